//! The core loop: the thread that runs the [`Server`] and carries out its
//! effects. It decides nothing itself.
//!
//! It waits for any input (tick, peer message, client request, sync or
//! snapshot written) in the transport's poll, which the other threads wake,
//! then drains everything else already queued before the server processes
//! the core's `Ready`. Proposals that arrive while the previous
//! batch is being fsynced therefore share one append, one sync and one
//! AppendEntries round (group commit).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use log::error;

use super::client_endpoint::ClientEndpoint;
use super::log_reader::DiskRead;
use super::replies::{Forward, ReplyTo};
use super::server::{Effect, ProcessError, Server, SnapshotJob, Time};
use super::store::{NodeStore, PersistError};
use super::writers::{MirrorMsg, SnapshotOutcome, SyncJob};
use super::{Shared, peer_endpoints};
use crate::lock;
use crate::metrics::METRICS;
use crate::net::security::NodeSecurity;
use crate::net::transport::{Inbound, Transport};
use crate::raft::{NodeId, Role};
use crate::storage::DuplicateMarks;
use crate::wire::protocol::{ErrorCode, Reply, Request, encode_request};

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

/// Client requests handed to the server per round: each may be answered
/// with a value of up to 1 MiB in this round, which bounds the replies one
/// round queues at once.
const MAX_CLIENT_BATCH: usize = 64;

pub struct Inputs {
    /// How often the server's clock ticks.
    pub tick: Duration,
    pub peers: Receiver<Inbound>,
    /// The log reader's replies to `log` and `snapshot_data` requests.
    pub disk_replies: Receiver<(ReplyTo, Reply)>,
    pub snapshots: Receiver<SnapshotOutcome>,
    /// Log writes made durable off this thread.
    pub synced: Receiver<SyncJob>,
    pub stop: Receiver<()>,
}

/// Where the server's effects go.
pub struct Outputs {
    pub transport: Transport,
    pub clients: ClientEndpoint,
    pub mirror: Sender<MirrorMsg>,
    pub snapshots: Sender<SnapshotJob>,
    pub log_reader: Sender<DiskRead>,
    pub syncer: Sender<SyncJob>,
    /// Applied entries the session check skipped, for the `log` op.
    pub duplicates: DuplicateMarks,
    pub shared: Arc<Shared>,
    /// Plaintext or CURVE; learns the keys of members added at run time.
    pub security: Arc<NodeSecurity>,
    /// `--peer` routes: where to reach some peers instead of their `raft` endpoint.
    pub routes: Vec<(NodeId, String)>,
}

pub struct CoreLoop {
    pub server: Server<NodeStore, ReplyTo>,
    pub out: Outputs,
    pub started: Instant,
}

impl CoreLoop {
    /// Runs until the node stops: on `inputs.stop`, on its own removal, or
    /// when an input channel closes.
    ///
    /// A storage error stops the process at once, with one line saying why:
    /// nothing may be retried after a failed fsync (the kernel may have
    /// dropped the dirty pages), and sled, once a write failed, never returns
    /// from closing the database.
    pub fn run(mut self, inputs: Inputs) {
        let id = self.server.raft().id();
        if let Err(e) = self.serve(&inputs) {
            error!("node {id}: stopping at once: {e}; restart it once its disk is fine");
            std::process::exit(1);
        }
        let Outputs { transport, clients, log_reader, shared, .. } = self.out;
        transport.shutdown();
        // The log reader stops once it has answered what it holds.
        drop(log_reader);
        clients.shut_down(&inputs.disk_replies, &shared);
    }

    fn now(&self) -> Time {
        self.started.elapsed()
    }

    fn serve(&mut self, inputs: &Inputs) -> Result<(), ProcessError<PersistError>> {
        self.publish();
        let mut next_tick = Instant::now() + inputs.tick;
        loop {
            if !self.run_once(inputs, &mut next_tick)? {
                self.server.begin_stop(self.now());
            }
            // Before this step's replies leave: a leader told this node is
            // behind sends snapshot pieces at once.
            let soft = self.server.raft().soft_state();
            self.out.transport.follow(soft.term, soft.leader);
            self.server.process(&mut |msg| self.out.transport.send(msg))?;
            // Before the forwards leave: the client endpoint answers those
            // to a leader other than the one it sees, rather than sending.
            self.out.shared.set_leader(self.server.leader());
            self.carry_out()?;
            self.publish();
            self.out.clients.tidy(&self.out.shared);
            METRICS.client_queue.set(self.out.clients.queued() as i64);
            METRICS.apply_queue.set(self.out.mirror.len() as i64);
            if self.server.removed() {
                self.server.begin_stop(self.now());
            }
            if self.server.may_stop(self.now()) {
                break;
            }
        }
        self.server.shut_down()?;
        self.carry_out()?;
        Ok(())
    }

    /// Waits for the network, a wake-up or the next tick, then takes what
    /// is queued. False when the node is to stop.
    fn run_once(&mut self, inputs: &Inputs, next_tick: &mut Instant) -> Result<bool, PersistError> {
        let wait = if self.queued(inputs) {
            Duration::ZERO
        } else {
            let tick = next_tick.saturating_duration_since(Instant::now());
            self.out.clients.look_again_in().map_or(tick, |soon| soon.min(tick))
        };
        // Replies and requests from peers land in `inputs.peers`; client
        // requests in the endpoint's queue.
        let Outputs { transport, clients, shared, .. } = &mut self.out;
        let ready = transport.poll(wait, &clients.sockets());
        clients.on_ready(&ready, shared);
        if !matches!(inputs.stop.try_recv(), Err(TryRecvError::Empty)) {
            return Ok(false);
        }
        let now = Instant::now();
        if now >= *next_tick {
            *next_tick = (*next_tick + inputs.tick).max(now);
            self.server.tick(self.now())?;
            *lock(&self.out.shared.status) = Some(self.server.status());
        }
        let mut taken = 0;
        for _ in 0..MAX_BATCH {
            let mut idle = true;
            // A completed sync may commit what the requests below wait on.
            match inputs.synced.try_recv() {
                Ok(job) => {
                    self.on_synced(job);
                    idle = false;
                }
                Err(TryRecvError::Disconnected) => return Ok(false),
                Err(TryRecvError::Empty) => {}
            }
            if let Ok(msg) = inputs.peers.try_recv() {
                self.on_peer(msg);
                idle = false;
            }
            if taken < MAX_CLIENT_BATCH
                && let Some(call) = self.out.clients.next_call()
            {
                self.on_client(call);
                taken += 1;
                idle = false;
            }
            if let Ok((reply_to, reply)) = inputs.disk_replies.try_recv() {
                self.out.clients.reply(reply_to, &reply);
                idle = false;
            }
            match inputs.snapshots.try_recv() {
                Ok(Ok(snapshot)) => self.server.snapshot_saved(snapshot)?,
                Ok(Err(_)) => self.server.snapshot_failed(),
                Err(TryRecvError::Disconnected) => return Ok(false),
                Err(TryRecvError::Empty) => {}
            }
            if idle {
                break;
            }
        }
        Ok(true)
    }

    /// Something waits to be taken: no need to wait for the network.
    fn queued(&self, inputs: &Inputs) -> bool {
        self.out.clients.queued() > 0
            || !inputs.synced.is_empty()
            || !inputs.peers.is_empty()
            || !inputs.snapshots.is_empty()
            || !inputs.disk_replies.is_empty()
    }

    fn on_peer(&mut self, inbound: Inbound) {
        match inbound {
            Inbound::Message(msg) => self.server.peer(msg, self.now()),
            Inbound::Unreachable(peer) => self.server.peer_unreachable(peer),
        }
    }

    fn on_synced(&mut self, SyncJob { seq, written, messages }: SyncJob) {
        self.server.synced(seq, written);
        messages.into_iter().for_each(|msg| self.out.transport.send(msg));
    }

    fn on_client(&mut self, ClientCall { request, reply_to, .. }: ClientCall) {
        let now = self.now();
        if reply_to.is_forwarded() {
            self.server.forwarded(request, reply_to, now);
        } else {
            self.server.client(request, reply_to, now);
        }
    }

    /// Fails only if the duplicate marks cannot be stored.
    fn carry_out(&mut self) -> Result<(), PersistError> {
        for effect in self.server.take_effects() {
            let out = &mut self.out;
            match effect {
                Effect::Reply(reply_to, reply) => out.clients.reply(reply_to, &reply),
                Effect::Forward { leader, request, handle } => {
                    let forward = Forward { leader, request: encode_request(&request), reply_to: handle };
                    out.clients.forward(forward, &out.shared)
                }
                Effect::Applied { entries, duplicates } => {
                    // Before `last_applied` says the `log` op may read them.
                    out.duplicates.mark(&duplicates)?;
                    // The mirror thread only stops after us.
                    let _ = out.mirror.send(MirrorMsg::Applied { entries, duplicates });
                }
                Effect::Restored(snapshot) => {
                    let _ = out.mirror.send(MirrorMsg::Restored(snapshot));
                }
                Effect::SaveSnapshot(job) => {
                    let _ = out.snapshots.send(*job);
                }
                Effect::ReadLog { from, limit, handle } => {
                    out.read_disk(DiskRead::Log { from, limit, reply_to: handle })
                }
                Effect::ReadSnapshotFile { index, offset, handle } => {
                    out.read_disk(DiskRead::Snapshot { index, offset, reply_to: handle })
                }
                Effect::Members(members) => {
                    // Their keys first: the connections to new members need them.
                    out.security.learn(&members);
                    let peers = peer_endpoints(&members, self.server.raft().id(), &out.routes)
                        .expect("no route to itself: checked at start");
                    out.transport.set_peers(peers);
                    *lock(&out.shared.members) = members;
                }
                Effect::Revoked(removed) => out.security.revoke(&removed),
                Effect::Sync { seq, written, messages } => {
                    // The syncer only stops after us.
                    let _ = out.syncer.send(SyncJob { seq, written, messages });
                }
                Effect::Identity { named, expected, fingerprint } => {
                    if named == 0 {
                        out.transport.expect_cluster(expected);
                    } else {
                        out.transport.name_cluster(named);
                        out.transport.learn_fingerprint(fingerprint);
                    }
                }
            }
        }
        Ok(())
    }

    /// What other threads read without asking: the leader (for forwarding),
    /// the applied and snapshot indexes, and the metrics.
    fn publish(&self) {
        let (server, shared, m) = (&self.server, &self.out.shared, &*METRICS);
        shared.set_leader(server.leader());
        let applied = server.applied().index;
        shared.last_applied.store(applied, Ordering::Release);
        shared.snapshot_index.store(server.last_snapshot().index, Ordering::Release);
        let raft = server.raft();
        let soft = raft.soft_state();
        m.term.set(soft.term as i64);
        m.is_leader.set((soft.role == Role::Leader) as i64);
        m.commit_index.set(raft.commit_index() as i64);
        m.applied_index.set(applied as i64);
        m.snapshot_index.set(server.last_snapshot().index as i64);
        m.last_log_index.set(raft.last_index() as i64);
        m.first_log_index.set(raft.log_start().index as i64 + 1);
        m.members.with_label_values(&["voter"]).set(raft.membership().voters.len() as i64);
        m.members.with_label_values(&["learner"]).set(raft.membership().learners.len() as i64);
    }
}

impl Outputs {
    fn read_disk(&mut self, read: DiskRead) {
        if let Err(TrySendError::Full(read) | TrySendError::Disconnected(read)) = self.log_reader.try_send(read) {
            let reply = Reply::error(
                ErrorCode::Busy,
                "too many log or snapshot reads queued; retry later",
                self.shared.leader(),
            );
            self.clients.reply(read.reply_to(), &reply);
        }
    }
}
