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
//! | `log/` + index as u64 BE    | [`Entry`]    |
//! | `meta/` + name              | raw bytes    |
//!
//! Big-endian indexes make sled's key order the log order, so recovery is one
//! prefix scan.
//!
//! # Atomicity
//!
//! [`Storage::write`] puts the hard state, the deletion of a conflicting
//! suffix and the new entries in one `sled::Batch`. sled applies a batch
//! all-or-nothing across a crash, so a follower that truncates its log at a
//! conflict never comes back with a log that is neither the old one nor the
//! new one.
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

use std::collections::HashSet;
use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::raft::types::{Entry, HardState, Index, Term};

const HARD_STATE_KEY: &[u8] = b"hs";
const LOG_PREFIX: &[u8] = b"log/";
const META_PREFIX: &[u8] = b"meta/";
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

/// What [`Storage::open`] found on disk.
#[derive(Debug)]
pub struct Recovered {
    /// Default (term 0, no vote, commit 0) for a fresh node; `commit` is
    /// clamped to the last log index.
    pub hard_state: HardState,
    /// The whole log, contiguous from index 1.
    pub entries: Vec<Entry>,
}

/// The node's durable state. Writes are buffered by sled until [`Storage::sync`].
pub struct Storage {
    dir: PathBuf,
    db: sled::Db,
    /// A second handle on sled's data file, only for `fdatasync`.
    db_file: File,
    /// Blob files already fsynced (by name). Rebuilt from each listing so
    /// blobs that sled garbage-collected are forgotten.
    synced_blobs: HashSet<OsString>,
    /// Names in `dir` when it was last fsynced.
    synced_names: HashSet<OsString>,
    /// Index of the last log entry written (durable or not), so that `write`
    /// can truncate and validate without reading the database.
    last_index: Index,
    sync_count: u64,
}

impl Storage {
    /// Opens (creating if absent) the sled db in `dir`, validates and returns
    /// its contents.
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

        let mut storage = Storage {
            dir: dir.to_path_buf(),
            db,
            db_file,
            synced_blobs: HashSet::new(),
            synced_names: HashSet::new(),
            last_index: 0,
            sync_count: 0,
        };
        // sled wrote `conf` (and maybe `db`'s first pages) without fsync.
        // Doing this on every open rather than only on creation also covers
        // a crash between creation and the first sync.
        storage.sync_files()?;
        for path in ["conf", "db"].map(|name| dir.join(name)) {
            fsync_path(&path).map_err(|e| err(format!("cannot fsync {}: {e}", path.display())))?;
        }
        storage.sync_dir_entries()?;
        for created_dir in created {
            let parent = created_dir.parent().filter(|p| !p.as_os_str().is_empty());
            let parent = parent.unwrap_or(Path::new("."));
            fsync_path(parent).map_err(|e| err(format!("cannot fsync {}: {e}", parent.display())))?;
        }

        let recovered = storage.recover()?;
        storage.last_index = recovered.entries.last().map_or(0, |e| e.index);
        Ok((storage, recovered))
    }

    /// Reads and validates everything; any inconsistency is an error rather
    /// than something to paper over, since Raft's safety rests on this state.
    fn recover(&self) -> Result<Recovered, StorageError> {
        let err = |problem: String| StorageError::new(&self.dir, problem);

        let mut hard_state = match self.db.get(HARD_STATE_KEY) {
            Ok(None) => HardState::default(),
            Ok(Some(bytes)) => {
                rmp_serde::from_slice(&bytes).map_err(|e| err(format!("hard state is unreadable: {e}")))?
            }
            Err(e) => return Err(err(format!("cannot read hard state: {e}"))),
        };

        let mut entries: Vec<Entry> = Vec::new();
        for item in self.db.scan_prefix(LOG_PREFIX) {
            let (key, value) = item.map_err(|e| err(format!("cannot read log: {e}")))?;
            let index = parse_log_key(&key)
                .ok_or_else(|| err(format!("log key {} is malformed", String::from_utf8_lossy(&key).escape_debug())))?;
            let entry: Entry =
                rmp_serde::from_slice(&value).map_err(|e| err(format!("log entry {index} is unreadable: {e}")))?;
            if entry.index != index {
                return Err(err(format!("log entry {index} is stored with index {} inside", entry.index)));
            }
            let expected = entries.last().map_or(1, |e| e.index + 1);
            if index != expected {
                return Err(err(format!("log entry {index} follows a gap: expected index {expected}")));
            }
            if let Some(prev) = entries.last()
                && entry.term < prev.term
            {
                return Err(err(format!(
                    "log entry {index} has term {} after term {} at index {}",
                    entry.term, prev.term, prev.index
                )));
            }
            entries.push(entry);
        }

        let last_index = entries.last().map_or(0, |e| e.index);
        if hard_state.commit > last_index {
            log::warn!(
                "state dir {}: commit index {} is past the last log entry {}; using {}",
                self.dir.display(),
                hard_state.commit,
                last_index,
                last_index
            );
            hard_state.commit = last_index;
        }
        Ok(Recovered { hard_state, entries })
    }

    /// Atomically (one sled batch, so a crash leaves either all or none of
    /// it): sets the hard state if `Some`, deletes every log entry with index
    /// `>= truncate_from` if `Some`, inserts `entries`.
    ///
    /// `entries` must be consecutive and start at most one past the last
    /// entry left after truncation, so that the log on disk never has a gap
    /// (which `open` would reject). Not durable until [`Storage::sync`].
    pub fn write(
        &mut self,
        hard_state: Option<&HardState>,
        truncate_from: Option<Index>,
        entries: &[Entry],
    ) -> Result<(), StorageError> {
        let kept_last = match truncate_from {
            Some(from) => self.last_index.min(from.saturating_sub(1)),
            None => self.last_index,
        };
        let new_last = self.check_appendable(kept_last, entries)?;

        let mut batch = sled::Batch::default();
        if let Some(hs) = hard_state {
            batch.insert(HARD_STATE_KEY, self.encode(hs, "hard state")?);
        }
        for index in kept_last + 1..=self.last_index {
            batch.remove(&log_key(index)[..]);
        }
        for entry in entries {
            // Inserted after the removals: a batch is a map, so an entry
            // that replaces a truncated one wins.
            batch.insert(&log_key(entry.index)[..], self.encode(entry, "log entry")?);
        }
        self.db.apply_batch(batch).map_err(|e| StorageError::new(&self.dir, format!("cannot write: {e}")))?;
        self.last_index = new_last;
        Ok(())
    }

    /// Returns the last index after appending `entries` behind `kept_last`,
    /// or an error if that would leave a gap.
    fn check_appendable(&self, kept_last: Index, entries: &[Entry]) -> Result<Index, StorageError> {
        let Some(first) = entries.first() else {
            return Ok(kept_last);
        };
        let err = |problem: String| Err(StorageError::new(&self.dir, problem));
        if first.index == 0 || first.index > kept_last + 1 {
            return err(format!(
                "refusing to write log entry {} after last index {kept_last}: \
                 the log would have a gap",
                first.index
            ));
        }
        let mut prev = (first.index - 1, self.stored_term(first.index - 1)?);
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
        Ok(kept_last.max(prev.0))
    }

    /// The term of the stored entry at `index` (0 for index 0).
    fn stored_term(&self, index: Index) -> Result<Term, StorageError> {
        if index == 0 {
            return Ok(0);
        }
        let err = |problem: String| StorageError::new(&self.dir, problem);
        let bytes = self
            .db
            .get(log_key(index))
            .map_err(|e| err(format!("cannot read log entry {index}: {e}")))?
            .ok_or_else(|| err(format!("log entry {index} is missing")))?;
        let entry: Entry =
            rmp_serde::from_slice(&bytes).map_err(|e| err(format!("log entry {index} is unreadable: {e}")))?;
        Ok(entry.term)
    }

    fn encode<T: serde::Serialize>(&self, value: &T, what: &str) -> Result<Vec<u8>, StorageError> {
        rmp_serde::to_vec_named(value).map_err(|e| StorageError::new(&self.dir, format!("cannot encode {what}: {e}")))
    }

    /// Makes everything written so far durable (see the module docs for why
    /// this is more than `flush`). One call covers any number of writes, so
    /// the caller can group-commit.
    pub fn sync(&mut self) -> Result<(), StorageError> {
        self.db.flush().map_err(|e| StorageError::new(&self.dir, format!("cannot flush: {e}")))?;
        self.db_file.sync_data().map_err(|e| StorageError::new(&self.dir, format!("cannot fsync db file: {e}")))?;
        self.sync_files()?;
        self.sync_dir_entries()?;
        self.sync_count += 1;
        Ok(())
    }

    /// Number of completed [`Storage::sync`] calls (lets tests prove that an
    /// acknowledgement waited for one).
    pub fn sync_count(&self) -> u64 {
        self.sync_count
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

    /// A view of the log for readers on other threads.
    pub fn log_view(&self) -> LogView {
        LogView { dir: self.dir.clone(), db: self.db.clone() }
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

/// A read-only view of the stored log for other threads (the `log` op), so
/// reading never holds up the core loop. Only entries the node has applied
/// may be asked for: those are durable and never change again.
#[derive(Clone)]
pub struct LogView {
    dir: PathBuf,
    db: sled::Db,
}

impl LogView {
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

fn parse_log_key(key: &[u8]) -> Option<Index> {
    let bytes = key.strip_prefix(LOG_PREFIX)?;
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
        Entry { index, term, payload: Payload::Command(data.to_vec()) }
    }

    fn reopen(dir: &Path) -> Recovered {
        Storage::open(dir).expect("reopen").1
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
        let (_s, rec) = Storage::open(&dir).unwrap();
        assert_eq!(rec.hard_state, HardState::default());
        assert!(rec.entries.is_empty());
        assert!(dir.join("db").exists());
    }

    #[test]
    fn write_sync_reopen_roundtrip() {
        let tmp = tempfile::tempdir().unwrap();
        let hs = HardState { term: 3, vote: Some(1), commit: 2 };
        let entries = vec![Entry { index: 1, term: 1, payload: Payload::Noop }, entry(2, 2, b"a"), entry(3, 3, b"b")];
        {
            let (mut s, _) = Storage::open(tmp.path()).unwrap();
            s.write(Some(&hs), None, &entries).unwrap();
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
            s.write(None, None, &[entry(1, 1, b"a"), entry(2, 1, b"b")]).unwrap();
            s.write(None, None, &[entry(3, 1, b"c")]).unwrap();
            s.write(None, None, &[]).unwrap();
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
            s.write(None, None, &old).unwrap();
            s.sync().unwrap();
            let hs = HardState { term: 2, vote: None, commit: 2 };
            s.write(Some(&hs), Some(3), &[entry(3, 2, b"new")]).unwrap();
            s.sync().unwrap();
        }
        let rec = reopen(tmp.path());
        assert_eq!(rec.entries, vec![entry(1, 1, b"old"), entry(2, 1, b"old"), entry(3, 2, b"new")]);
        assert_eq!(rec.hard_state.term, 2);
    }

    #[test]
    fn truncate_without_entries_shortens_log_and_later_appends_follow_it() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut s, _) = Storage::open(tmp.path()).unwrap();
        s.write(None, None, &(1..=4).map(|i| entry(i, 1, b"x")).collect::<Vec<_>>()).unwrap();
        s.write(None, Some(2), &[]).unwrap();
        // Index 3 would leave a gap after the truncation to 1.
        assert!(s.write(None, None, &[entry(3, 2, b"y")]).is_err());
        s.write(None, None, &[entry(2, 2, b"y")]).unwrap();
        s.sync().unwrap();
        drop(s);
        let rec = reopen(tmp.path());
        assert_eq!(rec.entries, vec![entry(1, 1, b"x"), entry(2, 2, b"y")]);
    }

    #[test]
    fn hard_state_updates_replace_previous() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Storage::open(tmp.path()).unwrap();
            s.write(Some(&HardState { term: 1, vote: Some(0), commit: 0 }), None, &[]).unwrap();
            s.write(Some(&HardState { term: 2, vote: None, commit: 0 }), None, &[]).unwrap();
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
            s.write(Some(&hs), None, &[entry(1, 1, b"a")]).unwrap();
            s.sync().unwrap();
        }
        assert_eq!(reopen(tmp.path()).hard_state.commit, 1);
    }

    #[test]
    fn write_rejects_gaps() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut s, _) = Storage::open(tmp.path()).unwrap();
        let e = s.write(None, None, &[entry(2, 1, b"a")]).unwrap_err().to_string();
        assert!(e.contains("log entry 2 after last index 0"), "{e}");
        let e = s.write(None, None, &[entry(1, 1, b"a"), entry(3, 1, b"c")]).unwrap_err();
        assert!(e.to_string().contains("consecutive"), "{e}");
        assert!(s.write(None, None, &[entry(0, 1, b"a")]).is_err());
        // A rejected write changes nothing.
        s.write(None, None, &[entry(1, 1, b"a")]).unwrap();
    }

    #[test]
    fn write_rejects_decreasing_terms_that_would_make_the_dir_unopenable() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut s, _) = Storage::open(tmp.path()).unwrap();
        s.write(None, None, &[entry(1, 2, b"a"), entry(2, 3, b"b")]).unwrap();
        let e = s.write(None, None, &[entry(3, 2, b"c")]).unwrap_err().to_string();
        assert!(e.contains("term 2 after term 3"), "{e}");
        assert!(s.write(None, None, &[entry(3, 4, b"c"), entry(4, 3, b"d")]).is_err());
        // After truncating entry 2, term 2 may follow entry 1 again.
        s.write(None, Some(2), &[entry(2, 2, b"b2")]).unwrap();
        s.sync().unwrap();
        drop(s);
        assert_eq!(reopen(tmp.path()).entries.len(), 2);
    }

    #[test]
    fn log_view_visits_a_range_until_told_to_stop() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut s, _) = Storage::open(tmp.path()).unwrap();
        let entries: Vec<Entry> = (1..=5).map(|i| entry(i, 1, &[i as u8; 10])).collect();
        s.write(None, None, &entries).unwrap();
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
            s.write(None, None, &[entry(i + 1, 1, b"x")]).unwrap();
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
            s.write(None, None, &[entry(1, 1, &big)]).unwrap();
            s.sync().unwrap();
            assert!(!s.synced_blobs.is_empty(), "sync found no blob file");
            let on_disk = list_names(&tmp.path().join("blobs")).unwrap();
            assert!(on_disk.iter().all(|n| s.synced_blobs.contains(n)));
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
        let (s, rec) = Storage::open(tmp.path()).unwrap();
        assert!(rec.entries.is_empty(), "meta keys are not log entries");
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
            s.write(Some(&HardState { term: 3, vote: Some(1), commit: 0 }), None, &[entry(1, 3, b"x")]).unwrap();
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
}
