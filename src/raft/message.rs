//! The messages Raft nodes exchange. The transport wraps them in an envelope
//! (protocol version, cluster id); the core only ever sees these.

use serde::{Deserialize, Serialize};

use super::types::{Entry, Index, NodeId, Term};

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
        match_index: Index,
        conflict_index: Index,
        conflict_term: Option<Term>,
        read_seq: u64,
    },
    /// Leadership transfer (thesis §3.10): the leader tells a follower whose
    /// log matches its own to start an election now. Never answered; the
    /// election that follows is the answer.
    TimeoutNow,
}

impl Body {
    /// Requests travel on the sender's REQ socket; replies answer them.
    pub fn is_request(&self) -> bool {
        matches!(self, Body::RequestVote { .. } | Body::AppendEntries { .. } | Body::TimeoutNow)
    }
}
