//! One simulated server: the node's own request layer (`raft_zmq::node::server`,
//! with the real `Raft` core, the shared Ready driver and the real
//! `KvStore`) over a disk model, given client requests as the client
//! endpoint gives them and carrying out its effects as the runtime does.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::Duration;

use raft_zmq::kv::KvStore;
use raft_zmq::node::server::{Effect, ProcessError, Server, ServerConfig, SnapshotJob};
use raft_zmq::raft::driver::DurableStore;
use raft_zmq::raft::{
    CoreConfig, Entry, Index, LogStore, LogWrite, Message, NodeId, Raft, Role, SnapshotMeta, SoftState,
};
use raft_zmq::wire::protocol::{ErrorCode, Reply, Request};

use super::history::{OpId, OpKind};
use super::register::{Held, Write, WriteResult, command_of, held, key_value, logged_write};
use super::schedule::Time;
use super::storage::{Crashed, Disk};

/// How a client request held by a node ended.
#[derive(Clone, Debug)]
pub enum Completion {
    /// `index` is the one the reply names: where the write was first
    /// applied; `effect` what the reply says it did there.
    WriteAcked { op: OpId, index: Index, effect: WriteResult },
    /// What the key held (the write that stored its value), if anything.
    ReadServed { op: OpId, value: Held },
    /// An error reply; `None`: no reply at all (the node crashed).
    Failed(OpId, Option<ErrorCode>),
}

/// One applied write command: the write it belongs to (by name), and
/// whether the session check skipped it as a retry already applied.
#[derive(Clone, Copy, Debug)]
pub struct Executed {
    pub index: Index,
    pub name: OpId,
    pub write: Write,
    pub duplicate: bool,
}

/// What one round of processing did, for the cluster to route and check.
#[derive(Default)]
pub struct Effects {
    pub sent: Vec<Message>,
    /// Role, term or leader after the round, when they changed in it.
    pub role: Option<SoftState>,
    /// Lowest index written to disk, if entries were written.
    pub wrote_from: Option<Index>,
    pub applied: Vec<Entry>,
    pub executed: Vec<Executed>,
    pub completed: Vec<Completion>,
    /// The node crashed between sending messages and syncing its write.
    pub torn_crash: bool,
    /// The node's state machine started over from this snapshot.
    pub restored: Option<SnapshotMeta>,
    /// A snapshot was written and the log compacted behind it.
    pub compacted: Option<SnapshotMeta>,
    /// Client requests sent on to the leader.
    pub forwarded: Vec<Forwarded>,
}

/// Every snapshot file any node wrote, by position: the state machine at
/// that index is the same on every node (state machine safety, which the
/// checker verifies), so a follower installing one reads it from here, as
/// the real one reads the file its transport staged.
pub type SnapshotRegistry = Rc<RefCell<BTreeMap<SnapshotMeta, Vec<u8>>>>;

/// A client request a follower's server sent on to the leader it knows,
/// as the client endpoint does.
pub struct Forwarded {
    pub op: OpId,
    pub leader: NodeId,
    pub request: Request,
}

/// Who a request's reply goes to: a client operation, or the harness
/// itself (a snapshot, a transfer or a membership change an operator asks for).
pub type Handle = Option<OpId>;

pub struct SimNode {
    cfg: CoreConfig,
    /// The running server, which owns the core, which owns the disk; `None`
    /// while crashed.
    server: Option<Server<Disk, Handle>>,
    /// The disk while the node is down.
    down_disk: Option<Disk>,
    /// Client operations handed to the server and not yet answered: a crash
    /// leaves them unanswered.
    in_flight: BTreeSet<OpId>,
    /// Bumped by every crash, so stale timers for a past life are ignored.
    pub incarnation: u64,
    /// This node's drifting clock: virtual time between two ticks.
    pub tick_period: Time,
    /// A paused process (GC, SIGSTOP) handles nothing until then.
    pub paused_until: Time,
    /// Role, term and leader as last reported: a tick or a message may
    /// change them, and the next round reports it.
    reported: Option<SoftState>,
    /// Syncs the server left to the runtime (`Effect::Sync`), oldest first:
    /// what they wrote, and the messages waiting for them.
    unsynced: Vec<PendingSync>,
    /// A `Synced` event is on its way for this incarnation.
    pub sync_scheduled: bool,
}

/// An `Effect::Sync` not carried out yet: the last entry it wrote, and the
/// messages waiting for it.
struct PendingSync {
    seq: u64,
    wrote: Option<LogWrite>,
    messages: Vec<Message>,
}

/// How long a request may wait before its client hears `timeout`, and a
/// stopping leader waits for its successor.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const HANDOVER_TIMEOUT: Duration = Duration::from_millis(500);

fn at(now: Time) -> Duration {
    Duration::from_micros(now)
}

/// The request a client operation sends.
pub fn request_of(op: OpId, kind: OpKind) -> Request {
    let write = |name: OpId, write: Write| {
        let logged = command_of(name, write);
        Request::Write { command: logged.command, client_id: logged.client_id, seq: logged.seq }
    };
    match kind {
        OpKind::Write(w) => write(op, w),
        OpKind::Retry(w, of) => write(of, w),
        OpKind::Read(key) => Request::Get { key: key_value(key) },
    }
}

impl SimNode {
    pub fn new(cfg: CoreConfig, disk: Disk, tick_period: Time) -> SimNode {
        let mut node = SimNode {
            cfg,
            server: None,
            down_disk: Some(disk),
            in_flight: BTreeSet::new(),
            incarnation: 0,
            tick_period,
            paused_until: 0,
            reported: None,
            unsynced: Vec::new(),
            sync_scheduled: false,
        };
        node.restart(node.cfg.seed);
        node
    }

    pub fn raft(&self) -> Option<&Raft<Disk>> {
        self.server.as_ref().map(Server::raft)
    }

    pub fn disk(&self) -> &Disk {
        match &self.server {
            Some(server) => server.raft().store(),
            None => self.down_disk.as_ref().expect("a node that is down keeps its disk"),
        }
    }

    pub fn has_unsynced(&self) -> bool {
        !self.unsynced.is_empty()
    }

    pub fn is_up(&self) -> bool {
        self.server.is_some()
    }

    pub fn applied(&self) -> Index {
        self.server.as_ref().map_or(0, |s| s.applied().index)
    }

    /// Hands a client request to the server, as the client endpoint does.
    pub fn submit(&mut self, op: OpId, kind: OpKind, now: Time, fx: &mut Effects) {
        let Some(server) = self.server.as_mut() else { return fx.completed.push(Completion::Failed(op, None)) };
        self.in_flight.insert(op);
        server.client(request_of(op, kind), Some(op), at(now));
    }

    /// A client request another node forwarded here.
    pub fn submit_forwarded(&mut self, op: OpId, request: Request, now: Time, fx: &mut Effects) {
        let Some(server) = self.server.as_mut() else { return fx.completed.push(Completion::Failed(op, None)) };
        self.in_flight.insert(op);
        server.forwarded(request, Some(op), at(now));
    }

    /// A request of the harness's own, whose reply nobody waits for.
    pub fn operator(&mut self, request: Request, now: Time) {
        if let Some(server) = self.server.as_mut() {
            server.client(request, None, at(now));
        }
    }

    pub fn tick(&mut self, now: Time) {
        if let Some(server) = self.server.as_mut() {
            // Only a sync can crash, and a tick writes nothing to the log.
            server.tick(at(now)).expect("a tick never syncs the log");
        }
    }

    pub fn step(&mut self, m: Message, now: Time) {
        if let Some(server) = self.server.as_mut() {
            server.peer(m, at(now));
        }
    }

    pub fn peer_unreachable(&mut self, peer: NodeId) {
        if let Some(server) = self.server.as_mut() {
            server.peer_unreachable(peer);
        }
    }

    /// Runs the server's Ready processing and carries out its effects. With
    /// `torn_crash`, its first write crashes the node after the round's
    /// messages left and before the sync. With `sync_now`, the syncs left
    /// to the runtime finish first, as the node's sync thread does them: one
    /// sync for all, then their messages in order.
    pub fn process(&mut self, torn_crash: bool, sync_now: bool, fx: &mut Effects) {
        let Some(server) = self.server.as_mut() else { return };
        if sync_now && !self.unsynced.is_empty() {
            server.store_mut().sync().expect("a sync on its own never crashes");
            let (mut last, mut written) = (0, None);
            for PendingSync { seq, wrote, messages } in self.unsynced.drain(..) {
                (last, written) = (seq, wrote.or(written));
                fx.sent.extend(messages);
            }
            server.synced(last, written);
        }
        server.store_mut().crash_before_sync = torn_crash;
        let outcome = server.process(&mut |m| fx.sent.push(m));
        let disk = server.store_mut();
        disk.crash_before_sync = false;
        fx.wrote_from = disk.wrote_from.take();
        match outcome {
            Ok(()) => {}
            Err(ProcessError::Storage(Crashed)) => {
                fx.torn_crash = true;
                return self.crash(fx);
            }
            Err(ProcessError::StateMachine(problem)) => panic!("node {}: {problem}", self.cfg.id),
        }
        let soft = server.raft().soft_state();
        if self.reported != Some(soft) {
            self.reported = Some(soft);
            fx.role = Some(soft);
        }
        self.carry_out(fx);
    }

    fn carry_out(&mut self, fx: &mut Effects) {
        let server = self.server.as_mut().expect("up");
        for effect in server.take_effects() {
            match effect {
                Effect::Reply(Some(op), reply) => {
                    self.in_flight.remove(&op);
                    fx.completed.push(completion(op, reply));
                }
                Effect::Forward { leader, request, handle: Some(op) } => {
                    self.in_flight.remove(&op);
                    fx.forwarded.push(Forwarded { op, leader, request });
                }
                Effect::Applied { entries, duplicates } => {
                    for entry in &entries {
                        if let Some((name, write)) = logged_write(entry) {
                            let duplicate = duplicates.contains(&entry.index);
                            fx.executed.push(Executed { index: entry.index, name, write, duplicate });
                        }
                    }
                    fx.applied.extend(entries);
                }
                Effect::Restored(snapshot) => fx.restored = Some(snapshot),
                Effect::Sync { seq, written, messages } => {
                    self.unsynced.push(PendingSync { seq, wrote: written, messages })
                }
                Effect::SaveSnapshot(job) => {
                    let SnapshotJob { meta: snapshot, image, .. } = *job;
                    server.store_mut().snapshots.borrow_mut().insert(snapshot, image.encode());
                    server.snapshot_saved(snapshot).expect("compaction never crashes");
                    fx.compacted = Some(snapshot);
                }
                // Operators' requests and replies, and what only a real runtime uses.
                Effect::Reply(None, _)
                | Effect::Forward { handle: None, .. }
                | Effect::ReadLog { .. }
                | Effect::ReadSnapshotFile { .. }
                | Effect::Members(_)
                | Effect::Identity { .. }
                | Effect::Revoked(_) => {}
            }
        }
    }

    /// Loses everything but the disk; held client requests get no answer.
    pub fn crash(&mut self, fx: &mut Effects) {
        let Some(server) = self.server.take() else { return };
        let mut disk = server.into_store();
        disk.lose_unsynced();
        self.unsynced.clear();
        self.sync_scheduled = false;
        self.down_disk = Some(disk);
        self.incarnation += 1;
        self.reported = None;
        let lost = std::mem::take(&mut self.in_flight);
        fx.completed.extend(lost.into_iter().map(|op| Completion::Failed(op, None)));
    }

    /// A clean stop (SIGTERM): the server hands leadership over and answers
    /// everyone it holds, then the process exits. Returns whether it may
    /// exit now; call again on later rounds until it may.
    pub fn stop(&mut self, now: Time, fx: &mut Effects) -> bool {
        let Some(server) = self.server.as_mut() else { return true };
        server.begin_stop(at(now));
        if !server.may_stop(at(now)) {
            return false;
        }
        server.shut_down().expect("a clean stop syncs without a torn write");
        self.carry_out(fx);
        self.crash(fx);
        true
    }

    /// Whether the node applied its own removal and no longer leads (a
    /// leader that removed itself hands over first): a real node exits then.
    pub fn must_exit(&self) -> bool {
        self.server.as_ref().is_some_and(|s| s.removed() && s.raft().soft_state().role != Role::Leader)
    }

    /// Replaces the disk by an empty one (a new machine, or a wiped one,
    /// under the same id) and starts a node on it that waits to be added.
    pub fn wipe(&mut self, seed: u64, fx: &mut Effects) {
        self.crash(fx);
        let snapshots = self.disk().snapshots.clone();
        self.down_disk = Some(Disk { snapshots, ..Disk::default() });
        self.restart(seed);
    }

    /// Starts a fresh process from what the disk holds: the state machine
    /// from the snapshot its log starts after, then the log.
    pub fn restart(&mut self, seed: u64) {
        let cfg = CoreConfig { seed, ..self.cfg.clone() };
        let disk = self.down_disk.take().expect("restarting a node that is down");
        let (hard_state, start, cluster) = (disk.hard_state(), disk.log_start(), disk.cluster);
        let mut kv = KvStore::new();
        if start.index > 0 {
            let image = disk.snapshots.borrow().get(&start).cloned().expect("a compacted log follows a snapshot");
            kv.restore(&image).expect("a snapshot the simulation took");
        }
        let server_cfg = ServerConfig {
            id: cfg.id,
            request_timeout: REQUEST_TIMEOUT,
            handover_timeout: HANDOVER_TIMEOUT,
            // The harness asks for snapshots (`Request::Snapshot`) at random.
            snapshot_entries: u64::MAX,
            curve: false,
            new_cluster_name: seed.max(1),
            // Mostly the node's way; now and then every write synced at once.
            sync_later: !seed.is_multiple_of(4),
        };
        let raft = Raft::new(cfg, disk, hard_state, start.index);
        self.server = Some(Server::new(server_cfg, raft, kv, start, cluster, 0));
    }
}

/// The client's view of a reply.
fn completion(op: OpId, reply: Reply) -> Completion {
    let acked = |index, effect| Completion::WriteAcked { op, index, effect };
    match reply {
        Reply::Put { index } => acked(index, WriteResult::Put),
        Reply::Delete { index, existed } => acked(index, WriteResult::Delete { existed }),
        Reply::Cas { index, swapped, value } => {
            acked(index, WriteResult::Cas { swapped, current: value.as_ref().map(held) })
        }
        Reply::Get { value } => Completion::ReadServed { op, value: value.as_ref().map(held) },
        Reply::Error { code, .. } => Completion::Failed(op, Some(code)),
        other => panic!("op {op} got {other:?}"),
    }
}
