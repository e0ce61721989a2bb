//! Plain data shared by the core and the I/O shell: ids, log entries and the
//! state that must be durable before the node may talk about it.

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
    /// An opaque state-machine command (the KV layer's encoding).
    Command(#[serde(with = "serde_bytes")] Vec<u8>),
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

/// Where a snapshot stands in the log: it covers every entry up to `index`,
/// the last of which had `term` (needed to check the entry after it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub index: Index,
    pub term: Term,
}
