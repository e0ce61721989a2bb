//! The `log` and `snapshot_data` ops, served on a thread of their own from
//! the stored log and the snapshot files: a client paging through large
//! entries or copying a snapshot never holds up the core loop's heartbeats,
//! nor the applier.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crossbeam_channel::Receiver;
use log::error;

use super::Shared;
use super::replies::ReplyTo;
use crate::kv::command_json;
use crate::net::wake::WakingSender;
use crate::raft::Index;
use crate::storage::LogView;
use crate::storage::snapshot::Snapshots;
use crate::wire::protocol::{ErrorCode, LogEntryView, Reply};

/// A `log` reply takes entries until their commands, as rendered, pass this
/// many bytes; the first entry always goes in, whatever its size. A client
/// pages on with `from`.
pub const LOG_REPLY_MAX_BYTES: usize = 1 << 20;

/// `log` requests waiting for the reader beyond this many get `busy`.
pub const QUEUE_LEN: usize = 64;

/// A `snapshot_data` reply carries at most this many bytes of the file.
pub const SNAPSHOT_PIECE_BYTES: usize = 1 << 20;

pub enum DiskRead {
    Log { from: Index, limit: u64, reply_to: ReplyTo },
    Snapshot { index: Option<Index>, offset: u64, reply_to: ReplyTo },
}

impl DiskRead {
    pub fn reply_to(self) -> ReplyTo {
        match self {
            DiskRead::Log { reply_to, .. } | DiskRead::Snapshot { reply_to, .. } => reply_to,
        }
    }
}

/// Serves requests until the channel closes; the replies go to the core
/// loop, which owns the client endpoint.
pub fn run(
    view: LogView,
    snapshots: Snapshots,
    shared: Arc<Shared>,
    replies: WakingSender<(ReplyTo, Reply)>,
    requests: Receiver<DiskRead>,
) {
    for request in requests {
        let reply = match request {
            DiskRead::Log { from, limit, reply_to } => (reply_to, read_log(&view, &shared, from, limit)),
            DiskRead::Snapshot { index, offset, reply_to } => {
                let reply = read_snapshot(&snapshots, index, offset)
                    .unwrap_or_else(|message| Reply::error(ErrorCode::BadRequest, message, shared.leader()));
                (reply_to, reply)
            }
        };
        // After the core loop stopped nobody listens, which is fine.
        let _ = replies.send(reply);
    }
}

/// A piece of the snapshot file at `index` (the newest if `None`).
fn read_snapshot(snapshots: &Snapshots, index: Option<Index>, offset: u64) -> Result<Reply, String> {
    let meta =
        snapshots.find(index).map_err(|e| format!("cannot list snapshots: {e}"))?.ok_or_else(|| match index {
            Some(index) => format!("no snapshot at index {index} (a newer one replaced it? take one with `snapshot`)"),
            None => "this node has no snapshot yet (take one with `snapshot`)".to_string(),
        })?;
    let path = snapshots.path(meta);
    let unreadable = |e: std::io::Error| format!("cannot read snapshot {}: {e}", path.display());
    let mut file = File::open(&path).map_err(unreadable)?;
    let total = file.metadata().map_err(unreadable)?.len();
    if offset > total {
        return Err(format!("offset {offset} is past the snapshot's {total} bytes"));
    }
    let mut data = vec![0; SNAPSHOT_PIECE_BYTES.min((total - offset) as usize)];
    file.seek(SeekFrom::Start(offset)).and_then(|_| file.read_exact(&mut data)).map_err(unreadable)?;
    Ok(Reply::SnapshotData { index: meta.index, term: meta.term, total, offset, data })
}

fn read_log(view: &LogView, shared: &Shared, from: Index, limit: u64) -> Reply {
    // Applied entries are committed, durable and never change again.
    let applied = shared.last_applied.load(Ordering::Acquire);
    let (from, to) = (from.max(1), applied.min(from.saturating_add(limit).saturating_sub(1)));
    let mut entries = Vec::new();
    let mut bytes = 0;
    let read = view.duplicates(from, to).and_then(|duplicates| {
        view.visit(from, to, |entry| {
            let command = command_json(&entry.payload, duplicates.contains(&entry.index));
            bytes += command.len();
            if bytes > LOG_REPLY_MAX_BYTES && !entries.is_empty() {
                return false;
            }
            entries.push(LogEntryView { index: entry.index, term: entry.term, command });
            true
        })
    });
    match read {
        Ok(()) => Reply::Log { entries },
        Err(e) => {
            error!("log request: {e}");
            Reply::error(ErrorCode::Busy, format!("cannot read the log: {e}"), shared.leader())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{Command, KvStore, LoggedCommand, Value};
    use crate::raft::{Entry, Payload};
    use crate::storage::Storage;

    /// The same write twice in the log, the second skipped by the session
    /// check (a retry across a change of leader): after a restart, with the
    /// state machine past both (as from a snapshot), `log` still marks it.
    #[test]
    fn a_duplicate_is_still_marked_after_a_restart() {
        let tmp = tempfile::tempdir().unwrap();
        let put = Command::Put { key: Value::Str("k".into()), value: Value::Str("v".into()) };
        let write =
            Payload::Command(LoggedCommand { command: put, client_id: Some("c".into()), seq: Some(1) }.encode().into());
        let entries: Vec<Entry> = (1..=2).map(|index| Entry { index, term: 1, payload: write.clone() }).collect();
        {
            let (mut storage, _) = Storage::open(tmp.path()).unwrap();
            storage.write(None, &entries).unwrap();
            storage.sync().unwrap();
            let mut kv = KvStore::new();
            let duplicates: Vec<Index> = entries
                .iter()
                .filter(|e| kv.apply(e.index, &e.payload).is_some_and(|a| a.duplicate))
                .map(|e| e.index)
                .collect();
            assert_eq!(duplicates, [2]);
            storage.duplicate_marks().mark(&duplicates).unwrap();
        }
        let (storage, _) = Storage::open(tmp.path()).unwrap();
        let shared = Shared::new();
        shared.last_applied.store(2, Ordering::Release);
        let Reply::Log { entries } = read_log(&storage.log_view(), &shared, 1, 10) else { panic!("a log reply") };
        let marked: Vec<bool> = entries.iter().map(|e| e.command.ends_with(r#""dup":true}"#)).collect();
        assert_eq!(marked, [false, true]);
    }
}
