//! Crash points, for tests: with `RAFT_ZMQ_CRASH_AT=<name>` in its
//! environment, a node aborts when it reaches the point of that name. No
//! destructor runs and nothing more is written or synced, as when the power
//! goes; tests run the node over lazyfs (tools/lazyfs) to lose its unsynced
//! writes too. Unset, a point costs one look at a value read once.

use std::sync::OnceLock;

/// The variable naming the point to crash at.
pub const VARIABLE: &str = "RAFT_ZMQ_CRASH_AT";

/// After a received snapshot file became the node's newest, before the
/// state dir records that the log starts over after it.
pub const SNAPSHOT_ADOPTED: &str = "snapshot-adopted";

/// Aborts the process if [`VARIABLE`] names `point`.
pub fn reached(point: &str) {
    static CRASH_AT: OnceLock<Option<String>> = OnceLock::new();
    if CRASH_AT.get_or_init(|| std::env::var(VARIABLE).ok()).as_deref() == Some(point) {
        log::error!("crash point {point} reached ({VARIABLE}): aborting");
        std::process::abort();
    }
}
