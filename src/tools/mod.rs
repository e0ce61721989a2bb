//! Programs built on the library, behind the `raft-zmq` subcommands: a
//! cluster supervisor, a command-line client and a benchmark.

pub mod bench;
pub mod client;
pub mod cluster;
