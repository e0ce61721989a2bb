//! Leadership transfer (thesis §3.10), asked for by the shell or started by
//! a leader that removed itself.

use log::info;

use super::{Raft, RoleState, TransferError};
use crate::raft::LogStore;
use crate::raft::message::{Body, Message};
use crate::raft::types::NodeId;

/// A leadership transfer in progress on the leader.
#[derive(Clone, Copy, Debug)]
pub(super) struct Transfer {
    pub(super) to: NodeId,
    /// Tick at which it started; it is abandoned one minimum election
    /// timeout later.
    pub(super) since: u64,
}

impl<S: LogStore> Raft<S> {
    /// Hands leadership to `to` (thesis §3.10): proposals stop, `to` is
    /// caught up, then told to campaign at once with `TimeoutNow`. Abandoned
    /// if no new leader has taken over within one minimum election timeout;
    /// a later call replaces the pending transfer.
    pub fn transfer_leadership(&mut self, to: NodeId) -> Result<(), TransferError> {
        self.require_leader().map_err(TransferError::NotLeader)?;
        if to == self.cfg.id || !self.log.membership().is_voter(to) {
            return Err(TransferError::NotAPeer(to));
        }
        info!("node {}: transferring leadership to {} in term {}", self.cfg.id, to, self.term);
        self.start_transfer(to);
        Ok(())
    }

    /// The follower a pending leadership transfer goes to.
    pub fn transfer_target(&self) -> Option<NodeId> {
        self.leadership()?.transfer.map(|t| t.to)
    }

    /// On the leader: the voter that can take over soonest, i.e. the one
    /// holding the most of the log, preferring those recently heard from.
    pub fn transfer_candidate(&self) -> Option<NodeId> {
        self.leadership()?;
        let voters = &self.log.membership().voters;
        self.tracker
            .progresses()
            .filter(|(id, _)| voters.contains(id))
            .max_by_key(|(_, pr)| (pr.matched, pr.recent_active))
            .map(|(id, _)| id)
    }

    /// On the leader: hands over to `to`, replacing any transfer pending.
    pub(super) fn start_transfer(&mut self, to: NodeId) {
        let since = self.ticks;
        if let Some(lead) = self.leadership_mut() {
            lead.transfer = Some(Transfer { to, since });
            self.send_timeout_now_if_caught_up();
        }
    }

    /// A tick on the leader: a transfer that has not led to a new leader
    /// within a minimum election timeout is abandoned, and a leader that
    /// was handing over because it was removed steps down. True if it did.
    pub(super) fn tick_transfer(&mut self) -> bool {
        let RoleState::Leader(lead) = &mut self.state else { return false };
        let Some(transfer) = lead.transfer.filter(|t| self.ticks - t.since >= self.cfg.election_ticks.0) else {
            return false;
        };
        lead.transfer = None;
        if !self.is_voter() {
            info!("node {}: handing over to {} timed out; removed, so stepping down", self.cfg.id, transfer.to);
            self.become_follower(self.term, None);
            return true;
        }
        info!(
            "node {}: leadership transfer to {} timed out; leading on in term {}",
            self.cfg.id, transfer.to, self.term
        );
        false
    }

    /// Tells the transferee to campaign once it holds our whole log, so that
    /// it wins on the up-to-date check. Proposals are refused meanwhile, so
    /// `last_index` stands still. `TimeoutNow` closes the follower's window
    /// (its progress probes again): the transport sends it alone, once the
    /// requests out are answered, and keeps only the newest request queued,
    /// so an append right after would replace it. It is never answered: it
    /// expires like an unanswered request, or a later reply answers it.
    pub(super) fn send_timeout_now_if_caught_up(&mut self) {
        let Some(to) = self.transfer_target() else { return };
        let (last, now) = (self.log.last_index(), self.ticks);
        let pr = self.tracker.progress_mut(to).expect("the transferee is a member");
        if pr.matched == last {
            pr.replicating = false;
            pr.sent(last, last, now);
            self.messages.push(Message { from: self.cfg.id, to, term: self.term, body: Body::TimeoutNow });
        }
    }
}
