//! State dir format 1 (raft-zmq 0.1 and 0.2): the hard state and the log in
//! sled, keys below. Read once, when this release first opens such a dir,
//! to move the log into `log/` (see [`super::Storage::open`]).
//!
//! | key                         | value        |
//! |-----------------------------|--------------|
//! | `hs`                        | [`HardState`] |
//! | `snapshot`                  | [`SnapshotMeta`]: the log starts after it |
//! | `log/` + index as u64 BE    | [`Entry`]    |
//! | `membership`                | (index, [`Membership`]): in force at the log start |
//! | `membership/` + index as BE | [`Membership`] of the membership entry at that index |

use std::path::Path;

use super::{StorageError, parse_index_key, read_key};
use crate::raft::SnapshotMeta;
use crate::raft::types::{Entry, HardState, Index, Membership};

pub(super) const HARD_STATE_KEY: &[u8] = b"hs";
const SNAPSHOT_KEY: &[u8] = b"snapshot";
pub(super) const LOG_PREFIX: &[u8] = b"log/";
const MEMBERSHIP_KEY: &[u8] = b"membership";

/// What a format-1 dir holds.
pub(super) struct Format1 {
    pub hard_state: HardState,
    pub start: SnapshotMeta,
    pub membership: Option<(Index, Membership)>,
    /// Every entry after `start`, checked to follow on without a gap or a
    /// term going back.
    pub entries: Vec<Entry>,
}

pub(super) fn read(db: &sled::Db, dir: &Path) -> Result<Format1, StorageError> {
    let err = |problem: String| StorageError::new(dir, problem);
    let hard_state = read_key(db, dir, HARD_STATE_KEY, "hard state")?.unwrap_or_default();
    let start: SnapshotMeta = read_key(db, dir, SNAPSHOT_KEY, "snapshot position")?.unwrap_or_default();
    let membership = read_key(db, dir, MEMBERSHIP_KEY, "membership")?;
    let mut entries: Vec<Entry> = Vec::new();
    for item in db.scan_prefix(LOG_PREFIX) {
        let (key, value) = item.map_err(|e| err(format!("cannot read log: {e}")))?;
        let index = parse_index_key(LOG_PREFIX, &key)
            .ok_or_else(|| err(format!("log key {} is malformed", String::from_utf8_lossy(&key).escape_debug())))?;
        if index <= start.index {
            continue; // compacted, and not yet deleted when the node stopped
        }
        let entry: Entry =
            rmp_serde::from_slice(&value).map_err(|e| err(format!("log entry {index} is unreadable: {e}")))?;
        if entry.index != index {
            return Err(err(format!("log entry {index} is stored with index {} inside", entry.index)));
        }
        let (prev_index, prev_term) = entries.last().map_or((start.index, start.term), |e| (e.index, e.term));
        if index != prev_index + 1 {
            return Err(err(format!("log entry {index} follows a gap: expected index {}", prev_index + 1)));
        }
        if entry.term < prev_term {
            return Err(err(format!(
                "log entry {index} has term {} after term {prev_term} at index {prev_index}",
                entry.term
            )));
        }
        entries.push(entry);
    }
    Ok(Format1 { hard_state, start, membership, entries })
}

/// Deletes what format 1 kept in sled that format 2 keeps in `log/`, once
/// the move is durable.
pub(super) fn delete(db: &sled::Db, dir: &Path) -> Result<(), StorageError> {
    let err = |e: sled::Error| StorageError::new(dir, format!("cannot delete the log moved out of sled: {e}"));
    for prefix in [LOG_PREFIX, MEMBERSHIP_KEY] {
        for key in db.scan_prefix(prefix).keys() {
            db.remove(key.map_err(err)?).map_err(err)?;
        }
    }
    db.remove(SNAPSHOT_KEY).map_err(err)?;
    Ok(())
}

/// Whether format-1 keys are still there (a crash cut [`delete`] short).
pub(super) fn has_leftovers(db: &sled::Db) -> bool {
    db.scan_prefix(LOG_PREFIX).next().is_some()
        || db.scan_prefix(MEMBERSHIP_KEY).next().is_some()
        || db.contains_key(SNAPSHOT_KEY).unwrap_or(false)
}
