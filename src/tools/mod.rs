//! Programs built on the library, behind the `raft-zmq` subcommands: a
//! cluster supervisor, a command-line client, a benchmark and backups.

pub mod backup;
pub mod bench;
pub mod client;
pub mod cluster;
