//! The core's window on the durable log (in the spirit of etcd's `Storage`).
//!
//! The core keeps in memory only the entries not yet durable; everything the
//! shell has persisted is read back through [`LogStore`]. A store starts
//! after a snapshot: entries up to [`SnapshotMeta::index`] are compacted
//! away, and the snapshot's state machine stands in for them.
//!
//! Reads are infallible on purpose: a node that cannot read its own durable
//! log must stop at once (the node's store does, with a clear message), since
//! acting on half of it could break every safety property.

use super::types::{Entry, HardState, Index, Membership, Payload, SnapshotMeta, Term};

pub trait LogStore {
    /// Index and term of the last compacted entry: the stored log starts
    /// right after it. `SnapshotMeta::default()` (index 0, term 0) when
    /// nothing was ever compacted.
    fn log_start(&self) -> SnapshotMeta;

    /// The newest snapshot the shell can send a follower; at or after
    /// `log_start` (a store may keep entries before its newest snapshot for
    /// followers that are only a little behind).
    fn snapshot(&self) -> SnapshotMeta {
        self.log_start()
    }

    /// Index of the last stored entry; the snapshot's index when none.
    fn last_index(&self) -> Index;

    /// Term of the stored entry at `index`, for
    /// `log_start().index < index <= last_index()`.
    fn term(&self, index: Index) -> Term;

    /// The stored entries `lo..=hi` (within the range `term` accepts), in
    /// order, stopping before their sizes add up to more than `max_bytes`,
    /// but always at least one.
    fn entries(&self, lo: Index, hi: Index, max_bytes: usize) -> Vec<Entry>;

    /// The membership in force at the log start (indexed by the log start),
    /// then every membership entry stored after it, oldest first. Read once,
    /// when the core starts.
    fn memberships(&self) -> Vec<(Index, Membership)>;
}

/// A store in memory: the reference implementation, used by the core's
/// tests, the simulator (as the model of a disk) and the fuzz targets.
#[derive(Clone, Debug, Default)]
pub struct MemStore {
    pub hard_state: HardState,
    snapshot: SnapshotMeta,
    /// The membership in force at the snapshot.
    start_membership: Membership,
    /// `entries[i]` has index `snapshot.index + 1 + i`.
    entries: Vec<Entry>,
}

impl MemStore {
    /// A store of a cluster of `membership` holding `hard_state` and
    /// `entries`, contiguous from index 1. A node that is to join a cluster
    /// starts with an empty membership.
    pub fn new(membership: Membership, hard_state: HardState, entries: &[Entry]) -> MemStore {
        let mut store = MemStore { hard_state, start_membership: membership, ..MemStore::default() };
        store.append(entries);
        store
    }

    /// Replaces stored entries from `entries[0].index` on with `entries`.
    ///
    /// # Panics
    /// If that would leave a gap or reach below the snapshot: the core never
    /// asks for either.
    pub fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else { return };
        assert!(
            first.index > self.snapshot.index && first.index <= self.last_index() + 1,
            "write of entry {} after snapshot {} and last entry {}",
            first.index,
            self.snapshot.index,
            self.last_index()
        );
        self.entries.truncate(self.offset(first.index));
        self.entries.extend_from_slice(entries);
    }

    /// Drops the entries up to `index`, which a snapshot now covers.
    pub fn compact(&mut self, index: Index) {
        if index <= self.snapshot.index {
            return;
        }
        assert!(index <= self.last_index(), "compaction past the last entry {}", self.last_index());
        let term = self.term(index);
        self.start_membership = self.memberships().into_iter().rev().find(|(i, _)| *i <= index).expect("the start's").1;
        self.entries.drain(..self.offset(index + 1));
        self.snapshot = SnapshotMeta { index, term };
    }

    /// Starts over after `snapshot`: entries it covers are dropped, and so is
    /// every other one, since they may conflict with the snapshot's history.
    pub fn restore(&mut self, snapshot: SnapshotMeta, membership: Membership) {
        self.entries.clear();
        self.snapshot = snapshot;
        self.start_membership = membership;
    }

    fn offset(&self, index: Index) -> usize {
        (index - self.snapshot.index - 1) as usize
    }
}

impl LogStore for MemStore {
    fn log_start(&self) -> SnapshotMeta {
        self.snapshot
    }

    fn last_index(&self) -> Index {
        self.snapshot.index + self.entries.len() as Index
    }

    fn term(&self, index: Index) -> Term {
        self.entries[self.offset(index)].term
    }

    fn entries(&self, lo: Index, hi: Index, max_bytes: usize) -> Vec<Entry> {
        take_within(self.entries[self.offset(lo)..=self.offset(hi)].iter().cloned(), max_bytes)
    }

    fn memberships(&self) -> Vec<(Index, Membership)> {
        let later = self.entries.iter().filter_map(|e| match &e.payload {
            Payload::Membership(membership) => Some((e.index, membership.clone())),
            _ => None,
        });
        [(self.snapshot.index, self.start_membership.clone())].into_iter().chain(later).collect()
    }
}

/// The leading entries of `entries` whose sizes add up to at most
/// `max_bytes`, but at least one.
pub fn take_within(entries: impl Iterator<Item = Entry>, max_bytes: usize) -> Vec<Entry> {
    // Usually all of them fit; a long backlog is cut at `max_bytes` anyway.
    let mut out = Vec::with_capacity(entries.size_hint().0.min(256));
    let mut bytes = 0;
    for entry in entries {
        bytes += entry.approx_size();
        if !out.is_empty() && bytes > max_bytes {
            break;
        }
        out.push(entry);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::types::Payload;

    fn entry(index: Index, term: Term) -> Entry {
        Entry { index, term, payload: Payload::Noop }
    }

    #[test]
    fn the_reference_store_conforms() {
        let store = MemStore::new(Membership::of_voters([1, 2, 3], vec![]), HardState::default(), &[]);
        crate::testing::log_store_conformance(store, |_, _| {}, |store| store);
    }

    #[test]
    fn append_replaces_the_suffix_and_compaction_keeps_the_rest() {
        let mut store = MemStore::default();
        store.append(&[entry(1, 1), entry(2, 1), entry(3, 1)]);
        store.append(&[entry(3, 2), entry(4, 2)]);
        assert_eq!((store.last_index(), store.term(3)), (4, 2));
        store.compact(2);
        assert_eq!(store.log_start(), SnapshotMeta { index: 2, term: 1 });
        assert_eq!(store.entries(3, 4, 0), vec![entry(3, 2)]);
        assert_eq!(store.entries(3, 4, 1000), vec![entry(3, 2), entry(4, 2)]);
        store.restore(SnapshotMeta { index: 9, term: 3 }, Membership::default());
        assert_eq!(store.last_index(), 9);
        store.append(&[entry(10, 3)]);
        assert_eq!(store.term(10), 3);
    }

    #[test]
    fn memberships_start_at_the_snapshot_and_follow_the_log() {
        let of = |ids: &[u64]| Membership::of_voters(ids.iter().copied(), vec![]);
        let changed = |index, ids: &[u64]| Entry { index, term: 1, payload: Payload::Membership(of(ids)) };
        let mut store = MemStore::new(of(&[1]), HardState::default(), &[entry(1, 1), changed(2, &[1, 2]), entry(3, 1)]);
        store.append(&[changed(4, &[1, 2, 3])]);
        assert_eq!(store.memberships(), vec![(0, of(&[1])), (2, of(&[1, 2])), (4, of(&[1, 2, 3]))]);
        store.compact(3);
        assert_eq!(store.memberships(), vec![(3, of(&[1, 2])), (4, of(&[1, 2, 3]))]);
        store.restore(SnapshotMeta { index: 9, term: 2 }, of(&[5]));
        assert_eq!(store.memberships(), vec![(9, of(&[5]))]);
    }
}
