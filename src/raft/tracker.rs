//! Who counts, and for what (etcd's `tracker` over its `quorum`): the
//! membership in force, the leader's view of every other member's log, and
//! a campaign's votes. Every majority the core needs (election, commit,
//! CheckQuorum, read confirmation) is computed here, over voters only.

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
    membership: Membership,
    /// On the leader: every other member's replication state, learners
    /// included. Empty on other nodes.
    progress: BTreeMap<NodeId, Progress>,
    /// In a campaign: the votes received, ours included.
    votes: BTreeMap<NodeId, bool>,
}

impl Tracker {
    pub fn new(id: NodeId, membership: Membership) -> Tracker {
        Tracker { id, membership, progress: BTreeMap::new(), votes: BTreeMap::new() }
    }

    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// Whether this node may campaign and vote counts for it.
    pub fn is_voter(&self) -> bool {
        self.membership.is_voter(self.id)
    }

    /// Switches to `membership`. A leader starts tracking new members from
    /// `next` and forgets those that left.
    pub fn set_membership(&mut self, membership: Membership, next: Index, leading: bool) {
        self.membership = membership;
        if leading {
            let peers: Vec<NodeId> = self.peers().collect();
            self.progress.retain(|id, _| peers.contains(id));
            for id in peers {
                self.progress.entry(id).or_insert_with(|| Progress::new(next - 1));
            }
        }
        let voters = &self.membership.voters;
        self.votes.retain(|id, _| voters.contains(id));
    }

    /// Every other member, learners included: whom a leader replicates to.
    pub fn peers(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.membership.ids().filter(move |&id| id != self.id)
    }

    /// Every other voter: whom a candidate asks for votes.
    pub fn voter_peers(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.membership.voters.iter().copied().filter(move |&id| id != self.id)
    }

    // ----- leader ---------------------------------------------------------

    /// A new leader's view: every other member is assumed to need `next`.
    pub fn start_leading(&mut self, next: Index) {
        self.progress = self.peers().map(|id| (id, Progress::new(next - 1))).collect();
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
    pub fn committed(&self, own: Index) -> Index {
        let mut matched: Vec<Index> = self.voter_values(own, |pr| pr.matched);
        majority_value(&mut matched)
    }

    /// Whether a majority of voters were heard from in the current
    /// CheckQuorum window (the leader counts for itself if it votes).
    pub fn quorum_active(&self) -> bool {
        let active = self.voter_values(1, |pr| u64::from(pr.recent_active)).iter().sum::<u64>();
        active as usize >= majority(self.membership.voters.len())
    }

    /// The highest read round a majority of voters acknowledged.
    pub fn read_confirmed(&self) -> u64 {
        let mut acked = self.voter_values(u64::MAX, |pr| pr.read_acked);
        majority_value(&mut acked)
    }

    /// One value per voter: `own` for this node, `of` the progress for the
    /// others (0 for a voter not tracked yet).
    fn voter_values(&self, own: u64, of: impl Fn(&Progress) -> u64) -> Vec<u64> {
        let value = |id: &NodeId| if *id == self.id { own } else { self.progress.get(id).map_or(0, &of) };
        self.membership.voters.iter().map(value).collect()
    }

    // ----- campaign ----------------------------------------------------------

    /// A new campaign, with our own vote in it.
    pub fn start_campaign(&mut self) {
        self.votes = BTreeMap::from([(self.id, true)]);
    }

    /// A vote arrived; only voters' count.
    pub fn record_vote(&mut self, from: NodeId, granted: bool) {
        if self.membership.is_voter(from) {
            self.votes.insert(from, granted);
        }
    }

    pub fn vote_result(&self) -> VoteResult {
        let quorum = majority(self.membership.voters.len());
        let counted = |granted: bool| self.votes.iter().filter(|&(id, &g)| g == granted && self.membership.is_voter(*id)).count();
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

    pub fn clear_votes(&mut self) {
        self.votes.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(voters: &[NodeId], learners: &[NodeId]) -> Tracker {
        let membership = Membership {
            voters: voters.iter().copied().collect(),
            learners: learners.iter().copied().collect(),
            ..Membership::default()
        };
        let mut tracker = Tracker::new(1, membership);
        tracker.start_leading(1);
        tracker
    }

    fn matched(tracker: &mut Tracker, id: NodeId, index: Index) {
        tracker.progress_mut(id).unwrap().on_success(index);
    }

    #[test]
    fn learners_never_count_toward_commit() {
        let mut t = tracker(&[1, 2, 3], &[4, 5]);
        matched(&mut t, 4, 9);
        matched(&mut t, 5, 9);
        assert_eq!(t.committed(9), 0, "the leader and two learners are no majority");
        matched(&mut t, 2, 7);
        assert_eq!(t.committed(9), 7);
    }

    #[test]
    fn a_leader_that_is_no_voter_counts_only_the_voters() {
        let mut t = tracker(&[2, 3], &[]);
        matched(&mut t, 2, 5);
        assert_eq!(t.committed(100), 0, "one of two voters is no majority");
        matched(&mut t, 3, 4);
        assert_eq!(t.committed(100), 4);
        t.progress_mut(2).unwrap().recent_active = true;
        assert!(!t.quorum_active(), "the leader does not count for itself");
        t.progress_mut(3).unwrap().recent_active = true;
        assert!(t.quorum_active());
    }

    #[test]
    fn only_voters_votes_count() {
        let mut t = tracker(&[1, 2, 3, 4], &[5, 6]);
        t.start_campaign();
        t.record_vote(5, true);
        t.record_vote(6, true);
        assert_eq!(t.vote_result(), VoteResult::Pending);
        t.record_vote(2, true);
        assert_eq!(t.vote_result(), VoteResult::Pending, "2 of 4 voters");
        t.record_vote(3, false);
        t.record_vote(4, false);
        assert_eq!(t.vote_result(), VoteResult::Pending, "2 against of 4 is no majority either");
        t.record_vote(3, true);
        assert_eq!(t.vote_result(), VoteResult::Won);
    }

    #[test]
    fn a_new_membership_adds_and_drops_progress() {
        let mut t = tracker(&[1, 2, 3], &[]);
        matched(&mut t, 2, 4);
        let next = Membership { voters: [1, 2].into(), learners: [7].into(), ..Membership::default() };
        t.set_membership(next, 10, true);
        let tracked: Vec<NodeId> = t.progresses().map(|(id, _)| id).collect();
        assert_eq!(tracked, vec![2, 7]);
        assert_eq!(t.progress(2).unwrap().matched, 4, "kept");
        assert_eq!(t.progress(7).unwrap().next, 10, "new members start from next");
        assert_eq!(t.read_confirmed(), 0, "voter 2 acknowledged no round yet");
    }
}
