//! The pure Raft core: no sockets, threads, clocks or disk.
//!
//! It is driven by `tick`, `step(message)`, `propose` and `read_index`, and
//! hands back a [`Ready`]: what to persist, what to send (before or after the
//! persist), what is committed and which reads may be served. The shell
//! persists, sends, applies, then calls `advance`.

pub mod message;
pub mod types;

pub use message::{Body, Message};
pub use types::{Entry, HardState, Index, NodeId, Payload, Term};
