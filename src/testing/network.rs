//! Cores of one cluster on an in-memory network whose delivery the caller
//! controls: the core's scenario tests and the fuzz targets both build on
//! it, each adding its own faults (cut links, losses, duplicates, crashes).
//! Every node runs the real Ready driver over a [`MemStore`].

use std::collections::{BTreeMap, VecDeque};

use crate::raft::driver::{ReadySink, run_ready};
use crate::raft::{
    Entry, MemStore, Membership, Message, NodeId, Raft, ReadState, SnapshotInfo, SnapshotMeta, SoftState,
};

/// A core with its durable state where its shell keeps it.
pub type Core = Raft<MemStore>;

/// What one node's shell was handed: its state machine and its reads.
#[derive(Debug, Default)]
pub struct Seen {
    /// The snapshot the state machine last started over from.
    pub restored: Option<SnapshotMeta>,
    /// Entries applied since then (or since the node started).
    pub applied: Vec<Entry>,
    pub reads: Vec<ReadState>,
    pub failed_reads: Vec<u64>,
}

#[derive(Default)]
pub struct Network {
    pub nodes: BTreeMap<NodeId, Core>,
    pub seen: BTreeMap<NodeId, Seen>,
    /// Sent and not yet delivered or lost, oldest first.
    pub queue: VecDeque<Message>,
    /// Every message sent, if `record` is set: for assertions about traffic.
    pub sent: Vec<Message>,
    pub record: bool,
}

impl Network {
    /// Starts `core` as node `core.id()`, or restarts it: its state machine
    /// starts over empty (from the snapshot its store starts after).
    pub fn start(&mut self, core: Core) {
        let id = core.id();
        self.nodes.insert(id, core);
        self.seen.insert(id, Seen::default());
    }

    pub fn core(&self, id: NodeId) -> &Core {
        &self.nodes[&id]
    }

    pub fn core_mut(&mut self, id: NodeId) -> &mut Core {
        self.nodes.get_mut(&id).expect("a node of this network")
    }

    /// Runs node `id`'s Ready cycle through the shared driver: what it
    /// sends is queued, what it applies and reads is seen.
    pub fn process(&mut self, id: NodeId) {
        let Some(core) = self.nodes.get_mut(&id) else { return };
        let seen = self.seen.get_mut(&id).expect("seen with its node");
        let sent = if self.record { Some(&mut self.sent) } else { None };
        let Ok(()) = run_ready(core, &mut Shell { seen, queue: &mut self.queue, sent });
    }

    pub fn tick(&mut self, id: NodeId) {
        self.core_mut(id).tick();
        self.process(id);
    }

    /// Hands `message` to its node and runs that node's Ready cycle. A
    /// message to a node that is not running is lost.
    pub fn step(&mut self, message: Message) {
        let to = message.to;
        if let Some(core) = self.nodes.get_mut(&to) {
            core.step(message);
            self.process(to);
        }
    }

    /// Removes the queued message at `at` (modulo the queue's length).
    pub fn take(&mut self, at: usize) -> Option<Message> {
        let len = self.queue.len();
        (len > 0).then(|| self.queue.remove(at % len)).flatten()
    }
}

struct Shell<'a> {
    seen: &'a mut Seen,
    queue: &'a mut VecDeque<Message>,
    sent: Option<&'a mut Vec<Message>>,
}

impl<S> ReadySink<S> for Shell<'_> {
    fn send(&mut self, msg: Message) {
        if let Some(sent) = self.sent.as_mut() {
            sent.push(msg.clone());
        }
        self.queue.push_back(msg);
    }

    fn soft_state(&mut self, _: SoftState) {}

    fn membership(&mut self, _: &Membership) {}

    fn restore(&mut self, snapshot: &SnapshotInfo, _: &S) {
        self.seen.restored = Some(snapshot.meta);
        self.seen.applied.clear();
    }

    fn apply(&mut self, entries: Vec<Entry>) {
        self.seen.applied.extend(entries);
    }

    fn read_ready(&mut self, read: ReadState) {
        self.seen.reads.push(read);
    }

    fn read_failed(&mut self, ctx: u64) {
        self.seen.failed_reads.push(ctx);
    }
}
