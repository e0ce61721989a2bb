//! The pure Raft core: no sockets, threads, clocks or disk.
//!
//! It is driven by [`Raft::tick`], [`Raft::step`], [`Raft::propose`],
//! [`Raft::read_index`] and [`Raft::transfer_leadership`], and hands back a [`Ready`]: what to persist, what to
//! send (before or after the persist), what is committed and which reads may
//! be served. The shell persists, sends, applies, then calls
//! [`Raft::advance`] — the division of labour of etcd's `RawNode`.

pub mod driver;
mod engine;
pub mod log_store;
pub mod membership;
pub mod message;
mod progress;
mod quorum;
mod raft_log;
mod ready;
mod tracker;
pub mod types;

#[cfg(test)]
mod tests;

pub use engine::{ChangeError, CoreConfig, NotLeader, Raft, TransferError};
pub use log_store::{LogStore, MemStore};
pub use membership::MembershipChange;
pub use message::{Body, Message};
pub use quorum::majority_value;
pub use ready::{LogWrite, ReadState, Ready, Role, SoftState};
pub use types::{Entry, HardState, Index, Membership, NodeId, Payload, SnapshotInfo, SnapshotMeta, Term};
