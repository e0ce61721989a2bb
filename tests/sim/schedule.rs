//! The virtual clock and its agenda: events fire in time order, ties in the
//! order they were scheduled, so a run never depends on anything but its seed.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// Virtual time in microseconds since the start of a run.
pub type Time = u64;

pub const MS: Time = 1_000;

struct Scheduled<E> {
    at: Time,
    seq: u64,
    event: E,
}

impl<E> PartialEq for Scheduled<E> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl<E> Eq for Scheduled<E> {}

impl<E> PartialOrd for Scheduled<E> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<E> Ord for Scheduled<E> {
    /// Reversed: `BinaryHeap` is a max-heap and we want the earliest first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

pub struct Schedule<E> {
    heap: BinaryHeap<Scheduled<E>>,
    seq: u64,
    now: Time,
}

impl<E> Schedule<E> {
    pub fn new() -> Schedule<E> {
        Schedule { heap: BinaryHeap::new(), seq: 0, now: 0 }
    }

    pub fn now(&self) -> Time {
        self.now
    }

    pub fn after(&mut self, delay: Time, event: E) {
        self.seq += 1;
        self.heap.push(Scheduled { at: self.now + delay, seq: self.seq, event });
    }

    /// The next event due no later than `until`, advancing the clock to it.
    pub fn pop_until(&mut self, until: Time) -> Option<E> {
        if self.heap.peek().is_none_or(|next| next.at > until) {
            self.now = until;
            return None;
        }
        let next = self.heap.pop().expect("peeked");
        self.now = next.at;
        Some(next.event)
    }
}
