//! Programs built on the library, behind the `raft-zmq` subcommands: a
//! cluster supervisor, a command-line client and its interactive shell, the
//! cluster status table, a health probe, a benchmark and backups.

pub mod backup;
pub mod bench;
pub mod client;
pub mod cluster;
pub mod health;
pub mod shell;
pub mod status;
