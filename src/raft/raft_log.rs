//! The Raft log: durable entries behind a [`LogStore`], the not yet durable
//! tail in memory, and the watermarks.
//!
//! ```text
//!   snapshot ... applied ...... committed ...... stable ...... last
//!   |<- compacted ->|<- handed to the shell ->|   |<- unstable: memory only ->|
//! ```
//!
//! Entries before `offset` are in the store, durable (`stable` is
//! `offset - 1`); entries from `offset` on live only in memory until the
//! shell has written and synced them (the split of etcd's `log_unstable.go`).
//! Only stable entries count toward commit on this node and are applied.
//! `committed` may run ahead of `stable`.
//!
//! The store may still hold stale entries at or after `offset` (a follower
//! truncated its log at a conflict, or installed a snapshot): they are never
//! read, and the shell's next write of entries replaces them.

use super::log_store::{LogStore, take_within};
use super::membership::Memberships;
use super::types::{Entry, Index, Membership, Payload, SnapshotInfo, SnapshotMeta, Term};

#[derive(Debug)]
pub struct RaftLog<S> {
    store: S,
    /// `unstable[i]` has index `offset + i`.
    unstable: Vec<Entry>,
    offset: Index,
    /// Last index handed to the shell to write (`offset - 1` when none).
    handed: Index,
    committed: Index,
    /// Last index handed to the shell to apply (the state machine may not
    /// have applied it yet).
    handed_to_apply: Index,
    /// A snapshot from the leader that replaces the log; the shell installs
    /// it before anything else.
    pending_snapshot: Option<SnapshotInfo>,
    /// It was handed to the shell.
    snapshot_handed: bool,
    /// Times the log was cut back (a conflict) or started over (a snapshot).
    cuts: u64,
    /// The memberships in the log; the newest is in force.
    memberships: Memberships,
}

impl<S: LogStore> RaftLog<S> {
    /// A log recovered from `store`, whose state machine is at `applied`.
    pub fn new(store: S, committed: Index, applied: Index) -> RaftLog<S> {
        let last = store.last_index();
        let snapshot = store.log_start().index;
        let applied = applied.clamp(snapshot, last);
        RaftLog {
            unstable: Vec::new(),
            offset: last + 1,
            handed: last,
            committed: committed.clamp(applied, last),
            handed_to_apply: applied,
            pending_snapshot: None,
            snapshot_handed: false,
            cuts: 0,
            memberships: Memberships::new(store.memberships()),
            store,
        }
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    pub fn into_store(self) -> S {
        self.store
    }

    /// The position the log starts after (a snapshot being installed
    /// counts already).
    pub fn log_start(&self) -> SnapshotMeta {
        self.pending_snapshot.as_ref().map_or_else(|| self.store.log_start(), |s| s.meta)
    }

    /// The newest snapshot to send a follower that needs compacted entries,
    /// with the membership it holds.
    pub fn newest_snapshot(&self) -> SnapshotInfo {
        if let Some(pending) = &self.pending_snapshot {
            return pending.clone();
        }
        let meta = self.store.snapshot();
        debug_assert!(meta.index >= self.log_start().index, "the newest snapshot is older than the log start");
        SnapshotInfo { meta, membership: self.memberships.at(meta.index).clone() }
    }

    /// The membership in force: the newest in the log.
    pub fn membership(&self) -> &Membership {
        self.memberships.current()
    }

    /// Changes whenever the membership in force may have.
    pub fn membership_generation(&self) -> u64 {
        self.memberships.generation()
    }

    /// The membership once everything committed is applied.
    pub fn committed_membership(&self) -> &Membership {
        self.memberships.at(self.committed)
    }

    /// The membership once the log up to `index` (at or after the log
    /// start) is applied.
    pub fn membership_at(&self, index: Index) -> &Membership {
        debug_assert!(index >= self.log_start().index, "{index} is before the log start");
        self.memberships.at(index)
    }

    /// Index of the entry that made the membership in force.
    pub fn membership_index(&self) -> Index {
        self.memberships.current_index()
    }

    pub fn last_index(&self) -> Index {
        self.offset + self.unstable.len() as Index - 1
    }

    pub fn last_term(&self) -> Term {
        self.term(self.last_index()).expect("the last entry is never compacted")
    }

    /// Term of the entry at `index`; None if compacted or past the end.
    pub fn term(&self, index: Index) -> Option<Term> {
        if index >= self.offset {
            return self.unstable.get((index - self.offset) as usize).map(|e| e.term);
        }
        let snapshot = self.log_start();
        match index.cmp(&snapshot.index) {
            std::cmp::Ordering::Less => None,
            std::cmp::Ordering::Equal => Some(snapshot.term),
            std::cmp::Ordering::Greater => Some(self.store.term(index)),
        }
    }

    pub fn committed(&self) -> Index {
        self.committed
    }

    pub fn handed_to_apply(&self) -> Index {
        self.handed_to_apply
    }

    pub fn stable(&self) -> Index {
        self.offset - 1
    }

    /// Entries `lo..=hi`, at most `max_bytes` in total but at least one.
    /// `lo` must be past the snapshot.
    fn slice(&self, lo: Index, hi: Index, max_bytes: usize) -> Vec<Entry> {
        if lo > hi {
            return Vec::new();
        }
        let mut out = Vec::new();
        if lo < self.offset {
            out = self.store.entries(lo, hi.min(self.offset - 1), max_bytes);
            if out.last().is_some_and(|e| e.index < self.offset - 1) || hi < self.offset {
                return out;
            }
        }
        // The stored part is all of `lo..offset` and within the budget: the
        // budget goes on into memory.
        let from = (lo.max(self.offset) - self.offset) as usize;
        let to = (hi - self.offset) as usize;
        take_within(out.into_iter().chain(self.unstable[from..=to].iter().cloned()), max_bytes)
    }

    /// Entries from `from` (past the snapshot) on, at most `max_bytes` in
    /// total but at least one.
    pub fn entries_from(&self, from: Index, max_bytes: usize) -> Vec<Entry> {
        self.slice(from, self.last_index(), max_bytes)
    }

    /// First index of the run of entries with the same term as `index`
    /// (the follower's conflict hint); it stops at the first stored entry.
    /// Terms never decrease along the log, so this is a binary search.
    pub fn first_index_of_term_at(&self, index: Index) -> Index {
        let term = self.term(index);
        let (mut lo, mut hi) = (self.log_start().index + 1, index);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.term(mid) < term {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo.min(index)
    }

    /// Last index whose entry has exactly `term`, if any (the leader's side
    /// of the conflict hint); a binary search, like the above.
    pub fn last_index_of_term(&self, term: Term) -> Option<Index> {
        let (mut lo, mut hi) = (self.log_start().index, self.last_index());
        if self.term(lo) > Some(term) {
            return None;
        }
        // term(lo) <= term; find the last such index.
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if self.term(mid) <= Some(term) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        (self.term(lo) == Some(term)).then_some(lo)
    }

    /// Appends a new entry at `last + 1` and returns its index.
    pub fn append(&mut self, term: Term, payload: Payload) -> Index {
        let index = self.last_index() + 1;
        let entry = Entry { index, term, payload };
        self.memberships.appended(std::slice::from_ref(&entry));
        self.unstable.push(entry);
        index
    }

    /// Merges entries from a leader that follow an already-verified prefix
    /// (consecutive, starting past the snapshot and at most one past our
    /// last entry). Entries the log already holds are skipped; only a real
    /// conflict truncates, so a delayed duplicate AppendEntries never cuts
    /// off newer entries (a classic bug). Entries that would overwrite a
    /// committed one are refused whole, changing nothing: only a buggy or
    /// forged leader sends them. The error is the index of the first such
    /// entry.
    pub fn merge(&mut self, entries: Vec<Entry>) -> Result<(), Index> {
        let Some(first_new) = entries.iter().position(|e| self.term(e.index) != Some(e.term)) else {
            return Ok(());
        };
        let start = entries[first_new].index;
        if start <= self.committed {
            return Err(start);
        }
        debug_assert!(start <= self.last_index() + 1 && start > self.log_start().index);
        if start <= self.last_index() {
            self.cuts += 1;
        }
        if start >= self.offset {
            self.unstable.truncate((start - self.offset) as usize);
        } else {
            // The conflict is in stored entries: they are rewritten from here.
            self.unstable.clear();
            self.offset = start;
        }
        self.handed = self.handed.min(start - 1);
        self.memberships.truncated(start);
        self.memberships.appended(&entries[first_new..]);
        self.unstable.extend(entries.into_iter().skip(first_new));
        Ok(())
    }

    pub fn commit_to(&mut self, index: Index) {
        if index > self.committed {
            debug_assert!(index <= self.last_index());
            self.committed = index;
        }
    }

    /// Replaces the whole log by `snapshot` from the leader (which is past
    /// our commit index): it is committed and, once installed, applied.
    pub fn restore(&mut self, snapshot: SnapshotInfo) {
        let index = snapshot.meta.index;
        debug_assert!(index > self.committed);
        self.unstable.clear();
        self.offset = index + 1;
        self.handed = index;
        self.committed = index;
        self.handed_to_apply = index;
        self.memberships.restored(index, snapshot.membership.clone());
        self.pending_snapshot = Some(snapshot);
        self.snapshot_handed = false;
        self.cuts += 1;
    }

    /// How many times the log was cut back or started over.
    pub fn cuts(&self) -> u64 {
        self.cuts
    }

    /// Hands out the snapshot to install, once.
    pub fn take_snapshot(&mut self) -> Option<SnapshotInfo> {
        if self.snapshot_handed {
            return None;
        }
        self.snapshot_handed = true;
        self.pending_snapshot.clone()
    }

    /// The shell installed the snapshot in its store.
    pub fn snapshot_installed(&mut self) {
        if self.snapshot_handed {
            self.pending_snapshot = None;
            self.snapshot_handed = false;
        }
    }

    /// Hands out what storage must write (replacing whatever it holds from
    /// the first of them on), and assumes it will be written.
    pub fn take_unstable(&mut self) -> Vec<Entry> {
        let last = self.last_index();
        if self.handed >= last {
            return Vec::new();
        }
        let from = (self.handed + 1 - self.offset) as usize;
        self.handed = last;
        self.unstable[from..].to_vec()
    }

    /// Storage confirmed durable everything handed out up to `index` with
    /// `term`. Ignored if the log was truncated below it meanwhile.
    pub fn stable_to(&mut self, index: Index, term: Term) {
        if index >= self.offset && self.term(index) == Some(term) {
            self.unstable.drain(..=(index - self.offset) as usize);
            self.offset = index + 1;
        }
    }

    /// Committed, durable entries not yet handed out for applying, at most
    /// `max_bytes` of them (but at least one).
    pub fn take_committed(&mut self, max_bytes: usize) -> Vec<Entry> {
        let upto = self.committed.min(self.stable());
        if upto <= self.handed_to_apply {
            return Vec::new();
        }
        let out = self.slice(self.handed_to_apply + 1, upto, max_bytes);
        self.handed_to_apply = out.last().map_or(self.handed_to_apply, |e| e.index);
        out
    }

    pub fn has_unstable(&self) -> bool {
        self.handed < self.last_index() || (self.pending_snapshot.is_some() && !self.snapshot_handed)
    }

    pub fn has_committed_to_apply(&self) -> bool {
        self.committed.min(self.stable()) > self.handed_to_apply
    }

    /// Is `(term, index)` at least as up to date as our last entry (§5.4.1)?
    pub fn is_up_to_date(&self, last_term: Term, last_index: Index) -> bool {
        (last_term, last_index) >= (self.last_term(), self.last_index())
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::log_store::MemStore;

    fn log_with_terms(terms: &[Term]) -> RaftLog<MemStore> {
        let entries: Vec<Entry> = terms.iter().enumerate().map(|(i, &term)| entry(i as Index + 1, term)).collect();
        let mut store = MemStore::default();
        store.append(&entries);
        RaftLog::new(store, 0, 0)
    }

    fn entry(index: Index, term: Term) -> Entry {
        Entry { index, term, payload: Payload::Noop }
    }

    /// What the shell does with a handed-out write.
    fn persist(log: &mut RaftLog<MemStore>) {
        let entries = log.take_unstable();
        log.store_mut().append(&entries);
        if let Some(last) = entries.last() {
            log.stable_to(last.index, last.term);
        }
    }

    #[test]
    fn merge_skips_entries_already_present_and_keeps_newer_ones() {
        let mut log = log_with_terms(&[1, 1, 2, 2]);
        // A delayed AppendEntries carrying only entries 2..3.
        assert_eq!(log.merge(vec![entry(2, 1), entry(3, 2)]), Ok(()));
        assert_eq!(log.last_index(), 4, "must not truncate entry 4");
        assert!(!log.has_unstable());
    }

    #[test]
    fn merge_truncates_only_at_the_first_conflict() {
        let mut log = log_with_terms(&[1, 1, 2, 2]);
        log.merge(vec![entry(2, 1), entry(3, 3)]).unwrap();
        assert_eq!(log.last_index(), 3);
        assert_eq!(log.term(3), Some(3));
        assert_eq!(log.stable(), 2, "the overwritten suffix is no longer durable");
        assert_eq!(log.take_unstable(), vec![entry(3, 3)]);
        assert_eq!(log.store().last_index(), 4, "the store still holds the stale entries");
        log.store_mut().append(&[entry(3, 3)]);
        log.stable_to(3, 3);
        assert_eq!((log.stable(), log.store().last_index()), (3, 3));
    }

    #[test]
    fn merge_refuses_to_overwrite_committed_entries_and_changes_nothing() {
        let mut log = log_with_terms(&[1, 1]);
        log.commit_to(2);
        assert_eq!(log.merge(vec![entry(2, 1), entry(3, 1)]), Ok(()), "agreeing with the committed prefix is fine");
        assert_eq!(log.merge(vec![entry(2, 2), entry(3, 2), entry(4, 2)]), Err(2));
        assert_eq!((log.last_index(), log.term(2), log.term(3)), (3, Some(1), Some(1)));
    }

    #[test]
    fn unstable_entries_are_handed_out_once() {
        let mut log = log_with_terms(&[1]);
        log.append(2, Payload::Noop);
        log.append(2, Payload::Noop);
        assert_eq!(log.take_unstable().len(), 2);
        assert!(log.take_unstable().is_empty());
        assert_eq!(log.stable(), 1);
        log.stable_to(3, 2);
        assert_eq!(log.stable(), 3);
    }

    #[test]
    fn truncation_of_handed_out_but_unconfirmed_entries_is_redone() {
        let mut log = log_with_terms(&[1]);
        log.append(1, Payload::Noop);
        log.take_unstable();
        log.merge(vec![entry(2, 2)]).unwrap();
        assert_eq!(log.take_unstable(), vec![entry(2, 2)]);
        // A stale durability confirmation for the overwritten entry is ignored.
        log.stable_to(2, 1);
        assert_eq!(log.stable(), 1);
        log.stable_to(2, 2);
        assert_eq!(log.stable(), 2);
    }

    #[test]
    fn only_committed_and_durable_entries_are_applied_within_the_byte_cap() {
        let mut log = log_with_terms(&[1, 1]);
        log.append(1, Payload::Noop);
        log.commit_to(3);
        assert_eq!(log.take_committed(0), vec![entry(1, 1)], "at least one entry");
        assert_eq!(log.take_committed(1 << 20).len(), 1, "entry 3 is not durable yet");
        persist(&mut log);
        assert_eq!(log.take_committed(1 << 20), vec![entry(3, 1)]);
        assert!(log.take_committed(1 << 20).is_empty());
    }

    #[test]
    fn conflict_hints() {
        let log = log_with_terms(&[1, 1, 4, 4, 4, 5]);
        assert_eq!(log.first_index_of_term_at(5), 3);
        assert_eq!(log.first_index_of_term_at(2), 1);
        assert_eq!(log.first_index_of_term_at(6), 6);
        assert_eq!(log.last_index_of_term(4), Some(5));
        assert_eq!(log.last_index_of_term(1), Some(2));
        assert_eq!(log.last_index_of_term(5), Some(6));
        assert_eq!(log.last_index_of_term(3), None);
        assert_eq!(log.last_index_of_term(0), Some(0));
        assert_eq!(log.last_index_of_term(9), None);
    }

    #[test]
    fn up_to_date_compares_last_term_before_length() {
        let log = log_with_terms(&[1, 1, 2]);
        assert!(log.is_up_to_date(3, 1), "higher last term wins even if shorter");
        assert!(!log.is_up_to_date(1, 10), "longer log with older last term loses");
        assert!(log.is_up_to_date(2, 3));
        assert!(!log.is_up_to_date(2, 2));
    }

    #[test]
    fn entries_from_spans_the_store_and_memory_within_the_byte_budget() {
        let mut log = log_with_terms(&[1, 1, 1, 1]);
        log.append(1, Payload::Noop);
        assert_eq!(log.entries_from(2, 0).len(), 1);
        assert_eq!(log.entries_from(2, 48).len(), 2);
        assert_eq!(log.entries_from(2, 1000).len(), 4, "three stored, one in memory");
        assert_eq!(log.entries_from(5, 1000), vec![entry(5, 1)]);
        assert_eq!(log.entries_from(6, 1000).len(), 0);
    }

    #[test]
    fn a_batch_cut_short_in_the_store_does_not_go_on_in_memory() {
        let mut log = log_with_terms(&[1, 1]);
        log.append(1, Payload::Command(vec![0; 100].into()));
        persist(&mut log);
        log.append(1, Payload::Noop);
        // Entry 3 is too big for the budget; entry 4, in memory, is not, but
        // sending 2 then 4 would leave a gap.
        assert_eq!(log.entries_from(2, 50), vec![entry(2, 1)]);
    }

    #[test]
    fn a_compacted_log_answers_from_its_snapshot() {
        let mut log = log_with_terms(&[1, 1, 2, 2]);
        log.commit_to(4);
        log.take_committed(1 << 20);
        log.store_mut().compact(3);
        assert_eq!((log.log_start(), log.term(3), log.term(2)), (SnapshotMeta { index: 3, term: 2 }, Some(2), None));
        assert_eq!(log.first_index_of_term_at(4), 4);
        assert_eq!(log.last_index_of_term(1), None, "compacted away");
        assert_eq!(log.last_index_of_term(2), Some(4));
        let snapshot =
            SnapshotInfo { meta: SnapshotMeta { index: 9, term: 3 }, membership: Membership::of_voters([7], vec![]) };
        log.restore(snapshot.clone());
        assert_eq!((log.last_index(), log.last_term(), log.committed(), log.handed_to_apply()), (9, 3, 9, 9));
        assert_eq!(log.membership(), &snapshot.membership);
        assert!(log.has_unstable(), "the snapshot is still to be written");
        assert_eq!(log.take_snapshot(), Some(snapshot.clone()));
        assert_eq!(log.take_snapshot(), None, "handed out once");
        assert!(!log.has_unstable());
        log.store_mut().restore(snapshot.meta, snapshot.membership);
        log.snapshot_installed();
        log.append(3, Payload::Noop);
        persist(&mut log);
        assert_eq!((log.store().last_index(), log.stable()), (10, 10));
    }
}
