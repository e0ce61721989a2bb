//! Log replication (§5.3) and commitment (§5.4): AppendEntries and
//! InstallSnapshot on both sides, the leader's heartbeats and retries.

use log::{error, info};

use super::{Leadership, Raft, RoleState};
use crate::raft::LogStore;
use crate::raft::message::{Body, Message};
use crate::raft::progress::Progress;
use crate::raft::types::{Entry, Index, NodeId, SnapshotInfo, Term};

/// A follower's refusal of an AppendEntries whose `prev_log_index` it does
/// not hold: its hint where to resume.
#[derive(Clone, Copy, Debug)]
pub(super) struct Rejection {
    pub(super) conflict_index: Index,
    pub(super) conflict_term: Option<Term>,
}

impl Leadership {
    /// Whether the follower at `pr` is due an AppendEntries: room for one
    /// more in flight (up to `window`) and something to tell it (entries, a
    /// heartbeat, a read round no request out carries, or a commit index it
    /// has not heard). A new commit index alone waits for
    /// the next tick, unless nothing was ever sent to the follower (a member
    /// just added is probed at once): the next entries carry it anyway, and
    /// a round of its own after every commit doubled the messages a write
    /// costs under light load.
    pub(in crate::raft) fn wants_append(
        &self,
        pr: &Progress,
        window: usize,
        last_index: Index,
        committed: Index,
    ) -> bool {
        let unheard_commit = pr.commit_sent < committed && (self.commit_due || pr.commit_sent == 0);
        pr.has_room(window)
            && pr.pending_snapshot.is_none()
            && (self.heartbeat_due
                || pr.next <= last_index
                || unheard_commit
                || (!self.pending_reads.is_empty() && pr.read_sent < self.read_seq))
    }
}

impl<S: LogStore> Raft<S> {
    /// A tick on the leader: heartbeats are due every `heartbeat_ticks`,
    /// and an AppendEntries or a snapshot left unanswered too long is given
    /// up on, so the next one goes out.
    pub(super) fn tick_replication(&mut self) {
        let RoleState::Leader(lead) = &mut self.state else { return };
        lead.heartbeat_elapsed += 1;
        lead.commit_due = true;
        if lead.heartbeat_elapsed >= self.cfg.heartbeat_ticks {
            lead.heartbeat_elapsed = 0;
            lead.heartbeat_due = true;
        }
        let now = self.ticks;
        let (append_timeout, snapshot_timeout) = (self.cfg.inflight_timeout(), self.cfg.snapshot_timeout());
        for pr in self.tracker.progresses_mut() {
            if pr.overdue(now, append_timeout) {
                pr.forget_inflight();
            }
            if pr.pending_snapshot.is_some_and(|(_, sent)| now - sent >= snapshot_timeout) {
                pr.pending_snapshot = None;
            }
        }
    }

    pub(super) fn handle_append_entries(
        &mut self,
        from: NodeId,
        prev_log_index: Index,
        prev_log_term: Term,
        entries: Vec<Entry>,
        leader_commit: Index,
        read_seq: u64,
    ) {
        if !self.follow(from) {
            return;
        }
        let reply = |this: &mut Raft<S>, success, match_index, conflict_index, conflict_term| {
            this.persisted_messages.push(Message {
                from: this.cfg.id,
                to: from,
                term: this.term,
                body: Body::AppendEntriesReply {
                    success,
                    prev_log_index,
                    match_index,
                    conflict_index,
                    conflict_term,
                    read_seq,
                },
            });
        };
        if prev_log_index < self.log.log_start().index {
            // Our snapshot covers `prev`: everything up to our commit index is
            // committed, hence in the leader's log too (Leader Completeness).
            let committed = self.log.committed();
            return reply(self, true, committed, 0, None);
        }
        match self.log.term(prev_log_index) {
            None => {
                let next = self.log.last_index() + 1;
                reply(self, false, 0, next, None);
            }
            Some(term) if term != prev_log_term => {
                let first = self.log.first_index_of_term_at(prev_log_index);
                reply(self, false, 0, first, Some(term));
            }
            Some(_) => {
                let last_new = prev_log_index + entries.len() as Index;
                if let Err(index) = self.log.merge(entries) {
                    // Two leaders disagree on a committed entry: a bug or a
                    // forgery. Acting on it would break state machine safety.
                    error!(
                        "node {}: leader {} tried to overwrite committed entry {} (commit {}); ignoring its message",
                        self.cfg.id,
                        from,
                        index,
                        self.log.committed()
                    );
                    return;
                }
                self.membership_may_have_changed();
                // Only what this message verified may be committed: our log
                // past `last_new` might still diverge from the leader's.
                self.log.commit_to(leader_commit.min(last_new));
                reply(self, true, last_new, 0, None);
            }
        }
    }

    /// A message only a leader sends came from `from` in our term: follow it
    /// and hold off elections. False if we lead this term ourselves, which
    /// only a bug or a forgery can cause.
    pub(super) fn follow(&mut self, from: NodeId) -> bool {
        if self.is_leader() {
            error!("node {}: two leaders in term {} (other: {}); ignoring", self.cfg.id, self.term, from);
            return false;
        }
        if !matches!(self.state, RoleState::Follower) || self.leader != Some(from) {
            self.become_follower(self.term, Some(from));
        }
        self.election_elapsed = 0;
        true
    }

    /// A snapshot from the leader, already received and checked by the
    /// shell: install it unless our log already covers it.
    pub(super) fn handle_install_snapshot(&mut self, from: NodeId, install: SnapshotInfo) {
        if !self.follow(from) {
            return;
        }
        let snapshot = install.meta;
        let match_index = if snapshot.index <= self.log.committed() {
            self.log.committed()
        } else if self.log.term(snapshot.index) == Some(snapshot.term) {
            // We hold its last entry, hence every entry before it: they are committed.
            self.log.commit_to(snapshot.index);
            snapshot.index
        } else {
            info!(
                "node {}: installing snapshot {}/{} from leader {} (our log ends at {})",
                self.cfg.id,
                snapshot.index,
                snapshot.term,
                from,
                self.log.last_index()
            );
            self.log.restore(install);
            self.membership_may_have_changed();
            snapshot.index
        };
        self.persisted_messages.push(Message {
            from: self.cfg.id,
            to: from,
            term: self.term,
            body: Body::AppendEntriesReply {
                success: true,
                prev_log_index: snapshot.index,
                match_index,
                conflict_index: 0,
                conflict_term: None,
                read_seq: 0,
            },
        });
    }

    pub(super) fn handle_append_reply(
        &mut self,
        from: NodeId,
        prev_log_index: Index,
        match_index: Index,
        rejection: Option<Rejection>,
        read_seq: u64,
    ) {
        let RoleState::Leader(lead) = &self.state else { return };
        let (last, transferee) = (self.log.last_index(), lead.transfer.map(|t| t.to));
        let Some(pr) = self.tracker.progress_mut(from) else { return };
        pr.recent_active = true;
        pr.answered(prev_log_index);
        // A reply cannot acknowledge a read round that has not started.
        pr.read_acked = pr.read_acked.max(read_seq.min(lead.read_seq));
        match rejection {
            None => {
                if pr.on_success(match_index.min(last)) {
                    self.maybe_commit();
                }
                if transferee == Some(from) {
                    self.send_timeout_now_if_caught_up();
                }
                self.promote_caught_up_learners();
            }
            // No hint: the follower answered a request from an older term.
            Some(Rejection { conflict_index: 0, .. }) => {}
            Some(Rejection { conflict_index, conflict_term }) => {
                // Skip the follower's whole conflicting term at once; if we have
                // entries of that term, resume right after our last one of it.
                let next = conflict_term
                    .and_then(|t| self.log.last_index_of_term(t).map(|i| i + 1))
                    .unwrap_or(conflict_index)
                    .min(last + 1);
                let pr = self.tracker.progress_mut(from).expect("checked above");
                if pr.on_reject(prev_log_index, next) {
                    info!(
                        "node {}: follower {} no longer holds entry {} it had acknowledged \
                         (its state was lost?); replicating to it from {}",
                        self.cfg.id, from, prev_log_index, pr.next
                    );
                }
            }
        }
        self.confirm_reads();
    }

    /// One AppendEntries to every follower that has room for one more in
    /// flight and something to learn; all proposals since its last one go in it.
    pub(in crate::raft) fn send_appends(&mut self) {
        let RoleState::Leader(lead) = &mut self.state else { return };
        let (last, committed) = (self.log.last_index(), self.log.committed());
        let wanting: Vec<NodeId> = self
            .tracker
            .progresses()
            .filter(|(_, pr)| lead.wants_append(pr, self.cfg.max_inflight_appends, last, committed))
            .map(|(id, _)| id)
            .collect();
        lead.heartbeat_due = false;
        lead.commit_due = false;
        let read_seq = lead.read_seq;
        for to in wanting {
            let pr = self.tracker.progress(to).expect("listed above");
            let prev_log_index = pr.next - 1;
            let body = match self.log.term(prev_log_index) {
                Some(prev_log_term) => Body::AppendEntries {
                    prev_log_index,
                    prev_log_term,
                    entries: self.log.entries_from(pr.next, self.cfg.max_append_bytes),
                    leader_commit: self.log.committed(),
                    read_seq,
                },
                // What the follower needs next was compacted away.
                None => {
                    let SnapshotInfo { meta, membership } = self.log.newest_snapshot();
                    Body::InstallSnapshot { snapshot: meta, membership }
                }
            };
            let pr = self.tracker.progress_mut(to).expect("listed above");
            match &body {
                Body::AppendEntries { entries, .. } => {
                    pr.sent(prev_log_index, prev_log_index + entries.len() as Index, self.ticks);
                    pr.read_sent = read_seq;
                }
                Body::InstallSnapshot { snapshot, .. } => {
                    info!("node {}: sending snapshot {}/{} to {}", self.cfg.id, snapshot.index, snapshot.term, to);
                    pr.pending_snapshot = Some((snapshot.index, self.ticks));
                    // Its reply names the snapshot's index.
                    pr.replicating = false;
                    pr.sent(snapshot.index, snapshot.index, self.ticks);
                }
                _ => unreachable!("built above"),
            }
            pr.commit_sent = self.log.committed();
            // The leader may send before its own write is durable (thesis
            // §10.2.1): it counts itself toward commit only once it is.
            self.messages.push(Message { from: self.cfg.id, to, term: self.term, body });
        }
    }

    /// Commits the highest index stored on a majority, but only if it is from
    /// the current term; older entries commit with it (Figure 8).
    fn maybe_commit(&mut self) {
        let index = self.tracker.committed(self.log.membership(), self.log.stable());
        if index <= self.log.committed() || self.log.term(index) != Some(self.term) {
            return;
        }
        let first_in_term = !self.committed_in_current_term();
        self.log.commit_to(index);
        if first_in_term {
            self.start_reads_awaiting_commit();
        }
        self.hand_over_if_removed();
    }

    /// The leader's own write became durable: it may complete a majority.
    pub(in crate::raft) fn maybe_commit_as_leader(&mut self) {
        if self.is_leader() {
            self.maybe_commit();
        }
    }
}
