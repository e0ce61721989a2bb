//! The newest log entries, kept in memory up to a byte budget (and always
//! the last one): the leader sends them and looks up their terms without
//! reading a segment file. Kept the same way when the log is written and
//! when it is replayed at start.

use std::collections::VecDeque;

use crate::raft::{Entry, Index, Term};

#[derive(Debug, Default)]
pub struct Tail {
    entries: VecDeque<Entry>,
    bytes: usize,
    budget: usize,
}

impl Tail {
    pub fn new(budget: usize) -> Tail {
        Tail { budget, ..Tail::default() }
    }

    /// Adds `entry` as the log's last: any held at its index or after go
    /// (a conflict cut them), and so does everything if it does not follow
    /// on from what is held. The oldest go while over budget.
    pub fn push(&mut self, entry: Entry) {
        while self.entries.back().is_some_and(|e| e.index >= entry.index) {
            self.pop(false);
        }
        if self.entries.back().is_some_and(|e| e.index + 1 != entry.index) {
            self.clear();
        }
        self.bytes += entry.approx_size();
        self.entries.push_back(entry);
        while self.entries.len() > 1 && self.bytes > self.budget {
            self.pop(true);
        }
    }

    /// Keeps only the entries in `first..=last` (the log after a new start;
    /// none if `last` is before `first`).
    pub fn keep(&mut self, first: Index, last: Index) {
        while self.entries.front().is_some_and(|e| e.index < first) {
            self.pop(true);
        }
        while self.entries.back().is_some_and(|e| e.index > last) {
            self.pop(false);
        }
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    fn pop(&mut self, oldest: bool) {
        let dropped = if oldest { self.entries.pop_front() } else { self.entries.pop_back() };
        self.bytes -= dropped.map_or(0, |e| e.approx_size());
    }

    /// The term of entry `index`, if held.
    pub fn term(&self, index: Index) -> Option<Term> {
        self.entry(index).map(|e| e.term)
    }

    fn entry(&self, index: Index) -> Option<&Entry> {
        let first = self.entries.front()?.index;
        self.entries.get(usize::try_from(index.checked_sub(first)?).ok()?)
    }

    /// Entries `lo..=hi`, if all of them are held.
    pub fn range(&self, lo: Index, hi: Index) -> Option<impl Iterator<Item = &Entry>> {
        let first = self.entries.front()?.index;
        let last = self.entries.back()?.index;
        (lo >= first && hi <= last && lo <= hi)
            .then(|| self.entries.range((lo - first) as usize..=(hi - first) as usize))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter()
    }

    pub fn first_index(&self) -> Option<Index> {
        self.entries.front().map(|e| e.index)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::Payload;

    fn entry(index: Index, term: Term) -> Entry {
        Entry { index, term, payload: Payload::Command(vec![0; 100].into()) }
    }

    fn indexes(tail: &Tail) -> Vec<Index> {
        tail.iter().map(|e| e.index).collect()
    }

    #[test]
    fn a_conflict_cuts_a_gap_clears_and_the_budget_drops_the_oldest_but_never_the_last() {
        let size = entry(1, 1).approx_size();
        let mut tail = Tail::new(3 * size);
        (1..=5).for_each(|i| tail.push(entry(i, 1)));
        assert_eq!(indexes(&tail), [3, 4, 5], "within budget");
        tail.push(entry(4, 2));
        assert_eq!(indexes(&tail), [3, 4]);
        assert_eq!((tail.term(4), tail.term(5), tail.term(2)), (Some(2), None, None));
        tail.push(entry(9, 2));
        assert_eq!(indexes(&tail), [9], "a gap: nothing older is known to follow on");
        let mut small = Tail::new(1);
        small.push(entry(1, 1));
        small.push(entry(2, 1));
        assert_eq!(indexes(&small), [2], "the last is always held");
    }

    #[test]
    fn keep_and_range_hold_to_what_is_there() {
        let mut tail = Tail::new(usize::MAX);
        (1..=6).for_each(|i| tail.push(entry(i, 1)));
        tail.keep(2, 5);
        assert_eq!(indexes(&tail), [2, 3, 4, 5]);
        assert_eq!(tail.range(3, 5).unwrap().map(|e| e.index).collect::<Vec<_>>(), [3, 4, 5]);
        assert!(tail.range(1, 3).is_none() && tail.range(4, 6).is_none());
        tail.keep(7, 6);
        assert!(tail.is_empty() && tail.first_index().is_none());
        tail.push(entry(7, 1));
        assert_eq!(tail.bytes, entry(7, 1).approx_size(), "the size follows the entries");
    }
}
