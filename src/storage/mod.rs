//! Durable Raft state: term, vote, lazily persisted commit index and log in
//! append-only segment files under `state/<id>/log/` ([`wal`]), small
//! metadata in a sled database under `state/<id>/`.
//!
//! # Layout (state format 2)
//!
//! - `log/<seq>.wal`: the hard state, the log and where it starts (with the
//!   membership in force there); see [`wal`] for the format and why every
//!   crash leaves a state it replays.
//! - sled, values raw bytes:
//!
//! | key                       | value        |
//! |---------------------------|--------------|
//! | `created`                 | empty: written when the dir is created |
//! | `hs`                      | [`FORMAT_2_MARKER`]: the hard state moved out (format 1 kept it here) |
//! | `meta/` + name            | raw bytes    |
//! | `dup/` + index as u64 BE  | empty: the applied entry there was a duplicate (see [`DuplicateMarks`]) |
//!
//! Format 1 (0.1 and 0.2) kept the log in sled too ([`format1`]); opening
//! such a dir moves it into `log/` once. The marker is where 0.1 and 0.2
//! read their hard state, so they refuse a format-2 dir, saying why.
//!
//! The newest entries (up to [`TAIL_BYTES`]) are also kept in memory: the
//! leader replicates and applies from there, and only a follower far
//! behind costs file reads.
//!
//! # Durability
//!
//! [`Syncer::sync`] makes every write made before it durable: one
//! `fdatasync` of the log segment written since the last one, and, only if
//! sled was written since, sled's `flush()` followed by what it leaves out.
//! `sled::Db::flush` alone is not an fsync. In sled 0.34.7:
//! - the log buffers are written with `pwrite` followed by `sync_file_range`
//!   (`pagecache/iobuf.rs`), which pushes dirty pages to the device but does
//!   not flush the device's write-back cache nor the file's metadata;
//! - values (or pages) too big for a log segment go to separate files under
//!   `<dir>/blobs/<lsn>` that are written with no fsync at all
//!   (`pagecache/blob_io.rs`); on recovery a log record whose blob is missing
//!   ends the log there;
//! - `conf` is written once at creation with no fsync (`config.rs`), and
//!   snapshots `snap.<lsn>` are fsynced and renamed into place without
//!   fsyncing the directory (`pagecache/snapshot.rs`).
//!
//! So a sled sync is `flush()`, then `fdatasync` on `<dir>/db`, then `fsync`
//! on every blob file not synced before (blob files are immutable once
//! written) followed by the `blobs` directory, and `fsync` on `<dir>`
//! whenever its set of names changed (a new snapshot). [`Storage::open`]
//! fsyncs `conf`, `db`, `blobs/`, `<dir>` and every directory it had to
//! create, plus their parents, so a freshly created node's files exist after a
//! power loss.

pub(crate) mod disk_space;
mod format1;
pub mod mirror;
pub mod snapshot;
mod tail;
pub mod wal;

use std::collections::{BTreeSet, HashSet};
use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::lock;
use crate::metrics::{METRICS, seconds_since};
use crate::raft::log_store::take_within;
use crate::raft::types::{Entry, HardState, Index, Membership, Payload, Term};
use crate::raft::{LogStore, SnapshotMeta};
use tail::Tail;
use wal::{Batch, Start, Wal, WalReader, WalSyncer};

/// Version of the state dir's layout (see the module docs), shown by `raft-zmq --version`.
pub const STATE_FORMAT_VERSION: u32 = 2;

/// What a format-2 dir holds where format 1 kept its hard state: a
/// MessagePack string, so that 0.1 and 0.2 fail to read it as a hard state
/// and print it.
pub const FORMAT_2_MARKER: &str =
    "MOVED: state dir format 2 keeps the hard state and the log in log/; run a raft-zmq newer than 0.2.0";

const META_PREFIX: &[u8] = b"meta/";
const DUP_PREFIX: &[u8] = b"dup/";
/// Written when the database is created. sled treats an unreadable data file
/// as a torn write and silently opens it empty; without this marker a
/// corrupted state dir would restart as a blank node that may vote twice in a
/// term and has forgotten acknowledged entries.
const CREATED_KEY: &[u8] = b"created";

/// A storage failure: the state dir and what went wrong there.
#[derive(Debug)]
pub struct StorageError {
    dir: PathBuf,
    problem: String,
}

impl StorageError {
    fn new(dir: &Path, problem: impl Into<String>) -> Self {
        StorageError { dir: dir.to_path_buf(), problem: problem.into() }
    }
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "state dir {}: {}", self.dir.display(), self.problem)
    }
}

impl std::error::Error for StorageError {}

/// What [`Storage::open`] found on disk besides the log.
#[derive(Debug)]
pub struct Recovered {
    /// Default (term 0, no vote, commit 0) for a fresh node; `commit` is
    /// clamped to the last log index.
    pub hard_state: HardState,
}

/// The newest entries are kept in memory too, up to this many bytes.
const TAIL_BYTES: usize = 32 << 20;

/// The node's durable state. Writes are durable after [`Storage::sync`].
pub struct Storage {
    dir: PathBuf,
    db: sled::Db,
    wal: Wal,
    reader: WalReader,
    syncer: Syncer,
    /// The snapshot the stored log follows.
    snapshot: SnapshotMeta,
    /// Index of the last log entry written (durable or not).
    last_index: Index,
    /// The membership in force at the log start, then those of the stored
    /// membership entries; empty until a membership is first recorded.
    memberships: Vec<(Index, Membership)>,
    /// The newest entries, contiguous and ending at `last_index`.
    tail: Tail,
}

/// What makes the state dir's writes durable, shareable with a thread that
/// syncs a node's writes while its core loop goes on (see
/// [`crate::raft::Ready`] on asynchronous storage writes). One sync covers
/// every write made before it began, whichever thread made it.
#[derive(Clone)]
pub struct Syncer {
    wal: WalSyncer,
    sled: Arc<Mutex<SledSync>>,
    /// sled was written since its last sync. Set after each write, cleared
    /// under the `sled` lock by the sync that covers it.
    sled_written: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
}

struct SledSync {
    dir: PathBuf,
    db: sled::Db,
    /// A second handle on sled's data file, only for `fdatasync`.
    db_file: File,
    /// Blob files already fsynced (by name). Rebuilt from each listing so
    /// blobs that sled garbage-collected are forgotten.
    synced_blobs: HashSet<OsString>,
    /// Names in `dir` when it was last fsynced.
    synced_names: HashSet<OsString>,
}

/// What the sled database says about the dir's format.
enum Found {
    Fresh,
    Format1,
    Format2,
}

impl Storage {
    /// Opens (creating if absent) the state in `dir`, checks it and reads
    /// the hard state and the newest entries. A format-1 dir has its log
    /// moved into `log/` first.
    pub fn open(dir: &Path) -> Result<(Storage, Recovered), StorageError> {
        let err = |problem: String| StorageError::new(dir, problem);

        let created = create_dirs(dir).map_err(|e| err(format!("cannot create: {e}")))?;
        let had_data = fs::metadata(dir.join("db")).is_ok_and(|m| m.len() > 0);
        let db = open_sled(dir)?;
        let marker = rmp_serde::to_vec(FORMAT_2_MARKER).expect("a string encodes");
        let found = match db.get(CREATED_KEY) {
            Ok(Some(_)) => match db.get(format1::HARD_STATE_KEY) {
                Ok(Some(hs)) if *hs == *marker => Found::Format2,
                Ok(_) => Found::Format1,
                Err(e) => return Err(err(format!("cannot read: {e}"))),
            },
            Ok(None) if !had_data => Found::Fresh,
            Ok(None) => {
                return Err(err("holds a data file but no readable raft-zmq state: it is corrupt or not ours. \
                     Refusing to start, since a blank restart could vote twice or forget acknowledged writes. \
                     To rebuild this node from its peers, move the state dir and its logs/<id>.txt away"
                    .into()));
            }
            Err(e) => return Err(err(format!("cannot read: {e}"))),
        };
        let db_file = File::open(dir.join("db")).map_err(|e| err(format!("cannot open db file for syncing: {e}")))?;
        let mut sled_sync = SledSync {
            dir: dir.to_path_buf(),
            db: db.clone(),
            db_file,
            synced_blobs: HashSet::new(),
            synced_names: HashSet::new(),
        };
        // sled wrote `conf` (and maybe `db`'s first pages) without fsync.
        // Doing this on every open rather than only on creation also covers
        // a crash between creation and the first sync.
        sled_sync.sync_files()?;
        for path in ["conf", "db"].map(|name| dir.join(name)) {
            fsync_path(&path).map_err(|e| err(format!("cannot fsync {}: {e}", path.display())))?;
        }
        sled_sync.sync_dir_entries()?;
        for created_dir in created {
            let parent = created_dir.parent().filter(|p| !p.as_os_str().is_empty());
            let parent = parent.unwrap_or(Path::new("."));
            fsync_path(parent).map_err(|e| err(format!("cannot fsync {}: {e}", parent.display())))?;
        }

        let log_dir = dir.join("log");
        let (wal, replayed) = match found {
            Found::Fresh => {
                if holds_state(&log_dir).map_err(err)? {
                    return Err(err("holds a log in log/ but a new sled database: the node's other state \
                         is lost. Refusing to start. To rebuild this node from its peers, move the state \
                         dir and its logs/<id>.txt away"
                        .into()));
                }
                // The log first: a crash before the marker leaves a fresh dir again.
                Wal::create(&log_dir, HardState::default(), Start { restart: true, ..Start::default() })
                    .map_err(err)?;
                let mark = db.insert(CREATED_KEY, &[][..]).and_then(|_| db.insert(format1::HARD_STATE_KEY, marker));
                mark.map_err(|e| err(format!("cannot initialise: {e}")))?;
                sled_sync.sync()?;
                open_wal(dir, &log_dir)?
            }
            Found::Format1 => {
                // A crash while moving leaves the old hard state in sled; a
                // log in log/ beside none means sled lost its marker.
                let moved_before = db.get(format1::HARD_STATE_KEY).map_err(|e| err(format!("cannot read: {e}")))?;
                if moved_before.is_none() && holds_state(&log_dir).map_err(err)? {
                    return Err(err("holds a log in log/ but sled has lost the mark of state dir format 2. \
                         Refusing to start rather than replace that log"
                        .into()));
                }
                move_log_out_of_sled(dir, &db, &log_dir, &marker, &mut sled_sync)?;
                open_wal(dir, &log_dir)?
            }
            Found::Format2 => {
                if format1::has_leftovers(&db) {
                    format1::delete(&db, dir)?;
                    sled_sync.sync()?;
                }
                open_wal(dir, &log_dir)?
            }
        };

        let mut hard_state = replayed.hard_state.ok_or_else(|| {
            err("log/ holds no hard state: the node's term and vote are lost. Refusing to start".into())
        })?;
        let start = replayed.start;
        let memberships = start.membership.into_iter().chain(replayed.memberships).collect();
        let syncer = Syncer {
            wal: wal.syncer(),
            sled: Arc::new(Mutex::new(sled_sync)),
            sled_written: Arc::new(AtomicBool::new(false)),
            count: Arc::new(AtomicU64::new(0)),
        };
        let storage = Storage {
            dir: dir.to_path_buf(),
            db,
            reader: wal.reader(),
            wal,
            syncer,
            snapshot: start.meta,
            last_index: replayed.last,
            memberships,
            tail: replayed.tail,
        };
        // Marks past the log are leftovers of a log that started over.
        storage.delete_duplicate_marks(storage.last_index + 1, Index::MAX)?;
        if hard_state.commit > storage.last_index {
            log::warn!(
                "state dir {}: commit index {} is past the last log entry {}; using {}",
                dir.display(),
                hard_state.commit,
                storage.last_index,
                storage.last_index
            );
            hard_state.commit = storage.last_index;
        }
        Ok((storage, Recovered { hard_state }))
    }

    /// Sets the hard state if `Some`, and writes `entries` in place of
    /// every stored entry from the first of them on. A crash before the
    /// next [`Storage::sync`] keeps a prefix of what was written.
    ///
    /// `entries` must be consecutive, start past the snapshot and at most
    /// one past the last stored entry, and not go back in term, so that the
    /// log on disk never has a gap (which `open` would reject).
    pub fn write(&mut self, hard_state: Option<&HardState>, entries: &[Entry]) -> Result<(), StorageError> {
        let new_last = self.check_appendable(entries)?;
        // A new term or vote goes first (no entry of a term is kept without
        // it), with a commit index covering only entries this write leaves
        // alone: the suffix it replaces is not committed, and a crash must
        // not leave it looking so. The real commit index follows the entries.
        let first_commit = hard_state.map(|hs| match entries.first() {
            Some(first) => HardState { commit: hs.commit.min(first.index - 1), ..*hs },
            None => *hs,
        });
        let mut batch = Batch::default();
        if let Some(hs) = &first_commit {
            batch.hard_state(hs);
        }
        entries.iter().for_each(|entry| batch.entry(entry));
        if let Some(hs) = hard_state
            && first_commit != Some(*hs)
        {
            batch.hard_state(hs);
        }
        self.wal.write(batch).map_err(|e| StorageError::new(&self.dir, e))?;

        let Some(first) = entries.first() else { return Ok(()) };
        // Memberships of truncated entries go; the start's always stays.
        let kept = self.memberships.partition_point(|(index, _)| *index < first.index).max(1);
        self.memberships.truncate(kept);
        self.memberships.extend(entries.iter().filter_map(|entry| match &entry.payload {
            Payload::Membership(membership) => Some((entry.index, membership.clone())),
            _ => None,
        }));
        entries.iter().for_each(|entry| self.tail.push(entry.clone()));
        self.last_index = new_last;
        Ok(())
    }

    /// Starts the log over after `snapshot`: every stored entry goes (those
    /// after it may conflict with the history it holds). `membership` is the
    /// one in force at the snapshot. Not durable until [`Storage::sync`],
    /// unless it empties segments (see [`Storage::move_start`]).
    pub fn install_snapshot(&mut self, snapshot: SnapshotMeta, membership: &Membership) -> Result<(), StorageError> {
        let start = Start { meta: snapshot, membership: Some((snapshot.index, membership.clone())), restart: true };
        self.move_start(start)?;
        self.delete_duplicate_marks(0, Index::MAX)?;
        self.memberships = vec![(snapshot.index, membership.clone())];
        self.snapshot = snapshot;
        self.last_index = snapshot.index;
        self.tail.clear();
        Ok(())
    }

    /// Makes the log start after `index`, which a durable snapshot covers.
    /// Not durable until [`Storage::sync`], unless it empties segments (see
    /// [`Storage::move_start`]).
    pub fn compact(&mut self, index: Index) -> Result<(), StorageError> {
        if index <= self.snapshot.index {
            return Ok(());
        }
        if index > self.last_index {
            return Err(StorageError::new(
                &self.dir,
                format!("cannot compact to {index}: the log ends at {}", self.last_index),
            ));
        }
        let snapshot = SnapshotMeta { index, term: self.term(index) };
        // The newest membership at or before the new start becomes the start's.
        let covered = self.memberships.partition_point(|(i, _)| *i <= index);
        let membership = covered.checked_sub(1).map(|newest| self.memberships[newest].clone());
        self.move_start(Start { meta: snapshot, membership, restart: false })?;
        self.delete_duplicate_marks(0, index)?;
        if covered > 1 {
            self.memberships.drain(..covered - 1);
        }
        self.snapshot = snapshot;
        self.tail.keep(index + 1, self.last_index);
        Ok(())
    }

    /// Writes `start`, and if that leaves segments with no entry of the
    /// log, syncs and deletes them (only a durable start may make them
    /// obsolete). Otherwise it is durable with the next sync: most
    /// compactions empty no segment, and cost no fsync on the core loop.
    fn move_start(&mut self, start: Start) -> Result<(), StorageError> {
        let err = |problem: String| StorageError::new(&self.dir, problem);
        let mut batch = Batch::default();
        batch.start(&start);
        self.wal.write(batch).map_err(err)?;
        if self.wal.obsolete().is_empty() {
            return Ok(());
        }
        self.syncer.wal.sync().map_err(|e| err(format!("cannot fsync the log: {e}")))?;
        self.wal.delete_obsolete().map_err(err)
    }

    /// Records the membership a new cluster starts with, unless one is
    /// recorded already (it wins: it may have changed since). Not durable
    /// until [`Storage::sync`].
    pub fn bootstrap_membership(&mut self, membership: &Membership) -> Result<(), StorageError> {
        if !self.memberships.is_empty() {
            return Ok(());
        }
        let start = (self.snapshot.index, membership.clone());
        let mut batch = Batch::default();
        batch.start(&Start { meta: self.snapshot, membership: Some(start.clone()), restart: false });
        self.wal.write(batch).map_err(|e| StorageError::new(&self.dir, e))?;
        self.memberships = vec![start];
        Ok(())
    }

    /// Deletes the duplicate marks in `from..=to`.
    fn delete_duplicate_marks(&self, from: Index, to: Index) -> Result<(), StorageError> {
        let err = |e: sled::Error| StorageError::new(&self.dir, format!("cannot delete duplicate marks: {e}"));
        for key in self.db.range(dup_key(from)..=dup_key(to)).keys() {
            self.db.remove(key.map_err(err)?).map_err(err)?;
            self.syncer.sled_written();
        }
        Ok(())
    }

    /// Returns the last index after writing `entries`, or an error if that
    /// would leave a gap or a term going back.
    fn check_appendable(&self, entries: &[Entry]) -> Result<Index, StorageError> {
        let Some(first) = entries.first() else {
            return Ok(self.last_index);
        };
        let err = |problem: String| Err(StorageError::new(&self.dir, problem));
        if first.index <= self.snapshot.index || first.index > self.last_index + 1 {
            return err(format!(
                "refusing to write log entry {} after last index {} (snapshot at {}): \
                 the log would have a gap",
                first.index, self.last_index, self.snapshot.index
            ));
        }
        let prev_index = first.index - 1;
        let prev_term = if prev_index == self.snapshot.index { self.snapshot.term } else { self.term(prev_index) };
        let mut prev = (prev_index, prev_term);
        for entry in entries {
            if entry.index != prev.0 + 1 {
                return err(format!(
                    "refusing to write log entry {} after entry {}: entries must be consecutive",
                    entry.index, prev.0
                ));
            }
            // `open` rejects such a log: writing it would make the state dir unopenable.
            if entry.term < prev.1 {
                return err(format!(
                    "refusing to write log entry {} with term {} after term {} at index {}",
                    entry.index, entry.term, prev.1, prev.0
                ));
            }
            prev = (entry.index, entry.term);
        }
        Ok(prev.0)
    }

    /// The stored entry at `index`. A node that cannot read its own log
    /// must not go on: this stops the process, saying why.
    fn read_entry(&self, index: Index) -> Entry {
        self.reader.read(index).unwrap_or_else(|problem| self.fatal(&problem))
    }

    fn fatal(&self, problem: &str) -> ! {
        log::error!("state dir {}: {problem}; stopping at once", self.dir.display());
        std::process::exit(1)
    }

    /// Makes everything written so far durable (see [`Syncer::sync`]).
    pub fn sync(&mut self) -> Result<(), StorageError> {
        self.syncer.sync()
    }

    /// Number of completed syncs (lets tests prove that an acknowledgement
    /// waited for one).
    pub fn sync_count(&self) -> u64 {
        self.syncer.count.load(Ordering::SeqCst)
    }

    /// A handle that syncs this store from another thread.
    pub fn syncer(&self) -> Syncer {
        self.syncer.clone()
    }

    /// A view of the log for readers on other threads.
    pub fn log_view(&self) -> LogView {
        LogView { dir: self.dir.clone(), db: self.db.clone(), log: self.reader.clone() }
    }

    /// Where the core loop records which applied entries were duplicates.
    pub fn duplicate_marks(&self) -> DuplicateMarks {
        DuplicateMarks { dir: self.dir.clone(), db: self.db.clone(), syncer: self.syncer() }
    }

    /// Reads the metadata blob `name`, if it was ever written.
    pub fn read_meta(&self, name: &str) -> Result<Option<Vec<u8>>, StorageError> {
        self.db
            .get(meta_key(name))
            .map(|value| value.map(|v| v.to_vec()))
            .map_err(|e| StorageError::new(&self.dir, format!("cannot read meta {name:?}: {e}")))
    }

    /// Writes the metadata blob `name` and syncs (which also makes every
    /// earlier `write` durable).
    pub fn write_meta(&mut self, name: &str, value: &[u8]) -> Result<(), StorageError> {
        self.db
            .insert(meta_key(name), value)
            .map_err(|e| StorageError::new(&self.dir, format!("cannot write meta {name:?}: {e}")))?;
        self.syncer.sled_written();
        self.sync()
    }

    #[cfg(test)]
    fn set_segment_bytes(&mut self, bytes: u64) {
        self.wal.set_segment_bytes(bytes);
    }
}

/// Whether `log_dir` holds a log with anything in it: a term, a vote or an entry.
fn holds_state(log_dir: &Path) -> Result<bool, String> {
    Ok(Wal::open(log_dir, 0)?.is_some_and(|(_, replayed)| {
        replayed.hard_state.unwrap_or_default() != HardState::default() || replayed.last > 0
    }))
}

fn open_wal(dir: &Path, log_dir: &Path) -> Result<(Wal, wal::Replayed), StorageError> {
    Wal::open(log_dir, TAIL_BYTES).map_err(|e| StorageError::new(dir, e))?.ok_or_else(|| {
        StorageError::new(
            dir,
            "log/ is missing or empty: the node's term, vote and log are lost. Refusing to start, \
             since a blank restart could vote twice or forget acknowledged writes. To rebuild this \
             node from its peers, move the state dir and its logs/<id>.txt away",
        )
    })
}

/// Moves a format-1 dir's hard state and log into `log/`: the new log is
/// durable before the marker says so, so a crash part-way leaves a
/// format-1 dir, moved again at the next open.
fn move_log_out_of_sled(
    dir: &Path,
    db: &sled::Db,
    log_dir: &Path,
    marker: &[u8],
    sled_sync: &mut SledSync,
) -> Result<(), StorageError> {
    let err = |problem: String| StorageError::new(dir, problem);
    let started = Instant::now();
    let old = format1::read(db, dir)?;
    let start = Start { meta: old.start, membership: old.membership, restart: true };
    let mut wal = Wal::create(log_dir, old.hard_state, start).map_err(err)?;
    for chunk in old.entries.chunks(1024) {
        let mut batch = Batch::default();
        chunk.iter().for_each(|entry| batch.entry(entry));
        wal.write(batch).map_err(err)?;
    }
    wal.syncer().sync().map_err(|e| err(format!("cannot fsync the log: {e}")))?;
    drop(wal);
    db.insert(format1::HARD_STATE_KEY, marker).map_err(|e| err(format!("cannot write: {e}")))?;
    sled_sync.sync()?;
    format1::delete(db, dir)?;
    sled_sync.sync()?;
    log::info!(
        "state dir {}: moved {} log entries and the hard state from sled into log/ (state format 1 to 2) in {:?}",
        dir.display(),
        old.entries.len(),
        started.elapsed()
    );
    Ok(())
}

impl LogStore for Storage {
    fn log_start(&self) -> SnapshotMeta {
        self.snapshot
    }

    fn last_index(&self) -> Index {
        self.last_index
    }

    fn term(&self, index: Index) -> Term {
        self.tail
            .term(index)
            .or_else(|| self.wal.term(index))
            .unwrap_or_else(|| self.fatal(&format!("log entry {index} is not in the log")))
    }

    fn entries(&self, lo: Index, hi: Index, max_bytes: usize) -> Vec<Entry> {
        if let Some(held) = self.tail.range(lo, hi) {
            return take_within(held.cloned(), max_bytes);
        }
        take_within((lo..=hi).map(|index| self.read_entry(index)), max_bytes)
    }

    /// Before a membership is recorded: none, so the node waits to be added.
    fn memberships(&self) -> Vec<(Index, Membership)> {
        if self.memberships.is_empty() {
            return vec![(self.snapshot.index, Membership::default())];
        }
        self.memberships.clone()
    }
}

/// Which applied entries the session check skipped, so that the `log` op
/// marks them `"dup": true` as the mirror does, after a restart too. Kept
/// in sled and deleted with the entries they mark (a log that starts over
/// after a snapshot keeps none), so they take no memory and are at most as
/// many as the log's entries.
pub struct DuplicateMarks {
    dir: PathBuf,
    db: sled::Db,
    syncer: Syncer,
}

impl DuplicateMarks {
    /// Records the entries at `indexes` as duplicates, durably: a snapshot
    /// covering them may follow at once, after which a restart no longer
    /// applies them again to find out. Duplicates are rare (a retry across a
    /// change of leader), so the fsync is too.
    pub fn mark(&self, indexes: &[Index]) -> Result<(), StorageError> {
        if indexes.is_empty() {
            return Ok(());
        }
        let err = |problem: String| StorageError::new(&self.dir, problem);
        let mut batch = sled::Batch::default();
        indexes.iter().for_each(|&index| batch.insert(&dup_key(index)[..], &[][..]));
        self.db.apply_batch(batch).map_err(|e| err(format!("cannot write duplicate marks: {e}")))?;
        self.syncer.sled_written();
        self.syncer.sync()
    }
}

impl Syncer {
    /// Makes everything written so far durable (see the module docs for what
    /// that takes). One call covers any number of writes, so the caller can
    /// group-commit.
    pub fn sync(&self) -> Result<(), StorageError> {
        let started = Instant::now();
        self.wal.sync().map_err(|e| StorageError::new(&lock(&self.sled).dir, format!("cannot fsync the log: {e}")))?;
        {
            let mut sled = lock(&self.sled);
            if self.sled_written.swap(false, Ordering::SeqCst)
                && let Err(e) = sled.sync()
            {
                self.sled_written.store(true, Ordering::SeqCst);
                return Err(e);
            }
        }
        self.count.fetch_add(1, Ordering::SeqCst);
        METRICS.fsync_seconds.observe(seconds_since(started));
        Ok(())
    }

    fn sled_written(&self) {
        self.sled_written.store(true, Ordering::SeqCst);
    }
}

impl SledSync {
    fn sync(&mut self) -> Result<(), StorageError> {
        self.db.flush().map_err(|e| StorageError::new(&self.dir, format!("cannot flush: {e}")))?;
        self.db_file.sync_data().map_err(|e| StorageError::new(&self.dir, format!("cannot fsync db file: {e}")))?;
        self.sync_files()?;
        self.sync_dir_entries()
    }

    /// Fsyncs blob files not synced before, then the `blobs` directory so
    /// their names are durable too.
    fn sync_files(&mut self) -> Result<(), StorageError> {
        let blobs = self.dir.join("blobs");
        let err =
            |what: &Path, e: io::Error| StorageError::new(&self.dir, format!("cannot fsync {}: {e}", what.display()));
        let names = list_names(&blobs).map_err(|e| err(&blobs, e))?;
        let mut synced_any = false;
        for name in &names {
            if self.synced_blobs.contains(name) {
                continue;
            }
            let path = blobs.join(name);
            match fsync_path(&path) {
                Ok(()) => synced_any = true,
                // sled garbage-collects blobs concurrently; a deleted one
                // needs no durability.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(err(&path, e)),
            }
        }
        if synced_any {
            fsync_path(&blobs).map_err(|e| err(&blobs, e))?;
        }
        self.synced_blobs = names;
        Ok(())
    }

    /// Fsyncs `dir` if names appeared or vanished in it since the last time
    /// (sled renames a new snapshot into place without doing so).
    fn sync_dir_entries(&mut self) -> Result<(), StorageError> {
        let err = |e: io::Error| StorageError::new(&self.dir, format!("cannot fsync the directory: {e}"));
        let names = list_names(&self.dir).map_err(err)?;
        if names != self.synced_names {
            fsync_path(&self.dir).map_err(err)?;
            self.synced_names = names;
        }
        Ok(())
    }
}

/// A read-only view of the stored log for other threads (the `log` op), so
/// reading never holds up the core loop. Only entries the node has applied
/// may be asked for: those are durable and never change again.
#[derive(Clone)]
pub struct LogView {
    dir: PathBuf,
    db: sled::Db,
    log: WalReader,
}

impl LogView {
    /// The indexes in `from..=to` marked as duplicates (see [`DuplicateMarks`]).
    pub fn duplicates(&self, from: Index, to: Index) -> Result<BTreeSet<Index>, StorageError> {
        if from > to {
            return Ok(BTreeSet::new());
        }
        let err = |problem: String| StorageError::new(&self.dir, problem);
        self.db
            .range(dup_key(from)..=dup_key(to))
            .keys()
            .map(|key| {
                let key = key.map_err(|e| err(format!("cannot read duplicate marks: {e}")))?;
                parse_index_key(DUP_PREFIX, &key).ok_or_else(|| err("malformed duplicate mark".into()))
            })
            .collect()
    }

    /// Hands `visit` the entries `from..=to` the log still holds, in order,
    /// until it returns false. Compacted ones are skipped.
    pub fn visit(&self, from: Index, to: Index, mut visit: impl FnMut(Entry) -> bool) -> Result<(), StorageError> {
        for index in from.max(self.log.first())..=to.min(self.log.last()) {
            match self.log.read(index) {
                Ok(entry) => {
                    if !visit(entry) {
                        break;
                    }
                }
                // Compacted while being read.
                Err(_) if index < self.log.first() => {}
                Err(e) => return Err(StorageError::new(&self.dir, e)),
            }
        }
        Ok(())
    }
}

/// Reads the value under `key`, if any.
fn read_key<T: serde::de::DeserializeOwned>(
    db: &sled::Db,
    dir: &Path,
    key: &[u8],
    what: &str,
) -> Result<Option<T>, StorageError> {
    let err = |problem: String| StorageError::new(dir, problem);
    match db.get(key) {
        Ok(None) => Ok(None),
        Ok(Some(bytes)) => {
            rmp_serde::from_slice(&bytes).map(Some).map_err(|e| err(format!("{what} is unreadable: {e}")))
        }
        Err(e) => Err(err(format!("cannot read {what}: {e}"))),
    }
}

/// Creates `dir` and any missing ancestors; returns the ones it created,
/// outermost first, whose parents must be fsynced to make them durable.
fn create_dirs(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut missing = Vec::new();
    let mut cursor = Some(dir);
    while let Some(path) = cursor.filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
        missing.push(path.to_path_buf());
        cursor = path.parent();
    }
    fs::create_dir_all(dir)?;
    missing.reverse();
    Ok(missing)
}

/// `sled::open` that turns the panics sled 0.34 raises on some malformed
/// files into errors.
///
/// sled releases its file lock only once its background threads let go of a
/// dropped database, a moment after the drop; a lock still held after
/// [`LOCK_WAIT`] means another process is using the state dir.
fn open_sled(dir: &Path) -> Result<sled::Db, StorageError> {
    const LOCK_WAIT: Duration = Duration::from_secs(3);
    let err = |problem: String| StorageError::new(dir, problem);
    // No background flusher: `sync` flushes whenever the core needs
    // durability, and a second writer of fsyncs only adds latency jitter.
    let open = || panic::catch_unwind(AssertUnwindSafe(|| sled::Config::new().path(dir).flush_every_ms(None).open()));
    let deadline = Instant::now() + LOCK_WAIT;
    let mut opened = open();
    while matches!(&opened, Ok(Err(e)) if e.to_string().contains("could not acquire lock")) && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
        opened = open();
    }
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) if e.to_string().contains("could not acquire lock") => {
            Err(err(format!("is in use by another process (is this node already running?): {e}")))
        }
        Ok(Err(e)) => Err(err(format!("cannot open sled database: {e}"))),
        Err(payload) => {
            let reason = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(err(format!("not a readable sled database (sled panicked: {reason})")))
        }
    }
}

fn list_names(dir: &Path) -> io::Result<HashSet<OsString>> {
    fs::read_dir(dir)?.map(|entry| entry.map(|e| e.file_name())).collect()
}

/// Starts writing `len` bytes at `offset` of `file` to the disk without
/// waiting for them, so that a large file's fsync waits for the last of
/// them only, and the device gets them spread out rather than all at once.
/// A hint: the fsync is what makes them durable, so a failure here changes
/// nothing.
pub(crate) fn start_writeback(file: &File, offset: u64, len: usize) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (libc::off64_t::try_from(offset), libc::off64_t::try_from(len)) else { return };
    // SAFETY: the descriptor is open for as long as `file` is borrowed.
    unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE) };
}

/// `fsync` on a file or a directory (on Linux a directory opened read-only
/// can be fsynced, which makes the names in it durable).
fn fsync_path(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

fn dup_key(index: Index) -> Vec<u8> {
    [DUP_PREFIX, &index.to_be_bytes()].concat()
}

/// The index in a key made of `prefix` and a big-endian u64.
fn parse_index_key(prefix: &[u8], key: &[u8]) -> Option<Index> {
    let bytes = key.strip_prefix(prefix)?;
    Some(Index::from_be_bytes(bytes.try_into().ok()?))
}

fn meta_key(name: &str) -> Vec<u8> {
    [META_PREFIX, name.as_bytes()].concat()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::types::Payload;

    fn entry(index: Index, term: u64, data: &[u8]) -> Entry {
        Entry { index, term, payload: Payload::Command(data.to_vec().into()) }
    }

    struct Reopened {
        hard_state: HardState,
        entries: Vec<Entry>,
    }

    fn all_entries(s: &Storage) -> Vec<Entry> {
        let first = s.log_start().index + 1;
        if first > s.last_index() { vec![] } else { s.entries(first, s.last_index(), usize::MAX) }
    }

    fn reopen(dir: &Path) -> Reopened {
        let (s, rec) = Storage::open(dir).expect("reopen");
        Reopened { hard_state: rec.hard_state, entries: all_entries(&s) }
    }

    fn log_key(index: Index) -> Vec<u8> {
        [format1::LOG_PREFIX, &index.to_be_bytes()].concat()
    }

    /// Writes raw key/values into a state dir of format 1 (as 0.1 and 0.2
    /// left it) with sled directly, to plant what `open` must move or refuse.
    fn write_format_1(dir: &Path, pairs: &[(Vec<u8>, Vec<u8>)]) {
        let db = open_sled(dir).unwrap();
        db.insert(CREATED_KEY, &[][..]).unwrap();
        for (k, v) in pairs {
            db.insert(k.as_slice(), v.as_slice()).unwrap();
        }
        db.flush().unwrap();
    }

    type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

    fn format_1_entries(entries: &[Entry]) -> Pairs {
        entries.iter().map(|e| (log_key(e.index), rmp_serde::to_vec_named(e).unwrap())).collect()
    }

    fn open_err(dir: &Path) -> String {
        match Storage::open(dir) {
            Ok(_) => panic!("open of {} should fail", dir.display()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn fresh_dir_is_empty_and_created_with_parents() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state").join("0");
        let (s, rec) = Storage::open(&dir).unwrap();
        assert_eq!(rec.hard_state, HardState::default());
        assert!(all_entries(&s).is_empty());
        assert!(dir.join("db").exists());
        assert_eq!(s.wal.segments().len(), 1);
    }

    #[test]
    fn write_sync_reopen_roundtrip() {
        let tmp = tempfile::tempdir().unwrap();
        let hs = HardState { term: 3, vote: Some(1), commit: 2 };
        let entries = vec![Entry { index: 1, term: 1, payload: Payload::Noop }, entry(2, 2, b"a"), entry(3, 3, b"b")];
        {
            let (mut s, _) = Storage::open(tmp.path()).unwrap();
            s.write(Some(&hs), &entries).unwrap();
            assert_eq!(s.sync_count(), 0);
            s.sync().unwrap();
            assert_eq!(s.sync_count(), 1);
        }
        let rec = reopen(tmp.path());
        assert_eq!(rec.hard_state, hs);
        assert_eq!(rec.entries, entries);
    }

    #[test]
    fn write_without_truncate_appends() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Storage::open(tmp.path()).unwrap();
            s.write(None, &[entry(1, 1, b"a"), entry(2, 1, b"b")]).unwrap();
            s.write(None, &[entry(3, 1, b"c")]).unwrap();
            s.write(None, &[]).unwrap();
            s.sync().unwrap();
        }
        let rec = reopen(tmp.path());
        assert_eq!(rec.entries.iter().map(|e| e.index).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(rec.hard_state, HardState::default());
    }

    #[test]
    fn truncate_then_append_keeps_new_suffix() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Storage::open(tmp.path()).unwrap();
            let old: Vec<_> = (1..=5).map(|i| entry(i, 1, b"old")).collect();
            s.write(None, &old).unwrap();
            s.sync().unwrap();
            let hs = HardState { term: 2, vote: None, commit: 2 };
            s.write(Some(&hs), &[entry(3, 2, b"new")]).unwrap();
            s.sync().unwrap();
        }
        let rec = reopen(tmp.path());
        assert_eq!(rec.entries, vec![entry(1, 1, b"old"), entry(2, 1, b"old"), entry(3, 2, b"new")]);
        assert_eq!(rec.hard_state.term, 2);
    }

    /// The commit index is written after the entries it may cover: a crash
    /// between keeps the new term but not a commit index over the suffix
    /// being replaced.
    #[test]
    fn a_write_cut_short_keeps_no_commit_index_over_the_entries_it_replaces() {
        let tmp = tempfile::tempdir().unwrap();
        let segment;
        let before;
        {
            let (mut s, _) = Storage::open(tmp.path()).unwrap();
            s.write(
                Some(&HardState { term: 1, vote: None, commit: 1 }),
                &(1..=3).map(|i| entry(i, 1, b"a")).collect::<Vec<_>>(),
            )
            .unwrap();
            segment = tmp.path().join("log").join(format!("{:020}.wal", s.wal.segments()[0]));
            before = s.wal.end();
            s.write(Some(&HardState { term: 2, vote: None, commit: 3 }), &[entry(2, 2, b"b"), entry(3, 2, b"c")])
                .unwrap();
        }
        // Keep the new hard state and the first new entry only.
        let bytes = fs::read(&segment).unwrap();
        let record = |at: usize| 8 + u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let mut end = before as usize;
        end += record(end);
        end += record(end);
        fs::write(&segment, &bytes[..end]).unwrap();
        let rec = reopen(tmp.path());
        assert_eq!(rec.hard_state, HardState { term: 2, vote: None, commit: 1 });
        assert_eq!(rec.entries, vec![entry(1, 1, b"a"), entry(2, 2, b"b")]);
    }

    #[test]
    fn hard_state_updates_replace_previous() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Storage::open(tmp.path()).unwrap();
            s.write(Some(&HardState { term: 1, vote: Some(0), commit: 0 }), &[]).unwrap();
            s.write(Some(&HardState { term: 2, vote: None, commit: 0 }), &[]).unwrap();
            s.sync().unwrap();
        }
        assert_eq!(reopen(tmp.path()).hard_state, HardState { term: 2, vote: None, commit: 0 });
    }

    #[test]
    fn commit_past_log_end_is_clamped() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Storage::open(tmp.path()).unwrap();
            let hs = HardState { term: 1, vote: None, commit: 9 };
            s.write(Some(&hs), &[entry(1, 1, b"a")]).unwrap();
            s.sync().unwrap();
        }
        assert_eq!(reopen(tmp.path()).hard_state.commit, 1);
    }

    #[test]
    fn write_rejects_gaps() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut s, _) = Storage::open(tmp.path()).unwrap();
        let e = s.write(None, &[entry(2, 1, b"a")]).unwrap_err().to_string();
        assert!(e.contains("log entry 2 after last index 0 (snapshot at 0)"), "{e}");
        let e = s.write(None, &[entry(1, 1, b"a"), entry(3, 1, b"c")]).unwrap_err();
        assert!(e.to_string().contains("consecutive"), "{e}");
        assert!(s.write(None, &[entry(0, 1, b"a")]).is_err());
        // A rejected write changes nothing.
        s.write(None, &[entry(1, 1, b"a")]).unwrap();
    }

    #[test]
    fn write_rejects_decreasing_terms_that_would_make_the_dir_unopenable() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut s, _) = Storage::open(tmp.path()).unwrap();
        s.write(None, &[entry(1, 2, b"a"), entry(2, 3, b"b")]).unwrap();
        let e = s.write(None, &[entry(3, 2, b"c")]).unwrap_err().to_string();
        assert!(e.contains("term 2 after term 3"), "{e}");
        assert!(s.write(None, &[entry(3, 4, b"c"), entry(4, 3, b"d")]).is_err());
        // After truncating entry 2, term 2 may follow entry 1 again.
        s.write(None, &[entry(2, 2, b"b2")]).unwrap();
        s.sync().unwrap();
        drop(s);
        assert_eq!(reopen(tmp.path()).entries.len(), 2);
    }

    #[test]
    fn log_view_visits_a_range_until_told_to_stop_and_skips_compacted_entries() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut s, _) = Storage::open(tmp.path()).unwrap();
        let entries: Vec<Entry> = (1..=5).map(|i| entry(i, 1, &[i as u8; 10])).collect();
        s.write(None, &entries).unwrap();
        let view = s.log_view();
        let collect = |from, to, max: usize| {
            let mut seen = Vec::new();
            view.visit(from, to, |e| {
                seen.push(e);
                seen.len() < max
            })
            .unwrap();
            seen
        };
        assert_eq!(collect(2, 4, 10), entries[1..4]);
        assert_eq!(collect(4, 9, 10), entries[3..]);
        assert!(collect(4, 3, 10).is_empty());
        assert_eq!(collect(1, 5, 2), entries[..2]);
        s.compact(2).unwrap();
        assert_eq!(collect(1, 4, 10), entries[2..4]);
    }

    #[test]
    fn reopening_right_after_a_drop_waits_for_the_lock_and_a_second_opener_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        for i in 0..20 {
            let (mut s, _) = Storage::open(tmp.path()).unwrap();
            s.write(None, &[entry(i + 1, 1, b"x")]).unwrap();
            s.sync().unwrap();
        }
        let _first = Storage::open(tmp.path()).unwrap();
        let e = Storage::open(tmp.path()).err().expect("the state dir is locked").to_string();
        assert!(e.contains("in use by another process"), "{e}");
    }

    #[test]
    fn a_large_entry_round_trips_and_a_large_meta_value_goes_to_a_synced_blob() {
        let tmp = tempfile::tempdir().unwrap();
        let big = vec![0xAB; 1 << 20];
        {
            let (mut s, _) = Storage::open(tmp.path()).unwrap();
            s.write(None, &[entry(1, 1, &big)]).unwrap();
            s.write_meta("big", &big).unwrap();
            let sled = lock(&s.syncer.sled);
            assert!(!sled.synced_blobs.is_empty(), "sync found no blob file");
            let on_disk = list_names(&tmp.path().join("blobs")).unwrap();
            assert!(on_disk.iter().all(|n| sled.synced_blobs.contains(n)));
        }
        let (s, _) = Storage::open(tmp.path()).unwrap();
        assert_eq!(all_entries(&s), vec![entry(1, 1, &big)]);
        assert_eq!(s.read_meta("big").unwrap(), Some(big));
    }

    #[test]
    fn sled_is_synced_only_when_it_was_written() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut s, _) = Storage::open(tmp.path()).unwrap();
        s.write(None, &[entry(1, 1, b"x")]).unwrap();
        s.sync().unwrap();
        assert!(!s.syncer.sled_written.load(Ordering::SeqCst));
        s.duplicate_marks().mark(&[1]).unwrap();
        assert!(!s.syncer.sled_written.load(Ordering::SeqCst), "the mark was synced");
        assert_eq!(s.sync_count(), 2);
    }

    #[test]
    fn meta_roundtrip() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Storage::open(tmp.path()).unwrap();
            assert_eq!(s.read_meta("membership").unwrap(), None);
            s.write_meta("membership", b"v1").unwrap();
            s.write_meta("membership", b"v2").unwrap();
            assert_eq!(s.sync_count(), 2, "write_meta syncs");
            assert_eq!(s.read_meta("membership").unwrap(), Some(b"v2".to_vec()));
        }
        let (s, _) = Storage::open(tmp.path()).unwrap();
        assert!(all_entries(&s).is_empty(), "meta keys are not log entries");
        assert_eq!(s.read_meta("membership").unwrap(), Some(b"v2".to_vec()));
    }

    #[test]
    fn a_format_1_dir_has_its_log_moved_into_log_and_reopens_as_format_2() {
        let tmp = tempfile::tempdir().unwrap();
        let hs = HardState { term: 3, vote: Some(2), commit: 7 };
        let membership = Membership::of_voters([1, 2, 3], vec![]);
        let change = Entry { index: 6, term: 3, payload: Payload::Membership(Membership::of_voters([1, 2], vec![])) };
        let entries: Vec<Entry> = (3..=8).map(|i| if i == 6 { change.clone() } else { entry(i, 3, b"v") }).collect();
        let mut pairs = format_1_entries(&[entry(1, 1, b"compacted, not yet deleted")]);
        pairs.extend(format_1_entries(&entries));
        pairs.push((b"hs".to_vec(), rmp_serde::to_vec_named(&hs).unwrap()));
        pairs.push((b"snapshot".to_vec(), rmp_serde::to_vec_named(&SnapshotMeta { index: 2, term: 1 }).unwrap()));
        pairs.push((b"membership".to_vec(), rmp_serde::to_vec_named(&(0u64, membership.clone())).unwrap()));
        pairs.push((dup_key(4), vec![]));
        write_format_1(tmp.path(), &pairs);
        for _ in 0..2 {
            let (s, rec) = Storage::open(tmp.path()).unwrap();
            assert_eq!(rec.hard_state, hs);
            assert_eq!(s.log_start(), SnapshotMeta { index: 2, term: 1 });
            assert_eq!(all_entries(&s), entries);
            assert_eq!(s.memberships(), vec![(0, membership.clone()), (6, Membership::of_voters([1, 2], vec![]))]);
            assert_eq!(s.log_view().duplicates(1, 10).unwrap(), BTreeSet::from([4]));
            assert!(!format1::has_leftovers(&s.db), "the old keys are gone");
        }
        // What 0.1 and 0.2 say when they open it.
        let db = open_sled(tmp.path()).unwrap();
        let e = rmp_serde::from_slice::<HardState>(&db.get(b"hs").unwrap().unwrap()).unwrap_err().to_string();
        assert!(e.contains("state dir format 2") && e.contains("newer than 0.2.0"), "{e}");
    }

    #[test]
    fn a_format_1_dir_with_a_bad_log_is_refused_and_left_as_it_was() {
        let good = entry(1, 1, b"a");
        let cases: Vec<(Pairs, &str)> = vec![
            (
                vec![(log_key(1), rmp_serde::to_vec_named(&good).unwrap()), (log_key(2), b"\xc1junk".to_vec())],
                "log entry 2 is unreadable",
            ),
            (vec![(b"hs".to_vec(), b"\xff\xff".to_vec())], "hard state is unreadable"),
            (
                vec![(log_key(1), rmp_serde::to_vec_named(&entry(5, 1, b"a")).unwrap())],
                "log entry 1 is stored with index 5",
            ),
            (
                format_1_entries(&[entry(1, 1, b"a"), entry(2, 1, b"a"), entry(4, 1, b"a")]),
                "log entry 4 follows a gap: expected index 3",
            ),
            (format_1_entries(&[entry(2, 1, b"a")]), "expected index 1"),
            (format_1_entries(&[entry(1, 2, b"a"), entry(2, 1, b"a")]), "log entry 2 has term 1 after term 2"),
            (vec![(b"log/short".to_vec(), b"x".to_vec())], "log key log/short is malformed"),
        ];
        for (pairs, expected) in cases {
            let tmp = tempfile::tempdir().unwrap();
            write_format_1(tmp.path(), &pairs);
            let e = open_err(tmp.path());
            assert!(e.starts_with(&format!("state dir {}: ", tmp.path().display())), "{e}");
            assert!(e.contains(expected), "{e} should say {expected}");
            let db = open_sled(tmp.path()).unwrap();
            assert!(format1::has_leftovers(&db) || db.contains_key(b"hs").unwrap(), "untouched");
        }
    }

    #[test]
    fn garbage_dir_is_an_error_not_a_panic() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("db"), vec![0x5a; 4096]).unwrap();
        fs::write(tmp.path().join("conf"), b"this is not a sled config file at all").unwrap();
        let e = open_err(tmp.path());
        assert!(e.starts_with(&format!("state dir {}: ", tmp.path().display())), "{e}");
    }

    #[test]
    fn garbage_data_file_with_a_valid_conf_is_refused_not_opened_empty() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Storage::open(tmp.path()).unwrap();
            s.write(Some(&HardState { term: 3, vote: Some(1), commit: 0 }), &[entry(1, 3, b"x")]).unwrap();
            s.sync().unwrap();
        }
        fs::write(tmp.path().join("db"), vec![0x5a; 4096]).unwrap();
        assert!(open_err(tmp.path()).contains("corrupt"));
    }

    #[test]
    fn a_lost_log_or_a_lost_sled_database_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Storage::open(tmp.path()).unwrap();
            s.write(Some(&HardState { term: 3, vote: Some(1), commit: 0 }), &[entry(1, 3, b"x")]).unwrap();
            s.sync().unwrap();
        }
        fs::rename(tmp.path().join("log"), tmp.path().join("log.away")).unwrap();
        assert!(open_err(tmp.path()).contains("log/ is missing or empty"));
        for name in ["db", "conf", "blobs", "snap.*"] {
            let _ = fs::remove_dir_all(tmp.path().join(name)).or_else(|_| fs::remove_file(tmp.path().join(name)));
        }
        for item in fs::read_dir(tmp.path()).unwrap() {
            let path = item.unwrap().path();
            if path.file_name().unwrap().to_string_lossy().starts_with("snap.") {
                fs::remove_file(path).unwrap();
            }
        }
        fs::rename(tmp.path().join("log.away"), tmp.path().join("log")).unwrap();
        assert!(open_err(tmp.path()).contains("holds a log in log/ but a new sled database"));
    }

    #[test]
    fn path_that_is_a_file_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("state");
        fs::write(&file, b"x").unwrap();
        assert!(open_err(&file).contains("cannot create"));
    }

    #[test]
    fn compaction_and_snapshot_install_survive_a_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Storage::open(tmp.path()).unwrap();
            s.write(None, &(1..=6).map(|i| entry(i, 1 + i / 4, b"x")).collect::<Vec<_>>()).unwrap();
            s.compact(4).unwrap();
            assert_eq!(s.log_start(), SnapshotMeta { index: 4, term: 2 });
            assert!(s.write(None, &[entry(4, 2, b"y")]).is_err(), "below the snapshot");
            s.sync().unwrap();
        }
        {
            let (mut s, _) = Storage::open(tmp.path()).unwrap();
            assert_eq!((s.log_start().index, s.last_index(), s.term(5)), (4, 6, 2));
            assert_eq!(all_entries(&s).iter().map(|e| e.index).collect::<Vec<_>>(), vec![5, 6]);
            s.install_snapshot(SnapshotMeta { index: 9, term: 3 }, &Membership::default()).unwrap();
            s.write(None, &[entry(10, 3, b"z")]).unwrap();
            s.sync().unwrap();
        }
        let (s, _) = Storage::open(tmp.path()).unwrap();
        assert_eq!(s.log_start(), SnapshotMeta { index: 9, term: 3 });
        assert_eq!(all_entries(&s), vec![entry(10, 3, b"z")]);
    }

    #[test]
    fn compaction_deletes_the_segments_it_empties_and_keeps_the_start_membership() {
        let tmp = tempfile::tempdir().unwrap();
        let voters = Membership::of_voters([1, 2, 3], vec![]);
        let change = Membership::of_voters([1, 2], vec![]);
        {
            let (mut s, _) = Storage::open(tmp.path()).unwrap();
            s.set_segment_bytes(2000);
            s.bootstrap_membership(&voters).unwrap();
            for i in 1..=100 {
                let payload =
                    if i == 30 { Payload::Membership(change.clone()) } else { Payload::Command(vec![1; 100].into()) };
                s.write(
                    Some(&HardState { term: 1, vote: None, commit: i - 1 }),
                    &[Entry { index: i, term: 1, payload }],
                )
                .unwrap();
            }
            let before = s.wal.segments().len();
            s.compact(90).unwrap();
            assert!(s.wal.segments().len() <= 2, "{before} segments, then {:?}", s.wal.segments());
            assert_eq!(s.memberships(), vec![(30, change.clone())]);
            s.sync().unwrap();
        }
        let (s, rec) = Storage::open(tmp.path()).unwrap();
        assert_eq!((s.log_start().index, s.last_index(), rec.hard_state.commit), (90, 100, 99));
        assert_eq!(s.memberships(), vec![(30, change)]);
        assert_eq!(all_entries(&s).len(), 10);
    }

    /// A snapshot below the log's end starts the log over: a reopen before
    /// any new entry finds none of the old ones, nor their memberships.
    #[test]
    fn a_snapshot_installed_below_the_last_entry_leaves_nothing_of_the_old_log_after_a_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let snapshot_membership = Membership::of_voters([1, 2, 3], vec![]);
        {
            let (mut s, _) = Storage::open(tmp.path()).unwrap();
            s.bootstrap_membership(&Membership::of_voters([1], vec![])).unwrap();
            let change =
                Entry { index: 9, term: 1, payload: Payload::Membership(Membership::of_voters([1, 2], vec![])) };
            let mut entries: Vec<Entry> = (1..=8).map(|i| entry(i, 1, b"stale")).collect();
            entries.extend([change, entry(10, 1, b"stale")]);
            s.write(None, &entries).unwrap();
            s.install_snapshot(SnapshotMeta { index: 6, term: 2 }, &snapshot_membership).unwrap();
            s.sync().unwrap();
        }
        let (s, _) = Storage::open(tmp.path()).unwrap();
        assert_eq!((s.log_start().index, s.last_index()), (6, 6));
        assert_eq!(s.memberships(), vec![(6, snapshot_membership)]);
        assert!(s.tail.is_empty() && all_entries(&s).is_empty());
    }

    #[test]
    fn a_log_beside_a_sled_database_that_lost_its_format_2_mark_is_refused_not_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Storage::open(tmp.path()).unwrap();
            s.write(Some(&HardState { term: 3, vote: Some(1), commit: 0 }), &[entry(1, 3, b"x")]).unwrap();
            s.sync().unwrap();
        }
        let db = open_sled(tmp.path()).unwrap();
        db.remove(format1::HARD_STATE_KEY).unwrap();
        db.flush().unwrap();
        drop(db);
        let log = || {
            let mut files: Vec<_> =
                fs::read_dir(tmp.path().join("log")).unwrap().map(|e| fs::read(e.unwrap().path()).unwrap()).collect();
            files.sort();
            files
        };
        let before = log();
        assert!(open_err(tmp.path()).contains("sled has lost the mark of state dir format 2"));
        assert!(log() == before, "the log is untouched");
    }

    /// Truncating a suffix that holds a membership entry removes it, and
    /// the entries replacing them are what a reopen finds.
    #[test]
    fn a_truncated_membership_entry_goes_with_its_index() {
        let tmp = tempfile::tempdir().unwrap();
        let membership = Membership::of_voters([1, 2], vec![]);
        {
            let (mut s, _) = Storage::open(tmp.path()).unwrap();
            s.bootstrap_membership(&Membership::of_voters([1, 2, 3], vec![])).unwrap();
            let change = Entry { index: 2, term: 1, payload: Payload::Membership(membership) };
            s.write(None, &[entry(1, 1, b"a"), change, entry(3, 1, b"c")]).unwrap();
            assert_eq!(s.memberships().len(), 2);
            s.write(None, &[entry(2, 2, b"x")]).unwrap();
            s.sync().unwrap();
        }
        let (s, _) = Storage::open(tmp.path()).unwrap();
        assert_eq!(s.memberships().len(), 1);
        assert_eq!(all_entries(&s), vec![entry(1, 1, b"a"), entry(2, 2, b"x")]);
    }

    #[test]
    fn duplicate_marks_survive_a_reopen_and_go_with_the_entries_they_mark() {
        let tmp = tempfile::tempdir().unwrap();
        let marked = |s: &Storage| s.log_view().duplicates(1, 100).unwrap().into_iter().collect::<Vec<_>>();
        {
            let (mut s, _) = Storage::open(tmp.path()).unwrap();
            s.write(None, &(1..=10).map(|i| entry(i, 1, b"x")).collect::<Vec<_>>()).unwrap();
            s.sync().unwrap();
            s.duplicate_marks().mark(&[3, 5, 8]).unwrap();
        }
        let (mut s, _) = Storage::open(tmp.path()).unwrap();
        assert_eq!(marked(&s), [3, 5, 8], "durable");
        assert_eq!(s.log_view().duplicates(4, 7).unwrap(), BTreeSet::from([5]));
        s.compact(5).unwrap();
        s.sync().unwrap();
        drop(s);
        let (mut s, _) = Storage::open(tmp.path()).unwrap();
        assert_eq!(marked(&s), [8], "compacted with the entries they mark");
        s.install_snapshot(SnapshotMeta { index: 20, term: 2 }, &Membership::default()).unwrap();
        assert!(marked(&s).is_empty(), "a log that starts over keeps none");
    }

    #[test]
    fn entries_older_than_the_memory_tail_are_read_from_the_log_files() {
        let tmp = tempfile::tempdir().unwrap();
        let big = vec![7u8; 1 << 20];
        let entries: Vec<Entry> = (1..=40).map(|i| entry(i, 1, &big)).collect();
        {
            let (mut s, _) = Storage::open(tmp.path()).unwrap();
            s.write(None, &entries).unwrap();
            assert!(s.tail.first_index().unwrap() > 1, "the tail is bounded");
            assert_eq!(s.entries(1, 3, 3 << 20), entries[..2]);
            assert_eq!(s.term(1), 1);
            s.sync().unwrap();
        }
        let (s, _) = Storage::open(tmp.path()).unwrap();
        assert!(s.tail.first_index().unwrap() > 1, "the tail read at open is bounded");
        assert_eq!(s.entries(1, 40, usize::MAX), entries);
    }
}
