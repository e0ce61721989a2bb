//! What a leader knows about one follower's log (etcd's `tracker.Progress`).
//!
//! A follower is *probed* one AppendEntries at a time until a reply shows
//! where its log matches ours; from then on it is *replicating*: `next`
//! moves ahead as each request goes out, and up to a window of them are
//! out at once (`CoreConfig::max_inflight_appends`), so the next batch is
//! on its way while the follower writes the last one. A rejection, a
//! timeout or an unreachable peer goes back to probing. Whatever
//! accumulates while the window is full goes out as one batch in the next
//! request, which is where throughput comes from.

use std::collections::VecDeque;

use super::types::Index;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Highest index known to be replicated on the follower. Only grows.
    pub matched: Index,
    /// Next index to send. Always `> matched`.
    pub next: Index,
    /// Whether `next` may move ahead of what the follower acknowledged (see
    /// the module's comment); false while probing.
    pub replicating: bool,
    /// The requests out to the follower, oldest first: the `prev_log_index`
    /// each named and the tick it was sent at. They expire, so that a lost
    /// request or reply never stalls replication.
    pub inflight: VecDeque<Sent>,
    /// Highest read round the follower acknowledged in this term.
    pub read_acked: u64,
    /// Highest read round a request out to the follower carries (or the
    /// acknowledged one, once those requests are forgotten).
    pub read_sent: u64,
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

/// A request out to a follower.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sent {
    pub prev_log_index: Index,
    pub tick: u64,
}

impl Progress {
    pub fn new(last_index: Index) -> Progress {
        Progress {
            matched: 0,
            next: last_index + 1,
            replicating: false,
            inflight: VecDeque::new(),
            read_acked: 0,
            read_sent: 0,
            commit_sent: 0,
            recent_active: false,
            pending_snapshot: None,
            catch_up: None,
        }
    }

    /// Whether another request may go out now, with up to `window` out
    /// while replicating. The transport carries them in order on one
    /// connection (and one at a time to a peer that does not say it takes
    /// more).
    pub fn has_room(&self, window: usize) -> bool {
        let window = if self.replicating { window } else { 1 };
        self.inflight.len() < window
    }

    /// A request naming `prev_log_index` went out at `tick`; while
    /// replicating, the entries it carries up to `last_sent` count as sent.
    pub fn sent(&mut self, prev_log_index: Index, last_sent: Index, tick: u64) {
        self.inflight.push_back(Sent { prev_log_index, tick });
        if self.replicating {
            self.next = self.next.max(last_sent + 1);
        }
    }

    /// The reply to the request that named `prev_log_index` came: it and
    /// any older one are answered (one connection keeps them in order; an
    /// older one whose reply was lost went before it).
    pub fn answered(&mut self, prev_log_index: Index) {
        self.inflight.retain(|sent| sent.prev_log_index > prev_log_index);
    }

    /// The oldest request out has gone unanswered for `timeout` ticks.
    pub fn overdue(&self, now: u64, timeout: u64) -> bool {
        self.inflight.front().is_some_and(|sent| now - sent.tick >= timeout)
    }

    /// Requests out may never be answered (lost, or the peer unreachable):
    /// forget them and probe from what the follower acknowledged, since
    /// the optimistic `next` may lie past a request that never arrived.
    pub fn forget_inflight(&mut self) {
        self.inflight.clear();
        self.read_sent = self.read_acked;
        if self.replicating {
            self.replicating = false;
            self.next = self.matched + 1;
        }
    }

    /// A success reply: the follower holds our log up to `index`. A stale
    /// (reordered) reply never moves `matched` backwards. While probing,
    /// one that reaches `matched` shows where the logs match: replication
    /// goes on from there; while replicating, `next` keeps its lead.
    pub fn on_success(&mut self, index: Index) -> bool {
        let advanced = index > self.matched;
        self.matched = self.matched.max(index);
        if !self.replicating && index >= self.matched {
            self.replicating = true;
            self.next = self.matched + 1;
        }
        self.next = self.next.max(self.matched + 1);
        if self.pending_snapshot.is_some_and(|(snapshot, _)| self.matched >= snapshot) {
            self.pending_snapshot = None;
        }
        advanced
    }

    /// A rejection of the request that had `prev_log_index`, with the index
    /// to retry from; probing goes on from there. While probing, only a
    /// rejection of the current probe (`next - 1`) is acted on; while
    /// replicating, one of any request past `matched`: an older one is stale.
    /// Normally the retry stays above what is known to match; but a
    /// follower refusing `matched` itself has lost entries it acknowledged
    /// (its state dir was wiped), so what we knew is forgotten and it is
    /// caught up from its own hint. Returns true then.
    pub fn on_reject(&mut self, prev_log_index: Index, next: Index) -> bool {
        // `next` is at least 1; a peer's index may be anything.
        let current = if self.replicating { prev_log_index >= self.matched } else { prev_log_index == self.next - 1 };
        if !current {
            return false;
        }
        let lost_state = prev_log_index != 0 && prev_log_index == self.matched;
        if lost_state {
            self.matched = 0;
        }
        self.replicating = false;
        self.inflight.clear();
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
        pr.replicating = false;
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

    #[test]
    fn a_follower_is_probed_one_request_at_a_time_then_sent_a_window_of_them() {
        let mut pr = Progress::new(10);
        assert!(!pr.replicating && pr.has_room(2));
        pr.sent(10, 12, 1);
        assert!(!pr.has_room(2), "one probe at a time");
        assert_eq!(pr.next, 11, "a probe does not move next");
        pr.answered(10);
        assert!(pr.on_success(12));
        assert!(pr.replicating);
        assert_eq!((pr.matched, pr.next), (12, 13));
        pr.sent(12, 15, 2);
        assert_eq!(pr.next, 16, "what went out counts as sent");
        assert!(pr.has_room(2));
        pr.sent(15, 20, 2);
        assert_eq!(pr.next, 21);
        assert!(!pr.has_room(2), "a window of two");
        pr.answered(12);
        assert_eq!(pr.inflight.len(), 1, "the reply naming prev 12 answers the first only");
        assert!(pr.has_room(2));
        pr.on_success(15);
        assert_eq!((pr.matched, pr.next), (15, 21), "next keeps its lead");
    }

    /// Replicating, matched 15, requests out after 15 and 20, next 26.
    fn replicating() -> Progress {
        let mut pr = Progress::new(10);
        pr.on_success(15);
        pr.sent(15, 20, 1);
        pr.sent(20, 25, 2);
        assert_eq!((pr.replicating, pr.next), (true, 26));
        pr
    }

    #[test]
    fn a_rejection_while_replicating_goes_back_to_probing_from_the_hint() {
        let mut pr = replicating();
        assert!(!pr.on_reject(12, 3), "older than matched: stale");
        assert!(pr.replicating && pr.inflight.len() == 2);
        assert!(!pr.on_reject(20, 18));
        assert_eq!((pr.replicating, pr.next, pr.inflight.len()), (false, 18, 0));
        let mut pr = replicating();
        pr.on_reject(20, 3);
        assert_eq!(pr.next, 16, "never below what is known to match");
    }

    #[test]
    fn requests_forgotten_while_replicating_make_it_probe_from_matched() {
        let mut pr = replicating();
        pr.read_acked = 3;
        pr.read_sent = 5;
        assert!(!pr.overdue(5, 5));
        assert!(pr.overdue(6, 5));
        pr.forget_inflight();
        assert_eq!((pr.replicating, pr.next, pr.inflight.len()), (false, 16, 0));
        assert_eq!(pr.read_sent, 3, "the read round goes out again");
        pr.next = 18;
        pr.sent(17, 17, 7);
        pr.forget_inflight();
        assert_eq!(pr.next, 18, "a probe's place is kept");
    }

    #[test]
    fn a_reply_answers_its_request_and_every_older_one() {
        let mut pr = replicating();
        pr.answered(20);
        assert!(pr.inflight.is_empty(), "the reply to the older one was lost");
        let mut pr = replicating();
        pr.answered(14);
        assert_eq!(pr.inflight.len(), 2, "a reply to a request before these answers neither");
    }
}
