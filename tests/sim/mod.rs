//! A deterministic simulator for the real Raft core.
//!
//! N instances of `raft_zmq::raft::Raft` — the code the node runs — are
//! driven by a seeded random schedule on a virtual clock: drifting tick
//! clocks, a lossy reordering network with partitions, crashes that lose
//! whatever was not synced, pauses, and clients writing and reading
//! registers throughout. Raft's safety properties and the client contract
//! are checked after every step; a failure prints the seed, the recent
//! events and how to replay it.

mod checker;
mod cluster;
mod faults;
mod history;
mod network;
mod node;
pub mod random_run;
mod register;
mod rng;
mod scenarios;
mod schedule;
mod storage;
mod trace;
