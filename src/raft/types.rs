//! Plain data shared by the core and the I/O shell: ids, log entries and the
//! state that must be durable before the node may talk about it.

use std::collections::BTreeSet;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A member's id, as in `config.json`.
pub type NodeId = u64;
/// A Raft term. 0 means "never saw any leader or candidate".
pub type Term = u64;
/// A log index. Real entries start at 1; 0 is the empty prefix.
pub type Index = u64;

/// What a log entry carries. The core never looks inside a command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Payload {
    /// Appended by every new leader so that it can commit entries of earlier
    /// terms through one of its own (Raft paper §5.4.2, Figure 8).
    Noop,
    /// An opaque state-machine command (the KV layer's encoding). Shared:
    /// each AppendEntries and the apply take the entry without a copy.
    Command(Bytes),
    /// The whole membership from this entry on. It takes effect on every
    /// node as soon as the node appends it, committed or not (thesis §4.1).
    Membership(Membership),
}

/// Who is in the cluster. Voters elect leaders and make up every quorum;
/// learners only receive the log. `context` is the shell's data about the
/// members (their endpoints and keys), replicated with them; the core never
/// looks inside it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    pub voters: BTreeSet<NodeId>,
    pub learners: BTreeSet<NodeId>,
    /// Learners the leader promotes to voters once they have caught up.
    pub promote: BTreeSet<NodeId>,
    /// Every id ever removed. An id is never reused (as in etcd): a node
    /// replaying the log must not mistake an earlier member's removal for
    /// its own, and a removed node can always be told apart.
    pub removed: BTreeSet<NodeId>,
    /// The cluster's id: random, chosen by the first leader of a new
    /// cluster and committed like any change (see `MembershipChange::Name`);
    /// 0 until then. Every envelope carries it.
    #[serde(default)]
    pub cluster: u64,
    /// The shell's: what a new cluster's members speak for until it is
    /// named (set in the first membership; 0 for clusters that predate it).
    #[serde(default)]
    pub fingerprint: u64,
    #[serde(with = "serde_bytes")]
    pub context: Vec<u8>,
}

impl Membership {
    /// A membership of `voters` only, as a new cluster starts.
    pub fn of_voters(voters: impl IntoIterator<Item = NodeId>, context: Vec<u8>) -> Membership {
        Membership { voters: voters.into_iter().collect(), context, ..Membership::default() }
    }

    pub fn is_voter(&self, id: NodeId) -> bool {
        self.voters.contains(&id)
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.voters.contains(&id) || self.learners.contains(&id)
    }

    /// Voters and learners, in id order.
    pub fn ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.voters.union(&self.learners).copied()
    }

    /// Every member but `me`, learners included: whom a leader replicates to.
    pub fn others(&self, me: NodeId) -> impl Iterator<Item = NodeId> + '_ {
        self.ids().filter(move |&id| id != me)
    }

    /// Every voter but `me`: whom a candidate asks for votes.
    pub fn other_voters(&self, me: NodeId) -> impl Iterator<Item = NodeId> + '_ {
        self.voters.iter().copied().filter(move |&id| id != me)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub index: Index,
    pub term: Term,
    pub payload: Payload,
}

impl Entry {
    /// Rough wire size, used to bound the size of one AppendEntries.
    pub fn approx_size(&self) -> usize {
        24 + match &self.payload {
            Payload::Noop => 0,
            Payload::Command(bytes) => bytes.len(),
            Payload::Membership(membership) => membership.context.len() + 16 * membership.ids().count(),
        }
    }
}

/// The part of a node's state that must survive a crash (Figure 2,
/// "persistent state on all servers"), plus the commit index, which is
/// persisted lazily so that a restart can re-apply without waiting for a leader.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HardState {
    pub term: Term,
    pub vote: Option<NodeId>,
    pub commit: Index,
}

/// A snapshot as the core hands it around: where it stands, and the
/// membership in force at that point (entries it covers are gone, the
/// membership entries among them too).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub meta: SnapshotMeta,
    pub membership: Membership,
}

/// Where a snapshot stands in the log: it covers every entry up to `index`,
/// the last of which had `term` (needed to check the entry after it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub index: Index,
    pub term: Term,
}
