//! Membership changes, one server at a time (thesis §4): proposing them,
//! following the newest membership in the log, promoting learners that
//! caught up, and a removed node's way out.

use log::{debug, info};

use super::{ChangeError, Raft, RoleState};
use crate::raft::LogStore;
use crate::raft::membership::MembershipChange;
use crate::raft::message::{Body, Message};
use crate::raft::types::{Index, NodeId, Payload};

impl<S: LogStore> Raft<S> {
    /// Proposes a membership change (see [`crate::raft::membership`]); `context`
    /// becomes the new membership's shell data. Returns the index of the
    /// membership entry, which takes effect at once and is committed like
    /// any other. A leader that removes itself hands leadership to the most
    /// up-to-date voter once the change is committed, and steps down.
    pub fn change_membership(&mut self, change: MembershipChange, context: Vec<u8>) -> Result<Index, ChangeError> {
        if self.require_leader().map_err(ChangeError::NotLeader)?.transfer.is_some() {
            return Err(ChangeError::Busy("leadership is being transferred"));
        }
        if !self.committed_in_current_term() {
            return Err(ChangeError::Busy("the new leader has not committed an entry of its term yet"));
        }
        if self.log.membership_index() > self.log.committed() {
            return Err(ChangeError::Busy("another membership change is not committed yet"));
        }
        let next = change.apply_to(self.log.membership(), context).map_err(ChangeError::Invalid)?;
        info!("node {}: proposing {:?} in term {}", self.cfg.id, change, self.term);
        let index = self.log.append(self.term, Payload::Membership(next));
        self.membership_may_have_changed();
        Ok(index)
    }

    /// A learner that has not heard from a leader for an election timeout
    /// may have been removed while it was away, and no leader replicates to
    /// a removed node: it sends the voters a pre-vote request, which changes
    /// nothing (a learner counts no votes), but which members answer
    /// with `Removed` once its removal is committed, as for a removed voter.
    pub(super) fn ask_if_still_a_member(&mut self) {
        self.election_elapsed = 0;
        self.randomize_election_timeout();
        debug!("node {}: learner without a leader for an election timeout; asking the voters", self.cfg.id);
        let body = Body::RequestVote {
            last_log_index: self.log.last_index(),
            last_log_term: self.log.last_term(),
            pre_vote: true,
            transfer: false,
        };
        let voters: Vec<NodeId> = self.log.membership().other_voters(self.cfg.id).collect();
        for to in voters {
            self.messages.push(Message { from: self.cfg.id, to, term: self.term + 1, body: body.clone() });
        }
    }

    /// The log's newest membership is the one in force: called whenever the
    /// log may have gained or lost a membership entry. Only a leader (by its
    /// own proposal, never during a transfer) or a follower (from its
    /// leader) gets here: a candidate's log does not change.
    pub(super) fn membership_may_have_changed(&mut self) {
        debug_assert!(matches!(self.state, RoleState::Leader(_) | RoleState::Follower), "{:?}", self.role());
        let generation = self.log.membership_generation();
        if self.membership_followed == generation {
            return;
        }
        self.membership_followed = generation;
        let membership = self.log.membership();
        info!(
            "node {}: membership from entry {}: voters {:?}, learners {:?}",
            self.cfg.id,
            self.log.membership_index(),
            membership.voters,
            membership.learners
        );
        if self.is_leader() {
            self.tracker.membership_changed(membership, self.log.last_index() + 1);
        }
    }

    /// A leader whose removal is committed hands leadership to the most
    /// up-to-date voter (like a transfer: it catches that voter up, then
    /// sends `TimeoutNow`), so the cluster goes on without waiting out an
    /// election timeout. Should the transfer time out, it just steps down.
    pub(super) fn hand_over_if_removed(&mut self) {
        let Some(lead) = self.leadership() else { return };
        if self.is_voter() || lead.transfer.is_some() || self.log.committed() < self.log.membership_index() {
            return;
        }
        let to = self.transfer_candidate().expect("a membership always keeps a voter");
        info!("node {}: removed from the cluster; handing leadership to {} in term {}", self.cfg.id, to, self.term);
        self.start_transfer(to);
    }

    /// Promotes a learner that was added to become a voter once it has caught
    /// up (thesis §4.2.1): it is replicated to in rounds, each up to the
    /// leader's last index when the round began; when a round completes
    /// within a minimum election timeout, the learner is close enough that
    /// making it a voter will not stall commits, and the leader proposes it.
    /// Leaders only: called on their ticks and their followers' replies.
    pub(super) fn promote_caught_up_learners(&mut self) {
        debug_assert!(self.is_leader());
        if self.log.membership().promote.is_empty() {
            return;
        }
        let (last, now, round) = (self.log.last_index(), self.ticks, self.cfg.election_ticks.0);
        let learners: Vec<NodeId> = self.log.membership().promote.iter().copied().collect();
        for id in learners {
            let Some(pr) = self.tracker.progress_mut(id) else { continue };
            match pr.catch_up {
                Some((target, started)) if pr.matched >= target && now - started < round => {
                    let context = self.log.membership().context.clone();
                    match self.change_membership(MembershipChange::Promote(id), context) {
                        Ok(index) => {
                            info!("node {}: learner {id} caught up; promoting it (entry {index})", self.cfg.id)
                        }
                        Err(e) => debug!("node {}: learner {id} caught up, not promoted yet: {e:?}", self.cfg.id),
                    }
                    return;
                }
                Some((target, _)) if pr.matched < target => {}
                _ => pr.catch_up = Some((last, now)),
            }
        }
    }
}
