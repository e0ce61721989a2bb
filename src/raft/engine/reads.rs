//! Linearizable reads by ReadIndex (thesis §6.4): the leader notes its
//! commit index, confirms with a heartbeat round that it still leads, and
//! the read is served once that index is applied.

use super::{Leadership, NotLeader, Raft, RoleState};
use crate::raft::LogStore;
use crate::raft::ready::ReadState;
use crate::raft::types::Index;

/// A read waiting for a majority to confirm the round it was started in.
#[derive(Debug)]
pub(super) struct PendingRead {
    pub(super) ctx: u64,
    pub(super) index: Index,
    pub(super) seq: u64,
}

impl<S: LogStore> Raft<S> {
    /// Starts a linearizable read tagged `ctx`. It comes back in
    /// `Ready::read_states` once leadership is confirmed by a majority, or in
    /// `Ready::failed_reads` if leadership is lost first.
    pub fn read_index(&mut self, ctx: u64) -> Result<(), NotLeader> {
        let committed_in_term = self.committed_in_current_term();
        let lead = self.require_leader()?;
        if committed_in_term {
            self.start_read(ctx);
        } else {
            // Until this leader commits an entry of its own term it does not
            // know the true commit index (§6.4 step 1).
            lead.reads_awaiting_commit.push(ctx);
        }
        Ok(())
    }

    pub(super) fn committed_in_current_term(&self) -> bool {
        self.log.term(self.log.committed()) == Some(self.term)
    }

    /// The leader just committed its first entry of the term: the reads
    /// that waited for it start.
    pub(super) fn start_reads_awaiting_commit(&mut self) {
        let Some(lead) = self.leadership_mut() else { return };
        for ctx in std::mem::take(&mut lead.reads_awaiting_commit) {
            self.start_read(ctx);
        }
    }

    fn start_read(&mut self, ctx: u64) {
        let index = self.log.committed();
        let Some(lead) = self.leadership_mut() else { return };
        lead.read_seq += 1;
        let seq = lead.read_seq;
        lead.pending_reads.push_back(PendingRead { ctx, index, seq });
        self.confirm_reads();
    }

    /// Releases every read whose round a majority (ourselves included) has
    /// acknowledged in this term.
    pub(super) fn confirm_reads(&mut self) {
        let confirmed = self.tracker.read_confirmed(self.log.membership());
        let RoleState::Leader(Leadership { pending_reads, .. }) = &mut self.state else { return };
        while let Some(read) = pending_reads.pop_front_if(|r| r.seq <= confirmed) {
            self.read_states.push(ReadState { ctx: read.ctx, index: read.index });
        }
    }
}
