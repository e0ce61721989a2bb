//! What a leader knows about one follower's log (etcd's `tracker.Progress`).
//!
//! Replication runs one AppendEntries per follower at a time: the transport
//! is REQ/REP, and whatever accumulates while a request is in flight goes out
//! as one batch in the next one, which is where throughput comes from.

use super::types::Index;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Highest index known to be replicated on the follower. Only grows.
    pub matched: Index,
    /// Next index to send. Always `> matched`.
    pub next: Index,
    /// Tick at which the outstanding AppendEntries was sent, if any. Expires
    /// so that a lost request or reply never stalls replication.
    pub inflight_since: Option<u64>,
    /// Highest read round the follower acknowledged in this term.
    pub read_acked: u64,
    /// Commit index last sent, so the follower learns of new commits within a tick.
    pub commit_sent: Index,
    /// Heard from in the current CheckQuorum window.
    pub recent_active: bool,
    /// Index of the snapshot being sent to the follower and the tick it was
    /// sent at. The follower gets nothing else until it answers or the send
    /// is given up on; this has its own clock, since a stale reply may end
    /// the in-flight mark without answering the snapshot (found by the
    /// simulator: the follower was never contacted again).
    pub pending_snapshot: Option<(Index, u64)>,
    /// For a learner awaiting promotion: the catch-up round in progress, as
    /// the index it must reach and the tick it began (thesis §4.2.1).
    pub catch_up: Option<(Index, u64)>,
}

impl Progress {
    pub fn new(last_index: Index) -> Progress {
        Progress {
            matched: 0,
            next: last_index + 1,
            inflight_since: None,
            read_acked: 0,
            commit_sent: 0,
            recent_active: false,
            pending_snapshot: None,
            catch_up: None,
        }
    }

    /// A success reply: the follower holds our log up to `index`. A stale
    /// (reordered) reply never moves `matched` backwards. With one request in
    /// flight there is no optimistic `next` to preserve.
    pub fn on_success(&mut self, index: Index) -> bool {
        let advanced = index > self.matched;
        self.matched = self.matched.max(index);
        self.next = self.matched + 1;
        if self.pending_snapshot.is_some_and(|(snapshot, _)| self.matched >= snapshot) {
            self.pending_snapshot = None;
        }
        advanced
    }

    /// A rejection of the request that had `prev_log_index`, with the index
    /// to retry from. Only a rejection of the current probe (`next - 1`) is
    /// acted on: an older one is stale. Normally the retry stays above what
    /// is known to match; but a follower refusing `matched` itself has lost
    /// entries it acknowledged (its state dir was wiped), so what we knew is
    /// forgotten and it is caught up from its own hint. Returns true then.
    pub fn on_reject(&mut self, prev_log_index: Index, next: Index) -> bool {
        // `next` is at least 1; a peer's index may be anything.
        if prev_log_index != self.next - 1 {
            return false;
        }
        let lost_state = prev_log_index != 0 && prev_log_index == self.matched;
        if lost_state {
            self.matched = 0;
        }
        self.next = next.max(self.matched + 1);
        lost_state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_success_does_not_move_backwards() {
        let mut pr = Progress::new(10);
        assert!(pr.on_success(8));
        assert_eq!((pr.matched, pr.next), (8, 9));
        assert!(!pr.on_success(5));
        assert_eq!((pr.matched, pr.next), (8, 9));
    }

    #[test]
    fn reject_of_a_probe_never_goes_below_matched() {
        let mut pr = Progress::new(10);
        pr.on_success(6);
        pr.next = 9;
        assert!(!pr.on_reject(8, 3));
        assert_eq!(pr.next, 7);
        assert!(!pr.on_reject(8, 9), "stale: answers an older request");
        assert!(!pr.on_reject(u64::MAX, 9), "found by fuzzing: no overflow");
        assert_eq!(pr.next, 7);
    }

    #[test]
    fn reject_at_matched_means_the_follower_lost_its_state() {
        let mut pr = Progress::new(10);
        pr.on_success(10);
        assert!(pr.on_reject(10, 1));
        assert_eq!((pr.matched, pr.next), (0, 1));
    }
}
