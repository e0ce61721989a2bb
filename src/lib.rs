//! raft-zmq: a crash-safe Raft node speaking ZeroMQ. Its folders are its layers:
//!
//! - `raft`: the pure consensus core (no I/O), with `raft::driver`, the one
//!   Ready cycle every runtime uses;
//! - `kv`: the replicated state machine and its exactly-once sessions;
//! - `node`: the server (every decision about client requests, without I/O)
//!   and the runtime around it (threads, sockets, the HTTP site);
//! - `wire`: the formats others see: the client protocol, the peer envelope,
//!   the members' endpoints a membership carries;
//! - `storage`: the sled log store, snapshot files, the log mirror
//!   (`logs/<id>.txt`), free disk space;
//! - `net`: the ZeroMQ peer transport and socket security (CURVE);
//! - `tools`: the command-line tools (cluster supervisor, client and shell,
//!   status, bench, backups).
//!
//! Beside them: `config` and `keys` (CURVE key pairs and key files), which
//! the layers read; `client` (the library's client, over `net` and `wire`);
//! `http_server`, `metrics`, `warnings` and `crash_point`. No module imports
//! one that imports it.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex` whether or not another thread panicked while holding it: a
/// panic aborts the whole process (`node::abort_on_panic`), so no thread
/// ever sees data a panic left half-updated.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub mod client;
pub mod config;
pub mod crash_point;
pub mod http_server;
pub mod keys;
pub mod kv;
pub mod metrics;
pub mod net;
pub mod node;
pub mod raft;
pub mod storage;
#[doc(hidden)]
pub mod testing;
pub mod tools;
pub mod warnings;
pub mod wire;
