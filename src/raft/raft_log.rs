//! The in-memory Raft log and its three watermarks.
//!
//! ```text
//!   1 ........ applied ...... committed ...... stable ...... last
//!   |<- handed to the shell ->|                |<- not yet durable ->|
//! ```
//!
//! `stable` is the last index the shell has made durable; entries past it
//! exist only in memory and must not be counted toward commit by this node
//! nor applied. `unstable_from` marks the first entry the shell has not yet
//! been given to persist, so "what must be fsynced" is always explicit (the
//! same split as etcd's `log_unstable.go`). `committed` may run ahead of
//! `stable` on a follower or a leader; entries are only handed out for
//! applying once they are both committed and locally durable.

use super::types::{Entry, Index, Payload, Term};

#[derive(Debug)]
pub struct RaftLog {
    /// `entries[i]` has index `i + 1`.
    entries: Vec<Entry>,
    stable: Index,
    committed: Index,
    applied: Index,
    /// First index not yet handed to storage; `last + 1` when all is handed.
    unstable_from: Index,
    /// The last index storage holds (durable or in flight). A write that
    /// starts at or below it must first delete the stale suffix.
    storage_last: Index,
}

/// What storage must do to catch up with the in-memory log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Unstable {
    /// Delete stored entries with index >= this before appending.
    pub truncate_from: Option<Index>,
    pub entries: Vec<Entry>,
}

impl RaftLog {
    /// A log recovered from storage: everything in it is durable.
    pub fn restore(entries: Vec<Entry>, committed: Index) -> RaftLog {
        debug_assert!(entries.iter().enumerate().all(|(i, e)| e.index == i as Index + 1));
        let last = entries.len() as Index;
        RaftLog {
            entries,
            stable: last,
            committed: committed.min(last),
            applied: 0,
            unstable_from: last + 1,
            storage_last: last,
        }
    }

    pub fn last_index(&self) -> Index {
        self.entries.len() as Index
    }

    pub fn last_term(&self) -> Term {
        self.entries.last().map_or(0, |e| e.term)
    }

    /// Term of the entry at `index`; 0 for index 0, None past the end.
    pub fn term(&self, index: Index) -> Option<Term> {
        match index {
            0 => Some(0),
            i => self.entries.get(i as usize - 1).map(|e| e.term),
        }
    }

    pub fn committed(&self) -> Index {
        self.committed
    }

    pub fn stable(&self) -> Index {
        self.stable
    }

    /// Entries from `from` on, at most `max_bytes` in total but at least one.
    pub fn entries_from(&self, from: Index, max_bytes: usize) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut bytes = 0;
        for entry in self.entries.iter().skip(from.saturating_sub(1) as usize) {
            bytes += entry.approx_size();
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            out.push(entry.clone());
        }
        out
    }

    /// First index of the run of entries with the same term as `index`
    /// (the follower's conflict hint).
    pub fn first_index_of_term_at(&self, index: Index) -> Index {
        let term = self.term(index);
        let mut first = index;
        while first > 1 && self.term(first - 1) == term {
            first -= 1;
        }
        first
    }

    /// Last index whose entry has exactly `term`, if any (the leader's side
    /// of the conflict hint).
    pub fn last_index_of_term(&self, term: Term) -> Option<Index> {
        self.entries.iter().rev().find(|e| e.term == term).map(|e| e.index)
    }

    /// Appends a new entry at `last + 1` and returns its index.
    pub fn append(&mut self, term: Term, payload: Payload) -> Index {
        let index = self.last_index() + 1;
        self.entries.push(Entry { index, term, payload });
        index
    }

    /// Merges entries from a leader that follow an already-verified prefix
    /// (consecutive, starting at most one past our last entry). Entries the
    /// log already holds are skipped; only a real conflict truncates, so a
    /// delayed duplicate AppendEntries never cuts off newer entries (a classic
    /// bug). Entries that would overwrite a committed one are refused whole,
    /// changing nothing: only a buggy or forged leader sends them. The error
    /// is the index of the first such entry.
    pub fn merge(&mut self, entries: Vec<Entry>) -> Result<(), Index> {
        let Some(first_new) = entries.iter().position(|e| self.term(e.index) != Some(e.term)) else {
            return Ok(());
        };
        let start = entries[first_new].index;
        if start <= self.committed {
            return Err(start);
        }
        if start <= self.last_index() {
            self.truncate_from(start);
        }
        debug_assert_eq!(start, self.last_index() + 1);
        self.entries.extend(entries.into_iter().skip(first_new));
        Ok(())
    }

    fn truncate_from(&mut self, index: Index) {
        self.entries.truncate(index as usize - 1);
        self.stable = self.stable.min(index - 1);
        self.unstable_from = self.unstable_from.min(index);
    }

    pub fn commit_to(&mut self, index: Index) {
        if index > self.committed {
            debug_assert!(index <= self.last_index());
            self.committed = index;
        }
    }

    /// Hands out what storage must write, and assumes it will be written.
    pub fn take_unstable(&mut self) -> Unstable {
        let last = self.last_index();
        if self.unstable_from > last && self.storage_last <= last {
            return Unstable::default();
        }
        let truncate_from = (self.unstable_from <= self.storage_last).then_some(self.unstable_from);
        let entries = self.entries[self.unstable_from as usize - 1..].to_vec();
        self.unstable_from = last + 1;
        self.storage_last = last;
        Unstable { truncate_from, entries }
    }

    /// Storage confirmed durable everything handed out up to `index` with
    /// `term`. Ignored if the log was truncated below it meanwhile.
    pub fn stable_to(&mut self, index: Index, term: Term) {
        if index > self.stable && self.term(index) == Some(term) {
            self.stable = index;
        }
    }

    /// Committed, durable entries not yet handed out for applying.
    pub fn take_committed(&mut self) -> Vec<Entry> {
        let upto = self.committed.min(self.stable);
        if upto <= self.applied {
            return Vec::new();
        }
        let out = self.entries[self.applied as usize..upto as usize].to_vec();
        self.applied = upto;
        out
    }

    pub fn has_unstable(&self) -> bool {
        self.unstable_from <= self.last_index() || self.storage_last > self.last_index()
    }

    pub fn has_committed_to_apply(&self) -> bool {
        self.committed.min(self.stable) > self.applied
    }

    /// Is `(term, index)` at least as up to date as our last entry (§5.4.1)?
    pub fn is_up_to_date(&self, last_term: Term, last_index: Index) -> bool {
        (last_term, last_index) >= (self.last_term(), self.last_index())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_with_terms(terms: &[Term]) -> RaftLog {
        let entries = terms
            .iter()
            .enumerate()
            .map(|(i, &term)| Entry { index: i as Index + 1, term, payload: Payload::Noop })
            .collect();
        RaftLog::restore(entries, 0)
    }

    fn entry(index: Index, term: Term) -> Entry {
        Entry { index, term, payload: Payload::Noop }
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
        let unstable = log.take_unstable();
        assert_eq!(unstable.truncate_from, Some(3));
        assert_eq!(unstable.entries, vec![entry(3, 3)]);
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
    fn unstable_entries_are_handed_out_once_and_need_no_truncation_when_appending() {
        let mut log = log_with_terms(&[1]);
        log.append(2, Payload::Noop);
        log.append(2, Payload::Noop);
        let unstable = log.take_unstable();
        assert_eq!(unstable.truncate_from, None);
        assert_eq!(unstable.entries.len(), 2);
        assert_eq!(log.take_unstable(), Unstable::default());
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
        let unstable = log.take_unstable();
        assert_eq!(unstable.truncate_from, Some(2));
        // A stale durability confirmation for the overwritten entry is ignored.
        log.stable_to(2, 1);
        assert_eq!(log.stable(), 1);
        log.stable_to(2, 2);
        assert_eq!(log.stable(), 2);
    }

    #[test]
    fn only_committed_and_durable_entries_are_applied() {
        let mut log = log_with_terms(&[1, 1]);
        log.append(1, Payload::Noop);
        log.commit_to(3);
        assert_eq!(log.take_committed().len(), 2, "entry 3 is not durable yet");
        log.take_unstable();
        log.stable_to(3, 1);
        assert_eq!(log.take_committed(), vec![entry(3, 1)]);
        assert!(log.take_committed().is_empty());
    }

    #[test]
    fn conflict_hints() {
        let log = log_with_terms(&[1, 1, 4, 4, 4, 5]);
        assert_eq!(log.first_index_of_term_at(5), 3);
        assert_eq!(log.first_index_of_term_at(2), 1);
        assert_eq!(log.last_index_of_term(4), Some(5));
        assert_eq!(log.last_index_of_term(3), None);
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
    fn entries_from_respects_the_byte_budget_but_sends_at_least_one() {
        let log = log_with_terms(&[1, 1, 1, 1]);
        assert_eq!(log.entries_from(2, 0).len(), 1);
        assert_eq!(log.entries_from(2, 48).len(), 2);
        assert_eq!(log.entries_from(5, 1000).len(), 0);
    }
}
