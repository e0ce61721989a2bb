//! The core loop: the only owner of the Raft state and of storage.
//!
//! It waits for any input (tick, peer message, client request), then drains
//! everything else already queued before it processes the core's `Ready`.
//! Proposals that arrive while the previous batch is being fsynced therefore
//! share one append, one sync and one AppendEntries round (group commit).
//!
//! On the stop signal a leader first hands leadership to its most
//! up-to-date follower and keeps serving until it has, so that clients see
//! a new leader within a round trip instead of an election timeout.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError, after, select};
use log::{debug, error, info, warn};

use super::applier::ApplyMsg;
use super::disk::NOSPACE;
use super::log_reader::DiskRead;
use super::members::{LastContact, Transfers, check_new_member, context_of, member_infos, members_of};
use super::replies::{Replier, ReplyTo, not_leader};
use super::store::{NodeStore, PersistError};
use super::{Shared, peer_endpoints, record_cluster};
use crate::config::Member;
use crate::driver::{self, run_ready};
use crate::kv::{LoggedCommand, Value, session_reply};
use crate::lock;
use crate::metrics::METRICS;
use crate::protocol::{ErrorCode, Reply, Request, StatusInfo};
use crate::raft::{
    Body, ChangeError, Entry, Index, Membership, MembershipChange, Message, NodeId, NotLeader, Raft, ReadState, Role,
    Snapshot, SnapshotMeta, SoftState, Term, TransferError,
};
use crate::security::NodeSecurity;
use crate::sessions::SessionTable;
use crate::transport::{Inbound, Transport};

/// A decoded client request on its way to the core loop.
pub struct ClientCall {
    pub request: Request,
    pub reply_to: ReplyTo,
    /// Its size on the wire, counted in `Shared::queued_bytes` until taken.
    pub bytes: usize,
}

/// Inputs drained per wake-up before the batch is processed; bounds latency
/// under a flood while still batching generously.
const MAX_BATCH: usize = 4096;

/// A leader refuses new writes with `busy` while this many entries, or this
/// many bytes of them, are proposed but not yet applied: memory stays
/// bounded when clients send faster than the cluster commits.
pub const MAX_UNAPPLIED_ENTRIES: usize = 20_000;
pub const MAX_UNAPPLIED_BYTES: usize = 256 << 20;
/// Reads waiting for their leadership confirmation; more get `busy`.
pub const MAX_PENDING_READS: usize = 10_000;

/// Writes this leader proposed that are not applied yet, so that a retry of
/// one waits for it instead of being appended again (CONTRACT.md: a retry
/// of a pending write shows once in the log), and so that proposals can be
/// refused while too much is in flight.
#[derive(Default)]
struct Proposals {
    /// Oldest first: (index, approximate bytes).
    unapplied: VecDeque<(Index, usize)>,
    unapplied_bytes: usize,
    /// (client_id, seq) → (index, term) of each pending write with a
    /// session; a client may pipeline several.
    by_session: HashMap<(String, u64), (Index, Term)>,
    /// index → its (client_id, seq), to forget them as their entries apply.
    session_at: BTreeMap<Index, (String, u64)>,
}

impl Proposals {
    fn is_full(&self) -> bool {
        self.unapplied.len() >= MAX_UNAPPLIED_ENTRIES || self.unapplied_bytes >= MAX_UNAPPLIED_BYTES
    }

    fn add(&mut self, index: Index, term: Term, bytes: usize, session: Option<(&str, u64)>) {
        self.unapplied.push_back((index, bytes));
        self.unapplied_bytes += bytes;
        if let Some((client_id, seq)) = session {
            let session = (client_id.to_owned(), seq);
            self.by_session.insert(session.clone(), (index, term));
            self.session_at.insert(index, session);
        }
    }

    /// The pending write of `client_id` with `seq`, if any: (index, term).
    fn pending(&self, client_id: &str, seq: u64) -> Option<(Index, Term)> {
        self.by_session.get(&(client_id.to_owned(), seq)).copied()
    }

    /// Everything up to `applied` has left the applier's queue.
    fn applied_to(&mut self, applied: Index) {
        while self.unapplied.front().is_some_and(|&(index, _)| index <= applied) {
            let (_, bytes) = self.unapplied.pop_front().expect("checked");
            self.unapplied_bytes -= bytes;
        }
        let later = self.session_at.split_off(&(applied + 1));
        for (index, session) in std::mem::replace(&mut self.session_at, later) {
            if self.by_session.get(&session).is_some_and(|&(at, _)| at == index) {
                self.by_session.remove(&session);
            }
        }
    }

    /// Leadership was lost: whatever is pending is the next leader's to decide.
    fn clear(&mut self) {
        *self = Proposals::default();
    }
}

pub struct PendingRead {
    key: Value,
    reply_to: ReplyTo,
    deadline: Instant,
}

pub struct CoreLoop {
    pub raft: Raft<NodeStore>,
    pub io: Io,
}

/// Everything the core loop drives around the core: the Ready driver's
/// shell.
pub struct Io {
    pub id: NodeId,
    pub transport: Transport,
    pub applier: Sender<ApplyMsg>,
    pub log_reader: Sender<DiskRead>,
    /// The state machine's session table, read to answer retries.
    pub sessions: Arc<Mutex<SessionTable>>,
    pub replier: Replier,
    pub shared: Arc<Shared>,
    pub request_timeout: Duration,
    /// How long a stopping leader waits to see a new leader take over.
    pub handover_timeout: Duration,
    pub reads: HashMap<u64, PendingRead>,
    pub role: Role,
    pub leader: Option<NodeId>,
    proposals: Proposals,
    /// `--peer` routes: where to reach some peers instead of their `raft` endpoint.
    pub routes: Vec<(NodeId, String)>,
    transfers: Transfers,
    last_contact: LastContact,
    /// The cluster id the state dir holds (0: none yet, while joining).
    pub cluster_recorded: u64,
    /// Plaintext or CURVE; learns the keys of members added at run time.
    pub security: Arc<NodeSecurity>,
    /// For the metrics: the last leadership counted, and the last term this
    /// node campaigned in.
    leadership_seen: Option<(NodeId, Term)>,
    campaigned_in: Term,
}

impl Io {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: NodeId,
        transport: Transport,
        applier: Sender<ApplyMsg>,
        log_reader: Sender<DiskRead>,
        sessions: Arc<Mutex<SessionTable>>,
        replier: Replier,
        shared: Arc<Shared>,
        request_timeout: Duration,
        handover_timeout: Duration,
    ) -> Io {
        Io {
            id,
            transport,
            applier,
            log_reader,
            sessions,
            replier,
            shared,
            request_timeout,
            handover_timeout,
            reads: HashMap::new(),
            role: Role::Follower,
            leader: None,
            proposals: Proposals::default(),
            routes: Vec::new(),
            transfers: Transfers::default(),
            last_contact: LastContact::default(),
            cluster_recorded: 0,
            security: Arc::new(NodeSecurity::Plain),
            leadership_seen: None,
            campaigned_in: 0,
        }
    }
}

pub struct Inputs {
    pub ticks: Receiver<Instant>,
    pub peers: Receiver<Inbound>,
    pub clients: Receiver<ClientCall>,
    /// Snapshots the applier took.
    pub snapshots: Receiver<SnapshotMeta>,
    pub stop: Receiver<()>,
}

struct State {
    raft: Raft<NodeStore>,
    io: Io,
    next_read_ctx: u64,
}

impl CoreLoop {
    /// Runs until `inputs.stop` fires. A storage error is fatal: a node that
    /// cannot persist must not keep voting or acknowledging.
    ///
    /// A storage error stops the process at once, with one line saying why:
    /// nothing may be retried after a failed fsync (the kernel may have
    /// dropped the dirty pages), and sled, once a write failed, never returns
    /// from closing the database.
    pub fn run(self, inputs: Inputs) {
        let mut state = State { raft: self.raft, io: self.io, next_read_ctx: 0 };
        if let Err(e) = state.serve(&inputs) {
            error!("node {}: stopping at once: {e}; restart it once its disk is fine", state.io.id);
            std::process::exit(1);
        }
        state.io.to_applier(ApplyMsg::Shutdown);
        state.io.transport.shutdown();
    }
}

impl State {
    fn serve(&mut self, inputs: &Inputs) -> Result<(), PersistError> {
        while self.run_once(inputs, &inputs.stop)? {}
        self.hand_over_leadership(inputs)?;
        self.shut_down()
    }

    /// Waits for one input, drains what else is queued, then carries out the
    /// core's `Ready`. False once `stop` fires or an input channel closes.
    fn run_once<T>(&mut self, inputs: &Inputs, stop: &Receiver<T>) -> Result<bool, PersistError> {
        select! {
            recv(stop) -> _ => return Ok(false),
            recv(inputs.ticks) -> _ => self.on_tick()?,
            recv(inputs.peers) -> msg => match msg {
                Ok(msg) => self.on_peer(msg),
                Err(_) => return Ok(false),
            },
            recv(inputs.clients) -> call => match call {
                Ok(call) => self.on_client(call),
                Err(_) => return Ok(false),
            },
            recv(inputs.snapshots) -> snapshot => match snapshot {
                Ok(snapshot) => self.raft.store_mut().snapshot_taken(snapshot)?,
                Err(_) => return Ok(false),
            },
        }
        for _ in 0..MAX_BATCH {
            let mut idle = true;
            if let Ok(msg) = inputs.peers.try_recv() {
                self.on_peer(msg);
                idle = false;
            }
            if let Ok(call) = inputs.clients.try_recv() {
                self.on_client(call);
                idle = false;
            }
            if idle {
                break;
            }
        }
        self.process_ready()?;
        self.publish_metrics(inputs);
        if self.raft.removed() {
            info!("node {}: removed from the cluster (a member said so); stopping", self.raft.id());
            return Ok(false);
        }
        Ok(true)
    }

    /// A stopping leader hands leadership to the follower holding the most
    /// of the log and runs on until another node leads, the core abandons
    /// the transfer, or `handover_timeout` passes. Writes are refused
    /// meanwhile (clients retry, as after an election); reads are served.
    fn hand_over_leadership(&mut self, inputs: &Inputs) -> Result<(), PersistError> {
        let id = self.raft.id();
        let Some(to) = self.raft.transfer_candidate() else { return Ok(()) };
        if let Err(e) = self.raft.transfer_leadership(to) {
            warn!("node {id}: cannot transfer leadership to {to}: {e:?}");
            return Ok(());
        }
        info!("node {id}: transferring leadership to {to} before shutdown");
        self.process_ready()?;
        let deadline = after(self.io.handover_timeout);
        loop {
            let soft = self.raft.soft_state();
            match soft.leader {
                Some(leader) if leader != id => {
                    info!("node {id}: node {leader} leads in term {}; shutting down", soft.term);
                    return Ok(());
                }
                Some(_) if self.raft.transfer_target().is_none() => {
                    info!("node {id}: leadership transfer to {to} failed; shutting down as leader");
                    return Ok(());
                }
                _ => {}
            }
            if !self.run_once(inputs, &deadline)? {
                info!("node {id}: stopping before a new leader was seen");
                return Ok(());
            }
        }
    }

    fn on_tick(&mut self) -> Result<(), PersistError> {
        self.raft.tick();
        *lock(&self.io.shared.status) = Some(self.status());
        let now = Instant::now();
        for (to, reply_to) in self.io.transfers.expired(now) {
            let message = format!("node {to} did not take over leadership in time");
            self.io.reply_error(reply_to, ErrorCode::Timeout, &message);
        }
        self.follow_cluster_name()?;
        self.name_new_cluster();
        let expired: Vec<u64> = self.io.reads.iter().filter(|(_, r)| r.deadline <= now).map(|(&ctx, _)| ctx).collect();
        for ctx in expired {
            let read = self.io.reads.remove(&ctx).expect("listed above");
            self.io.reply_error(read.reply_to, ErrorCode::Timeout, "could not confirm leadership in time");
        }
        self.raft.store_mut().disk.poll(now);
        if self.raft.store().disk.handover_due() {
            self.hand_over_for_lack_of_space();
        }
        Ok(())
    }

    /// Keeps the wire in step with the cluster's name in the log, and the
    /// state dir in step with the wire (a joining node takes the name of the
    /// leader that added it): see `transport::Wire`.
    fn follow_cluster_name(&mut self) -> Result<(), PersistError> {
        let (raft, transport) = (&self.raft, &self.io.transport);
        if transport.cluster() == 0 {
            match raft.committed_membership().cluster {
                0 => transport.expect_cluster(raft.membership().cluster),
                named => {
                    info!("node {}: the cluster is named {named:#018x}", raft.id());
                    transport.name_cluster(named);
                }
            }
        }
        if transport.cluster() != 0 {
            transport.learn_fingerprint(raft.membership().fingerprint);
        }
        let cluster = transport.cluster();
        if cluster != self.io.cluster_recorded {
            record_cluster(&mut self.raft.store_mut().storage, cluster)?;
            self.io.cluster_recorded = cluster;
        }
        Ok(())
    }

    /// The first leader of a new cluster names it: a random id, committed
    /// like any membership change, so every member learns the same.
    fn name_new_cluster(&mut self) {
        let unnamed = self.io.transport.cluster() == 0 && self.raft.membership().cluster == 0;
        if self.raft.soft_state().role != Role::Leader || !unnamed {
            return;
        }
        let name = random_cluster_name();
        let context = self.raft.membership().context.clone();
        match self.raft.change_membership(MembershipChange::Name(name), context) {
            Ok(index) => info!("node {}: naming the new cluster {name:#018x} (entry {index})", self.raft.id()),
            Err(e) => debug!("node {}: cannot name the cluster yet: {e:?}", self.raft.id()),
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
            raft.store_mut().disk.handed_over();
            info!("node {}: low on disk space; handing leadership to {to}", raft.id());
            if let Err(e) = raft.transfer_leadership(to) {
                warn!("node {}: cannot hand leadership to {to}: {e:?}", raft.id());
            }
        }
    }

    fn on_peer(&mut self, inbound: Inbound) {
        match inbound {
            // Not taken while low on space (no reply: the leader retries,
            // and the majority commits without us meanwhile).
            Inbound::Message(msg)
                if self.raft.store().disk.raised()
                    && matches!(&msg.body, Body::AppendEntries { entries, .. } if !entries.is_empty()) => {}
            Inbound::Message(msg) => {
                self.io.last_contact.heard(msg.from);
                self.raft.step(msg)
            }
            Inbound::Unreachable(peer) => self.raft.peer_unreachable(peer),
        }
    }

    fn on_client(&mut self, ClientCall { request, reply_to, bytes }: ClientCall) {
        self.io.shared.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
        let deadline = Instant::now() + self.io.request_timeout;
        match request {
            Request::Write { command, client_id, seq } => {
                let logged = LoggedCommand { command, client_id, seq };
                self.on_write(logged, reply_to, deadline);
            }
            Request::Get { .. } if self.io.reads.len() >= MAX_PENDING_READS => {
                self.io.reply_error(reply_to, ErrorCode::Busy, "too many reads in flight; retry later")
            }
            Request::Get { key } => {
                self.next_read_ctx += 1;
                let ctx = self.next_read_ctx;
                match self.raft.read_index(ctx) {
                    Ok(()) => {
                        self.io.reads.insert(ctx, PendingRead { key, reply_to, deadline });
                    }
                    Err(not_leader) => self.io.reply_not_leader(reply_to, not_leader),
                }
            }
            Request::Status => {
                let reply = Reply::Status(Box::new(self.status()));
                self.io.replier.send(reply_to, &reply);
            }
            Request::Snapshot => self.io.to_applier(ApplyMsg::Snapshot { reply_to }),
            Request::Log { from, limit } => self.read_disk(DiskRead::Log { from, limit, reply_to }),
            Request::SnapshotData { index, offset } => self.read_disk(DiskRead::Snapshot { index, offset, reply_to }),
            Request::Members => {
                let raft = &self.raft;
                let contact = &self.io.last_contact;
                let progress = |id| raft.progress(id).map(|pr| (pr.matched, contact.get(id)));
                let members = member_infos(raft.membership(), progress);
                self.io.replier.send(reply_to, &Reply::Members { members });
            }
            Request::AddNode { member, voter } => {
                let mut members = members_of(self.raft.membership());
                if let Err(problem) = check_new_member(&members, &member) {
                    return self.io.reply_error(reply_to, ErrorCode::BadRequest, &problem);
                }
                let curve = self.io.security.is_curve();
                if curve != member.public_key.is_some() {
                    let problem = if curve {
                        format!("the cluster uses CURVE: node {} needs a public_key", member.id)
                    } else {
                        "the cluster does not use CURVE: no public_key".to_string()
                    };
                    return self.io.reply_error(reply_to, ErrorCode::BadRequest, &problem);
                }
                let change = MembershipChange::AddLearner { id: member.id, promote: voter };
                members.push(member);
                self.change_membership(change, &members, reply_to, deadline);
            }
            Request::RemoveNode { id } => {
                let mut members = members_of(self.raft.membership());
                members.retain(|m| m.id != id);
                self.change_membership(MembershipChange::Remove(id), &members, reply_to, deadline);
            }
            Request::PromoteNode { id } => {
                // As etcd: only a learner that holds everything committed, so
                // that counting it does not stall commits.
                let (raft, committed) = (&self.raft, self.raft.commit_index());
                let behind = raft.membership().learners.contains(&id)
                    && raft.progress(id).is_some_and(|pr| pr.matched < committed);
                if behind {
                    let matched = raft.progress(id).map_or(0, |pr| pr.matched);
                    let message = format!("learner {id} is still catching up ({matched} of {committed}); retry later");
                    return self.io.reply_error(reply_to, ErrorCode::Busy, &message);
                }
                let members = members_of(self.raft.membership());
                self.change_membership(MembershipChange::Promote(id), &members, reply_to, deadline);
            }
            Request::TransferLeader { to } => self.transfer_leader(to, reply_to),
        }
    }

    /// Proposes a membership change; the client is answered once it applies.
    fn change_membership(
        &mut self,
        change: MembershipChange,
        members: &[Member],
        reply_to: ReplyTo,
        deadline: Instant,
    ) {
        if self.raft.soft_state().role == Role::Leader && self.io.transport.cluster() == 0 {
            // A node added before this leader speaks for the name (once it
            // knows it is committed) would take the fingerprint for it.
            let message = "the new cluster has not committed its name yet; retry in a moment";
            return self.io.reply_error(reply_to, ErrorCode::Busy, message);
        }
        match self.raft.change_membership(change, context_of(members)) {
            Ok(index) => {
                METRICS.proposals.inc();
                let term = self.raft.soft_state().term;
                self.io.to_applier(ApplyMsg::AwaitWrite { index, term, session: None, reply_to, deadline });
            }
            Err(ChangeError::NotLeader(not_leader)) => self.io.reply_not_leader(reply_to, not_leader),
            Err(ChangeError::Busy(why)) => self.io.reply_error(reply_to, ErrorCode::Busy, why),
            Err(ChangeError::Invalid(why)) => self.io.reply_error(reply_to, ErrorCode::BadRequest, &why),
        }
    }

    /// Hands leadership to `to` (default: the most up-to-date voter); the
    /// client is answered once it leads, or after an election timeout.
    fn transfer_leader(&mut self, to: Option<NodeId>, reply_to: ReplyTo) {
        let raft = &mut self.raft;
        let target = to.or_else(|| raft.transfer_candidate()).unwrap_or(raft.id());
        if raft.soft_state().role == Role::Leader && target == raft.id() {
            return self.io.replier.send(reply_to, &Reply::TransferLeader { leader: target });
        }
        match raft.transfer_leadership(target) {
            Ok(()) => self.io.transfers.wait(target, reply_to, Instant::now() + self.io.handover_timeout),
            Err(TransferError::NotLeader(not_leader)) => self.io.reply_not_leader(reply_to, not_leader),
            Err(TransferError::NotAPeer(id)) => {
                let message = format!("node {id} is not a voter of this cluster");
                self.io.reply_error(reply_to, ErrorCode::BadRequest, &message)
            }
        }
    }

    fn read_disk(&self, read: DiskRead) {
        if let Err(TrySendError::Full(read) | TrySendError::Disconnected(read)) = self.io.log_reader.try_send(read) {
            self.io.reply_error(read.reply_to(), ErrorCode::Busy, "too many log or snapshot reads queued; retry later")
        }
    }

    /// A write with a session that was already decided, or is pending here,
    /// is answered without a new log entry; anything else is proposed.
    fn on_write(&mut self, logged: LoggedCommand, reply_to: ReplyTo, deadline: Instant) {
        let session = logged.client_id.clone().zip(logged.seq);
        if let Some((client_id, seq)) = &session {
            let verdict = lock(&self.io.sessions).check(client_id, *seq);
            if let Some(reply) = session_reply(verdict, *seq) {
                return self.io.replier.send(reply_to, &reply);
            }
            if let Some((index, term)) = self.io.proposals.pending(client_id, *seq)
                && !self.io.proposals.is_full()
            {
                let session = session.clone();
                return self.io.to_applier(ApplyMsg::AwaitWrite { index, term, session, reply_to, deadline });
            }
        }
        self.io.proposals.applied_to(self.io.shared.last_applied.load(Ordering::Acquire));
        if self.io.proposals.is_full() {
            return self.io.reply_error(reply_to, ErrorCode::Busy, "too many writes in flight; nothing was applied");
        }
        let bytes = logged.encode();
        let size = bytes.len();
        // Counted before it is written, so that one large batch cannot eat
        // the reserve between two checks.
        self.raft.store_mut().disk.wrote(size as u64);
        self.raft.store_mut().disk.poll(Instant::now());
        if self.raft.store().disk.raised() {
            let message =
                format!("node {} is low on disk space (alarm {NOSPACE}); nothing was applied", self.raft.id());
            return self.io.reply_error(reply_to, ErrorCode::Busy, &message);
        }
        match self.raft.propose(bytes) {
            Ok((index, term)) => {
                METRICS.proposals.inc();
                self.io.proposals.add(index, term, size, session.as_ref().map(|(c, s)| (c.as_str(), *s)));
                self.io.to_applier(ApplyMsg::AwaitWrite { index, term, session, reply_to, deadline });
            }
            Err(not_leader) => self.io.reply_not_leader(reply_to, not_leader),
        }
    }

    fn status(&self) -> StatusInfo {
        let raft = &self.raft;
        let soft = raft.soft_state();
        let role = match soft.role {
            Role::Leader => "leader",
            Role::Candidate => "candidate",
            // A pre-candidate has not left its term: to the outside it is a follower.
            Role::Follower | Role::PreCandidate => "follower",
        };
        StatusInfo {
            id: raft.id(),
            role: role.to_string(),
            term: soft.term,
            leader: soft.leader,
            commit_index: raft.commit_index(),
            last_applied: self.io.shared.last_applied.load(Ordering::Acquire),
            last_log_index: raft.last_index(),
            members: raft.membership().voters.iter().copied().collect(),
            learners: raft.membership().learners.iter().copied().collect(),
            first_log_index: raft.snapshot().index + 1,
            snapshot_index: self.io.shared.snapshot_index.load(Ordering::Acquire),
            alarms: self.raft.store().disk.raised().then(|| NOSPACE.to_string()).into_iter().collect(),
            vote: raft.hard_state().vote,
            // A leader's leader is the majority that keeps it leading.
            leader_contact_ms: match soft.leader {
                Some(leader) if leader == raft.id() => {
                    let voters = &raft.membership().voters;
                    self.io.last_contact.majority_silence(leader, voters, Instant::now()).map(|d| d.as_millis() as u64)
                }
                Some(leader) => self.io.last_contact.get(leader).map(|at| at.elapsed().as_millis() as u64),
                None => None,
            },
            state_bytes: self.raft.store().disk.state_bytes(),
            cluster_id: match self.io.transport.cluster() {
                0 => None,
                named => Some(format!("{named:016x}")),
            },
        }
    }

    /// What the core knows, for `/metrics` (a handful of atomic stores).
    fn publish_metrics(&self, inputs: &Inputs) {
        let (raft, m) = (&self.raft, &*METRICS);
        let soft = raft.soft_state();
        m.term.set(soft.term as i64);
        m.is_leader.set((soft.role == Role::Leader) as i64);
        m.commit_index.set(raft.commit_index() as i64);
        m.last_log_index.set(raft.last_index() as i64);
        m.first_log_index.set(raft.snapshot().index as i64 + 1);
        m.members.with_label_values(&["voter"]).set(raft.membership().voters.len() as i64);
        m.members.with_label_values(&["learner"]).set(raft.membership().learners.len() as i64);
        m.client_queue.set(inputs.clients.len() as i64);
        m.apply_queue.set(self.io.applier.len() as i64);
    }

    fn process_ready(&mut self) -> Result<(), PersistError> {
        run_ready(&mut self.raft, &mut self.io)
    }

    /// Clean stop: answer the reads still waiting and record the commit index
    /// so a restart re-applies without waiting for a leader. Requests still
    /// queued for us are answered by the client endpoint, their only
    /// producer, once it has stopped adding to the queue.
    fn shut_down(&mut self) -> Result<(), PersistError> {
        self.io.shared.stopping.store(true, Ordering::Release);
        for (_, read) in std::mem::take(&mut self.io.reads) {
            self.io.reply_error(read.reply_to, ErrorCode::ShuttingDown, "node is shutting down");
        }
        let hard_state = self.raft.hard_state();
        let storage = &mut self.raft.store_mut().storage;
        storage.write(Some(&hard_state), &[])?;
        Ok(storage.sync()?)
    }
}

impl driver::Shell for Io {
    fn send(&mut self, msg: Message) {
        self.transport.send(msg);
    }

    fn soft_state(&mut self, soft: SoftState) {
        info!(
            role = soft.role.as_str(), term = soft.term, leader = soft.leader;
            "node {}: role {} in term {}, leader {}",
            self.id,
            soft.role.as_str(),
            soft.term,
            soft.leader.map_or("unknown".to_string(), |l| l.to_string())
        );
        self.shared.set_leader(soft.leader);
        // A leadership is a (leader, term): a blip of "no leader" between
        // two heartbeats of the same one is no change.
        if let Some(leader) = soft.leader
            && self.leadership_seen != Some((leader, soft.term))
        {
            self.leadership_seen = Some((leader, soft.term));
            METRICS.leader_changes.inc();
        }
        // A candidate or leader in a term it was not one in before campaigned
        // in it (a lone voter becomes leader without showing as candidate).
        if matches!(soft.role, Role::Candidate | Role::Leader) && soft.term > self.campaigned_in {
            self.campaigned_in = soft.term;
            METRICS.elections.inc();
        }
        self.leader = soft.leader;
        if let Some(leader) = soft.leader {
            for reply_to in self.transfers.done(leader) {
                self.replier.send(reply_to, &Reply::TransferLeader { leader });
            }
        }
        if self.role == Role::Leader && soft.role != Role::Leader {
            self.proposals.clear();
            self.to_applier(ApplyMsg::LeadershipLost { leader: soft.leader });
        }
        self.role = soft.role;
    }

    fn membership(&mut self, membership: &Membership) {
        info!(
            voters:? = membership.voters, learners:? = membership.learners;
            "node {}: members: voters {:?}, learners {:?}", self.id, membership.voters, membership.learners
        );
        let members = members_of(membership);
        // Joining: no membership yet, so the config's nodes stay the peers.
        if !members.is_empty() {
            // Their keys first: the connections to new members need them.
            self.security.learn(&members);
            let peers = peer_endpoints(&members, self.id, &self.routes).expect("no route to itself: checked at start");
            if let Err(e) = self.transport.set_peers(peers) {
                warn!("node {}: cannot connect to the new members: {e}", self.id);
            }
            *lock(&self.shared.members) = members;
        }
        for id in &membership.removed {
            // Absent already after the first time, which is fine.
            let _ = METRICS.peer_seconds.remove_label_values(&[&id.to_string()]);
        }
    }

    fn restore(&mut self, snapshot: &Snapshot) {
        self.to_applier(ApplyMsg::Restore(snapshot.meta));
    }

    fn apply(&mut self, entries: Vec<Entry>) {
        self.to_applier(ApplyMsg::Apply(entries));
    }

    fn read_ready(&mut self, read: ReadState) {
        if let Some(pending) = self.reads.remove(&read.ctx) {
            self.to_applier(ApplyMsg::Read { index: read.index, key: pending.key, reply_to: pending.reply_to });
        }
    }

    fn read_failed(&mut self, ctx: u64) {
        if let Some(read) = self.reads.remove(&ctx) {
            self.reply_not_leader(read.reply_to, NotLeader { leader: self.leader });
        }
    }
}

impl Io {
    fn to_applier(&self, msg: ApplyMsg) {
        // The applier only stops after us; a failed send means it crashed.
        if self.applier.send(msg).is_err() {
            warn!("apply loop is gone");
        }
    }

    fn reply_not_leader(&self, reply_to: ReplyTo, NotLeader { leader }: NotLeader) {
        self.replier.send(reply_to, &not_leader(self.id, leader));
    }

    fn reply_error(&self, reply_to: ReplyTo, code: ErrorCode, message: &str) {
        self.replier.send(reply_to, &Reply::error(code, message, self.leader));
    }
}

/// A new cluster's name: the clock hashed under the random keys std's
/// `RandomState` draws from the operating system, so unpredictable and, in
/// practice, unique; never 0, which means "no name".
fn random_cluster_name() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    RandomState::new().hash_one(now).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipelined_writes_of_one_client_are_each_pending_until_applied() {
        let mut proposals = Proposals::default();
        proposals.add(7, 2, 10, Some(("c", 5)));
        proposals.add(8, 2, 10, Some(("c", 6)));
        proposals.add(9, 2, 10, None);
        assert_eq!((proposals.pending("c", 5), proposals.pending("c", 6)), (Some((7, 2)), Some((8, 2))));
        proposals.applied_to(7);
        assert_eq!((proposals.pending("c", 5), proposals.pending("c", 6)), (None, Some((8, 2))));
        assert_eq!((proposals.unapplied.len(), proposals.unapplied_bytes), (2, 20));
        proposals.applied_to(9);
        assert!(proposals.by_session.is_empty() && proposals.session_at.is_empty() && proposals.unapplied.is_empty());
    }
}
