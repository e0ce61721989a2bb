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

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, after, select};
use log::{info, warn};

use super::Shared;
use super::applier::ApplyMsg;
use super::replies::{Replier, ReplyTo, not_leader};
use crate::kv::{LoggedCommand, Value, command_json};
use crate::protocol::{ErrorCode, LogEntryView, Reply, Request, StatusInfo};
use crate::raft::{NotLeader, Raft, Role, SoftState};
use crate::storage::{Storage, StorageError};
use crate::transport::{Inbound, Transport};

/// A decoded client request on its way to the core loop.
pub struct ClientCall {
    pub request: Request,
    pub reply_to: ReplyTo,
}

/// Inputs drained per wake-up before the batch is processed; bounds latency
/// under a flood while still batching generously.
const MAX_BATCH: usize = 4096;

struct PendingRead {
    key: Value,
    reply_to: ReplyTo,
    deadline: Instant,
}

pub struct CoreLoop {
    pub raft: Raft,
    pub storage: Storage,
    pub transport: Transport,
    pub applier: Sender<ApplyMsg>,
    pub replier: Replier,
    pub shared: Arc<Shared>,
    pub request_timeout: Duration,
    /// How long a stopping leader waits to see a new leader take over.
    pub handover_timeout: Duration,
}

pub struct Inputs {
    pub ticks: Receiver<Instant>,
    pub peers: Receiver<Inbound>,
    pub clients: Receiver<ClientCall>,
    pub stop: Receiver<()>,
}

struct State {
    io: CoreLoop,
    reads: HashMap<u64, PendingRead>,
    next_read_ctx: u64,
    role: Role,
}

impl CoreLoop {
    /// Runs until `inputs.stop` fires. A storage error is fatal: a node that
    /// cannot persist must not keep voting or acknowledging.
    pub fn run(self, inputs: Inputs) -> Result<(), StorageError> {
        let mut state = State { io: self, reads: HashMap::new(), next_read_ctx: 0, role: Role::Follower };
        while state.run_once(&inputs, &inputs.stop)? {}
        state.hand_over_leadership(&inputs)?;
        state.shut_down(&inputs.clients)
    }
}

impl State {
    /// Waits for one input, drains what else is queued, then carries out the
    /// core's `Ready`. False once `stop` fires or an input channel closes.
    fn run_once<T>(&mut self, inputs: &Inputs, stop: &Receiver<T>) -> Result<bool, StorageError> {
        select! {
            recv(stop) -> _ => return Ok(false),
            recv(inputs.ticks) -> _ => self.on_tick(),
            recv(inputs.peers) -> msg => match msg {
                Ok(msg) => self.on_peer(msg),
                Err(_) => return Ok(false),
            },
            recv(inputs.clients) -> call => match call {
                Ok(call) => self.on_client(call),
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
        Ok(true)
    }

    /// A stopping leader hands leadership to the follower holding the most
    /// of the log and runs on until another node leads, the core abandons
    /// the transfer, or `handover_timeout` passes. Writes are refused
    /// meanwhile (clients retry, as after an election); reads are served.
    fn hand_over_leadership(&mut self, inputs: &Inputs) -> Result<(), StorageError> {
        let id = self.io.raft.id();
        let Some(to) = self.io.raft.transfer_candidate() else { return Ok(()) };
        if let Err(e) = self.io.raft.transfer_leadership(to) {
            warn!("node {id}: cannot transfer leadership to {to}: {e:?}");
            return Ok(());
        }
        info!("node {id}: transferring leadership to {to} before shutdown");
        self.process_ready()?;
        let deadline = after(self.io.handover_timeout);
        loop {
            let soft = self.io.raft.soft_state();
            match soft.leader {
                Some(leader) if leader != id => {
                    info!("node {id}: node {leader} leads in term {}; shutting down", soft.term);
                    return Ok(());
                }
                Some(_) if self.io.raft.transfer_target().is_none() => {
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

    fn on_tick(&mut self) {
        self.io.raft.tick();
        let now = Instant::now();
        let expired: Vec<u64> = self.reads.iter().filter(|(_, r)| r.deadline <= now).map(|(&ctx, _)| ctx).collect();
        for ctx in expired {
            let read = self.reads.remove(&ctx).expect("listed above");
            self.reply_error(read.reply_to, ErrorCode::Timeout, "could not confirm leadership in time");
        }
    }

    fn on_peer(&mut self, inbound: Inbound) {
        match inbound {
            Inbound::Message(msg) => self.io.raft.step(msg),
            Inbound::Unreachable(peer) => self.io.raft.peer_unreachable(peer),
        }
    }

    fn on_client(&mut self, ClientCall { request, reply_to }: ClientCall) {
        let deadline = Instant::now() + self.io.request_timeout;
        match request {
            Request::Write { command, client_id, seq } => {
                let bytes = LoggedCommand { command, client_id, seq }.encode();
                match self.io.raft.propose(bytes) {
                    Ok((index, term)) => self.to_applier(ApplyMsg::AwaitWrite { index, term, reply_to, deadline }),
                    Err(not_leader) => self.reply_not_leader(reply_to, not_leader),
                }
            }
            Request::Get { key } => {
                self.next_read_ctx += 1;
                let ctx = self.next_read_ctx;
                match self.io.raft.read_index(ctx) {
                    Ok(()) => {
                        self.reads.insert(ctx, PendingRead { key, reply_to, deadline });
                    }
                    Err(not_leader) => self.reply_not_leader(reply_to, not_leader),
                }
            }
            Request::Status => {
                let reply = Reply::Status(self.status());
                self.io.replier.send(reply_to, &reply);
            }
            Request::Log { from, limit } => {
                let entries = self
                    .io
                    .raft
                    .committed_entries(from, limit as usize)
                    .iter()
                    .map(|e| LogEntryView { index: e.index, term: e.term, command: command_json(&e.payload) })
                    .collect();
                self.io.replier.send(reply_to, &Reply::Log { entries });
            }
        }
    }

    fn status(&self) -> StatusInfo {
        let raft = &self.io.raft;
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
            members: raft.members().to_vec(),
        }
    }

    /// Carries out the core's `Ready`s in the documented order until it has
    /// nothing more to say.
    fn process_ready(&mut self) -> Result<(), StorageError> {
        while self.io.raft.has_ready() {
            let rd = self.io.raft.ready();
            if let Some(soft) = rd.soft_state {
                self.on_soft_state(soft);
            }
            let must_persist = rd.must_persist();
            for msg in rd.messages {
                self.io.transport.send(msg);
            }
            if must_persist {
                self.io.storage.write(rd.hard_state.as_ref(), rd.truncate_from, &rd.entries)?;
                self.io.storage.sync()?;
            }
            for msg in rd.persisted_messages {
                self.io.transport.send(msg);
            }
            self.io.raft.advance();
            if !rd.committed.is_empty() {
                self.to_applier(ApplyMsg::Apply(rd.committed));
            }
            for rs in rd.read_states {
                if let Some(read) = self.reads.remove(&rs.ctx) {
                    self.to_applier(ApplyMsg::Read { index: rs.index, key: read.key, reply_to: read.reply_to });
                }
            }
            for ctx in rd.failed_reads {
                if let Some(read) = self.reads.remove(&ctx) {
                    let leader = self.io.raft.soft_state().leader;
                    self.reply_not_leader(read.reply_to, NotLeader { leader });
                }
            }
        }
        Ok(())
    }

    fn on_soft_state(&mut self, soft: SoftState) {
        info!(
            "node {}: role {} in term {}, leader {}",
            self.io.raft.id(),
            soft.role.as_str(),
            soft.term,
            soft.leader.map_or("unknown".to_string(), |l| l.to_string())
        );
        self.io.shared.set_leader(soft.leader);
        if self.role == Role::Leader && soft.role != Role::Leader {
            self.to_applier(ApplyMsg::LeadershipLost { leader: soft.leader });
        }
        self.role = soft.role;
    }

    fn to_applier(&self, msg: ApplyMsg) {
        // The applier only stops after us; a failed send means it crashed.
        if self.io.applier.send(msg).is_err() {
            warn!("apply loop is gone");
        }
    }

    fn reply_not_leader(&self, reply_to: ReplyTo, NotLeader { leader }: NotLeader) {
        self.io.replier.send(reply_to, &not_leader(self.io.raft.id(), leader));
    }

    fn reply_error(&self, reply_to: ReplyTo, code: ErrorCode, message: &str) {
        let leader = self.io.raft.soft_state().leader;
        self.io.replier.send(reply_to, &Reply::error(code, message, leader));
    }

    /// Clean stop: answer everyone still waiting, record the commit index so a
    /// restart re-applies without waiting for a leader, and stop the applier.
    fn shut_down(mut self, clients: &Receiver<ClientCall>) -> Result<(), StorageError> {
        self.io.shared.stopping.store(true, Ordering::Release);
        for call in clients.try_iter() {
            self.reply_error(call.reply_to, ErrorCode::ShuttingDown, "node is shutting down");
        }
        for (_, read) in std::mem::take(&mut self.reads) {
            self.reply_error(read.reply_to, ErrorCode::ShuttingDown, "node is shutting down");
        }
        self.io.storage.write(Some(&self.io.raft.hard_state()), None, &[])?;
        self.io.storage.sync()?;
        self.to_applier(ApplyMsg::Shutdown);
        self.io.transport.shutdown();
        Ok(())
    }
}
