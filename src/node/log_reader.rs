//! The `log` op, served on a thread of its own from the stored log: a client
//! paging through large entries never holds up the core loop's heartbeats,
//! nor the applier.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crossbeam_channel::Receiver;
use log::error;

use super::Shared;
use super::replies::{Replier, ReplyTo};
use crate::kv::command_json;
use crate::protocol::{ErrorCode, LogEntryView, Reply};
use crate::raft::Index;
use crate::storage::LogView;

/// A `log` reply takes entries until their commands, as rendered, pass this
/// many bytes; the first entry always goes in, whatever its size. A client
/// pages on with `from`.
pub const LOG_REPLY_MAX_BYTES: usize = 1 << 20;

/// `log` requests waiting for the reader beyond this many get `busy`.
pub const QUEUE_LEN: usize = 64;

pub struct LogRequest {
    pub from: Index,
    pub limit: u64,
    pub reply_to: ReplyTo,
}

/// Serves requests until the channel closes.
pub fn run(view: LogView, shared: Arc<Shared>, replier: Replier, requests: Receiver<LogRequest>) {
    for LogRequest { from, limit, reply_to } in requests {
        // Applied entries are committed, durable and never change again.
        let applied = shared.last_applied.load(Ordering::Acquire);
        let (from, to) = (from.max(1), applied.min(from.saturating_add(limit).saturating_sub(1)));
        let mut entries = Vec::new();
        let mut bytes = 0;
        let read = view.visit(from, to, |entry| {
            let duplicate = shared.duplicates().contains(&entry.index);
            let command = command_json(&entry.payload, duplicate);
            bytes += command.len();
            if bytes > LOG_REPLY_MAX_BYTES && !entries.is_empty() {
                return false;
            }
            entries.push(LogEntryView { index: entry.index, term: entry.term, command });
            true
        });
        let reply = match read {
            Ok(()) => Reply::Log { entries },
            Err(e) => {
                error!("log request: {e}");
                Reply::error(ErrorCode::Busy, format!("cannot read the log: {e}"), shared.leader())
            }
        };
        replier.send(reply_to, &reply);
    }
}
