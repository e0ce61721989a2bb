//! The messages Raft nodes exchange. The transport wraps them in an envelope
//! (protocol version, cluster id); the core only ever sees these.

use serde::{Deserialize, Serialize};

use super::types::{Entry, Index, Membership, NodeId, SnapshotMeta, Term};

/// The highest term a message may carry. No real cluster gets near it (a
/// million elections a second would take 285 years), so a bigger one is a bug
/// or a forgery; adopting it would leave no room for the next election. It is
/// also the largest integer a JSON consumer (a browser, `jq`) reads exactly.
pub const MAX_TERM: Term = (1 << 53) - 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub from: NodeId,
    pub to: NodeId,
    /// The sender's term. Term rules are applied once for every message,
    /// before the receiver looks at the body.
    pub term: Term,
    pub body: Body,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// A (pre-)candidate asks for a vote. A pre-vote carries the term the
    /// candidate *would* use and changes no state on the receiver. `transfer`
    /// marks an election the leader asked for (`TimeoutNow`): voters grant it
    /// even while they still hear from that leader.
    RequestVote {
        last_log_index: Index,
        last_log_term: Term,
        pre_vote: bool,
        #[serde(default)]
        transfer: bool,
    },
    RequestVoteReply {
        granted: bool,
        pre_vote: bool,
    },
    /// Replication and heartbeat in one. `read_seq` tags the round so that
    /// the leader can confirm it was still leader for pending reads (ReadIndex).
    AppendEntries {
        prev_log_index: Index,
        prev_log_term: Term,
        entries: Vec<Entry>,
        leader_commit: Index,
        read_seq: u64,
    },
    /// On success `match_index` is the last index the follower now holds in
    /// agreement with the leader. On failure `conflict_index`/`conflict_term`
    /// let the leader skip back a whole term at a time (§5.3 optimisation).
    AppendEntriesReply {
        success: bool,
        /// The `prev_log_index` of the request this answers, so the leader can
        /// tell a rejection of its current probe from a stale one.
        prev_log_index: Index,
        match_index: Index,
        conflict_index: Index,
        conflict_term: Option<Term>,
        read_seq: u64,
    },
    /// Leadership transfer (thesis §3.10): the leader tells a follower whose
    /// log matches its own to start an election now. Never answered; the
    /// election that follows is the answer.
    TimeoutNow,
    /// The leader has compacted entries the follower needs: it sends the
    /// snapshot instead. The shell's transport streams the snapshot's data
    /// and delivers this message once all of it arrived intact. Answered by
    /// an `AppendEntriesReply` whose `prev_log_index` is the snapshot's index.
    /// `membership` is the one in force at the snapshot.
    InstallSnapshot {
        snapshot: SnapshotMeta,
        membership: Membership,
    },
    /// The answer to any request from a node that a committed membership
    /// removed: it has no business running any more (it may have been down,
    /// or cut off, when the entry removing it went out).
    Removed,
}

impl Message {
    /// Rough wire size of the entries it carries (0 for other messages).
    pub fn approx_size(&self) -> usize {
        match &self.body {
            Body::AppendEntries { entries, .. } => entries.iter().map(Entry::approx_size).sum(),
            _ => 0,
        }
    }

    /// Checks what the receiver relies on and a peer could get wrong (through
    /// a bug, a version skew or malice): entries that follow `prev` without a
    /// gap and with non-decreasing terms no newer than the message, terms
    /// within [`MAX_TERM`], indexes that cannot overflow. The transport drops
    /// a message that fails, so the core only ever sees consistent ones.
    pub fn validate(&self) -> Result<(), String> {
        if self.term > MAX_TERM {
            return Err(format!("term {} is above the maximum {MAX_TERM}", self.term));
        }
        if self.from == self.to {
            return Err(format!("node {} sent a message to itself", self.from));
        }
        match &self.body {
            Body::RequestVote { last_log_index, last_log_term, .. } => {
                check_position("last log", *last_log_index, *last_log_term, self.term)
            }
            Body::AppendEntries { prev_log_index, prev_log_term, entries, .. } => {
                check_position("prev log", *prev_log_index, *prev_log_term, self.term)?;
                let (mut index, mut term) = (*prev_log_index, *prev_log_term);
                for entry in entries {
                    index = index.checked_add(1).ok_or("entry index overflows")?;
                    if entry.index != index {
                        return Err(format!("entry {} where {index} belongs", entry.index));
                    }
                    if entry.term < term || entry.term > self.term {
                        return Err(format!(
                            "entry {index} has term {} after term {term} in a term {} message",
                            entry.term, self.term
                        ));
                    }
                    term = entry.term;
                }
                Ok(())
            }
            Body::AppendEntriesReply { conflict_term: Some(conflict), .. } if *conflict > self.term => {
                Err(format!("conflict term {conflict} is newer than the reply's term {}", self.term))
            }
            Body::InstallSnapshot { snapshot, .. } if snapshot.index == 0 => Err("snapshot at index 0".into()),
            Body::InstallSnapshot { snapshot, membership } => {
                check_position("snapshot", snapshot.index, snapshot.term, self.term)?;
                let members: std::collections::BTreeSet<NodeId> = membership.ids().collect();
                if !membership.learners.is_disjoint(&membership.voters)
                    || !membership.promote.is_subset(&membership.learners)
                    || !membership.removed.is_disjoint(&members)
                {
                    return Err(format!("inconsistent membership in a snapshot: {membership:?}"));
                }
                Ok(())
            }
            Body::RequestVoteReply { .. } | Body::AppendEntriesReply { .. } | Body::TimeoutNow | Body::Removed => {
                Ok(())
            }
        }
    }
}

/// A log position (index, term) as a message describes it: index 0 is the
/// empty prefix with term 0, a real entry has a term of at least 1, and no
/// entry is newer than the message carrying its position.
fn check_position(what: &str, index: Index, term: Term, message_term: Term) -> Result<(), String> {
    if (index == 0) != (term == 0) || term > message_term {
        return Err(format!("{what} position {index}/{term} is impossible in a term {message_term} message"));
    }
    Ok(())
}

impl Body {
    /// Requests travel on the sender's link to the peer; replies answer them.
    pub fn is_request(&self) -> bool {
        matches!(
            self,
            Body::RequestVote { .. } | Body::AppendEntries { .. } | Body::TimeoutNow | Body::InstallSnapshot { .. }
        )
    }
}
