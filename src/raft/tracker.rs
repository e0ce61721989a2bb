//! Who counts, and for what (etcd's `tracker` over its `quorum`): the
//! leader's view of every other member's log, and a campaign's votes. Every
//! majority the core needs (election, commit, CheckQuorum, read
//! confirmation) is computed here, over the voters of the membership in
//! force, which the log holds (the tracker keeps no copy of it).

use std::collections::BTreeMap;

use super::progress::Progress;
use super::quorum::{majority, majority_value};
use super::types::{Index, Membership, NodeId};

/// How a campaign stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VoteResult {
    Won,
    Lost,
    Pending,
}

#[derive(Debug)]
pub struct Tracker {
    /// This node.
    id: NodeId,
    /// On the leader: every other member's replication state, learners
    /// included. Empty on other nodes.
    progress: BTreeMap<NodeId, Progress>,
    /// In a campaign: the votes received, ours included.
    votes: BTreeMap<NodeId, bool>,
}

impl Tracker {
    pub fn new(id: NodeId) -> Tracker {
        Tracker { id, progress: BTreeMap::new(), votes: BTreeMap::new() }
    }

    /// `membership` is now in force on the leader: it starts tracking new
    /// members from `next` and forgets those that left.
    pub fn membership_changed(&mut self, membership: &Membership, next: Index) {
        self.progress.retain(|&id, _| membership.contains(id));
        for id in membership.others(self.id) {
            self.progress.entry(id).or_insert_with(|| Progress::new(next - 1));
        }
    }

    // ----- leader ---------------------------------------------------------

    /// A new leader's view: every other member is assumed to need `next`.
    pub fn start_leading(&mut self, membership: &Membership, next: Index) {
        self.progress = membership.others(self.id).map(|id| (id, Progress::new(next - 1))).collect();
    }

    pub fn stop_leading(&mut self) {
        self.progress.clear();
    }

    pub fn progress(&self, id: NodeId) -> Option<&Progress> {
        self.progress.get(&id)
    }

    pub fn progress_mut(&mut self, id: NodeId) -> Option<&mut Progress> {
        self.progress.get_mut(&id)
    }

    pub fn progresses(&self) -> impl Iterator<Item = (NodeId, &Progress)> {
        self.progress.iter().map(|(&id, pr)| (id, pr))
    }

    pub fn progresses_mut(&mut self) -> impl Iterator<Item = &mut Progress> {
        self.progress.values_mut()
    }

    /// The highest index a majority of voters hold; `own` is what the leader
    /// itself holds durably (counted only if it is a voter).
    pub fn committed(&self, membership: &Membership, own: Index) -> Index {
        let mut matched: Vec<Index> = self.voter_values(membership, own, |pr| pr.matched);
        majority_value(&mut matched)
    }

    /// Whether a majority of voters were heard from in the current
    /// CheckQuorum window (the leader counts for itself if it votes).
    pub fn quorum_active(&self, membership: &Membership) -> bool {
        let active = self.voter_values(membership, 1, |pr| u64::from(pr.recent_active)).iter().sum::<u64>();
        active as usize >= majority(membership.voters.len())
    }

    /// The highest read round a majority of voters acknowledged.
    pub fn read_confirmed(&self, membership: &Membership) -> u64 {
        let mut acked = self.voter_values(membership, u64::MAX, |pr| pr.read_acked);
        majority_value(&mut acked)
    }

    /// One value per voter: `own` for this node, `of` the progress for the
    /// others (0 for a voter not tracked yet).
    fn voter_values(&self, membership: &Membership, own: u64, of: impl Fn(&Progress) -> u64) -> Vec<u64> {
        let value = |id: &NodeId| if *id == self.id { own } else { self.progress.get(id).map_or(0, &of) };
        membership.voters.iter().map(value).collect()
    }

    // ----- campaign ----------------------------------------------------------

    /// A new campaign, with our own vote in it.
    pub fn start_campaign(&mut self) {
        self.votes = BTreeMap::from([(self.id, true)]);
    }

    /// A vote arrived; only voters' count.
    pub fn record_vote(&mut self, membership: &Membership, from: NodeId, granted: bool) {
        if membership.is_voter(from) {
            self.votes.insert(from, granted);
        }
    }

    pub fn vote_result(&self, membership: &Membership) -> VoteResult {
        let quorum = majority(membership.voters.len());
        let counted =
            |granted: bool| self.votes.iter().filter(|&(&id, &g)| g == granted && membership.is_voter(id)).count();
        if counted(true) >= quorum {
            VoteResult::Won
        } else if counted(false) >= quorum {
            VoteResult::Lost
        } else {
            VoteResult::Pending
        }
    }

    pub fn votes(&self) -> &BTreeMap<NodeId, bool> {
        &self.votes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Node 1 leading `voters` and `learners`.
    fn tracker(voters: &[NodeId], learners: &[NodeId]) -> (Tracker, Membership) {
        let membership = Membership {
            voters: voters.iter().copied().collect(),
            learners: learners.iter().copied().collect(),
            ..Membership::default()
        };
        let mut tracker = Tracker::new(1);
        tracker.start_leading(&membership, 1);
        (tracker, membership)
    }

    fn matched(tracker: &mut Tracker, id: NodeId, index: Index) {
        tracker.progress_mut(id).unwrap().on_success(index);
    }

    #[test]
    fn learners_never_count_toward_commit() {
        let (mut t, m) = tracker(&[1, 2, 3], &[4, 5]);
        matched(&mut t, 4, 9);
        matched(&mut t, 5, 9);
        assert_eq!(t.committed(&m, 9), 0, "the leader and two learners are no majority");
        matched(&mut t, 2, 7);
        assert_eq!(t.committed(&m, 9), 7);
    }

    #[test]
    fn a_leader_that_is_no_voter_counts_only_the_voters() {
        let (mut t, m) = tracker(&[2, 3], &[]);
        matched(&mut t, 2, 5);
        assert_eq!(t.committed(&m, 100), 0, "one of two voters is no majority");
        matched(&mut t, 3, 4);
        assert_eq!(t.committed(&m, 100), 4);
        t.progress_mut(2).unwrap().recent_active = true;
        assert!(!t.quorum_active(&m), "the leader does not count for itself");
        t.progress_mut(3).unwrap().recent_active = true;
        assert!(t.quorum_active(&m));
    }

    #[test]
    fn only_voters_votes_count() {
        let (mut t, m) = tracker(&[1, 2, 3, 4], &[5, 6]);
        t.start_campaign();
        t.record_vote(&m, 5, true);
        t.record_vote(&m, 6, true);
        assert_eq!(t.vote_result(&m), VoteResult::Pending);
        t.record_vote(&m, 2, true);
        assert_eq!(t.vote_result(&m), VoteResult::Pending, "2 of 4 voters");
        t.record_vote(&m, 3, false);
        t.record_vote(&m, 4, false);
        assert_eq!(t.vote_result(&m), VoteResult::Pending, "2 against of 4 is no majority either");
        t.record_vote(&m, 3, true);
        assert_eq!(t.vote_result(&m), VoteResult::Won);
    }

    #[test]
    fn a_new_membership_adds_and_drops_progress() {
        let (mut t, _) = tracker(&[1, 2, 3], &[]);
        matched(&mut t, 2, 4);
        let next = Membership { voters: [1, 2].into(), learners: [7].into(), ..Membership::default() };
        t.membership_changed(&next, 10);
        let tracked: Vec<NodeId> = t.progresses().map(|(id, _)| id).collect();
        assert_eq!(tracked, vec![2, 7]);
        assert_eq!(t.progress(2).unwrap().matched, 4, "kept");
        assert_eq!(t.progress(7).unwrap().next, 10, "new members start from next");
        assert_eq!(t.read_confirmed(&next), 0, "voter 2 acknowledged no round yet");
    }
}
