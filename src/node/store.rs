//! The node's durable side as the Ready driver sees it: the sled log, the
//! snapshot files, and the disk-space alarm that watches every byte written.

use std::fmt;
use std::time::Instant;

use log::info;

use crate::metrics::{METRICS, seconds_since};
use crate::raft::driver;
use crate::raft::{Entry, HardState, Index, LogStore, Membership, SnapshotInfo, SnapshotMeta, Term};
use crate::storage::snapshot::{SnapshotError, Snapshots};
use crate::storage::{Storage, StorageError};

use super::disk::{DiskAlarm, NOSPACE};
use super::record_cluster;
use super::server::NodeStorage;

pub struct NodeStore {
    pub storage: Storage,
    pub disk: DiskAlarm,
    pub snapshots: Snapshots,
    /// The newest snapshot on disk, which a follower that needs compacted
    /// entries is sent.
    pub newest: SnapshotMeta,
    /// Entries kept before the newest snapshot when compacting, so that a
    /// follower only a little behind catches up from the log rather than by
    /// a whole snapshot (etcd keeps 5,000).
    pub margin: u64,
}

/// Persisting failed: the node must stop.
#[derive(Debug)]
pub enum PersistError {
    Storage(StorageError),
    Snapshot(SnapshotError),
}

impl fmt::Display for PersistError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PersistError::Storage(e) => e.fmt(f),
            PersistError::Snapshot(e) => e.fmt(f),
        }
    }
}

impl From<StorageError> for PersistError {
    fn from(e: StorageError) -> Self {
        PersistError::Storage(e)
    }
}

impl From<SnapshotError> for PersistError {
    fn from(e: SnapshotError) -> Self {
        PersistError::Snapshot(e)
    }
}

impl NodeStore {
    /// Checks the free space when due, counting what a snapshot being
    /// received has declared and not written yet as used.
    fn poll_disk(&mut self) {
        self.disk.poll(Instant::now(), self.snapshots.promised_bytes());
    }
}

impl NodeStorage for NodeStore {
    fn reserve(&mut self, bytes: u64) -> Result<(), String> {
        self.disk.wrote(bytes);
        self.poll_disk();
        if self.disk.raised() { Err(format!("alarm {NOSPACE}")) } else { Ok(()) }
    }

    fn low_on_space(&self) -> bool {
        self.disk.raised()
    }

    fn check_space(&mut self) -> bool {
        self.poll_disk();
        self.disk.handover_due()
    }

    fn handed_over(&mut self) {
        self.disk.handed_over();
    }

    fn disk_status(&self) -> (Vec<String>, u64) {
        let alarms = self.disk.raised().then(|| NOSPACE.to_string()).into_iter().collect();
        (alarms, self.disk.state_bytes())
    }

    /// The state machine has a new snapshot on disk: it becomes the one to
    /// send, and the log is compacted up to `margin` entries before it.
    fn snapshot_saved(&mut self, snapshot: SnapshotMeta) -> Result<(), PersistError> {
        if snapshot.index <= self.newest.index {
            return Ok(());
        }
        self.newest = snapshot;
        let upto = snapshot.index.saturating_sub(self.margin);
        if upto > self.storage.log_start().index {
            let started = Instant::now();
            self.storage.compact(upto)?;
            METRICS.compactions.inc();
            METRICS.compaction_seconds.observe(seconds_since(started));
            info!("log compacted up to {upto} (snapshot at {}) in {:?}", snapshot.index, started.elapsed());
        }
        Ok(())
    }

    fn load_snapshot(&self, snapshot: SnapshotMeta) -> Result<Vec<u8>, String> {
        self.snapshots.load(snapshot).map(|file| file.data).map_err(|e| e.to_string())
    }

    fn record_cluster(&mut self, cluster: u64) -> Result<(), PersistError> {
        Ok(record_cluster(&mut self.storage, cluster)?)
    }
}

impl LogStore for NodeStore {
    fn log_start(&self) -> SnapshotMeta {
        self.storage.log_start()
    }

    fn snapshot(&self) -> SnapshotMeta {
        self.newest
    }

    fn last_index(&self) -> Index {
        self.storage.last_index()
    }

    fn term(&self, index: Index) -> Term {
        self.storage.term(index)
    }

    fn entries(&self, lo: Index, hi: Index, max_bytes: usize) -> Vec<Entry> {
        self.storage.entries(lo, hi, max_bytes)
    }

    fn memberships(&self) -> Vec<(Index, Membership)> {
        self.storage.memberships()
    }
}

impl driver::DurableStore for NodeStore {
    type Error = PersistError;

    /// A snapshot from the leader: its file (received and checked by the
    /// transport) becomes the newest first, then the log starts over after
    /// it. A crash in between is repaired at the next start, which finds a
    /// snapshot the log does not hold and starts the log over after it with
    /// the membership in the file.
    fn write(
        &mut self,
        snapshot: Option<&SnapshotInfo>,
        hard_state: Option<&HardState>,
        entries: &[Entry],
    ) -> Result<(), PersistError> {
        if let Some(SnapshotInfo { meta, membership }) = snapshot {
            self.snapshots.adopt(*meta)?;
            crate::crash_point::reached(crate::crash_point::SNAPSHOT_ADOPTED);
            self.storage.install_snapshot(*meta, membership)?;
            self.newest = *meta;
        }
        self.storage.write(hard_state, entries)?;
        if !entries.is_empty() {
            METRICS.persist_entries.observe(entries.len() as f64);
        }
        self.disk.wrote(entries.iter().map(|e| e.approx_size() as u64).sum());
        self.poll_disk();
        Ok(())
    }

    fn sync(&mut self) -> Result<(), PersistError> {
        Ok(self.storage.sync()?)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::storage::snapshot::{self, Staging};

    fn open(dir: &Path) -> NodeStore {
        let (mut storage, _) = Storage::open(dir).unwrap();
        // Once only: a bootstrapped store ignores it.
        storage.bootstrap_membership(&Membership::of_voters([1, 2, 3], vec![])).unwrap();
        let snapshots = Snapshots::open(&snapshot::dir_in(dir)).unwrap();
        let newest = snapshots.latest().unwrap().map_or(storage.log_start(), |file| file.meta);
        NodeStore { storage, disk: DiskAlarm::new(dir, 0), snapshots, newest, margin: 0 }
    }

    /// The sled store, its snapshot files received as the transport does,
    /// reopened from its directory.
    #[test]
    fn the_nodes_store_conforms() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let stage = |store: &mut NodeStore, info: &SnapshotInfo| {
            let file = snapshot::encode(info.meta, &info.membership, b"state");
            let mut staging = Staging::new(store.snapshots.clone(), 0);
            let received = staging.piece((1, info.meta.term), info.meta, 0, file.len() as u64, &file);
            assert_eq!(received, Ok(None), "received");
        };
        crate::testing::log_store_conformance(open(&dir), stage, |store| {
            drop(store);
            open(&dir)
        });
    }
}
