//! The apply loop: feeds committed entries to the KV state machine, mirrors
//! them to `logs/<id>.txt`, and answers the clients waiting on them.
//!
//! It runs on its own thread so that applying and mirroring never delay the
//! core loop's persistence and replication.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::{error, info, warn};

use super::replies::{Replier, ReplyTo};
use crate::kv::{KvStore, Value, command_json};
use crate::mirror::Mirror;
use crate::protocol::{ErrorCode, Reply};
use crate::raft::{Entry, Index, NodeId, Term};

pub enum ApplyMsg {
    /// Committed entries, in index order.
    Apply(Vec<Entry>),
    /// A client waits for the entry proposed at `index` in `term`.
    AwaitWrite { index: Index, term: Term, reply_to: ReplyTo, deadline: Instant },
    /// A confirmed linearizable read: serve it once `index` is applied.
    Read { index: Index, key: Value, reply_to: ReplyTo },
    /// This node stopped leading: writes it proposed may still commit under
    /// the next leader, or not; their clients must be told "unknown" now.
    LeadershipLost { leader: Option<NodeId> },
    /// The node is stopping: answer everybody and exit.
    Shutdown,
}

struct PendingWrite {
    term: Term,
    reply_to: ReplyTo,
    deadline: Instant,
}

pub struct Applier {
    kv: KvStore,
    mirror: Mirror,
    replier: Replier,
    last_applied: Arc<AtomicU64>,
    writes: BTreeMap<Index, PendingWrite>,
    reads: BTreeMap<Index, Vec<(Value, ReplyTo)>>,
}

impl Applier {
    pub fn new(mirror: Mirror, replier: Replier, last_applied: Arc<AtomicU64>) -> Applier {
        Applier { kv: KvStore::new(), mirror, replier, last_applied, writes: BTreeMap::new(), reads: BTreeMap::new() }
    }

    pub fn run(mut self, inbox: Receiver<ApplyMsg>) {
        loop {
            match inbox.recv_timeout(Duration::from_millis(50)) {
                Ok(ApplyMsg::Shutdown) | Err(RecvTimeoutError::Disconnected) => break,
                Ok(msg) => self.handle(msg),
                Err(RecvTimeoutError::Timeout) => {}
            }
            self.expire_writes(Instant::now());
        }
        self.fail_writes(ErrorCode::ShuttingDown, "node is shutting down; the write may or may not apply", None);
        let stopping = Reply::error(ErrorCode::ShuttingDown, "node is shutting down", None);
        for (_, reply_to) in std::mem::take(&mut self.reads).into_values().flatten() {
            self.replier.send(reply_to, &stopping);
        }
        if let Err(e) = self.mirror.flush() {
            error!("cannot flush the log mirror: {e}");
        }
    }

    fn handle(&mut self, msg: ApplyMsg) {
        match msg {
            ApplyMsg::Apply(entries) => self.apply(entries),
            ApplyMsg::AwaitWrite { index, term, reply_to, deadline } => {
                self.writes.insert(index, PendingWrite { term, reply_to, deadline });
            }
            ApplyMsg::Read { index, key, reply_to } => {
                if index <= self.applied() {
                    self.answer_read(&key, reply_to);
                } else {
                    self.reads.entry(index).or_default().push((key, reply_to));
                }
            }
            ApplyMsg::LeadershipLost { leader } => self.fail_writes(
                ErrorCode::Timeout,
                "leadership changed before the write committed; it may or may not apply (retry with the same client_id/seq)",
                leader,
            ),
            ApplyMsg::Shutdown => unreachable!("handled by run"),
        }
    }

    fn applied(&self) -> Index {
        self.last_applied.load(Ordering::Acquire)
    }

    fn apply(&mut self, entries: Vec<Entry>) {
        let Some(last) = entries.last().map(|e| e.index) else { return };
        for entry in entries {
            let reply = self.kv.apply(entry.index, &entry.payload);
            if let Err(e) = self.mirror.append(entry.index, entry.term, &command_json(&entry.payload)) {
                error!("cannot write entry {} to the log mirror: {e}", entry.index);
            }
            if let Some(pending) = self.writes.remove(&entry.index) {
                let reply = match reply {
                    Some(reply) if pending.term == entry.term => reply,
                    // Another leader's entry took this index: ours never committed.
                    _ => Reply::error(ErrorCode::NoLeader, "leadership changed; the write was not applied", None),
                };
                self.replier.send(pending.reply_to, &reply);
            }
        }
        if let Err(e) = self.mirror.flush() {
            error!("cannot flush the log mirror: {e}");
        }
        self.last_applied.store(last, Ordering::Release);
        let later = self.reads.split_off(&(last + 1));
        for (key, reply_to) in std::mem::replace(&mut self.reads, later).into_values().flatten() {
            self.answer_read(&key, reply_to);
        }
    }

    fn answer_read(&self, key: &Value, reply_to: ReplyTo) {
        let value = self.kv.get(key).cloned();
        self.replier.send(reply_to, &Reply::Get { value });
    }

    fn expire_writes(&mut self, now: Instant) {
        let expired: Vec<Index> =
            self.writes.iter().filter(|(_, w)| w.deadline <= now).map(|(&index, _)| index).collect();
        for index in expired {
            let write = self.writes.remove(&index).expect("listed above");
            warn!("write at index {index} not committed in time");
            let reply = Reply::error(
                ErrorCode::Timeout,
                "not committed in time; it may or may not apply (retry with the same client_id/seq)",
                None,
            );
            self.replier.send(write.reply_to, &reply);
        }
    }

    fn fail_writes(&mut self, code: ErrorCode, message: &str, leader: Option<NodeId>) {
        if !self.writes.is_empty() {
            info!("failing {} pending writes: {message}", self.writes.len());
        }
        for (_, write) in std::mem::take(&mut self.writes) {
            self.replier.send(write.reply_to, &Reply::error(code, message, leader));
        }
    }
}
