//! The apply loop: feeds committed entries to the KV state machine, mirrors
//! them to `logs/<id>.txt`, answers the clients waiting on them, and
//! snapshots the state machine every `snapshot_entries` entries (or when
//! asked), so that a restart loads the snapshot and replays only the entries
//! after it.
//!
//! It runs on its own thread so that applying and mirroring never delay the
//! core loop's persistence and replication.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use log::{error, info, warn};

use super::Shared;
use super::replies::{Replier, ReplyTo};
use crate::kv::{KvStore, Value, command_json};
use crate::lock;
use crate::metrics::{METRICS, seconds_since};
use crate::mirror::Mirror;
use crate::protocol::{ErrorCode, Reply};
use crate::raft::{Entry, Index, NodeId, Payload, SnapshotMeta, Term};
use crate::sessions::Verdict;
use crate::snapshot::Snapshots;

pub enum ApplyMsg {
    /// Committed entries, in index order.
    Apply(Vec<Entry>),
    /// The state machine starts over from the snapshot the core loop just
    /// installed.
    Restore(SnapshotMeta),
    /// A client waits for the entry proposed at `index` in `term`. A retry
    /// may wait on an entry that was applied meanwhile: it is answered from
    /// the session table by its `session` (client_id, seq).
    AwaitWrite { index: Index, term: Term, session: Option<(String, u64)>, reply_to: ReplyTo, deadline: Instant },
    /// Snapshot the state machine now (the `snapshot` op).
    Snapshot { reply_to: ReplyTo },
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

/// When and where the applier snapshots the state machine.
pub struct SnapshotPolicy {
    pub snapshots: Snapshots,
    /// Snapshot once this many entries were applied since the last one.
    pub every: u64,
    /// The newest snapshot on disk (index 0: none).
    pub last: SnapshotMeta,
    /// Tells the core loop of each new snapshot.
    pub taken: Sender<SnapshotMeta>,
}

/// This node, and how to stop it once it applies its own removal (as an
/// etcd member does: a removed node has no business running).
pub struct Removal {
    pub id: NodeId,
    pub stop: Sender<()>,
}

pub struct Applier {
    kv: KvStore,
    mirror: Mirror,
    snapshot: SnapshotPolicy,
    /// Index and term of the last entry applied.
    applied: SnapshotMeta,
    replier: Replier,
    shared: Arc<Shared>,
    removal: Removal,
    /// Clients waiting on each index: the proposer, and retries of it.
    writes: BTreeMap<Index, Vec<PendingWrite>>,
    reads: BTreeMap<Index, Vec<(Value, ReplyTo)>>,
}

impl Applier {
    /// An applier whose state machine `kv` is at `snapshot.last` (restored
    /// from that snapshot, or empty at index 0).
    pub fn new(
        kv: KvStore,
        mut mirror: Mirror,
        snapshot: SnapshotPolicy,
        replier: Replier,
        shared: Arc<Shared>,
        removal: Removal,
    ) -> Applier {
        let applied = snapshot.last;
        // A power loss may have cost the mirror lines the snapshot covers.
        if let Err(e) = mirror.append_snapshot(applied.index, applied.term) {
            error!("cannot write snapshot {} to the log mirror: {e}", applied.index);
        }
        shared.last_applied.store(applied.index, Ordering::Release);
        shared.snapshot_index.store(applied.index, Ordering::Release);
        METRICS.applied_index.set(applied.index as i64);
        METRICS.snapshot_index.set(applied.index as i64);
        Applier {
            kv,
            mirror,
            snapshot,
            applied,
            replier,
            shared,
            removal,
            writes: BTreeMap::new(),
            reads: BTreeMap::new(),
        }
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
            ApplyMsg::Restore(snapshot) => self.restore(snapshot),
            ApplyMsg::Snapshot { reply_to } => {
                if self.applied.index > self.snapshot.last.index {
                    self.take_snapshot();
                }
                let reply = Reply::Snapshot { index: self.snapshot.last.index };
                self.replier.send(reply_to, &reply);
            }
            ApplyMsg::AwaitWrite { index, term, session, reply_to, deadline } => {
                if index > self.applied() {
                    self.writes.entry(index).or_default().push(PendingWrite { term, reply_to, deadline });
                    return;
                }
                let verdict = session.map(|(client_id, seq)| lock(&self.kv.sessions()).check(&client_id, seq));
                let reply = match verdict {
                    Some(Verdict::Retry(reply)) => reply,
                    _ => Reply::error(
                        ErrorCode::Timeout,
                        "the write's log slot was applied with another entry; it may or may not apply \
                         (retry with the same client_id/seq)",
                        None,
                    ),
                };
                self.replier.send(reply_to, &reply);
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
        self.shared.last_applied.load(Ordering::Acquire)
    }

    fn apply(&mut self, entries: Vec<Entry>) {
        let Some(last) = entries.last().map(|e| e.index) else { return };
        let started = Instant::now();
        METRICS.apply_entries.observe(entries.len() as f64);
        for entry in entries {
            let applied = self.kv.apply(entry.index, &entry.payload);
            self.applied = SnapshotMeta { index: entry.index, term: entry.term };
            let duplicate = applied.as_ref().is_some_and(|a| a.duplicate);
            if duplicate {
                self.shared.duplicates().insert(entry.index);
            }
            if let Err(e) = self.mirror.append(entry.index, entry.term, &command_json(&entry.payload, duplicate)) {
                error!("cannot write entry {} to the log mirror: {e}", entry.index);
            }
            if let Payload::Membership(membership) = &entry.payload
                && membership.removed.contains(&self.removal.id)
            {
                info!(
                    "node {}: removed from the cluster (membership entry {}); stopping",
                    self.removal.id, entry.index
                );
                let _ = self.removal.stop.try_send(());
            }
            for pending in self.writes.remove(&entry.index).into_iter().flatten() {
                let reply = match (&applied, &entry.payload) {
                    (_, Payload::Membership(_)) if pending.term == entry.term => {
                        Reply::Membership { index: entry.index }
                    }
                    (Some(applied), _) if pending.term == entry.term => applied.reply.clone(),
                    // Another leader's entry took this index: ours never committed.
                    _ => Reply::error(ErrorCode::NoLeader, "leadership changed; the write was not applied", None),
                };
                self.replier.send(pending.reply_to, &reply);
            }
        }
        if let Err(e) = self.mirror.flush() {
            error!("cannot flush the log mirror: {e}");
        }
        self.shared.last_applied.store(last, Ordering::Release);
        METRICS.applied_index.set(last as i64);
        METRICS.apply_seconds.observe(seconds_since(started));
        if self.applied.index - self.snapshot.last.index >= self.snapshot.every {
            self.take_snapshot();
        }
        self.answer_reads_up_to(last);
    }

    /// Starts the state machine over from the snapshot the core loop
    /// installed (from the leader). A node that cannot read the file it
    /// just made durable has a broken disk: it stops.
    fn restore(&mut self, snapshot: SnapshotMeta) {
        let restored = self.snapshot.snapshots.load(snapshot).map_err(|e| e.to_string());
        if let Err(problem) = restored.and_then(|data| self.kv.restore(&data)) {
            error!("cannot load snapshot {}/{}: {problem}; stopping at once", snapshot.index, snapshot.term);
            std::process::exit(1);
        }
        info!(
            "state machine restored from the leader's snapshot {}/{} ({} keys)",
            snapshot.index,
            snapshot.term,
            self.kv.len()
        );
        if let Err(e) = self.mirror.append_snapshot(snapshot.index, snapshot.term).and_then(|()| self.mirror.flush()) {
            error!("cannot write snapshot {} to the log mirror: {e}", snapshot.index);
        }
        self.applied = snapshot;
        self.snapshot.last = snapshot;
        self.shared.last_applied.store(snapshot.index, Ordering::Release);
        self.shared.snapshot_index.store(snapshot.index, Ordering::Release);
        METRICS.applied_index.set(snapshot.index as i64);
        METRICS.snapshot_index.set(snapshot.index as i64);
        self.answer_reads_up_to(snapshot.index);
    }

    /// Writes the state machine as it stands to a new snapshot file. A node
    /// that cannot is not harmed (the log still holds everything), so a
    /// failure is logged and retried at the next occasion.
    fn take_snapshot(&mut self) {
        let started = Instant::now();
        let data = self.kv.snapshot();
        match self.snapshot.snapshots.save(self.applied, &data) {
            Ok(()) => {
                info!(
                    "snapshot at {}/{} taken ({} bytes, {} keys) in {:?}",
                    self.applied.index,
                    self.applied.term,
                    data.len(),
                    self.kv.len(),
                    started.elapsed()
                );
                self.snapshot.last = self.applied;
                self.shared.snapshot_index.store(self.applied.index, Ordering::Release);
                METRICS.snapshots.inc();
                METRICS.snapshot_seconds.observe(seconds_since(started));
                METRICS.snapshot_index.set(self.applied.index as i64);
                // The core loop compacts the log behind it; if it is gone, so is the node.
                let _ = self.snapshot.taken.send(self.applied);
            }
            Err(e) => error!("cannot take a snapshot: {e}"),
        }
    }

    fn answer_reads_up_to(&mut self, applied: Index) {
        let later = self.reads.split_off(&(applied + 1));
        for (key, reply_to) in std::mem::replace(&mut self.reads, later).into_values().flatten() {
            self.answer_read(&key, reply_to);
        }
    }

    fn answer_read(&self, key: &Value, reply_to: ReplyTo) {
        let value = self.kv.get(key).cloned();
        self.replier.send(reply_to, &Reply::Get { value });
    }

    fn expire_writes(&mut self, now: Instant) {
        let mut expired = Vec::new();
        self.writes.retain(|index, waiting| {
            let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(waiting).into_iter().partition(|w| w.deadline <= now);
            expired.extend(gone.into_iter().map(|w| (*index, w)));
            *waiting = kept;
            !waiting.is_empty()
        });
        for (index, write) in expired {
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
        let writes: Vec<PendingWrite> = std::mem::take(&mut self.writes).into_values().flatten().collect();
        if !writes.is_empty() {
            info!("failing {} pending writes: {message}", writes.len());
        }
        for write in writes {
            self.replier.send(write.reply_to, &Reply::error(code, message, leader));
        }
    }
}
