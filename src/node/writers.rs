//! The writers off the core loop: the log's syncs, the log mirror
//! (`logs/<id>.txt`) and the snapshot files. Only the first is on a
//! client's path, and it lets the core go on during an fsync: the server
//! answers from the state machine it holds, and a snapshot of any size is
//! written from a frozen image of it while the server goes on.

use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use log::{error, info};

use super::server::SnapshotJob;
use crate::kv::command_json;
use crate::metrics::{METRICS, seconds_since};
use crate::net::wake::WakingSender;
use crate::raft::{Entry, Index, LogWrite, Message, SnapshotMeta};
use crate::storage::mirror::Mirror;
use crate::storage::snapshot::Snapshots;

/// Log writes to make durable (an `Effect::Sync`), or made durable: the
/// last entry written, if any, and the messages that promise them.
pub struct SyncJob {
    pub seq: u64,
    pub written: Option<LogWrite>,
    pub messages: Vec<Message>,
}

/// Makes the node's log writes durable until the channel closes, one sync
/// for all the jobs queued meanwhile (group commit), and hands each batch
/// back in order. The replies the batch promised leave from here the moment
/// they are true (a follower's acknowledgement waits on no other thread);
/// requests go back with the batch, for the core loop to send. A failed
/// sync stops the process at once, as it does on the core loop: nothing
/// may be retried after a failed fsync.
pub fn log_syncer<E: std::fmt::Display>(
    sync: impl Fn() -> Result<(), E>,
    jobs: Receiver<SyncJob>,
    done: WakingSender<SyncJob>,
    answer: impl Fn(Message),
) {
    while let Ok(mut batch) = jobs.recv() {
        for next in jobs.try_iter() {
            // The newest write names the log's end as it is now; a sync
            // covers every write before it.
            batch.seq = next.seq;
            batch.written = next.written.or(batch.written);
            batch.messages.extend(next.messages);
        }
        // Nothing written since the last sync: the messages only waited
        // for the ones before them.
        if batch.written.is_some()
            && let Err(e) = sync()
        {
            error!("stopping at once: {e}; restart it once its disk is fine");
            std::process::exit(1);
        }
        let (replies, requests) = std::mem::take(&mut batch.messages).into_iter().partition(|m| !m.body.is_request());
        batch.messages = requests;
        replies.into_iter().for_each(&answer);
        // After the core loop stopped nobody listens, which is fine.
        let _ = done.send(batch);
    }
}

pub enum MirrorMsg {
    /// Applied entries, in order; those at `duplicates` get `"dup": true`.
    Applied { entries: Vec<Entry>, duplicates: Vec<Index> },
    /// The state machine started over from this snapshot.
    Restored(SnapshotMeta),
}

/// Mirrors applied entries until the channel closes. The mirror is for
/// people and scripts, not for recovery, so a failed write is logged and
/// the node goes on. It waits on the channel only while idle: under load it
/// writes what queued meanwhile, then sleeps a moment, so the core loop's
/// sends never have to wake it (a wake-up per applied batch cost about as
/// much CPU as the writing).
pub fn mirror(mut mirror: Mirror, inbox: Receiver<MirrorMsg>) {
    while let Ok(first) = inbox.recv() {
        let (mut next, mut unflushed) = (Some(first), 0);
        while let Some(msg) = next.take().or_else(|| inbox.try_recv().ok()) {
            let written = match msg {
                MirrorMsg::Applied { entries, duplicates } => entries.iter().try_for_each(|entry| {
                    let duplicate = duplicates.binary_search(&entry.index).is_ok();
                    mirror.append(entry.index, entry.term, &command_json(&entry.payload, duplicate))
                }),
                MirrorMsg::Restored(snapshot) => mirror.append_snapshot(snapshot.index, snapshot.term),
            };
            if let Err(e) = written {
                error!("cannot write to the log mirror: {e}");
            }
            unflushed += 1;
            let idle = inbox.is_empty();
            // Under a steady load, the file still sees every batch soon.
            if idle || unflushed == MIRROR_BATCH {
                if let Err(e) = mirror.flush() {
                    error!("cannot write to the log mirror: {e}");
                }
                unflushed = 0;
            }
            if idle {
                std::thread::sleep(MIRROR_PAUSE);
            }
        }
    }
}

/// How long the mirror lets applied entries gather between writes.
const MIRROR_PAUSE: Duration = Duration::from_millis(2);

/// At most this many applied batches share one write.
const MIRROR_BATCH: usize = 64;

/// The snapshot written, or the one that could not be.
pub type SnapshotOutcome = Result<SnapshotMeta, SnapshotMeta>;

/// Writes snapshots until the channel closes, telling the core loop of each.
pub fn snapshots(snapshots: Snapshots, jobs: Receiver<SnapshotJob>, done: WakingSender<SnapshotOutcome>) {
    for SnapshotJob { meta, membership, image } in jobs {
        let started = Instant::now();
        let data = image.encode();
        let outcome = match snapshots.save(meta, &membership, &data) {
            Ok(()) => {
                info!(
                    "snapshot at {}/{} taken ({} bytes, {} keys) in {:?}",
                    meta.index,
                    meta.term,
                    data.len(),
                    image.len(),
                    started.elapsed()
                );
                METRICS.snapshots.inc();
                METRICS.snapshot_seconds.observe(seconds_since(started));
                Ok(meta)
            }
            Err(e) => {
                error!("cannot take a snapshot: {e}");
                Err(meta)
            }
        };
        // After the core loop stopped nobody listens, which is fine.
        let _ = done.send(outcome);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use crossbeam_channel::unbounded;

    use super::*;
    use crate::net::wake::Wakeup;
    use crate::raft::Body;

    fn message(body: Body) -> Message {
        Message { from: 1, to: 0, term: 3, body }
    }

    /// A follower's acknowledgement promises the entries are on disk, so it
    /// must leave after the fsync that makes them so, never before.
    #[test]
    fn replies_leave_after_the_sync_and_requests_go_back_to_the_core() {
        let events = Arc::new(Mutex::new(Vec::new()));
        let (jobs_tx, jobs) = unbounded();
        let (done, done_rx) = unbounded();
        let done = WakingSender::new(done, Wakeup::new().unwrap().1);
        let reply = message(Body::RequestVoteReply { granted: true, pre_vote: false });
        let request =
            message(Body::RequestVote { last_log_index: 4, last_log_term: 3, pre_vote: false, transfer: false });
        let written = Some(LogWrite { index: 4, term: 3, cuts: 0 });
        jobs_tx.send(SyncJob { seq: 7, written, messages: vec![reply.clone(), request.clone()] }).unwrap();
        drop(jobs_tx);
        let (synced, answered) = (events.clone(), events.clone());
        log_syncer(
            move || {
                synced.lock().unwrap().push("sync".to_string());
                Ok::<_, String>(())
            },
            jobs,
            done,
            move |msg| answered.lock().unwrap().push(format!("answer {:?}", msg.body)),
        );
        assert_eq!(*events.lock().unwrap(), ["sync".to_string(), format!("answer {:?}", reply.body)]);
        let back: Vec<SyncJob> = done_rx.try_iter().collect();
        assert_eq!(back.len(), 1);
        assert_eq!((back[0].seq, back[0].written, &back[0].messages), (7, written, &vec![request]));
    }

    /// Messages that only waited for earlier writes need no sync of their own.
    #[test]
    fn a_batch_with_nothing_written_is_not_synced() {
        let (jobs_tx, jobs) = unbounded();
        let (done, done_rx) = unbounded();
        let done = WakingSender::new(done, Wakeup::new().unwrap().1);
        let reply = message(Body::RequestVoteReply { granted: false, pre_vote: true });
        jobs_tx.send(SyncJob { seq: 1, written: None, messages: vec![reply.clone()] }).unwrap();
        drop(jobs_tx);
        let answered = Arc::new(Mutex::new(Vec::new()));
        let sink = answered.clone();
        log_syncer(
            || -> Result<(), String> { panic!("nothing to sync") },
            jobs,
            done,
            move |msg| sink.lock().unwrap().push(msg),
        );
        assert_eq!(*answered.lock().unwrap(), vec![reply]);
        assert_eq!(done_rx.try_iter().count(), 1);
    }
}
