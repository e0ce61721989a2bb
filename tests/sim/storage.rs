//! The model of sled's durability: a node's disk holds exactly what the shell
//! wrote *and* synced. A crash keeps this and loses everything else, even
//! writes made long before, whose sync was left to later (asynchronous
//! storage writes).

use raft_zmq::config::Member;
use raft_zmq::node::server::NodeStorage;
use raft_zmq::raft::driver::DurableStore;
use raft_zmq::raft::{Entry, HardState, Index, LogStore, MemStore, Membership, SnapshotInfo, SnapshotMeta, Term};

use super::node::SnapshotRegistry;

/// The write never reached the disk: the node crashed before its sync.
#[derive(Debug)]
pub struct Crashed;

/// `Default` is the empty disk of a node that waits to be added to a cluster.
#[derive(Clone, Debug, Default)]
pub struct Disk {
    pub store: MemStore,
    /// The next write crashes the node before it is synced (and keeps
    /// nothing of it, as sled after a power loss may).
    pub crash_before_sync: bool,
    /// Lowest index written since the simulator last looked, for the checker.
    pub wrote_from: Option<Index>,
    /// The snapshot files, shared by every node's disk (see [`SnapshotRegistry`]).
    pub snapshots: SnapshotRegistry,
    /// The cluster's name, once the node knows it is committed.
    pub cluster: u64,
    /// Written since the last sync, in order: lost in a crash.
    pub unsynced: Vec<Write>,
}

#[derive(Clone, Debug)]
pub struct Write {
    snapshot: Option<SnapshotInfo>,
    hard_state: Option<HardState>,
    entries: Vec<Entry>,
}

/// Node `id` as the membership names it: endpoints no one connects to.
pub fn sim_member(id: u64) -> Member {
    Member { id, raft: format!("tcp://node{id}:7000"), client: format!("tcp://node{id}:7100"), public_key: None }
}

impl Disk {
    /// A disk of a node of a new cluster of voters 1 to `n`, holding
    /// `entries` (contiguous from index 1) and `hard_state`.
    pub fn with(n: u64, hard_state: HardState, entries: &[Entry]) -> Disk {
        let members: Vec<Member> = (1..=n).map(sim_member).collect();
        let context = serde_json::to_vec(&members).expect("members serialize");
        let store = MemStore::new(Membership::of_voters(1..=n, context), hard_state, entries);
        Disk { store, ..Disk::default() }
    }

    /// A blank disk of a node of a new cluster of voters 1 to `n`.
    pub fn bootstrap(n: u64) -> Disk {
        Disk::with(n, HardState::default(), &[])
    }

    pub fn hard_state(&self) -> HardState {
        self.store.hard_state
    }

    /// The power went: what was not synced is gone.
    pub fn lose_unsynced(&mut self) {
        self.unsynced.clear();
    }

    /// Every entry held after the snapshot, in order.
    pub fn entries(&self) -> Vec<Entry> {
        let (first, last) = (self.store.log_start().index + 1, self.store.last_index());
        if first > last { Vec::new() } else { self.store.entries(first, last, usize::MAX) }
    }
}

impl LogStore for Disk {
    fn log_start(&self) -> SnapshotMeta {
        self.store.log_start()
    }

    fn last_index(&self) -> Index {
        self.store.last_index()
    }

    fn term(&self, index: Index) -> Term {
        self.store.term(index)
    }

    fn entries(&self, lo: Index, hi: Index, max_bytes: usize) -> Vec<Entry> {
        self.store.entries(lo, hi, max_bytes)
    }

    fn memberships(&self) -> Vec<(Index, Membership)> {
        self.store.memberships()
    }
}

impl DurableStore for Disk {
    type Error = Crashed;

    fn write(
        &mut self,
        snapshot: Option<&SnapshotInfo>,
        hard_state: Option<&HardState>,
        entries: &[Entry],
    ) -> Result<(), Crashed> {
        if std::mem::take(&mut self.crash_before_sync) {
            return Err(Crashed);
        }
        let (snapshot, hard_state, entries) = (snapshot.cloned(), hard_state.copied(), entries.to_vec());
        self.unsynced.push(Write { snapshot, hard_state, entries });
        Ok(())
    }

    /// The core reads back only what it was told is durable, so the store
    /// takes writes at their sync.
    fn sync(&mut self) -> Result<(), Crashed> {
        for Write { snapshot, hard_state, entries } in std::mem::take(&mut self.unsynced) {
            let Ok(()) = self.store.persist(snapshot.as_ref(), hard_state.as_ref(), &entries);
            if snapshot.is_some() {
                self.wrote_from = None; // what was written before is gone
            }
            if let Some(first) = entries.first() {
                self.wrote_from = Some(self.wrote_from.map_or(first.index, |f| f.min(first.index)));
            }
        }
        Ok(())
    }
}

/// The disk beyond the log: snapshot files and the cluster's name. Space
/// never runs out here.
impl NodeStorage for Disk {
    fn reserve(&mut self, _: u64) -> Result<(), String> {
        Ok(())
    }

    fn low_on_space(&self) -> bool {
        false
    }

    fn check_space(&mut self) -> bool {
        false
    }

    fn handed_over(&mut self) {}

    fn disk_status(&self) -> (Vec<String>, u64) {
        (Vec::new(), 0)
    }

    fn snapshot_saved(&mut self, snapshot: SnapshotMeta) -> Result<(), Crashed> {
        self.store.compact(snapshot.index);
        Ok(())
    }

    fn load_snapshot(&self, snapshot: SnapshotMeta) -> Result<Vec<u8>, String> {
        self.snapshots.borrow().get(&snapshot).cloned().ok_or_else(|| format!("no snapshot file for {snapshot:?}"))
    }

    fn record_cluster(&mut self, cluster: u64) -> Result<(), Crashed> {
        self.cluster = cluster;
        Ok(())
    }
}

/// The simulator's disk behaves as the node's store does: both run the
/// same suite (`raft_zmq::testing::log_store_conformance`), so what the
/// simulation proves holds for the store the node runs on. A crash keeps
/// what was persisted, as a restart of the node does.
#[test]
fn the_simulated_disk_conforms() {
    raft_zmq::testing::log_store_conformance(Disk::bootstrap(3), |_, _| {}, |disk| disk);
}
