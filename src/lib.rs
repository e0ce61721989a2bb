//! raft-zmq: a crash-safe Raft node speaking ZeroMQ.
//!
//! `raft` is the pure consensus core; every other module is the I/O shell.

pub mod raft;
pub mod transport;
