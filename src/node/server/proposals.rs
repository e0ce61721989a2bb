//! What a leader proposed and has not applied yet, and the clients waiting
//! on each of those entries.

use std::collections::{BTreeMap, HashMap};

use crate::raft::{Index, Term};

use super::Time;

/// A leader refuses new writes with `busy` while this many entries, or this
/// many bytes of them, are proposed but not yet applied: memory stays
/// bounded when clients send faster than the cluster commits.
pub const MAX_UNAPPLIED_ENTRIES: usize = 20_000;
pub const MAX_UNAPPLIED_BYTES: usize = 256 << 20;

/// A (client_id, seq) pair.
pub type Session = (String, u64);

/// A client waiting for the entry proposed at some index in `term`.
pub struct Waiter<H> {
    pub term: Term,
    pub handle: H,
    pub deadline: Time,
}

/// Writes this node proposed as leader that are not applied yet: so that a
/// retry of one waits for it instead of being appended again (CONTRACT.md: a
/// retry of a pending write shows once in the log), so that proposals can be
/// refused while too much is in flight, and so that each client waiting is
/// answered once its entry applies.
pub struct Proposals<H> {
    /// index → (its approximate bytes, its session if any, who waits on it).
    by_index: BTreeMap<Index, Proposal<H>>,
    bytes: usize,
    /// (client_id, seq) → index of each pending write with a session; a
    /// client may pipeline several.
    by_session: HashMap<Session, Index>,
}

struct Proposal<H> {
    bytes: usize,
    session: Option<Session>,
    waiters: Vec<Waiter<H>>,
}

impl<H> Default for Proposals<H> {
    fn default() -> Self {
        Proposals { by_index: BTreeMap::new(), bytes: 0, by_session: HashMap::new() }
    }
}

impl<H> Proposals<H> {
    pub fn is_full(&self) -> bool {
        self.by_index.len() >= MAX_UNAPPLIED_ENTRIES || self.bytes >= MAX_UNAPPLIED_BYTES
    }

    /// Entry `index` of `bytes` was proposed for `waiter`.
    pub fn add(&mut self, index: Index, bytes: usize, session: Option<Session>, waiter: Waiter<H>) {
        if let Some(session) = &session {
            self.by_session.insert(session.clone(), index);
        }
        let proposal = Proposal { bytes, session, waiters: vec![waiter] };
        // A leader proposes each index once per term; a slot proposed again
        // (a new term of this same leader is impossible without losing it)
        // would mean the old proposal was cut off.
        debug_assert!(!self.by_index.contains_key(&index), "index {index} proposed twice");
        self.bytes += bytes;
        self.by_index.insert(index, proposal);
    }

    /// The index of the pending write of `session`, if any.
    pub fn pending(&self, session: &Session) -> Option<Index> {
        self.by_session.get(session).copied()
    }

    /// One more client waits on the pending entry at `index` (a retry).
    pub fn wait(&mut self, index: Index, waiter: Waiter<H>) {
        self.by_index.get_mut(&index).expect("pending").waiters.push(waiter);
    }

    /// Entry `index` applied: who waited on it.
    pub fn applied(&mut self, index: Index) -> Vec<Waiter<H>> {
        let Some(proposal) = self.by_index.remove(&index) else { return Vec::new() };
        self.bytes -= proposal.bytes;
        if let Some(session) = proposal.session
            && self.by_session.get(&session) == Some(&index)
        {
            self.by_session.remove(&session);
        }
        proposal.waiters
    }

    /// Everyone waiting whose deadline passed.
    pub fn expired(&mut self, now: Time) -> Vec<H> {
        let mut expired = Vec::new();
        for proposal in self.by_index.values_mut() {
            let (gone, kept) = std::mem::take(&mut proposal.waiters).into_iter().partition(|w| w.deadline <= now);
            proposal.waiters = kept;
            expired.extend(gone.into_iter().map(|w: Waiter<H>| w.handle));
        }
        expired
    }

    /// Leadership was lost, or the node stops: whatever is pending is the
    /// next leader's to decide. Everyone who waited.
    pub fn clear(&mut self) -> Vec<H> {
        let proposals = std::mem::take(self);
        proposals.by_index.into_values().flat_map(|p| p.waiters).map(|w| w.handle).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn waiter(handle: u32, deadline_ms: u64) -> Waiter<u32> {
        Waiter { term: 2, handle, deadline: Duration::from_millis(deadline_ms) }
    }

    #[test]
    fn pipelined_writes_of_one_client_are_each_pending_until_applied() {
        let mut proposals = Proposals::default();
        let (c5, c6) = (("c".to_string(), 5), ("c".to_string(), 6));
        proposals.add(7, 10, Some(c5.clone()), waiter(1, 100));
        proposals.add(8, 10, Some(c6.clone()), waiter(2, 100));
        proposals.add(9, 10, None, waiter(3, 100));
        proposals.wait(8, waiter(4, 100));
        assert_eq!((proposals.pending(&c5), proposals.pending(&c6)), (Some(7), Some(8)));
        assert_eq!(proposals.applied(7).iter().map(|w| w.handle).collect::<Vec<_>>(), [1]);
        assert_eq!((proposals.pending(&c5), proposals.pending(&c6)), (None, Some(8)));
        assert_eq!((proposals.by_index.len(), proposals.bytes), (2, 20));
        assert_eq!(proposals.applied(8).iter().map(|w| w.handle).collect::<Vec<_>>(), [2, 4]);
        assert!(proposals.applied(8).is_empty(), "answered once");
        assert_eq!(proposals.clear(), [3]);
        assert!(proposals.by_index.is_empty() && proposals.by_session.is_empty() && proposals.bytes == 0);
    }

    #[test]
    fn only_waiters_past_their_deadline_expire_and_the_entry_stays_pending() {
        let mut proposals = Proposals::default();
        let session = ("c".to_string(), 1);
        proposals.add(3, 10, Some(session.clone()), waiter(1, 100));
        proposals.wait(3, waiter(2, 200));
        assert!(proposals.expired(Duration::from_millis(99)).is_empty());
        assert_eq!(proposals.expired(Duration::from_millis(100)), [1]);
        assert_eq!(proposals.pending(&session), Some(3), "a retry still waits on the entry");
        assert_eq!(proposals.expired(Duration::from_millis(200)), [2]);
    }

    #[test]
    fn too_many_entries_or_bytes_in_flight_is_full() {
        let mut proposals = Proposals::default();
        proposals.add(1, MAX_UNAPPLIED_BYTES - 1, None, waiter(1, 1));
        assert!(!proposals.is_full());
        proposals.add(2, 1, None, waiter(2, 1));
        assert!(proposals.is_full());
        proposals.applied(1);
        assert!(!proposals.is_full());
    }
}
