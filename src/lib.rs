//! raft-zmq: a crash-safe Raft node speaking ZeroMQ.
//!
//! `raft` is the pure consensus core (no I/O). Everything else is the shell
//! around it: `config`, `storage` (sled), `transport` (ZeroMQ peers), `kv`
//! (the replicated state machine), `sessions` (its exactly-once table), `mirror`
//! (`logs/<id>.txt`), `protocol` (the client wire format), `keys` (CURVE keys), `security`
//! (CURVE socket setup and who may do what), `http_server` (a small hardened HTTP server),
//! `node` (threads wiring it all together) and `tools` (the cluster
//! supervisor, CLI client and benchmark).

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
pub(crate) mod disk_space;
pub mod driver;
pub mod http_server;
pub mod keys;
pub mod kv;
pub mod members;
pub mod metrics;
pub mod mirror;
pub mod node;
pub mod protocol;
pub mod raft;
pub mod security;
pub mod snapshot;
pub mod storage;
#[doc(hidden)]
pub mod testing;
pub mod tools;
pub mod transport;
pub mod warnings;
