//! One simulated server: the real `Raft` core plus a shell that follows the
//! Ready protocol of `ready.rs` exactly as `node/core_loop.rs` does, a disk
//! model, the register state machine and the client requests it holds.

use std::collections::BTreeMap;

use raft_zmq::raft::{Config, Entry, Index, Message, NodeId, Raft, SoftState, Term};

use super::history::{OpId, OpKind};
use super::register::{Key, Register, Version, encode_set};
use super::rng::Rng;
use super::schedule::Time;
use super::storage::Disk;

/// How a client request held by a node ended.
#[derive(Clone, Copy, Debug)]
pub enum Completion {
    WriteAcked { op: OpId, index: Index, term: Term },
    ReadServed { op: OpId, key: Key, version: Version },
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
}

struct PendingRead {
    key: Key,
    /// Set once leadership is confirmed; served when applied reaches it.
    index: Option<Index>,
}

pub struct SimNode {
    cfg: Config,
    /// `None` while crashed.
    raft: Option<Raft>,
    pub disk: Disk,
    /// Bumped by every crash, so stale timers for a past life are ignored.
    pub incarnation: u64,
    /// This node's drifting clock: virtual time between two ticks.
    pub tick_period: Time,
    /// A paused process (GC, SIGSTOP) handles nothing until then.
    pub paused_until: Time,
    register: Register,
    applied: Index,
    /// Proposals awaiting their apply: index → (term, op).
    writes: BTreeMap<Index, (Term, OpId)>,
    /// Reads by ctx, which is the op id.
    reads: BTreeMap<OpId, PendingRead>,
}

impl SimNode {
    pub fn new(cfg: Config, disk: Disk, tick_period: Time) -> SimNode {
        let raft = Raft::new(cfg.clone(), disk.hard_state, disk.entries.clone());
        SimNode {
            cfg,
            raft: Some(raft),
            disk,
            incarnation: 0,
            tick_period,
            paused_until: 0,
            register: Register::default(),
            applied: 0,
            writes: BTreeMap::new(),
            reads: BTreeMap::new(),
        }
    }

    pub fn id(&self) -> NodeId {
        self.cfg.id
    }

    pub fn raft(&self) -> Option<&Raft> {
        self.raft.as_ref()
    }

    pub fn raft_mut(&mut self) -> Option<&mut Raft> {
        self.raft.as_mut()
    }

    pub fn is_up(&self) -> bool {
        self.raft.is_some()
    }

    pub fn applied(&self) -> Index {
        self.applied
    }

    /// Hands a client request to the core; a refusal fails it at once.
    pub fn submit(&mut self, op: OpId, kind: OpKind, fx: &mut Effects) {
        let Some(raft) = self.raft.as_mut() else { return fx.completed.push(Completion::Failed(op)) };
        match kind {
            OpKind::Write(key) => match raft.propose(encode_set(key, op)) {
                Ok((index, term)) => {
                    // A slot re-proposed after a truncation: the old request lost it.
                    if let Some((_, displaced)) = self.writes.insert(index, (term, op)) {
                        fx.completed.push(Completion::Failed(displaced));
                    }
                }
                Err(_) => fx.completed.push(Completion::Failed(op)),
            },
            OpKind::Read(key) => match raft.read_index(op) {
                Ok(()) => {
                    self.reads.insert(op, PendingRead { key, index: None });
                }
                Err(_) => fx.completed.push(Completion::Failed(op)),
            },
        }
    }

    /// Runs Ready rounds until the core is quiet, in the documented order.
    /// With probability `torn_crash`, a round that must persist crashes the
    /// node after its `messages` left and before the sync.
    pub fn process(&mut self, rng: &mut Rng, torn_crash: f64, fx: &mut Effects) {
        loop {
            let Some(raft) = self.raft.as_mut().filter(|raft| raft.has_ready()) else { return };
            let mut rd = raft.ready();
            fx.roles.extend(rd.soft_state);
            fx.sent.append(&mut rd.messages);
            if rd.must_persist() && rng.chance(torn_crash) {
                fx.torn_crash = true;
                return self.crash(fx);
            }
            if let Some(first) = self.disk.persist(&rd) {
                fx.wrote_from = Some(fx.wrote_from.map_or(first, |f| f.min(first)));
            }
            fx.sent.append(&mut rd.persisted_messages);
            raft.advance();
            for entry in rd.committed {
                self.apply(entry, fx);
            }
            for rs in rd.read_states {
                if let Some(read) = self.reads.get_mut(&rs.ctx) {
                    read.index = Some(rs.index);
                }
            }
            for ctx in rd.failed_reads {
                if self.reads.remove(&ctx).is_some() {
                    fx.completed.push(Completion::Failed(ctx));
                }
            }
            self.serve_reads(fx);
        }
    }

    fn apply(&mut self, entry: Entry, fx: &mut Effects) {
        self.register.apply(&entry);
        self.applied = entry.index;
        if let Some((term, op)) = self.writes.remove(&entry.index) {
            fx.completed.push(if term == entry.term {
                Completion::WriteAcked { op, index: entry.index, term }
            } else {
                Completion::Failed(op)
            });
        }
        fx.applied.push(entry);
    }

    fn serve_reads(&mut self, fx: &mut Effects) {
        let applied = self.applied;
        let ready: Vec<OpId> =
            self.reads.iter().filter(|(_, r)| r.index.is_some_and(|i| i <= applied)).map(|(&op, _)| op).collect();
        for op in ready {
            let key = self.reads.remove(&op).expect("listed above").key;
            fx.completed.push(Completion::ReadServed { op, key, version: self.register.get(key) });
        }
    }

    /// Loses everything but the disk; held client requests get no answer.
    pub fn crash(&mut self, fx: &mut Effects) {
        self.raft = None;
        self.incarnation += 1;
        self.register = Register::default();
        self.applied = 0;
        let writes = std::mem::take(&mut self.writes).into_values().map(|(_, op)| op);
        let reads = std::mem::take(&mut self.reads).into_keys();
        fx.completed.extend(writes.chain(reads).map(Completion::Failed));
    }

    /// Starts a fresh process from what the disk holds.
    pub fn restart(&mut self, seed: u64) {
        let cfg = Config { seed, ..self.cfg.clone() };
        self.raft = Some(Raft::new(cfg, self.disk.hard_state, self.disk.entries.clone()));
    }
}
