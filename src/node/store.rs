//! The node's durable side as the Ready driver sees it: the sled log, plus
//! the disk-space alarm that watches every byte written to it.

use std::time::Instant;

use crate::driver;
use crate::raft::{Entry, HardState, Index, LogStore, SnapshotMeta, Term};
use crate::storage::{Storage, StorageError};

use super::disk::DiskAlarm;

pub struct NodeStore {
    pub storage: Storage,
    pub disk: DiskAlarm,
}

impl LogStore for NodeStore {
    fn snapshot_meta(&self) -> SnapshotMeta {
        self.storage.snapshot_meta()
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
}

impl driver::Storage for NodeStore {
    type Error = StorageError;

    fn persist(
        &mut self,
        snapshot: Option<SnapshotMeta>,
        hard_state: Option<&HardState>,
        entries: &[Entry],
    ) -> Result<(), StorageError> {
        if let Some(snapshot) = snapshot {
            self.storage.install_snapshot(snapshot)?;
        }
        self.storage.write(hard_state, entries)?;
        self.storage.sync()?;
        self.disk.wrote(entries.iter().map(|e| e.approx_size() as u64).sum());
        self.disk.poll(Instant::now());
        Ok(())
    }
}
