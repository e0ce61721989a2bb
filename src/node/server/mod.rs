//! The node's request layer, without I/O: the Raft core, the key-value
//! state machine and every decision about client requests, in one value
//! that the runtime (`super::core_loop`) and the simulator drive alike.
//!
//! It takes inputs — time, peer messages, client requests with an opaque
//! reply handle `H`, snapshots saved — and returns [`Effect`]s for the
//! runtime to carry out (replies, mirror lines, snapshots to write, members
//! to connect to). The core's `Ready`s go through the one driver
//! ([`crate::raft::driver::run_ready`]); its messages leave through the `send`
//! the caller of [`Server::process`] passes, at the moment the driver says,
//! so a leader's AppendEntries still leave before its own fsync.
//!
//! What it decides, and where a client write goes:
//! 0. forwarding: on a follower, a request that needs the leader goes to
//!    the leader it knows ([`Effect::Forward`]), or is answered `no_leader`;
//! 1. admission: `busy` when too much is in flight or the disk is low;
//! 2. sessions: a decided (client_id, seq) is answered from the session
//!    table, a pending one waits on its entry, a new one is proposed;
//! 3. once its entry applies, the waiter gets the state machine's reply;
//!    `timeout` when leadership changes or the node stops first (the entry
//!    may still commit), `no_leader` only when nothing can have applied.

mod contact;
mod proposals;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use log::{debug, info, warn};

use crate::config::Member;
use crate::kv::{KvImage, KvStore, LoggedCommand, Value, decided};
use crate::metrics::METRICS;
use crate::raft::driver::{self, ReadySink, run_ready};
use crate::raft::{
    Body, ChangeError, Entry, Index, LogWrite, Membership, MembershipChange, Message, NodeId, NotLeader, Payload, Raft,
    ReadState, Role, SnapshotInfo, SnapshotMeta, SoftState, Term, TransferError,
};
use crate::wire::protocol::{ErrorCode, Reply, Request, StatusInfo};

use crate::wire::members::{check_new_member, context_of, member_infos, members_of};
use contact::LastContact;
pub use proposals::{MAX_UNAPPLIED_BYTES, MAX_UNAPPLIED_ENTRIES};
use proposals::{Proposals, Session, Waiter};

/// Time since the node started, as the runtime (or the simulator) tells it.
pub type Time = Duration;

/// Reads waiting for their leadership confirmation; more get `busy`.
pub const MAX_PENDING_READS: usize = 10_000;

pub struct ServerConfig {
    pub id: NodeId,
    /// How long a write or read may wait before its client hears `timeout`.
    pub request_timeout: Duration,
    /// How long a stopping leader waits to see a new leader take over, and
    /// a `transfer_leader` client waits for the new leader.
    pub handover_timeout: Duration,
    /// Snapshot once this many entries were applied since the last one.
    pub snapshot_entries: u64,
    /// The cluster uses CURVE: new members need a public key.
    pub curve: bool,
    /// The name this node gives a new cluster if it is its first leader
    /// (never 0): drawn at random by the runtime ([`random_cluster_name`]),
    /// from the seed by the simulator.
    pub new_cluster_name: u64,
    /// Make a leader's log writes durable off the server's thread
    /// ([`Effect::Sync`]), so that it goes on meanwhile (asynchronous
    /// storage writes): it replicates, commits and answers while it syncs.
    /// A follower syncs in the Ready cycle all the same (once the syncs
    /// from when it led are done). Its work is the entries its leader
    /// sends, in order, and the hand-off to another thread and back, to
    /// send the acknowledgement, costs more than the wait it saves.
    pub sync_later: bool,
}

/// What the server needs of its durable side beyond the Ready driver's.
pub trait NodeStorage: driver::DurableStore {
    /// Counts `bytes` about to be proposed against the disk's reserve, so
    /// that one large batch cannot eat it between two checks. `Err` (why)
    /// while the disk is low on space: nothing may be proposed.
    fn reserve(&mut self, bytes: u64) -> Result<(), String>;
    /// Low on space: appended entries are not taken either.
    fn low_on_space(&self) -> bool;
    /// Looks at the disk (once a tick); whether a leader low on space should
    /// hand leadership to a follower now.
    fn check_space(&mut self) -> bool;
    /// Leadership was handed over for lack of space.
    fn handed_over(&mut self);
    /// Alarms an operator must act on, and the bytes the state dir takes.
    fn disk_status(&self) -> (Vec<String>, u64);
    /// A snapshot of the state machine is on disk: the log may be
    /// compacted behind it, and it is what a lagging follower is sent.
    fn snapshot_saved(&mut self, snapshot: SnapshotMeta) -> Result<(), Self::Error>;
    /// The state machine's bytes in the snapshot `snapshot`, installed from
    /// the leader.
    fn load_snapshot(&self, snapshot: SnapshotMeta) -> Result<Vec<u8>, String>;
    /// The cluster's name, once this node knows it is committed.
    fn record_cluster(&mut self, cluster: u64) -> Result<(), Self::Error>;
}

/// A snapshot to write: where, the membership in force there, and the
/// state machine as of there.
pub struct SnapshotJob {
    pub meta: SnapshotMeta,
    pub membership: Membership,
    pub image: KvImage,
}

/// What the runtime carries out for the server.
pub enum Effect<H> {
    Reply(H, Reply),
    /// Send `request` to `leader` on the client's behalf (this node follows
    /// it) and pass its reply on to `handle`; the runtime answers `timeout`
    /// if the leader does not in time, since the request may have applied.
    Forward {
        leader: NodeId,
        request: Request,
        handle: H,
    },
    /// Committed entries applied to the state machine, in order; those at
    /// `duplicates` were skipped by the session check (the mirror and the
    /// `log` op mark them `"dup": true`).
    Applied {
        entries: Vec<Entry>,
        duplicates: Vec<Index>,
    },
    /// The state machine started over from this snapshot (from the leader).
    Restored(SnapshotMeta),
    /// Write this snapshot, off the server's thread; then call
    /// [`Server::snapshot_saved`] (or `snapshot_failed`).
    SaveSnapshot(Box<SnapshotJob>),
    /// The `log` op: committed entries from the stored log.
    ReadLog {
        from: Index,
        limit: u64,
        handle: H,
    },
    /// The `snapshot_data` op: a piece of a snapshot file.
    ReadSnapshotFile {
        index: Option<Index>,
        offset: u64,
        handle: H,
    },
    /// The members changed: their endpoints and keys, to connect to.
    Members(Vec<Member>),
    /// The removal of these nodes is committed: their keys are let in
    /// nowhere from now on.
    Revoked(Vec<NodeId>),
    /// What the wire speaks for (see `transport::Wire`): the cluster's
    /// committed name (0: not yet), the name the log holds uncommitted, and
    /// the fingerprint of the first membership.
    Identity {
        named: u64,
        expected: u64,
        fingerprint: u64,
    },
    /// Only with [`ServerConfig::sync_later`]: make everything written so
    /// far durable, off the server's thread; then send `messages` (from any
    /// thread) and call [`Server::synced`] with `seq` and `written` (the
    /// last entry written; none: nothing was, and the sync only keeps the
    /// messages in order). No message may leave before its sync is done,
    /// and replies to a peer leave in the order given (requests and replies
    /// travel apart and may pass each other, as Raft allows). One call may
    /// answer for several (the newest `seq` and `written`).
    Sync {
        seq: u64,
        written: Option<LogWrite>,
        messages: Vec<Message>,
    },
}

pub struct Server<S: NodeStorage, H> {
    raft: Raft<S>,
    app: App<H>,
}

/// Everything but the core, apart so that the driver's shell can hold it
/// while the driver holds the core.
struct App<H> {
    cfg: ServerConfig,
    kv: KvStore,
    /// Index and term of the last entry applied.
    applied: SnapshotMeta,
    /// The membership in force at `applied`, which a snapshot taken there holds.
    applied_membership: Membership,
    snapshots: SnapshotState<H>,
    proposals: Proposals<H>,
    reads: Reads<H>,
    /// Clients waiting for a leadership transfer: (target, handle, deadline).
    transfers: Vec<(NodeId, H, Time)>,
    last_contact: LastContact,
    role: Role,
    leader: Option<NodeId>,
    /// For the metrics: the last leadership counted, and the last term this
    /// node campaigned in.
    turnover: Turnover,
    identity: Identity,
    /// Nodes the runtime was told were removed ([`Effect::Revoked`]).
    revoked: BTreeSet<NodeId>,
    /// This node applied its own removal: it stops.
    removed: bool,
    stopping: Option<Stopping>,
    /// The state machine cannot go on (a snapshot it cannot load).
    fatal: Option<String>,
    now: Time,
    effects: Vec<Effect<H>>,
    /// The last [`Effect::Sync`] handed out, and the last one done.
    syncs_issued: u64,
    syncs_done: u64,
}

#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct Identity {
    named: u64,
    expected: u64,
    fingerprint: u64,
    /// The name the state dir holds.
    recorded: u64,
}

struct SnapshotState<H> {
    /// The newest snapshot on disk (index 0: none).
    last: SnapshotMeta,
    /// One being written.
    saving: Option<SnapshotMeta>,
    /// `snapshot` ops waiting for the one being written.
    waiting: Vec<H>,
}

struct Reads<H> {
    last_ctx: u64,
    /// Waiting for leadership to be confirmed, by ctx.
    asked: HashMap<u64, PendingRead<H>>,
    /// Confirmed, waiting for the state machine to reach the index.
    confirmed: BTreeMap<Index, Vec<(Value, H)>>,
}

struct PendingRead<H> {
    key: Value,
    handle: H,
    deadline: Time,
}

struct Stopping {
    /// Whom leadership is being handed to, if anyone.
    to: Option<NodeId>,
    deadline: Time,
}

impl<S: NodeStorage, H> Server<S, H> {
    /// A server over `raft`, whose state machine `kv` is as of `snapshot`
    /// (restored from it, or empty at index 0), with the cluster identity
    /// the state dir records.
    pub fn new(
        cfg: ServerConfig,
        raft: Raft<S>,
        kv: KvStore,
        snapshot: SnapshotMeta,
        cluster: u64,
        fingerprint: u64,
    ) -> Self {
        let identity = Identity { named: cluster, expected: 0, fingerprint, recorded: cluster };
        let app = App {
            cfg,
            kv,
            applied: snapshot,
            applied_membership: raft.membership_at(snapshot.index).clone(),
            snapshots: SnapshotState { last: snapshot, saving: None, waiting: Vec::new() },
            proposals: Proposals::default(),
            reads: Reads { last_ctx: 0, asked: HashMap::new(), confirmed: BTreeMap::new() },
            transfers: Vec::new(),
            last_contact: LastContact::default(),
            role: Role::Follower,
            leader: None,
            turnover: Turnover::default(),
            identity,
            revoked: BTreeSet::new(),
            removed: false,
            stopping: None,
            fatal: None,
            now: Duration::ZERO,
            effects: Vec::new(),
            syncs_issued: 0,
            syncs_done: 0,
        };
        Server { raft, app }
    }

    pub fn raft(&self) -> &Raft<S> {
        &self.raft
    }

    /// The durable side, for a runtime (or simulator) that models it.
    pub fn store_mut(&mut self) -> &mut S {
        self.raft.store_mut()
    }

    /// What survives the process: its store.
    pub fn into_store(self) -> S {
        self.raft.into_store()
    }

    /// What the server has for the runtime to carry out, oldest first.
    pub fn take_effects(&mut self) -> Vec<Effect<H>> {
        std::mem::take(&mut self.app.effects)
    }

    /// Carries out the core's `Ready`s; messages leave through `send`. A
    /// storage error, or a snapshot the state machine cannot load, stops
    /// the node.
    pub fn process(&mut self, send: &mut dyn FnMut(Message)) -> Result<(), ProcessError<S::Error>> {
        run_ready(&mut self.raft, &mut ReadyShell { app: &mut self.app, send })?;
        // Right after every step, not on the next tick: a leader that
        // names its wire later than a follower learns of the commit has its
        // requests refused in the meantime.
        self.follow_cluster_name().map_err(ProcessError::Storage)?;
        self.follow_removals();
        match self.app.fatal.take() {
            Some(problem) => Err(ProcessError::StateMachine(problem)),
            None => Ok(()),
        }
    }

    /// [`Effect::Sync`] `seq` and every one before it are done: what they
    /// cover is durable.
    pub fn synced(&mut self, seq: u64, written: Option<LogWrite>) {
        self.app.syncs_done = self.app.syncs_done.max(seq);
        if let Some(written) = written {
            self.raft.persisted(written);
        }
    }

    /// Time passed: the core's tick, and every deadline and policy that
    /// hangs on time.
    pub fn tick(&mut self, now: Time) -> Result<(), S::Error> {
        self.app.now = now;
        self.raft.tick();
        for (to, handle) in self.app.expired_transfers() {
            let message = format!("node {to} did not take over leadership in time");
            self.app.reply_error(handle, ErrorCode::Timeout, &message);
        }
        self.name_new_cluster();
        let expired: Vec<u64> =
            self.app.reads.asked.iter().filter(|(_, r)| r.deadline <= now).map(|(&ctx, _)| ctx).collect();
        for ctx in expired {
            let read = self.app.reads.asked.remove(&ctx).expect("listed above");
            self.app.reply_error(read.handle, ErrorCode::Timeout, "could not confirm leadership in time");
        }
        for handle in self.app.proposals.expired(now) {
            let message = "not committed in time; it may or may not apply (retry with the same client_id/seq)";
            self.app.reply_error(handle, ErrorCode::Timeout, message);
        }
        if self.raft.store_mut().check_space() {
            self.hand_over_for_lack_of_space();
        }
        Ok(())
    }

    /// A message from a peer (already checked to come from it).
    pub fn peer(&mut self, msg: Message, now: Time) {
        self.app.now = now;
        let appends = matches!(&msg.body, Body::AppendEntries { entries, .. } if !entries.is_empty());
        if appends && self.raft.store().low_on_space() {
            // Not taken while low on space (no reply: the leader retries,
            // and the majority commits without us meanwhile).
            return;
        }
        self.app.last_contact.heard(msg.from, now);
        self.raft.step(msg);
    }

    /// The transport gave up on a request to `peer`.
    pub fn peer_unreachable(&mut self, peer: NodeId) {
        self.raft.peer_unreachable(peer);
    }

    /// A client request; its reply goes to `handle`, now or later. On a
    /// follower, one that needs the leader goes to the leader it knows.
    pub fn client(&mut self, request: Request, handle: H, now: Time) {
        self.app.now = now;
        match self.leader_elsewhere(&request) {
            None => self.serve(request, handle),
            Some(NotLeader { leader: Some(leader) }) => {
                self.app.effects.push(Effect::Forward { leader, request, handle })
            }
            Some(not_leader) => self.app.reply_not_leader(handle, not_leader),
        }
    }

    /// A request a follower forwarded here, taking this node for the
    /// leader. Never forwarded again: two nodes with stale views of the
    /// leader would bounce it between them.
    pub fn forwarded(&mut self, request: Request, handle: H, now: Time) {
        self.app.now = now;
        match self.leader_elsewhere(&request) {
            None => self.serve(request, handle),
            Some(not_leader) => self.app.reply_not_leader(handle, not_leader),
        }
    }

    /// For a request only the leader serves, on a node that does not lead:
    /// who leads as far as this node knows.
    fn leader_elsewhere(&self, request: &Request) -> Option<NotLeader> {
        let SoftState { role, leader, .. } = self.raft.soft_state();
        (role != Role::Leader && !request.is_local()).then_some(NotLeader { leader })
    }

    fn serve(&mut self, request: Request, handle: H) {
        let deadline = self.app.now + self.app.cfg.request_timeout;
        match request {
            Request::Write { command, client_id, seq } => {
                self.write(LoggedCommand { command, client_id, seq }, handle, deadline)
            }
            Request::Get { key } => self.read(key, handle, deadline),
            Request::Status => {
                let reply = Reply::Status(Box::new(self.status()));
                self.app.reply(handle, reply);
            }
            Request::Snapshot => self.snapshot_now(handle),
            Request::Log { from, limit } => self.app.effects.push(Effect::ReadLog { from, limit, handle }),
            Request::SnapshotData { index, offset } => {
                self.app.effects.push(Effect::ReadSnapshotFile { index, offset, handle })
            }
            Request::Members => {
                let members = self.members();
                self.app.reply(handle, Reply::Members { members });
            }
            Request::AddNode { member, voter } => self.add_node(member, voter, handle, deadline),
            Request::RemoveNode { id } => {
                let mut members = members_of(self.raft.membership());
                members.retain(|m| m.id != id);
                self.change_membership(MembershipChange::Remove(id), &members, handle, deadline);
            }
            Request::PromoteNode { id } => self.promote(id, handle, deadline),
            Request::TransferLeader { to } => self.transfer_leader(to, handle),
        }
    }

    /// The snapshot asked for by [`Effect::SaveSnapshot`] is on disk.
    pub fn snapshot_saved(&mut self, snapshot: SnapshotMeta) -> Result<(), S::Error> {
        self.raft.store_mut().snapshot_saved(snapshot)?;
        let state = &mut self.app.snapshots;
        state.saving = None;
        if snapshot.index > state.last.index {
            state.last = snapshot;
        }
        self.app.answer_snapshot_waiters();
        self.app.maybe_snapshot();
        Ok(())
    }

    /// Writing the snapshot failed: the log still holds everything, so the
    /// next occasion tries again.
    pub fn snapshot_failed(&mut self) {
        self.app.snapshots.saving = None;
        self.app.answer_snapshot_waiters();
    }

    /// The node is to stop: a leader first hands leadership to the follower
    /// holding the most of the log, so that clients see a new leader within
    /// a round trip instead of an election timeout. Writes are refused
    /// meanwhile (the core refuses them during a transfer); reads are served.
    pub fn begin_stop(&mut self, now: Time) {
        if self.app.stopping.is_some() {
            return;
        }
        let id = self.raft.id();
        let deadline = now + self.app.cfg.handover_timeout;
        let to = self.raft.transfer_candidate().filter(|&to| match self.raft.transfer_leadership(to) {
            Ok(()) => {
                info!("node {id}: transferring leadership to {to} before shutdown");
                true
            }
            Err(e) => {
                warn!("node {id}: cannot transfer leadership to {to}: {e:?}");
                false
            }
        });
        self.app.stopping = Some(Stopping { to, deadline });
    }

    /// Whether the node may stop now: it began to, and any hand-over of
    /// leadership is done, abandoned or out of time.
    pub fn may_stop(&self, now: Time) -> bool {
        let Some(stopping) = &self.app.stopping else { return false };
        let Some(to) = stopping.to else { return true };
        let (id, soft) = (self.raft.id(), self.raft.soft_state());
        match soft.leader {
            Some(leader) if leader != id => {
                info!("node {id}: node {leader} leads in term {}; shutting down", soft.term);
                true
            }
            Some(_) if self.raft.transfer_target().is_none() => {
                info!("node {id}: leadership transfer to {to} failed; shutting down as leader");
                true
            }
            _ if now >= stopping.deadline => {
                info!("node {id}: stopping before a new leader was seen");
                true
            }
            _ => false,
        }
    }

    /// Whether this node was removed from the cluster and must stop.
    pub fn removed(&self) -> bool {
        self.app.removed || self.raft.removed()
    }

    /// The last stop: everyone still waiting is answered, and the commit
    /// index is made durable so that a restart re-applies without waiting
    /// for a leader. A write that may be in the log hears `timeout`, never
    /// `shutting_down`, which promises that nothing was applied.
    pub fn shut_down(&mut self) -> Result<(), S::Error> {
        let app = &mut self.app;
        for handle in app.proposals.clear() {
            let message = "node is shutting down; the write may or may not apply (retry with the same client_id/seq)";
            app.reply_error(handle, ErrorCode::Timeout, message);
        }
        let asked = std::mem::take(&mut app.reads.asked).into_values().map(|r| r.handle);
        let confirmed = std::mem::take(&mut app.reads.confirmed).into_values().flatten().map(|(_, handle)| handle);
        for handle in asked.chain(confirmed).collect::<Vec<_>>() {
            app.reply_error(handle, ErrorCode::ShuttingDown, "node is shutting down");
        }
        for (to, handle, _) in std::mem::take(&mut app.transfers) {
            let message = format!("node is shutting down; node {to} may or may not take over");
            app.reply_error(handle, ErrorCode::Timeout, &message);
        }
        for handle in std::mem::take(&mut app.snapshots.waiting) {
            app.reply_error(handle, ErrorCode::ShuttingDown, "node is shutting down");
        }
        // Through the log's own write and sync: the commit index may cover
        // entries whose sync was left to later, and this one covers them.
        let hard_state = self.raft.hard_state();
        self.raft.store_mut().persist(None, Some(&hard_state), &[])
    }

    pub fn leader(&self) -> Option<NodeId> {
        self.app.leader
    }

    /// Index and term of the last entry applied.
    pub fn applied(&self) -> SnapshotMeta {
        self.app.applied
    }

    /// The newest snapshot of the state machine on disk.
    pub fn last_snapshot(&self) -> SnapshotMeta {
        self.app.snapshots.last
    }

    pub fn kv(&self) -> &KvStore {
        &self.app.kv
    }

    /// A write with a session that was already decided, or is pending here,
    /// is answered without a new log entry; anything else is proposed.
    fn write(&mut self, logged: LoggedCommand, handle: H, deadline: Time) {
        let session: Option<Session> = logged.client_id.clone().zip(logged.seq);
        let app = &mut self.app;
        if let Some((client_id, seq)) = &session {
            if let Some(outcome) = decided(app.kv.sessions().check(client_id, *seq), *seq) {
                return app.reply(handle, Reply::of_write(outcome));
            }
            let term = self.raft.soft_state().term;
            if let Some(index) = app.proposals.pending(&(client_id.clone(), *seq)) {
                return app.proposals.wait(index, Waiter { term, handle, deadline });
            }
        }
        if app.proposals.is_full() {
            return app.reply_error(handle, ErrorCode::Busy, "too many writes in flight; nothing was applied");
        }
        let bytes = logged.encode();
        let size = bytes.len();
        if let Err(why) = self.raft.store_mut().reserve(size as u64) {
            let message = format!("node {} is low on disk space ({why}); nothing was applied", self.raft.id());
            return self.app.reply_error(handle, ErrorCode::Busy, &message);
        }
        match self.raft.propose(bytes) {
            Ok((index, term)) => {
                METRICS.proposals.inc();
                self.app.proposals.add(index, size, session, Waiter { term, handle, deadline });
            }
            Err(not_leader) => self.app.reply_not_leader(handle, not_leader),
        }
    }

    /// A linearizable read: confirmed by a ReadIndex round, served once the
    /// state machine reaches the index.
    fn read(&mut self, key: Value, handle: H, deadline: Time) {
        let reads = &mut self.app.reads;
        if reads.asked.len() >= MAX_PENDING_READS {
            return self.app.reply_error(handle, ErrorCode::Busy, "too many reads in flight; retry later");
        }
        reads.last_ctx += 1;
        let ctx = reads.last_ctx;
        match self.raft.read_index(ctx) {
            Ok(()) => {
                reads.asked.insert(ctx, PendingRead { key, handle, deadline });
            }
            Err(not_leader) => self.app.reply_not_leader(handle, not_leader),
        }
    }

    /// The `snapshot` op: snapshot now unless the newest one is as of
    /// everything applied; answered once it is on disk.
    fn snapshot_now(&mut self, handle: H) {
        let app = &mut self.app;
        app.snapshots.waiting.push(handle);
        if app.snapshots.saving.is_none() {
            if app.applied.index > app.snapshots.last.index {
                app.save_snapshot();
            } else {
                app.answer_snapshot_waiters();
            }
        }
    }

    fn add_node(&mut self, member: Member, voter: bool, handle: H, deadline: Time) {
        let mut members = members_of(self.raft.membership());
        if let Err(problem) = check_new_member(&members, &member) {
            return self.app.reply_error(handle, ErrorCode::BadRequest, &problem);
        }
        if let Some(owner) = members.iter().find(|m| m.public_key.is_some() && m.public_key == member.public_key) {
            let problem = format!("public_key is node {}'s: a key speaks for one node only", owner.id);
            return self.app.reply_error(handle, ErrorCode::BadRequest, &problem);
        }
        if self.app.cfg.curve != member.public_key.is_some() {
            let problem = if self.app.cfg.curve {
                format!("the cluster uses CURVE: node {} needs a public_key", member.id)
            } else {
                "the cluster does not use CURVE: no public_key".to_string()
            };
            return self.app.reply_error(handle, ErrorCode::BadRequest, &problem);
        }
        let change = MembershipChange::AddLearner { id: member.id, promote: voter };
        members.push(member);
        self.change_membership(change, &members, handle, deadline);
    }

    /// As etcd: only a learner that holds everything committed is promoted,
    /// so that counting it does not stall commits.
    fn promote(&mut self, id: NodeId, handle: H, deadline: Time) {
        let (raft, committed) = (&self.raft, self.raft.commit_index());
        let behind =
            raft.membership().learners.contains(&id) && raft.progress(id).is_some_and(|pr| pr.matched < committed);
        if behind {
            let matched = raft.progress(id).map_or(0, |pr| pr.matched);
            let message = format!("learner {id} is still catching up ({matched} of {committed}); retry later");
            return self.app.reply_error(handle, ErrorCode::Busy, &message);
        }
        let members = members_of(self.raft.membership());
        self.change_membership(MembershipChange::Promote(id), &members, handle, deadline);
    }

    /// Proposes a membership change; the client is answered once it applies.
    fn change_membership(&mut self, change: MembershipChange, members: &[Member], handle: H, deadline: Time) {
        if self.raft.soft_state().role == Role::Leader && self.app.identity.named == 0 {
            // A node added before this leader speaks for the name (once it
            // knows it is committed) would take the fingerprint for it.
            let message = "the new cluster has not committed its name yet; retry in a moment";
            return self.app.reply_error(handle, ErrorCode::Busy, message);
        }
        match self.raft.change_membership(change, context_of(members)) {
            Ok(index) => {
                METRICS.proposals.inc();
                let term = self.raft.soft_state().term;
                self.app.proposals.add(index, 0, None, Waiter { term, handle, deadline });
            }
            Err(ChangeError::NotLeader(not_leader)) => self.app.reply_not_leader(handle, not_leader),
            Err(ChangeError::Busy(why)) => self.app.reply_error(handle, ErrorCode::Busy, why),
            Err(ChangeError::Invalid(why)) => self.app.reply_error(handle, ErrorCode::BadRequest, &why),
        }
    }

    /// Hands leadership to `to` (default: the most up-to-date voter); the
    /// client is answered once it leads, or after the hand-over timeout.
    fn transfer_leader(&mut self, to: Option<NodeId>, handle: H) {
        let raft = &mut self.raft;
        let target = to.or_else(|| raft.transfer_candidate()).unwrap_or(raft.id());
        if raft.soft_state().role == Role::Leader && target == raft.id() {
            return self.app.reply(handle, Reply::TransferLeader { leader: target });
        }
        match raft.transfer_leadership(target) {
            Ok(()) => {
                let deadline = self.app.now + self.app.cfg.handover_timeout;
                self.app.transfers.push((target, handle, deadline));
            }
            Err(TransferError::NotLeader(not_leader)) => self.app.reply_not_leader(handle, not_leader),
            Err(TransferError::NotAPeer(id)) => {
                let message = format!("node {id} is not a voter of this cluster");
                self.app.reply_error(handle, ErrorCode::BadRequest, &message)
            }
        }
    }

    /// A leader low on space lets a follower lead instead, so the cluster
    /// keeps taking writes if that one has space.
    fn hand_over_for_lack_of_space(&mut self) {
        let raft = &mut self.raft;
        if raft.transfer_target().is_some() {
            return;
        }
        if let Some(to) = raft.transfer_candidate() {
            raft.store_mut().handed_over();
            info!("node {}: low on disk space; handing leadership to {to}", raft.id());
            if let Err(e) = raft.transfer_leadership(to) {
                warn!("node {}: cannot hand leadership to {to}: {e:?}", raft.id());
            }
        }
    }

    /// Keeps the wire in step with the cluster's name in the log, and the
    /// state dir in step with the wire: see `transport::Wire`.
    fn follow_cluster_name(&mut self) -> Result<(), S::Error> {
        let (raft, before) = (&self.raft, self.app.identity);
        let mut identity = before;
        if identity.named == 0 {
            match raft.committed_membership().cluster {
                0 => identity.expected = raft.membership().cluster,
                named => {
                    info!("node {}: the cluster is named {named:#018x}", raft.id());
                    identity.named = named;
                }
            }
        }
        if identity.named != 0 && identity.fingerprint == 0 {
            // A joined node learns it, to reach members of the first
            // membership that have not learned the name.
            identity.fingerprint = raft.membership().fingerprint;
        }
        if identity.named != identity.recorded {
            self.raft.store_mut().record_cluster(identity.named)?;
            identity.recorded = identity.named;
        }
        if identity != before {
            let Identity { named, expected, fingerprint, .. } = identity;
            self.app.effects.push(Effect::Identity { named, expected, fingerprint });
            self.app.identity = identity;
        }
        Ok(())
    }

    /// Tells the runtime of every removal once it is committed (a removal
    /// in force but not committed may still be cut off).
    fn follow_removals(&mut self) {
        let removed = &self.raft.committed_membership().removed;
        let newly: Vec<NodeId> = removed.difference(&self.app.revoked).copied().collect();
        if !newly.is_empty() {
            self.app.revoked.extend(&newly);
            self.app.effects.push(Effect::Revoked(newly));
        }
    }

    /// The first leader of a new cluster names it: a random id, committed
    /// like any membership change, so every member learns the same.
    fn name_new_cluster(&mut self) {
        let unnamed = self.app.identity.named == 0 && self.raft.membership().cluster == 0;
        if self.raft.soft_state().role != Role::Leader || !unnamed {
            return;
        }
        let name = self.app.cfg.new_cluster_name;
        let context = self.raft.membership().context.clone();
        match self.raft.change_membership(MembershipChange::Name(name), context) {
            Ok(index) => info!("node {}: naming the new cluster {name:#018x} (entry {index})", self.raft.id()),
            Err(e) => debug!("node {}: cannot name the cluster yet: {e:?}", self.raft.id()),
        }
    }

    /// The `members` reply; on the leader with each member's match index
    /// and how long ago it was heard from (the leader's own: its last index, now).
    fn members(&self) -> Vec<crate::wire::protocol::MemberInfo> {
        let (raft, app) = (&self.raft, &self.app);
        let leading = raft.soft_state().role == Role::Leader;
        let progress = |id| {
            if !leading {
                return None;
            }
            if id == raft.id() {
                return Some((raft.last_index(), Some(0)));
            }
            let silence = app.last_contact.silence(id, app.now).map(|d| d.as_millis() as u64);
            raft.progress(id).map(|pr| (pr.matched, silence))
        };
        member_infos(raft.membership(), progress)
    }

    pub fn status(&self) -> StatusInfo {
        let (raft, app) = (&self.raft, &self.app);
        let soft = raft.soft_state();
        let role = match soft.role {
            Role::Leader => "leader",
            Role::Candidate => "candidate",
            // A pre-candidate has not left its term: to the outside it is a follower.
            Role::Follower | Role::PreCandidate => "follower",
        };
        let (alarms, state_bytes) = raft.store().disk_status();
        StatusInfo {
            id: raft.id(),
            role: role.to_string(),
            term: soft.term,
            leader: soft.leader,
            commit_index: raft.commit_index(),
            last_applied: app.applied.index,
            last_log_index: raft.last_index(),
            members: raft.membership().voters.iter().copied().collect(),
            learners: raft.membership().learners.iter().copied().collect(),
            first_log_index: raft.log_start().index + 1,
            snapshot_index: app.snapshots.last.index,
            alarms,
            vote: raft.hard_state().vote,
            // A leader's leader is the majority that keeps it leading.
            leader_contact_ms: match soft.leader {
                Some(leader) if leader == raft.id() => {
                    let voters = &raft.membership().voters;
                    app.last_contact.majority_silence(leader, voters, app.now).map(|d| d.as_millis() as u64)
                }
                Some(leader) => app.last_contact.silence(leader, app.now).map(|d| d.as_millis() as u64),
                None => None,
            },
            state_bytes,
            cluster_id: match app.identity.named {
                0 => None,
                named => Some(format!("{named:016x}")),
            },
        }
    }
}

impl<H> App<H> {
    fn reply(&mut self, handle: H, reply: Reply) {
        self.effects.push(Effect::Reply(handle, reply));
    }

    fn reply_error(&mut self, handle: H, code: ErrorCode, message: &str) {
        let reply = Reply::error(code, message, self.leader);
        self.reply(handle, reply);
    }

    fn reply_not_leader(&mut self, handle: H, NotLeader { leader }: NotLeader) {
        let reply = not_leader(self.cfg.id, leader);
        self.reply(handle, reply);
    }

    fn expired_transfers(&mut self) -> Vec<(NodeId, H)> {
        let now = self.now;
        self.take_transfers(|_, deadline| deadline <= now)
    }

    fn take_transfers(&mut self, pick: impl Fn(NodeId, Time) -> bool) -> Vec<(NodeId, H)> {
        let (picked, kept): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.transfers).into_iter().partition(|(to, _, deadline)| pick(*to, *deadline));
        self.transfers = kept;
        picked.into_iter().map(|(to, handle, _)| (to, handle)).collect()
    }

    fn apply(&mut self, entries: Vec<Entry>) {
        let mut duplicates = Vec::new();
        for entry in &entries {
            let applied = self.kv.apply(entry.index, &entry.payload);
            self.applied = SnapshotMeta { index: entry.index, term: entry.term };
            if applied.as_ref().is_some_and(|a| a.duplicate) {
                duplicates.push(entry.index);
            }
            if let Payload::Membership(membership) = &entry.payload {
                self.applied_membership = membership.clone();
                if membership.removed.contains(&self.cfg.id) {
                    info!(
                        "node {}: removed from the cluster (membership entry {}); stopping",
                        self.cfg.id, entry.index
                    );
                    self.removed = true;
                }
            }
            for waiter in self.proposals.applied(entry.index) {
                let reply = match (&applied, &entry.payload) {
                    (_, Payload::Membership(_)) if waiter.term == entry.term => {
                        Reply::Membership { index: entry.index }
                    }
                    (Some(applied), _) if waiter.term == entry.term => Reply::of_write(applied.outcome.clone()),
                    // Another leader's entry took this index: ours never committed.
                    _ => {
                        Reply::error(ErrorCode::NoLeader, "leadership changed; the write was not applied", self.leader)
                    }
                };
                self.reply(waiter.handle, reply);
            }
        }
        METRICS.apply_entries.observe(entries.len() as f64);
        self.effects.push(Effect::Applied { entries, duplicates });
        self.answer_reads();
        self.maybe_snapshot();
    }

    /// Reads confirmed at an index the state machine has reached.
    fn answer_reads(&mut self) {
        let later = self.reads.confirmed.split_off(&(self.applied.index + 1));
        for (key, handle) in std::mem::replace(&mut self.reads.confirmed, later).into_values().flatten() {
            let value = self.kv.get(&key).cloned();
            self.reply(handle, Reply::Get { value });
        }
    }

    fn maybe_snapshot(&mut self) {
        let due = self.applied.index - self.snapshots.last.index >= self.cfg.snapshot_entries;
        if due && self.snapshots.saving.is_none() {
            self.save_snapshot();
        }
    }

    fn save_snapshot(&mut self) {
        self.snapshots.saving = Some(self.applied);
        let membership = self.applied_membership.clone();
        let job = SnapshotJob { meta: self.applied, membership, image: self.kv.image() };
        self.effects.push(Effect::SaveSnapshot(Box::new(job)));
    }

    fn answer_snapshot_waiters(&mut self) {
        let index = self.snapshots.last.index;
        for handle in std::mem::take(&mut self.snapshots.waiting) {
            self.reply(handle, Reply::Snapshot { index });
        }
    }
}

/// The leaderships and campaigns a node has seen, for the metrics.
#[derive(Default)]
struct Turnover {
    leadership_seen: Option<(NodeId, Term)>,
    campaigned_in: Term,
}

impl Turnover {
    /// Whether `soft` shows a leadership not seen before, and a campaign of
    /// this node's in a new term.
    fn observe(&mut self, soft: &SoftState) -> (bool, bool) {
        // A leadership is a (leader, term): a blip of "no leader" between
        // two heartbeats of the same one is no change.
        let leadership = soft.leader.map(|leader| (leader, soft.term));
        let new_leadership = leadership.is_some() && leadership != self.leadership_seen;
        if new_leadership {
            self.leadership_seen = leadership;
        }
        // A candidate or leader in a term it was not one in before campaigned
        // in it (a lone voter becomes leader without showing as candidate).
        let new_campaign = matches!(soft.role, Role::Candidate | Role::Leader) && soft.term > self.campaigned_in;
        if new_campaign {
            self.campaigned_in = soft.term;
        }
        (new_leadership, new_campaign)
    }
}

/// Why the server cannot go on: the node stops at once.
#[derive(Debug)]
pub enum ProcessError<E> {
    Storage(E),
    /// The state machine cannot load a snapshot its store holds.
    StateMachine(String),
}

impl<E: std::fmt::Display> std::fmt::Display for ProcessError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProcessError::Storage(e) => e.fmt(f),
            ProcessError::StateMachine(problem) => f.write_str(problem),
        }
    }
}

impl<E> From<E> for ProcessError<E> {
    fn from(e: E) -> Self {
        ProcessError::Storage(e)
    }
}

/// The server's side of the one Ready driver.
struct ReadyShell<'a, H> {
    app: &'a mut App<H>,
    send: &'a mut dyn FnMut(Message),
}

impl<S: NodeStorage, H> ReadySink<S> for ReadyShell<'_, H> {
    fn send(&mut self, msg: Message) {
        (self.send)(msg);
    }

    /// A leader, or a node whose syncs from when it led are still under way:
    /// its acknowledgements queue behind those, in order.
    fn syncs_later(&self) -> bool {
        let app = &self.app;
        app.cfg.sync_later && (app.role == Role::Leader || app.syncs_done < app.syncs_issued)
    }

    /// Acknowledgements with no write of their own and no sync to wait
    /// behind leave at once (a follower's answer to a heartbeat).
    fn sync_later(&mut self, written: Option<LogWrite>, messages: Vec<Message>) {
        let app = &mut *self.app;
        if written.is_none() && app.syncs_done == app.syncs_issued {
            return messages.into_iter().for_each(|msg| (self.send)(msg));
        }
        app.syncs_issued += 1;
        app.effects.push(Effect::Sync { seq: app.syncs_issued, written, messages });
    }

    fn soft_state(&mut self, soft: SoftState) {
        let app = &mut *self.app;
        info!(
            role = soft.role.as_str(), term = soft.term, leader = soft.leader;
            "node {}: role {} in term {}, leader {}",
            app.cfg.id,
            soft.role.as_str(),
            soft.term,
            soft.leader.map_or("unknown".to_string(), |l| l.to_string())
        );
        let (new_leadership, new_campaign) = app.turnover.observe(&soft);
        if new_leadership {
            METRICS.leader_changes.inc();
        }
        if new_campaign {
            METRICS.elections.inc();
        }
        app.leader = soft.leader;
        if let Some(leader) = soft.leader {
            for (_, handle) in app.take_transfers(|to, _| to == leader) {
                app.reply(handle, Reply::TransferLeader { leader });
            }
        }
        if app.role == Role::Leader && soft.role != Role::Leader {
            // Whatever is pending is the next leader's to decide.
            let message = "leadership changed before the write committed; it may or may not apply (retry with the same client_id/seq)";
            for handle in app.proposals.clear() {
                app.reply_error(handle, ErrorCode::Timeout, message);
            }
        }
        app.role = soft.role;
    }

    fn membership(&mut self, membership: &Membership) {
        info!(
            voters:? = membership.voters, learners:? = membership.learners;
            "node {}: members: voters {:?}, learners {:?}", self.app.cfg.id, membership.voters, membership.learners
        );
        let members = members_of(membership);
        // Joining: no membership yet, so the config's nodes stay the peers.
        if !members.is_empty() {
            self.app.effects.push(Effect::Members(members));
        }
        for id in &membership.removed {
            // Absent already after the first time, which is fine.
            let _ = METRICS.peer_seconds.remove_label_values(&[&id.to_string()]);
        }
    }

    fn restore(&mut self, snapshot: &SnapshotInfo, store: &S) {
        let app = &mut *self.app;
        let meta = snapshot.meta;
        match store.load_snapshot(meta).and_then(|data| app.kv.restore(&data)) {
            Ok(()) => info!(
                "state machine restored from the leader's snapshot {}/{} ({} keys)",
                meta.index,
                meta.term,
                app.kv.len()
            ),
            Err(problem) => {
                app.fatal = Some(format!("cannot load snapshot {}/{}: {problem}", meta.index, meta.term));
                return;
            }
        }
        app.removed |= snapshot.membership.removed.contains(&app.cfg.id);
        app.applied = meta;
        app.applied_membership = snapshot.membership.clone();
        if meta.index > app.snapshots.last.index {
            app.snapshots.last = meta;
        }
        app.effects.push(Effect::Restored(meta));
        app.answer_reads();
    }

    fn apply(&mut self, entries: Vec<Entry>) {
        self.app.apply(entries);
    }

    fn read_ready(&mut self, read: ReadState) {
        let app = &mut *self.app;
        if let Some(pending) = app.reads.asked.remove(&read.ctx) {
            app.reads.confirmed.entry(read.index).or_default().push((pending.key, pending.handle));
            app.answer_reads();
        }
    }

    fn read_failed(&mut self, ctx: u64) {
        let app = &mut *self.app;
        if let Some(read) = app.reads.asked.remove(&ctx) {
            let leader = app.leader;
            app.reply_not_leader(read.handle, NotLeader { leader });
        }
    }
}

/// The `no_leader` reply of node `me`, naming the leader it knows, if any.
pub fn not_leader(me: NodeId, leader: Option<NodeId>) -> Reply {
    let message = match leader {
        Some(id) => format!("node {me} is not the leader; node {id} is"),
        None => format!("node {me} is not the leader and knows of none (election in progress)"),
    };
    Reply::error(ErrorCode::NoLeader, message, leader)
}

/// A new cluster's name: the clock hashed under the random keys std's
/// `RandomState` draws from the operating system, so unpredictable and, in
/// practice, unique; never 0, which means "no name".
pub fn random_cluster_name() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    RandomState::new().hash_one(now).max(1)
}

#[cfg(test)]
mod tests;
