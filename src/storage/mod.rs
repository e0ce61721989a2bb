//! Durable Raft state (term, vote, lazily persisted commit index, log and
//! small metadata blobs) in a sled database under `state/<id>/`.
//!
//! # Layout
//!
//! One sled tree (the default one) with prefixed keys, values encoded with
//! `rmp_serde::to_vec_named`:
//!
//! | key                         | value        |
//! |-----------------------------|--------------|
//! | `hs`                        | [`HardState`] |
//! | `snapshot`                  | [`SnapshotMeta`]: the log starts after it |
//! | `log/` + index as u64 BE    | [`Entry`]    |
//! | `membership`                | (index, [`Membership`]): in force at the log start |
//! | `membership/` + index as BE | [`Membership`] of the membership entry at that index |
//! | `meta/` + name              | raw bytes    |
//! | `dup/` + index as u64 BE    | empty: the applied entry there was a duplicate (see [`DuplicateMarks`]) |
//!
//! Big-endian indexes make sled's key order the log order. The newest
//! entries (up to [`TAIL_BYTES`]) are also kept in memory, and they are all
//! that opening reads: the core reads older ones through [`LogStore`].
//! Membership entries are also indexed on their own, so that opening finds
//! every membership without reading the whole log.
//!
//! # Crash consistency
//!
//! sled recovers a prefix of its operations, so [`Storage::write`] orders
//! them so that every prefix is a state [`Storage::open`] accepts and Raft
//! is safe in: the hard state first (a newer term or vote may always be
//! durable before the entries that come with it), its commit index held
//! below the first new entry; then a conflicting suffix, deleted from its
//! end; then the membership index of those entries; then each new entry
//! after its own membership index; then the commit index the hard state
//! gives. (Written first, that commit index could make a crash-cut
//! follower apply the uncommitted entries a leader was replacing.) A crash
//! part-way leaves the old log cut short and part of the new entries: none
//! of them was acknowledged (acknowledgements wait for [`Storage::sync`]),
//! and none of the cut entries was committed, since a leader's log
//! disagreed with them. A membership index past the last
//! entry is a leftover, deleted at open. (One `sled::Batch` would make the
//! write all-or-nothing, but sled writes a batch's manifest in a buffer of
//! its own: two more writes and `sync_file_range` calls on every persist.)
//!
//! # Durability
//!
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
//! So [`Storage::sync`] does `flush()`, then `fdatasync` on `<dir>/db`, then
//! `fsync` on every blob file it has not synced before (blob files are
//! immutable once written) followed by the `blobs` directory, and `fsync` on
//! `<dir>` whenever its set of names changed (a new snapshot). [`Storage::open`]
//! fsyncs `conf`, `db`, `blobs/`, `<dir>` and every directory it had to
//! create, plus their parents, so a freshly created node's files exist after a
//! power loss.

pub(crate) mod disk_space;
pub mod mirror;
pub mod snapshot;

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::lock;
use crate::metrics::{METRICS, seconds_since};
use crate::raft::log_store::take_within;
use crate::raft::types::{Entry, HardState, Index, Membership, Payload, Term};
use crate::raft::{LogStore, SnapshotMeta};

/// Version of the state dir's layout (the keys and value encodings above), shown by `raft-zmq --version`.
pub const STATE_FORMAT_VERSION: u32 = 1;

const HARD_STATE_KEY: &[u8] = b"hs";
const SNAPSHOT_KEY: &[u8] = b"snapshot";
const LOG_PREFIX: &[u8] = b"log/";
const MEMBERSHIP_KEY: &[u8] = b"membership";
const MEMBERSHIP_PREFIX: &[u8] = b"membership/";
const META_PREFIX: &[u8] = b"meta/";
const DUP_PREFIX: &[u8] = b"dup/";
/// Written when the database is created. sled treats an unreadable data file
/// as a torn write and silently opens it empty; without this marker a
/// corrupted state dir would restart as a blank node that may vote twice in a
/// term and has forgotten acknowledged entries.
const CREATED_KEY: &[u8] = b"created";
const LOG_KEY_LEN: usize = LOG_PREFIX.len() + 8;

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

/// The newest entries are kept in memory too, up to this many bytes: the
/// leader replicates and applies from memory, and only a follower far
/// behind costs database reads. It is also all that `open` reads and checks,
/// so a restart takes the same time however long the log is.
const TAIL_BYTES: usize = 32 << 20;

/// The node's durable state. Writes are buffered by sled until [`Storage::sync`].
pub struct Storage {
    dir: PathBuf,
    db: sled::Db,
    syncer: Syncer,
    /// The snapshot the stored log follows.
    snapshot: SnapshotMeta,
    /// Index of the last log entry written (durable or not), so that `write`
    /// can truncate and validate without reading the database.
    last_index: Index,
    /// The membership in force at the log start, then those of the stored
    /// membership entries; empty until a membership is first recorded.
    memberships: Vec<(Index, Membership)>,
    /// The newest entries, contiguous and ending at `last_index`.
    tail: VecDeque<Entry>,
    tail_bytes: usize,
    compactor: Compactor,
}

/// What makes the state dir's writes durable, shareable with a thread that
/// syncs a node's writes while its core loop goes on (see
/// [`crate::raft::Ready`] on asynchronous storage writes). One sync covers
/// every write made before it began, whichever thread made it.
#[derive(Clone)]
pub struct Syncer(Arc<Mutex<SyncState>>);

struct SyncState {
    dir: PathBuf,
    db: sled::Db,
    /// A second handle on sled's data file, only for `fdatasync`.
    db_file: File,
    /// Blob files already fsynced (by name). Rebuilt from each listing so
    /// blobs that sled garbage-collected are forgotten.
    synced_blobs: HashSet<OsString>,
    /// Names in `dir` when it was last fsynced.
    synced_names: HashSet<OsString>,
    count: u64,
}

/// Deletes compacted entries on a thread of its own: a compaction deletes
/// thousands of keys, which on the core loop's thread held up replication
/// for tens of milliseconds. The new log start is recorded first (sled
/// recovers a prefix of its operations, so no crash can leave entries
/// deleted without it); leftovers at or below it are never read, and the
/// next open deletes them.
struct Compactor {
    jobs: Option<crossbeam_channel::Sender<(Index, Index)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Compactor {
    /// Keys removed between pauses: deleting a
    /// compaction's keys at once competed with the core loop's writes and
    /// syncs for the disk and CPU (p99 write latency 38 ms instead of 12
    /// in `scripts/long_history.sh`); spread out, the cost disappears.
    const BATCH: u64 = 256;
    const PAUSE: std::time::Duration = std::time::Duration::from_millis(5);

    fn start(db: sled::Db, dir: PathBuf) -> Result<Compactor, StorageError> {
        let (jobs, queue) = crossbeam_channel::unbounded::<(Index, Index)>();
        let run = move || {
            for (from, to) in queue {
                // Duplicate marks first: then no crash leaves one below the
                // log start without a leftover entry, which the next open
                // finds and has deleted.
                // Key by key: no atomicity is needed, and a sled batch costs
                // buffer writes of its own.
                let marks = db.range(dup_key(from)..=dup_key(to)).keys().flatten();
                if let Err(e) = marks.into_iter().try_for_each(|key| db.remove(key).map(drop)) {
                    log::warn!("state dir {}: cannot delete compacted duplicate marks: {e}", dir.display());
                }
                for start in (from..=to).step_by(Self::BATCH as usize) {
                    let chunk = start..=to.min(start + Self::BATCH - 1);
                    if let Err(e) = chunk.into_iter().try_for_each(|i| db.remove(log_key(i)).map(drop)) {
                        log::warn!("state dir {}: cannot delete compacted entries: {e}", dir.display());
                        break;
                    }
                    std::thread::sleep(Self::PAUSE);
                }
            }
        };
        let thread = std::thread::Builder::new()
            .name("compactor".into())
            .spawn(run)
            .map_err(|e| StorageError::new(Path::new("."), format!("cannot start the compactor: {e}")))?;
        Ok(Compactor { jobs: Some(jobs), thread: Some(thread) })
    }

    fn delete(&self, from: Index, to: Index) {
        if let Some(jobs) = &self.jobs
            && from <= to
        {
            // Fails only if the thread died; the next open cleans up.
            let _ = jobs.send((from, to));
        }
    }
}

impl Drop for Compactor {
    /// Finishes the queued deletions, so the database is closed (and its
    /// lock released) when the storage is dropped.
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Storage {
    /// Opens (creating if absent) the sled db in `dir`, checks it and reads
    /// the hard state and the newest entries.
    pub fn open(dir: &Path) -> Result<(Storage, Recovered), StorageError> {
        let err = |problem: String| StorageError::new(dir, problem);

        let created = create_dirs(dir).map_err(|e| err(format!("cannot create: {e}")))?;
        let had_data = fs::metadata(dir.join("db")).is_ok_and(|m| m.len() > 0);
        let db = open_sled(dir)?;
        match db.get(CREATED_KEY) {
            Ok(Some(_)) => {}
            Ok(None) if !had_data => {
                db.insert(CREATED_KEY, &[][..]).map_err(|e| err(format!("cannot initialise: {e}")))?;
            }
            Ok(None) => {
                return Err(err("holds a data file but no readable raft-zmq state: it is corrupt or not ours. \
                     Refusing to start, since a blank restart could vote twice or forget acknowledged writes. \
                     To rebuild this node from its peers, move the state dir and its logs/<id>.txt away"
                    .into()));
            }
            Err(e) => return Err(err(format!("cannot read: {e}"))),
        }
        let db_file = File::open(dir.join("db")).map_err(|e| err(format!("cannot open db file for syncing: {e}")))?;

        let compactor = Compactor::start(db.clone(), dir.to_path_buf())?;
        let syncer = Syncer(Arc::new(Mutex::new(SyncState {
            dir: dir.to_path_buf(),
            db: db.clone(),
            db_file,
            synced_blobs: HashSet::new(),
            synced_names: HashSet::new(),
            count: 0,
        })));
        let mut storage = Storage {
            dir: dir.to_path_buf(),
            db,
            syncer,
            snapshot: SnapshotMeta::default(),
            last_index: 0,
            memberships: Vec::new(),
            tail: VecDeque::new(),
            tail_bytes: 0,
            compactor,
        };
        // sled wrote `conf` (and maybe `db`'s first pages) without fsync.
        // Doing this on every open rather than only on creation also covers
        // a crash between creation and the first sync.
        {
            let mut state = lock(&storage.syncer.0);
            state.sync_files()?;
            for path in ["conf", "db"].map(|name| dir.join(name)) {
                fsync_path(&path).map_err(|e| err(format!("cannot fsync {}: {e}", path.display())))?;
            }
            state.sync_dir_entries()?;
        }
        for created_dir in created {
            let parent = created_dir.parent().filter(|p| !p.as_os_str().is_empty());
            let parent = parent.unwrap_or(Path::new("."));
            fsync_path(parent).map_err(|e| err(format!("cannot fsync {}: {e}", parent.display())))?;
        }

        let recovered = storage.recover()?;
        Ok((storage, recovered))
    }

    /// Reads the hard state, the snapshot position and the log's newest
    /// entries, and checks them; any inconsistency is an error rather than
    /// something to paper over, since Raft's safety rests on this state.
    /// Older entries are checked as they are read.
    fn recover(&mut self) -> Result<Recovered, StorageError> {
        let err = |problem: String| StorageError::new(&self.dir, problem);

        let mut hard_state: HardState = self.read_key(HARD_STATE_KEY, "hard state")?.unwrap_or_default();
        self.snapshot = self.read_key(SNAPSHOT_KEY, "snapshot position")?.unwrap_or_default();

        // Newest first, until the byte budget is spent.
        let mut newest: Vec<Entry> = Vec::new();
        let mut bytes = 0;
        let mut reached_start = true;
        for item in self.db.scan_prefix(LOG_PREFIX).rev() {
            if bytes >= TAIL_BYTES {
                reached_start = false;
                break;
            }
            let (key, value) = item.map_err(|e| err(format!("cannot read log: {e}")))?;
            if parse_log_key(&key).is_some_and(|index| index <= self.snapshot.index) {
                break; // compacted, and not yet deleted when the node stopped
            }
            let entry = decode_entry(&self.dir, &key, &value)?;
            bytes += entry.approx_size();
            newest.push(entry);
        }
        newest.reverse();
        let mut prev: Option<(Index, Term)> = reached_start.then_some((self.snapshot.index, self.snapshot.term));
        for entry in &newest {
            if let Some((index, term)) = prev {
                if entry.index != index + 1 {
                    return Err(err(format!("log entry {} follows a gap: expected index {}", entry.index, index + 1)));
                }
                if entry.term < term {
                    return Err(err(format!(
                        "log entry {} has term {} after term {term} at index {index}",
                        entry.index, entry.term
                    )));
                }
            }
            prev = Some((entry.index, entry.term));
        }
        self.last_index = newest.last().map_or(self.snapshot.index, |e| e.index);
        if let Some(Ok((key, _))) = self.db.scan_prefix(LOG_PREFIX).next()
            && let Some(first) = parse_log_key(&key).filter(|&first| first <= self.snapshot.index)
        {
            self.compactor.delete(first, self.snapshot.index);
        }
        self.tail_bytes = bytes;
        self.tail = newest.into();
        self.memberships = self.read_key(MEMBERSHIP_KEY, "membership")?.into_iter().collect();
        for item in self.db.scan_prefix(MEMBERSHIP_PREFIX) {
            let (key, value) = item.map_err(|e| err(format!("cannot read memberships: {e}")))?;
            let index =
                parse_index_key(MEMBERSHIP_PREFIX, &key).ok_or_else(|| err("malformed membership key".into()))?;
            // Leftovers of a compaction, or of a write or a truncation a
            // crash cut short. Those past the log go now: an entry that is
            // no membership may take their index.
            if index <= self.snapshot.index {
                continue;
            }
            if index > self.last_index {
                self.delete(&key)?;
                continue;
            }
            let membership = rmp_serde::from_slice(&value)
                .map_err(|e| err(format!("membership of entry {index} is unreadable: {e}")))?;
            self.memberships.push((index, membership));
        }

        if hard_state.commit > self.last_index {
            log::warn!(
                "state dir {}: commit index {} is past the last log entry {}; using {}",
                self.dir.display(),
                hard_state.commit,
                self.last_index,
                self.last_index
            );
            hard_state.commit = self.last_index;
        }
        Ok(Recovered { hard_state })
    }

    fn read_key<T: serde::de::DeserializeOwned>(&self, key: &[u8], what: &str) -> Result<Option<T>, StorageError> {
        let err = |problem: String| StorageError::new(&self.dir, problem);
        match self.db.get(key) {
            Ok(None) => Ok(None),
            Ok(Some(bytes)) => {
                rmp_serde::from_slice(&bytes).map(Some).map_err(|e| err(format!("{what} is unreadable: {e}")))
            }
            Err(e) => Err(err(format!("cannot read {what}: {e}"))),
        }
    }

    /// Atomically (one sled batch, so a crash leaves either all or none of
    /// it): sets the hard state if `Some`, and writes `entries` in place of
    /// every stored entry from the first of them on.
    ///
    /// `entries` must be consecutive, start past the snapshot and at most
    /// one past the last stored entry, and not go back in term, so that the
    /// log on disk never has a gap (which `open` would reject). Not durable
    /// until [`Storage::sync`].
    pub fn write(&mut self, hard_state: Option<&HardState>, entries: &[Entry]) -> Result<(), StorageError> {
        let new_last = self.check_appendable(entries)?;
        // One sled operation at a time, in an order whose every prefix is a
        // state `open` accepts (see "Crash consistency" above): a batch
        // would cost sled two more buffer writes, each with its own
        // `sync_file_range`, on every persist.
        // Until the entries are in, the commit index covers only entries this
        // write leaves alone: the suffix it replaces is not committed, and a
        // crash must not leave it looking so.
        let first_commit = hard_state.map(|hs| match entries.first() {
            Some(first) => HardState { commit: hs.commit.min(first.index - 1), ..*hs },
            None => *hs,
        });
        if let Some(hs) = &first_commit {
            self.put(HARD_STATE_KEY, self.encode(hs, "hard state")?)?;
        }
        // Memberships of truncated entries go; the start's always stays.
        let kept_memberships = entries.first().map_or(self.memberships.len(), |first| {
            let kept = self.memberships.partition_point(|(index, _)| *index < first.index).max(1);
            kept.min(self.memberships.len())
        });
        if let Some(first) = entries.first() {
            for index in (first.index..=self.last_index).rev() {
                self.delete(&log_key(index))?;
            }
            for (index, _) in &self.memberships[kept_memberships..] {
                self.delete(&membership_key(*index))?;
            }
        }
        let mut added = Vec::new();
        for entry in entries {
            if let Payload::Membership(membership) = &entry.payload {
                self.put(&membership_key(entry.index), self.encode(membership, "membership")?)?;
                added.push((entry.index, membership.clone()));
            }
            self.put(&log_key(entry.index), self.encode(entry, "log entry")?)?;
        }
        if let Some(hs) = hard_state
            && first_commit != Some(*hs)
        {
            self.put(HARD_STATE_KEY, self.encode(hs, "hard state")?)?;
        }
        self.memberships.truncate(kept_memberships);
        self.memberships.extend(added);
        if let Some(first) = entries.first() {
            while self.tail.back().is_some_and(|e| e.index >= first.index) {
                let dropped = self.tail.pop_back().expect("checked");
                self.tail_bytes -= dropped.approx_size();
            }
            if self.tail.back().is_some_and(|e| e.index + 1 != first.index) {
                self.tail.clear();
                self.tail_bytes = 0;
            }
            for entry in entries {
                self.tail_bytes += entry.approx_size();
                self.tail.push_back(entry.clone());
            }
            while self.tail.len() > 1 && self.tail_bytes > TAIL_BYTES {
                let dropped = self.tail.pop_front().expect("more than one");
                self.tail_bytes -= dropped.approx_size();
            }
            self.last_index = new_last;
        }
        Ok(())
    }

    /// Starts the log over after `snapshot`: every stored entry goes (those
    /// after it may conflict with the history it holds). Atomic, not durable
    /// until [`Storage::sync`].
    /// `membership` is the one in force at the snapshot.
    pub fn install_snapshot(&mut self, snapshot: SnapshotMeta, membership: &Membership) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        batch.insert(SNAPSHOT_KEY, self.encode(&snapshot, "snapshot position")?);
        for index in self.snapshot.index + 1..=self.last_index {
            batch.remove(&log_key(index)[..]);
        }
        for (index, _) in self.memberships.iter().skip(1) {
            batch.remove(&membership_key(*index)[..]);
        }
        for key in self.db.scan_prefix(DUP_PREFIX).keys() {
            batch.remove(key.map_err(|e| StorageError::new(&self.dir, format!("cannot read duplicate marks: {e}")))?);
        }
        let start = (snapshot.index, membership.clone());
        batch.insert(MEMBERSHIP_KEY, self.encode(&start, "membership")?);
        self.apply(batch)?;
        self.memberships = vec![start];
        self.snapshot = snapshot;
        self.last_index = snapshot.index;
        self.tail.clear();
        self.tail_bytes = 0;
        Ok(())
    }

    /// Makes the log start after `index`, which a durable snapshot covers;
    /// the entries up to it are deleted in the background (see
    /// [`Compactor`]). Not durable until [`Storage::sync`]: a crash before
    /// leaves the old start, and the entries are still there.
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
        let mut batch = sled::Batch::default();
        batch.insert(SNAPSHOT_KEY, self.encode(&snapshot, "snapshot position")?);
        // The newest membership at or before the new start becomes the start's.
        let covered = self.memberships.partition_point(|(i, _)| *i <= index);
        if covered > 1 {
            for (i, _) in &self.memberships[1..covered] {
                batch.remove(&membership_key(*i)[..]);
            }
            batch.insert(MEMBERSHIP_KEY, self.encode(&self.memberships[covered - 1], "membership")?);
        }
        self.apply(batch)?;
        if covered > 1 {
            self.memberships.drain(..covered - 1);
        }
        self.compactor.delete(self.snapshot.index + 1, index);
        self.snapshot = snapshot;
        while self.tail.front().is_some_and(|e| e.index <= index) {
            let dropped = self.tail.pop_front().expect("checked");
            self.tail_bytes -= dropped.approx_size();
        }
        Ok(())
    }

    /// Records the membership a new cluster starts with, unless one is
    /// recorded already (it wins: it may have changed since). Not durable
    /// until [`Storage::sync`].
    pub fn bootstrap_membership(&mut self, membership: &Membership) -> Result<(), StorageError> {
        if !self.memberships.is_empty() {
            return Ok(());
        }
        let start = (self.snapshot.index, membership.clone());
        let mut batch = sled::Batch::default();
        batch.insert(MEMBERSHIP_KEY, self.encode(&start, "membership")?);
        self.apply(batch)?;
        self.memberships = vec![start];
        Ok(())
    }

    fn apply(&self, batch: sled::Batch) -> Result<(), StorageError> {
        self.db.apply_batch(batch).map_err(|e| StorageError::new(&self.dir, format!("cannot write: {e}")))
    }

    fn put(&self, key: &[u8], value: Vec<u8>) -> Result<(), StorageError> {
        self.db.insert(key, value).map(drop).map_err(|e| StorageError::new(&self.dir, format!("cannot write: {e}")))
    }

    fn delete(&self, key: &[u8]) -> Result<(), StorageError> {
        self.db.remove(key).map(drop).map_err(|e| StorageError::new(&self.dir, format!("cannot write: {e}")))
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
        let read = self
            .db
            .get(log_key(index))
            .map_err(|e| format!("cannot read log entry {index}: {e}"))
            .and_then(|bytes| bytes.ok_or_else(|| format!("log entry {index} is missing")))
            .and_then(|bytes| decode_entry(&self.dir, &log_key(index), &bytes).map_err(|e| e.problem));
        read.unwrap_or_else(|problem| self.fatal(&problem))
    }

    fn fatal(&self, problem: &str) -> ! {
        log::error!("state dir {}: {problem}; stopping at once", self.dir.display());
        std::process::exit(1)
    }

    fn encode<T: serde::Serialize>(&self, value: &T, what: &str) -> Result<Vec<u8>, StorageError> {
        rmp_serde::to_vec_named(value).map_err(|e| StorageError::new(&self.dir, format!("cannot encode {what}: {e}")))
    }

    /// Makes everything written so far durable (see [`Syncer::sync`]).
    pub fn sync(&mut self) -> Result<(), StorageError> {
        self.syncer.sync()
    }

    /// Number of completed syncs (lets tests prove that an acknowledgement
    /// waited for one).
    pub fn sync_count(&self) -> u64 {
        lock(&self.syncer.0).count
    }

    /// A handle that syncs this store from another thread.
    pub fn syncer(&self) -> Syncer {
        self.syncer.clone()
    }

    /// A view of the log for readers on other threads.
    pub fn log_view(&self) -> LogView {
        LogView { dir: self.dir.clone(), db: self.db.clone() }
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
        self.sync()
    }
}

impl LogStore for Storage {
    fn log_start(&self) -> SnapshotMeta {
        self.snapshot
    }

    fn last_index(&self) -> Index {
        self.last_index
    }

    fn term(&self, index: Index) -> Term {
        match self.tail.front() {
            Some(first) if index >= first.index => self.tail[(index - first.index) as usize].term,
            _ => self.read_entry(index).term,
        }
    }

    fn entries(&self, lo: Index, hi: Index, max_bytes: usize) -> Vec<Entry> {
        if let Some(first) = self.tail.front()
            && lo >= first.index
        {
            let range = (lo - first.index) as usize..=(hi - first.index) as usize;
            return take_within(self.tail.range(range).cloned(), max_bytes);
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
/// beside the log and compacted with it (a log that starts over after a
/// snapshot keeps none), so they take no memory and are at most as many as
/// the log's entries.
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
        self.syncer.sync()
    }
}

impl Syncer {
    /// Makes everything written so far durable (see the module docs for why
    /// this is more than `flush`). One call covers any number of writes, so
    /// the caller can group-commit.
    pub fn sync(&self) -> Result<(), StorageError> {
        lock(&self.0).sync()
    }
}

impl SyncState {
    fn sync(&mut self) -> Result<(), StorageError> {
        let started = Instant::now();
        self.db.flush().map_err(|e| StorageError::new(&self.dir, format!("cannot flush: {e}")))?;
        self.db_file.sync_data().map_err(|e| StorageError::new(&self.dir, format!("cannot fsync db file: {e}")))?;
        self.sync_files()?;
        self.sync_dir_entries()?;
        self.count += 1;
        METRICS.fsync_seconds.observe(seconds_since(started));
        Ok(())
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

    /// Hands `visit` the entries `from..=to` in order until it returns false.
    pub fn visit(&self, from: Index, to: Index, mut visit: impl FnMut(Entry) -> bool) -> Result<(), StorageError> {
        let err = |problem: String| StorageError::new(&self.dir, problem);
        if from > to {
            return Ok(());
        }
        for item in self.db.range(log_key(from)..=log_key(to)) {
            let (key, value) = item.map_err(|e| err(format!("cannot read log: {e}")))?;
            let index = parse_log_key(&key).ok_or_else(|| err("malformed log key".into()))?;
            let entry: Entry =
                rmp_serde::from_slice(&value).map_err(|e| err(format!("log entry {index} is unreadable: {e}")))?;
            if !visit(entry) {
                break;
            }
        }
        Ok(())
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

/// `fsync` on a file or a directory (on Linux a directory opened read-only
/// can be fsynced, which makes the names in it durable).
fn fsync_path(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

fn log_key(index: Index) -> [u8; LOG_KEY_LEN] {
    let mut key = [0; LOG_KEY_LEN];
    key[..LOG_PREFIX.len()].copy_from_slice(LOG_PREFIX);
    key[LOG_PREFIX.len()..].copy_from_slice(&index.to_be_bytes());
    key
}

fn membership_key(index: Index) -> Vec<u8> {
    [MEMBERSHIP_PREFIX, &index.to_be_bytes()].concat()
}

fn dup_key(index: Index) -> Vec<u8> {
    [DUP_PREFIX, &index.to_be_bytes()].concat()
}

fn parse_log_key(key: &[u8]) -> Option<Index> {
    parse_index_key(LOG_PREFIX, key)
}

/// The index in a key made of `prefix` and a big-endian u64.
fn parse_index_key(prefix: &[u8], key: &[u8]) -> Option<Index> {
    let bytes = key.strip_prefix(prefix)?;
    Some(Index::from_be_bytes(bytes.try_into().ok()?))
}

/// Decodes the log entry stored under `key`, checking the two agree.
fn decode_entry(dir: &Path, key: &[u8], value: &[u8]) -> Result<Entry, StorageError> {
    let err = |problem: String| StorageError::new(dir, problem);
    let index = parse_log_key(key)
        .ok_or_else(|| err(format!("log key {} is malformed", String::from_utf8_lossy(key).escape_debug())))?;
    let entry: Entry =
        rmp_serde::from_slice(value).map_err(|e| err(format!("log entry {index} is unreadable: {e}")))?;
    if entry.index != index {
        return Err(err(format!("log entry {index} is stored with index {} inside", entry.index)));
    }
    Ok(entry)
}

fn meta_key(name: &str) -> Vec<u8> {
    [META_PREFIX, name.as_bytes()].concat()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::types::Payload;

    fn entry(index: Index, term: u64, data: &[u8]) -> Entry {
        Entry { index, term, payload: Payload::Command(data.to_vec()) }
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

    /// Writes raw key/values with sled directly, bypassing `Storage`'s
    /// checks, to plant bad data in a store it created.
    fn write_raw(dir: &Path, pairs: &[(Vec<u8>, Vec<u8>)]) {
        if !dir.join("db").exists() {
            drop(Storage::open(dir).unwrap());
        }
        let db = open_sled(dir).unwrap();
        for (k, v) in pairs {
            db.insert(k.as_slice(), v.as_slice()).unwrap();
        }
        db.flush().unwrap();
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
    fn log_view_visits_a_range_until_told_to_stop() {
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
    fn large_entry_goes_to_blob_and_is_synced() {
        let tmp = tempfile::tempdir().unwrap();
        let big = vec![0xAB; 1 << 20];
        {
            let (mut s, _) = Storage::open(tmp.path()).unwrap();
            s.write(None, &[entry(1, 1, &big)]).unwrap();
            s.sync().unwrap();
            assert!(!lock(&s.syncer.0).synced_blobs.is_empty(), "sync found no blob file");
            let on_disk = list_names(&tmp.path().join("blobs")).unwrap();
            assert!(on_disk.iter().all(|n| lock(&s.syncer.0).synced_blobs.contains(n)));
        }
        assert_eq!(reopen(tmp.path()).entries, vec![entry(1, 1, &big)]);
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
    fn corrupt_entry_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let good = rmp_serde::to_vec_named(&entry(1, 1, b"a")).unwrap();
        write_raw(tmp.path(), &[(log_key(1).to_vec(), good), (log_key(2).to_vec(), b"\xc1junk".to_vec())]);
        let e = open_err(tmp.path());
        assert!(e.starts_with(&format!("state dir {}: ", tmp.path().display())), "{e}");
        assert!(e.contains("log entry 2 is unreadable"), "{e}");
    }

    #[test]
    fn corrupt_hard_state_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        write_raw(tmp.path(), &[(HARD_STATE_KEY.to_vec(), b"\xff\xff".to_vec())]);
        assert!(open_err(tmp.path()).contains("hard state is unreadable"));
    }

    #[test]
    fn entry_index_must_match_key() {
        let tmp = tempfile::tempdir().unwrap();
        let wrong = rmp_serde::to_vec_named(&entry(5, 1, b"a")).unwrap();
        write_raw(tmp.path(), &[(log_key(1).to_vec(), wrong)]);
        assert!(open_err(tmp.path()).contains("log entry 1 is stored with index 5"));
    }

    #[test]
    fn gap_in_log_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let pairs: Vec<_> = [1, 2, 4]
            .into_iter()
            .map(|i| (log_key(i).to_vec(), rmp_serde::to_vec_named(&entry(i, 1, b"a")).unwrap()))
            .collect();
        write_raw(tmp.path(), &pairs);
        let e = open_err(tmp.path());
        assert!(e.contains("log entry 4 follows a gap: expected index 3"), "{e}");
    }

    #[test]
    fn log_must_start_at_one() {
        let tmp = tempfile::tempdir().unwrap();
        let e2 = rmp_serde::to_vec_named(&entry(2, 1, b"a")).unwrap();
        write_raw(tmp.path(), &[(log_key(2).to_vec(), e2)]);
        assert!(open_err(tmp.path()).contains("expected index 1"));
    }

    #[test]
    fn decreasing_term_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let pairs: Vec<_> = [(1, 2), (2, 1)]
            .into_iter()
            .map(|(i, t)| (log_key(i).to_vec(), rmp_serde::to_vec_named(&entry(i, t, b"a")).unwrap()))
            .collect();
        write_raw(tmp.path(), &pairs);
        assert!(open_err(tmp.path()).contains("log entry 2 has term 1 after term 2"));
    }

    #[test]
    fn malformed_log_key_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        write_raw(tmp.path(), &[(b"log/short".to_vec(), b"x".to_vec())]);
        assert!(open_err(tmp.path()).contains("log key log/short is malformed"));
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
        let e = {
            drop(s);
            write_raw(tmp.path(), &[(log_key(12).to_vec(), rmp_serde::to_vec_named(&entry(12, 3, b"a")).unwrap())]);
            open_err(tmp.path())
        };
        assert!(e.contains("log entry 12 follows a gap: expected index 11"), "{e}");
    }

    /// A write is one sled operation at a time: a crash can keep a new
    /// membership's index without its entry. That leftover must not make
    /// the ordinary entry later written at its index a membership.
    #[test]
    fn a_membership_index_left_past_the_log_by_a_crash_is_dropped_at_open() {
        let tmp = tempfile::tempdir().unwrap();
        let memberships = |s: &Storage| s.memberships().into_iter().map(|(i, _)| i).collect::<Vec<_>>();
        {
            let (mut s, _) = Storage::open(tmp.path()).unwrap();
            s.bootstrap_membership(&Membership::of_voters([1, 2, 3], vec![])).unwrap();
            s.write(None, &[entry(1, 1, b"a"), entry(2, 1, b"b")]).unwrap();
            s.sync().unwrap();
        }
        let planted = rmp_serde::to_vec_named(&Membership::of_voters([1, 2], vec![])).unwrap();
        write_raw(tmp.path(), &[(membership_key(3), planted)]);
        {
            let (mut s, _) = Storage::open(tmp.path()).unwrap();
            assert_eq!(memberships(&s), vec![0], "past the log: not in force");
            s.write(None, &[entry(3, 2, b"c")]).unwrap();
            s.sync().unwrap();
        }
        let (s, _) = Storage::open(tmp.path()).unwrap();
        assert_eq!(memberships(&s), vec![0], "entry 3 is a command");
        assert_eq!(s.last_index(), 3);
    }

    /// Truncating a suffix that holds a membership entry removes both, and
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
        drop(s); // waits for the background deletion
        let (mut s, _) = Storage::open(tmp.path()).unwrap();
        assert_eq!(marked(&s), [8], "compacted with the entries they mark");
        s.install_snapshot(SnapshotMeta { index: 20, term: 2 }, &Membership::default()).unwrap();
        assert!(marked(&s).is_empty(), "a log that starts over keeps none");
    }

    #[test]
    fn entries_older_than_the_memory_tail_are_read_from_the_database() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut s, _) = Storage::open(tmp.path()).unwrap();
        let big = vec![7u8; 1 << 20];
        let entries: Vec<Entry> = (1..=40).map(|i| entry(i, 1, &big)).collect();
        s.write(None, &entries).unwrap();
        assert!(s.tail.front().unwrap().index > 1, "the tail is bounded");
        assert_eq!(s.entries(1, 3, 3 << 20), entries[..2]);
        assert_eq!(s.term(1), 1);
    }

    #[test]
    fn entries_left_below_the_log_start_by_a_crash_are_ignored_then_deleted() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Storage::open(tmp.path()).unwrap();
            s.write(None, &(1..=6).map(|i| entry(i, 1, b"x")).collect::<Vec<_>>()).unwrap();
            s.compact(4).unwrap();
            s.sync().unwrap();
        }
        // As if the node stopped before the background deletion got to them.
        let leftovers: Vec<_> =
            (2..=4).map(|i| (log_key(i).to_vec(), rmp_serde::to_vec_named(&entry(i, 1, b"x")).unwrap())).collect();
        write_raw(tmp.path(), &leftovers);
        let reopened = reopen(tmp.path());
        assert_eq!(reopened.entries.iter().map(|e| e.index).collect::<Vec<_>>(), vec![5, 6]);
        let db = open_sled(tmp.path()).unwrap();
        assert_eq!(db.scan_prefix(LOG_PREFIX).count(), 2, "the leftovers were deleted");
    }
}
