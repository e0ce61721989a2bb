//! One simulated server: the real `Raft` core driven by the node's own Ready
//! driver (`raft_zmq::driver`), a disk model, the register state machine and
//! the client requests it holds.

use std::collections::BTreeMap;

/// Every snapshot any node took, by position: the state machine at that
/// index is the same on every node (state machine safety, which the checker
/// verifies), so a follower installing one takes its state from here.
use raft_zmq::driver::{Shell, run_ready};
use raft_zmq::raft::{
    Config, Entry, Index, LogStore, Membership, Message, NodeId, Payload, Raft, ReadState, Role, Snapshot, SnapshotMeta,
    SoftState, Term,
};

use super::history::{OpId, OpKind};
use super::register::{Applied, Image, Key, Register, Version, encode_write};
use super::rng::Rng;
use super::schedule::Time;
use super::storage::{Crashed, Disk};

/// How a client request held by a node ended.
#[derive(Clone, Copy, Debug)]
pub enum Completion {
    /// `index` is the one the reply names: where the write was first applied.
    WriteAcked {
        op: OpId,
        index: Index,
    },
    ReadServed {
        op: OpId,
        key: Key,
        version: Version,
    },
    Failed(OpId),
}

/// What one round of Ready processing did, for the cluster to route and check.
#[derive(Default)]
pub struct Effects {
    pub sent: Vec<Message>,
    pub roles: Vec<SoftState>,
    /// Lowest index written to disk, if entries were written.
    pub wrote_from: Option<Index>,
    pub applied: Vec<Entry>,
    pub completed: Vec<Completion>,
    /// The node crashed between sending `messages` and syncing its write.
    pub torn_crash: bool,
    /// The node's state machine started over from this snapshot.
    pub restored: Option<SnapshotMeta>,
    /// The membership in force changed to this.
    pub membership: Option<Membership>,
    /// Write commands applied: (entry index, what the state machine did).
    pub executed: Vec<(Index, Applied)>,
}

pub type SnapshotRegistry = BTreeMap<SnapshotMeta, Image>;

struct PendingRead {
    key: Key,
    /// Set once leadership is confirmed; served when applied reaches it.
    index: Option<Index>,
}

/// The state machine and the client requests a node holds: what a crash loses.
#[derive(Default)]
struct App {
    register: Register,
    applied: Index,
    /// Proposals awaiting their apply: index → (term, op).
    writes: BTreeMap<Index, (Term, OpId)>,
    /// Reads by ctx, which is the op id.
    reads: BTreeMap<OpId, PendingRead>,
    /// A membership applied (or restored) says this node was removed.
    removed: bool,
}

pub struct SimNode {
    cfg: Config,
    /// The running core, which owns the disk; `None` while crashed.
    raft: Option<Raft<Disk>>,
    /// The disk while the node is down.
    down_disk: Option<Disk>,
    /// Bumped by every crash, so stale timers for a past life are ignored.
    pub incarnation: u64,
    /// This node's drifting clock: virtual time between two ticks.
    pub tick_period: Time,
    /// A paused process (GC, SIGSTOP) handles nothing until then.
    pub paused_until: Time,
    app: App,
}

/// The node's side of the shared Ready driver, for one run of it.
struct SimShell<'a> {
    id: NodeId,
    app: &'a mut App,
    fx: &'a mut Effects,
    snapshots: &'a SnapshotRegistry,
}

impl<S> Shell<S> for SimShell<'_> {
    fn send(&mut self, msg: Message) {
        self.fx.sent.push(msg);
    }

    fn soft_state(&mut self, soft: SoftState) {
        self.fx.roles.push(soft);
    }

    fn membership(&mut self, membership: &Membership) {
        self.fx.membership = Some(membership.clone());
    }

    fn restore(&mut self, snapshot: &Snapshot, _: &S) {
        self.app.removed |= snapshot.membership.removed.contains(&self.id);
        let snapshot = snapshot.meta;
        self.app.register = Register::restore(self.snapshots.get(&snapshot).expect("every snapshot sent was taken"));
        self.app.applied = snapshot.index;
        // Whether these made it into the snapshot cannot be told: unknown.
        let later = self.app.writes.split_off(&(snapshot.index + 1));
        let covered = std::mem::replace(&mut self.app.writes, later);
        self.fx.completed.extend(covered.into_values().map(|(_, op)| Completion::Failed(op)));
        self.fx.restored = Some(snapshot);
    }

    fn apply(&mut self, entries: Vec<Entry>) {
        for entry in entries {
            if let Payload::Membership(membership) = &entry.payload {
                self.app.removed |= membership.removed.contains(&self.id);
            }
            let applied = self.app.register.apply(&entry);
            self.app.applied = entry.index;
            if let Some((term, op)) = self.app.writes.remove(&entry.index) {
                self.fx.completed.push(match &applied {
                    Some(applied) if term == entry.term => Completion::WriteAcked { op, index: applied.index },
                    _ => Completion::Failed(op),
                });
            }
            self.fx.executed.extend(applied.map(|applied| (entry.index, applied)));
            self.fx.applied.push(entry);
        }
    }

    fn read_ready(&mut self, read: ReadState) {
        if let Some(pending) = self.app.reads.get_mut(&read.ctx) {
            pending.index = Some(read.index);
        }
    }

    fn read_failed(&mut self, ctx: u64) {
        if self.app.reads.remove(&ctx).is_some() {
            self.fx.completed.push(Completion::Failed(ctx));
        }
    }
}

impl SimNode {
    pub fn new(cfg: Config, disk: Disk, tick_period: Time) -> SimNode {
        let hard_state = disk.hard_state();
        let raft = Raft::new(cfg.clone(), disk, hard_state, 0);
        SimNode {
            cfg,
            raft: Some(raft),
            down_disk: None,
            incarnation: 0,
            tick_period,
            paused_until: 0,
            app: App::default(),
        }
    }

    pub fn raft(&self) -> Option<&Raft<Disk>> {
        self.raft.as_ref()
    }

    pub fn raft_mut(&mut self) -> Option<&mut Raft<Disk>> {
        self.raft.as_mut()
    }

    pub fn disk(&self) -> &Disk {
        match &self.raft {
            Some(raft) => raft.store(),
            None => self.down_disk.as_ref().expect("a node that is down keeps its disk"),
        }
    }

    pub fn is_up(&self) -> bool {
        self.raft.is_some()
    }

    pub fn applied(&self) -> Index {
        self.app.applied
    }

    /// Hands a client request to the core; a refusal fails it at once.
    pub fn submit(&mut self, op: OpId, kind: OpKind, fx: &mut Effects) {
        let Some(raft) = self.raft.as_mut() else { return fx.completed.push(Completion::Failed(op)) };
        match kind {
            OpKind::Write(_) | OpKind::Retry(..) => {
                let command = match kind {
                    OpKind::Retry(key, of) => encode_write(key, of),
                    OpKind::Write(key) | OpKind::Read(key) => encode_write(key, op),
                };
                match raft.propose(command) {
                    Ok((index, term)) => {
                        // A slot re-proposed after a truncation: the old request lost it.
                        if let Some((_, displaced)) = self.app.writes.insert(index, (term, op)) {
                            fx.completed.push(Completion::Failed(displaced));
                        }
                    }
                    Err(_) => fx.completed.push(Completion::Failed(op)),
                }
            }
            OpKind::Read(key) => match raft.read_index(op) {
                Ok(()) => {
                    self.app.reads.insert(op, PendingRead { key, index: None });
                }
                Err(_) => fx.completed.push(Completion::Failed(op)),
            },
        }
    }

    /// Runs the shared Ready driver until the core is quiet. With
    /// probability `torn_crash`, its first write crashes the node after the
    /// round's `messages` left and before the sync.
    pub fn process(&mut self, rng: &mut Rng, torn_crash: f64, snapshots: &SnapshotRegistry, fx: &mut Effects) {
        let Some(raft) = self.raft.as_mut() else { return };
        raft.store_mut().crash_before_sync = torn_crash > 0.0 && rng.chance(torn_crash);
        let id = self.cfg.id;
        let outcome = run_ready(raft, &mut SimShell { id, app: &mut self.app, fx, snapshots });
        let disk = raft.store_mut();
        disk.crash_before_sync = false;
        fx.wrote_from = disk.wrote_from.take();
        match outcome {
            Ok(()) => self.serve_reads(fx),
            Err(Crashed) => {
                fx.torn_crash = true;
                self.crash(fx);
            }
        }
    }

    fn serve_reads(&mut self, fx: &mut Effects) {
        let app = &mut self.app;
        let ready: Vec<OpId> =
            app.reads.iter().filter(|(_, r)| r.index.is_some_and(|i| i <= app.applied)).map(|(&op, _)| op).collect();
        for op in ready {
            let key = app.reads.remove(&op).expect("listed above").key;
            fx.completed.push(Completion::ReadServed { op, key, version: app.register.get(key) });
        }
    }

    /// Loses everything but the disk; held client requests get no answer.
    pub fn crash(&mut self, fx: &mut Effects) {
        let Some(raft) = self.raft.take() else { return };
        self.down_disk = Some(raft.into_store());
        self.incarnation += 1;
        let app = std::mem::take(&mut self.app);
        let writes = app.writes.into_values().map(|(_, op)| op);
        fx.completed.extend(writes.chain(app.reads.into_keys()).map(Completion::Failed));
    }

    /// Whether the node applied its own removal and no longer leads (a
    /// leader that removed itself hands over first): a real node exits then.
    pub fn must_exit(&self) -> bool {
        self.raft().is_some_and(|r| (self.app.removed || r.removed()) && r.soft_state().role != Role::Leader)
    }

    /// Replaces the disk by an empty one (a new machine, or a wiped one,
    /// under the same id) and starts a node on it that waits to be added.
    pub fn wipe(&mut self, seed: u64, fx: &mut Effects) {
        self.crash(fx);
        self.down_disk = Some(Disk::default());
        self.app = App::default();
        self.restart(seed, &SnapshotRegistry::new());
    }

    /// Starts a fresh process from what the disk holds: the state machine
    /// from the snapshot its log starts after, then the log.
    pub fn restart(&mut self, seed: u64, snapshots: &SnapshotRegistry) {
        let cfg = Config { seed, ..self.cfg.clone() };
        let disk = self.down_disk.take().expect("restarting a node that is down");
        let (hard_state, start) = (disk.hard_state(), disk.log_start());
        // The membership the log starts with is committed.
        self.app.removed = disk.memberships()[0].1.removed.contains(&self.cfg.id);
        if start.index > 0 {
            self.app.register = Register::restore(snapshots.get(&start).expect("a compacted log follows a snapshot"));
            self.app.applied = start.index;
        }
        self.raft = Some(Raft::new(cfg, disk, hard_state, start.index));
    }

    /// Snapshots the state machine and compacts the log up to what was
    /// applied, as the node does every `snapshot_entries` entries.
    pub fn compact(&mut self, snapshots: &mut SnapshotRegistry) -> Option<SnapshotMeta> {
        let raft = self.raft.as_mut()?;
        let applied = self.app.applied;
        if applied <= raft.store().log_start().index {
            return None;
        }
        let snapshot = SnapshotMeta { index: applied, term: raft.store().term(applied) };
        snapshots.insert(snapshot, self.app.register.snapshot());
        raft.store_mut().store.compact(applied);
        Some(snapshot)
    }
}
