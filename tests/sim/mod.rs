//! A deterministic simulator for the node's request layer and Raft core.
//!
//! N instances of `raft_zmq::node::server::Server` — the code the node
//! runs, with its `Raft` core and `KvStore` — are driven by a seeded random
//! schedule on a virtual clock: drifting tick clocks, a lossy reordering
//! network with partitions, crashes that lose whatever was not synced,
//! clean stops, pauses, and clients writing and reading through the client
//! protocol's requests throughout. Raft's safety properties and the client contract
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
