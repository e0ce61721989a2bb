//! The Raft log and hard state, appended to segment files under
//! `state/<id>/log/`: `<seq>.wal`, `seq` a zero-padded counter.
//!
//! # Format
//!
//! A segment starts with [`HEADER`], then records: body length (u32 LE),
//! CRC-32 of the body (u32 LE), body. A body is a kind byte and a
//! MessagePack value: an [`Entry`], a [`HardState`] or a [`Start`].
//! Nothing is ever rewritten: replaying the records in order gives the
//! state. An entry at an index the log already holds replaces it and
//! everything after it (Raft's truncation); a [`Start`] moves the log start
//! (compaction) or empties the log (a snapshot installed).
//!
//! Every segment begins with the hard state and the start in force when it
//! was created, so the newest segments alone replay to the whole state once
//! the older ones hold no entry still in the log. They are deleted oldest
//! first: a crash part-way leaves a suffix of segments, which replays the
//! same.
//!
//! # Crash consistency
//!
//! One thread appends ([`Wal::write`]), another may make it durable
//! ([`WalSyncer::sync`], one `fdatasync`). A crash keeps a prefix of what was
//! written since the last sync, perhaps ending in a torn record: replay stops
//! at the first record whose length or CRC does not hold, and cuts the file
//! there so new records follow valid ones. Only the newest segment can end
//! so: a segment is fdatasynced before the next one is started, and a new
//! segment's name is made durable (directory fsync) before anything is
//! written after its first records. A bad record anywhere else is damage,
//! and opening refuses.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::{self, JoinHandle};

use serde::{Deserialize, Serialize};

use super::tail::Tail;
use crate::lock;
use crate::raft::SnapshotMeta;
use crate::raft::types::{Entry, HardState, Index, Membership, Payload, Term};

/// First bytes of every segment: what the file is, and its format version.
pub const HEADER: &[u8] = b"raft-zmq wal 1\n";
/// A segment past this size is closed and a new one started before the next write.
const SEGMENT_BYTES: u64 = 8 << 20;
const RECORD_HEADER: usize = 8;
/// Bigger than any record a node writes (entries are bounded by the client
/// protocol's frame limit): a length past it is a torn or damaged record.
const MAX_RECORD: u32 = 1 << 30;

const KIND_ENTRY: u8 = 1;
const KIND_HARD_STATE: u8 = 2;
const KIND_START: u8 = 3;

/// Where the log starts: after `meta`, with the membership in force there
/// (the index of the entry that made it, and it), once one is recorded.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Start {
    pub meta: SnapshotMeta,
    pub membership: Option<(Index, Membership)>,
    /// The log starts over after `meta`: every entry goes (a snapshot was
    /// installed). Otherwise only those up to `meta.index` (compaction).
    pub restart: bool,
}

/// Records to append in one write, in order.
#[derive(Default)]
pub struct Batch {
    bytes: Vec<u8>,
    /// (index, term, offset of the record in `bytes`) of each entry.
    entries: Vec<(Index, Term, usize)>,
    hard_state: Option<HardState>,
    start: Option<Start>,
}

impl Batch {
    pub fn entry(&mut self, entry: &Entry) {
        // Room for the record up front: encoding into the buffer would
        // otherwise grow it a few bytes at a time.
        self.bytes.reserve(RECORD_HEADER + 64 + entry.approx_size());
        let at = self.bytes.len();
        self.record(KIND_ENTRY, entry);
        self.entries.push((entry.index, entry.term, at));
    }

    pub fn hard_state(&mut self, hard_state: &HardState) {
        self.record(KIND_HARD_STATE, hard_state);
        self.hard_state = Some(*hard_state);
    }

    pub fn start(&mut self, start: &Start) {
        self.record(KIND_START, start);
        self.start = Some(start.clone());
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn record<T: Serialize>(&mut self, kind: u8, value: &T) {
        let at = self.bytes.len();
        self.bytes.extend_from_slice(&[0; RECORD_HEADER]);
        self.bytes.push(kind);
        rmp_serde::encode::write_named(&mut self.bytes, value).expect("encoding into memory cannot fail");
        let body = &self.bytes[at + RECORD_HEADER..];
        let (len, crc) = (body.len() as u32, crc32fast::hash(body));
        self.bytes[at..at + 4].copy_from_slice(&len.to_le_bytes());
        self.bytes[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Where one entry's record is.
#[derive(Clone, Copy, Debug)]
struct Location {
    segment: u64,
    offset: u64,
    /// Of the record's body.
    len: u32,
    term: Term,
}

/// Where each entry of the log is, shared with readers on other threads.
#[derive(Default)]
struct Locations {
    /// Index of `entries[0]`.
    first: Index,
    entries: VecDeque<Location>,
    /// Every segment, open for reading.
    segments: BTreeMap<u64, Arc<File>>,
}

impl Locations {
    fn last(&self) -> Option<Index> {
        (!self.entries.is_empty()).then(|| self.first + self.entries.len() as u64 - 1)
    }

    fn get(&self, index: Index) -> Option<Location> {
        let offset = index.checked_sub(self.first)?;
        self.entries.get(usize::try_from(offset).ok()?).copied()
    }

    /// Records `entry` at `at`: it replaces the entry at its index and all
    /// after it. An index past the one after the last leaves a gap, which
    /// only damage can cause.
    fn place(&mut self, index: Index, at: Location) -> Result<(), String> {
        match self.last() {
            Some(last) if index > last + 1 => {
                return Err(format!("log entry {index} follows a gap: expected index {}", last + 1));
            }
            Some(_) if index >= self.first => {
                self.entries.truncate((index - self.first) as usize);
                if let Some(prev) = self.entries.back()
                    && prev.term > at.term
                {
                    return Err(format!(
                        "log entry {index} has term {} after term {} at index {}",
                        at.term,
                        prev.term,
                        index - 1
                    ));
                }
            }
            // The first entry seen, or one before every entry held (they all go).
            _ => {
                self.entries.clear();
                self.first = index;
            }
        }
        self.entries.push_back(at);
        Ok(())
    }

    fn apply_start(&mut self, start: &Start) {
        if start.restart {
            self.entries.clear();
        }
        while self.entries.front().is_some() && self.first <= start.meta.index {
            self.entries.pop_front();
            self.first += 1;
        }
        if self.entries.is_empty() {
            self.first = start.meta.index.saturating_add(1);
        }
    }
}

/// What replaying the segments found, besides where the entries are.
pub struct Replayed {
    pub hard_state: Option<HardState>,
    pub start: Start,
    /// The last entry, or the log start if there is none.
    pub last: Index,
    /// The memberships of the membership entries in the log.
    pub memberships: Vec<(Index, Membership)>,
    /// The newest entries, up to `tail_bytes` of them (and at least the last).
    pub tail: Tail,
}

/// The log's segments, appended to by one thread.
pub struct Wal {
    dir: PathBuf,
    /// The segment appended to, its number and length.
    file: Arc<File>,
    segment: u64,
    len: u64,
    segment_bytes: u64,
    /// Written into each new segment's first records.
    hard_state: HardState,
    start: Start,
    locations: Arc<RwLock<Locations>>,
    syncer: WalSyncer,
    /// The next segment's file, being made ahead (see [`prepare`]).
    next: Option<Prepared>,
}

impl Wal {
    /// Creates a log that holds `hard_state` and starts at `start` (so
    /// `start.restart` should be set), durably, in a new segment of `dir`,
    /// in place of the segments it had. Those are deleted first: they hold
    /// nothing the callers need (a start or a move that a crash cut short,
    /// done again), and the newest may end in reserved space, which would
    /// read as damage once another segment follows it.
    pub fn create(dir: &Path, hard_state: HardState, start: Start) -> Result<Wal, String> {
        fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        fsync_dir(dir.parent().unwrap_or(Path::new(".")))?;
        let old = list_segments(dir)?;
        let segment = old.last().map_or(1, |last| last + 1);
        delete_segments(dir, &old)?;
        let (file, len) = new_segment(dir, segment, &hard_state, &start, SEGMENT_BYTES)?;
        let mut locations = Locations::default();
        locations.apply_start(&start);
        locations.segments.insert(segment, file.clone());
        let wal = Wal {
            dir: dir.to_path_buf(),
            syncer: WalSyncer::new(file.clone()),
            file,
            segment,
            len,
            segment_bytes: SEGMENT_BYTES,
            hard_state,
            start,
            locations: Arc::new(RwLock::new(locations)),
            next: None,
        };
        Ok(wal)
    }

    /// Opens the log in `dir` and replays it, keeping the newest entries up
    /// to `tail_bytes` in memory; `None` if `dir` holds no segment.
    pub fn open(dir: &Path, tail_bytes: usize) -> Result<Option<(Wal, Replayed)>, String> {
        let mut segments = match fs::metadata(dir) {
            Ok(_) => list_segments(dir)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read {}: {e}", dir.display())),
        };
        let mut replay = Replay { tail: Tail::new(tail_bytes), ..Replay::default() };
        let mut files = BTreeMap::new();
        let mut current = None;
        while let Some(&segment) = segments.first() {
            let newest = segments.len() == 1;
            let path = segment_path(dir, segment);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            let bytes = fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            // A new segment's first records (the hard state and the start,
            // copies of what older segments hold) are synced before anything
            // follows them: if they are incomplete, or the file is still
            // zeros, the segment was torn while being created, and nothing
            // in it is needed.
            let zeros = bytes.iter().all(|&b| b == 0);
            let (end, records) = if zeros { Ok((0, 0)) } else { replay.segment(segment, &bytes) }
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if newest && records < 2 {
                log::warn!("{}: dropping a segment a crash cut short as it was created", path.display());
                fs::remove_file(&path).map_err(|e| format!("cannot delete {}: {e}", path.display()))?;
                fsync_dir(dir)?;
                segments.remove(0);
                continue;
            }
            // Zeros after the last record of the newest segment are the
            // space reserved for it (see [`preallocate`]), not a torn write.
            let reserved = newest && bytes[end..].iter().all(|&b| b == 0);
            if end < bytes.len() && !reserved {
                if !newest {
                    return Err(format!(
                        "{} is damaged at byte {end} of {}: only the newest segment may end in a torn write",
                        path.display(),
                        bytes.len()
                    ));
                }
                log::warn!(
                    "{}: dropping {} bytes after byte {end}, a write a crash cut short",
                    path.display(),
                    bytes.len() - end
                );
                file.set_len(end as u64).map_err(|e| format!("cannot truncate {}: {e}", path.display()))?;
            }
            if newest {
                reserve_space(&file, SEGMENT_BYTES);
                file.sync_all().map_err(|e| format!("cannot fsync {}: {e}", path.display()))?;
            }
            let file = Arc::new(file);
            files.insert(segment, file.clone());
            current = Some((file, segment, end as u64));
            segments.remove(0);
        }
        let Some((file, segment, len)) = current else { return Ok(None) };
        let mut locations = replay.locations;
        locations.segments = files;
        let start = replay.start.clone();
        if let Some(first) = locations.entries.front().map(|_| locations.first)
            && first > start.meta.index.saturating_add(1)
        {
            return Err(format!(
                "the log holds entries from {first} on, but starts after {}: entries are missing",
                start.meta.index
            ));
        }
        let last = locations.last().unwrap_or(start.meta.index);
        let wal = Wal {
            dir: dir.to_path_buf(),
            syncer: WalSyncer::new(file.clone()),
            file,
            segment,
            len,
            segment_bytes: SEGMENT_BYTES,
            hard_state: replay.hard_state.unwrap_or_default(),
            start: start.clone(),
            locations: Arc::new(RwLock::new(locations)),
            next: None,
        };
        let replayed =
            Replayed { hard_state: replay.hard_state, start, last, memberships: replay.memberships, tail: replay.tail };
        Ok(Some((wal, replayed)))
    }

    /// Appends `batch`, starting a new segment first if this one is full.
    /// Not durable until a [`WalSyncer::sync`] that begins after it returns.
    pub fn write(&mut self, batch: Batch) -> Result<(), String> {
        if batch.is_empty() {
            return Ok(());
        }
        if self.len >= self.segment_bytes {
            self.next_segment()?;
        }
        // From half way through a segment: a log that never fills one (a
        // small cluster, a test) never writes one ahead.
        if self.next.is_none() && self.len >= self.segment_bytes / 2 {
            self.next = Some(prepare(&self.dir, self.segment_bytes));
        }
        let offset = self.len;
        self.file
            .write_all_at(&batch.bytes, offset)
            .map_err(|e| format!("cannot write {}: {e}", segment_path(&self.dir, self.segment).display()))?;
        self.len += batch.bytes.len() as u64;
        self.syncer.written();
        if let Some(hard_state) = batch.hard_state {
            self.hard_state = hard_state;
        }
        let mut locations = self.locations.write().expect("a reader panicked");
        for (index, term, at) in batch.entries {
            let len = u32::from_le_bytes(batch.bytes[at..at + 4].try_into().expect("4 bytes"));
            let location = Location { segment: self.segment, offset: offset + at as u64, len, term };
            locations.place(index, location)?;
        }
        if let Some(start) = batch.start {
            locations.apply_start(&start);
            self.start = start;
        }
        Ok(())
    }

    /// Deletes the segments that hold no entry of the log any more. Only
    /// once the records that made them obsolete are durable: the caller syncs first.
    pub fn delete_obsolete(&mut self) -> Result<(), String> {
        let obsolete = self.obsolete();
        {
            let mut locations = self.locations.write().expect("a reader panicked");
            obsolete.iter().for_each(|s| drop(locations.segments.remove(s)));
        }
        delete_segments(&self.dir, &obsolete)
    }

    /// The segments older than any that holds an entry of the log.
    pub fn obsolete(&self) -> Vec<u64> {
        let locations = self.locations.read().expect("a writer panicked");
        let oldest_needed = locations.entries.front().map_or(self.segment, |l| l.segment);
        locations.segments.range(..oldest_needed).map(|(&s, _)| s).collect()
    }

    /// Closes the segment appended to (durably: nothing may be torn in a
    /// segment after it) and starts the next one.
    fn next_segment(&mut self) -> Result<(), String> {
        let path = segment_path(&self.dir, self.segment);
        // Only the newest segment may end in reserved space: in an older
        // one, anything after the last record is damage.
        self.file.set_len(self.len).map_err(|e| format!("cannot truncate {}: {e}", path.display()))?;
        self.file.sync_data().map_err(|e| format!("cannot fsync {}: {e}", path.display()))?;
        let segment = self.segment + 1;
        // Only where the log starts: the entries before this segment stay.
        let start = Start { restart: false, ..self.start.clone() };
        let (file, len) = match self.take_prepared() {
            Some(prepared) => install_segment(&self.dir, segment, prepared, &self.hard_state, &start)?,
            None => new_segment(&self.dir, segment, &self.hard_state, &start, self.segment_bytes)?,
        };
        self.locations.write().expect("a reader panicked").segments.insert(segment, file.clone());
        self.syncer.switch_to(file.clone());
        (self.file, self.segment, self.len) = (file, segment, len);
        Ok(())
    }

    /// The file made ahead for the next segment, if it is ready and of the
    /// size segments have. One still being made is left to finish (it is
    /// used at the next rollover): two would write the same file.
    fn take_prepared(&mut self) -> Option<File> {
        if self.next.as_ref()?.handle.as_ref().is_some_and(|handle| !handle.is_finished()) {
            return None;
        }
        let Prepared { handle, bytes } = self.next.take()?;
        match handle?.join().expect("the thread making a segment ahead panicked") {
            Ok(file) if bytes == self.segment_bytes => Some(file),
            Ok(_) => {
                let _ = fs::remove_file(self.dir.join(PREPARED));
                None
            }
            Err(e) => {
                log::debug!("no log segment made ahead: {e}");
                None
            }
        }
    }

    /// Waits until the next segment's file is made.
    #[cfg(test)]
    pub fn wait_for_next(&self) {
        while self.next.as_ref().and_then(|next| next.handle.as_ref()).is_some_and(|handle| !handle.is_finished()) {
            thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Where the newest segment's records end.
    #[cfg(test)]
    pub fn end(&self) -> u64 {
        self.len
    }

    pub fn syncer(&self) -> WalSyncer {
        self.syncer.clone()
    }

    pub fn reader(&self) -> WalReader {
        WalReader { locations: self.locations.clone() }
    }

    /// Term of the entry at `index`, if the log holds it.
    pub fn term(&self, index: Index) -> Option<Term> {
        self.locations.read().expect("a writer panicked").get(index).map(|l| l.term)
    }

    #[cfg(test)]
    pub fn set_segment_bytes(&mut self, bytes: u64) {
        self.segment_bytes = bytes;
    }

    #[cfg(test)]
    pub fn segments(&self) -> Vec<u64> {
        list_segments(&self.dir).unwrap()
    }
}

/// Reads entries of the log from any thread.
#[derive(Clone)]
pub struct WalReader {
    locations: Arc<RwLock<Locations>>,
}

impl WalReader {
    /// The first index the log holds (one past the log start if it holds none).
    pub fn first(&self) -> Index {
        self.locations.read().expect("a writer panicked").first
    }

    /// The last index the log holds (the log start if it holds none).
    pub fn last(&self) -> Index {
        let locations = self.locations.read().expect("a writer panicked");
        locations.last().unwrap_or(locations.first.saturating_sub(1))
    }

    /// The entry at `index`; an error if the log does not hold it or it
    /// cannot be read back.
    pub fn read(&self, index: Index) -> Result<Entry, String> {
        let (location, file) = {
            let locations = self.locations.read().expect("a writer panicked");
            let location = locations.get(index).ok_or_else(|| format!("log entry {index} is not in the log"))?;
            (location, locations.segments.get(&location.segment).cloned())
        };
        let file = file.ok_or_else(|| format!("the segment of log entry {index} is gone"))?;
        let mut header = [0; RECORD_HEADER];
        file.read_exact_at(&mut header, location.offset).map_err(|e| format!("cannot read log entry {index}: {e}"))?;
        let (len, crc) = record_header(&header);
        if len != location.len {
            return Err(format!("log entry {index} is damaged"));
        }
        let mut body = vec![0; len as usize];
        file.read_exact_at(&mut body, location.offset + RECORD_HEADER as u64)
            .map_err(|e| format!("cannot read log entry {index}: {e}"))?;
        if crc32fast::hash(&body) != crc || body.first() != Some(&KIND_ENTRY) {
            return Err(format!("log entry {index} is damaged"));
        }
        let entry: Entry =
            rmp_serde::from_slice(&body[1..]).map_err(|e| format!("log entry {index} is unreadable: {e}"))?;
        if entry.index != index {
            return Err(format!("log entry {index} is stored with index {} inside", entry.index));
        }
        Ok(entry)
    }
}

/// Makes the log's writes durable, from any thread. One sync covers every
/// write made before it began.
#[derive(Clone)]
pub struct WalSyncer(Arc<SyncShared>);

struct SyncShared {
    /// The segment appended to, and whether it was written since its last sync.
    current: Mutex<(Arc<File>, bool)>,
    /// Held through a sync: a sync that begins while another runs must wait
    /// for it, since the writes it covers may be the ones that sync took.
    syncing: Mutex<()>,
}

impl WalSyncer {
    fn new(file: Arc<File>) -> WalSyncer {
        WalSyncer(Arc::new(SyncShared { current: Mutex::new((file, false)), syncing: Mutex::new(()) }))
    }

    fn written(&self) {
        lock(&self.0.current).1 = true;
    }

    /// The previous segment was synced by the writer; the new one's first
    /// records were too.
    fn switch_to(&self, file: Arc<File>) {
        *lock(&self.0.current) = (file, false);
    }

    pub fn sync(&self) -> io::Result<()> {
        let _syncing = lock(&self.0.syncing);
        let (file, written) = {
            let mut current = lock(&self.0.current);
            let written = std::mem::replace(&mut current.1, false);
            (current.0.clone(), written)
        };
        if written && let Err(e) = file.sync_data() {
            lock(&self.0.current).1 = true;
            return Err(e);
        }
        Ok(())
    }
}

#[derive(Default)]
struct Replay {
    hard_state: Option<HardState>,
    start: Start,
    locations: Locations,
    memberships: Vec<(Index, Membership)>,
    tail: Tail,
}

impl Replay {
    /// Replays the records of one segment; returns where the valid ones end
    /// (before the header if it is torn) and how many there are.
    fn segment(&mut self, segment: u64, bytes: &[u8]) -> Result<(usize, usize), String> {
        if bytes.len() < HEADER.len() {
            return if HEADER.starts_with(bytes) { Ok((0, 0)) } else { Err("not a raft-zmq log segment".into()) };
        }
        if &bytes[..HEADER.len()] != HEADER {
            return Err("not a raft-zmq log segment, or of a newer format".into());
        }
        let (mut at, mut records) = (HEADER.len(), 0);
        while bytes.len() - at >= RECORD_HEADER {
            let (len, crc) = record_header(&bytes[at..at + RECORD_HEADER]);
            let end = at + RECORD_HEADER + len as usize;
            if len == 0 || len > MAX_RECORD || end > bytes.len() {
                break;
            }
            let body = &bytes[at + RECORD_HEADER..end];
            if crc32fast::hash(body) != crc {
                break;
            }
            self.record(Location { segment, offset: at as u64, len, term: 0 }, body)
                .map_err(|e| format!("record at byte {at}: {e}"))?;
            (at, records) = (end, records + 1);
        }
        Ok((at, records))
    }

    fn record(&mut self, mut location: Location, body: &[u8]) -> Result<(), String> {
        let value = &body[1..];
        match body[0] {
            KIND_ENTRY => {
                let entry: Entry = rmp_serde::from_slice(value).map_err(|e| format!("unreadable entry: {e}"))?;
                if entry.index <= self.start.meta.index {
                    return Err(format!(
                        "log entry {} is at or before the log start {}",
                        entry.index, self.start.meta.index
                    ));
                }
                if self.locations.last().is_none() && entry.term < self.start.meta.term {
                    return Err(format!(
                        "log entry {} has term {} after the log start's term {}",
                        entry.index, entry.term, self.start.meta.term
                    ));
                }
                location.term = entry.term;
                self.locations.place(entry.index, location)?;
                let first = self.locations.first;
                self.memberships.retain(|(i, _)| *i >= first && *i < entry.index);
                if let Payload::Membership(membership) = &entry.payload {
                    self.memberships.push((entry.index, membership.clone()));
                }
                self.tail.push(entry);
            }
            KIND_HARD_STATE => {
                self.hard_state =
                    Some(rmp_serde::from_slice(value).map_err(|e| format!("unreadable hard state: {e}"))?);
            }
            KIND_START => {
                let start: Start = rmp_serde::from_slice(value).map_err(|e| format!("unreadable log start: {e}"))?;
                self.locations.apply_start(&start);
                // A restart leaves no entry: `first` is past all of them.
                let (first, last) = (self.locations.first, self.locations.last().unwrap_or(0));
                self.memberships.retain(|(i, _)| (first..=last).contains(i));
                self.tail.keep(first, last);
                self.start = start;
            }
            kind => return Err(format!("unknown record kind {kind}")),
        }
        Ok(())
    }
}

fn record_header(bytes: &[u8]) -> (u32, u32) {
    let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    (word(0), word(4))
}

fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:020}.wal"))
}

/// The segment numbers in `dir`, oldest first.
fn list_segments(dir: &Path) -> Result<Vec<u64>, String> {
    let listing = fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut segments = Vec::new();
    for item in listing {
        let name = item.map_err(|e| format!("cannot list {}: {e}", dir.display()))?.file_name();
        let name = name.to_string_lossy();
        if let Some(number) = name.strip_suffix(".wal").filter(|n| n.len() == 20).and_then(|n| n.parse().ok()) {
            segments.push(number);
        }
    }
    segments.sort_unstable();
    Ok(segments)
}

/// Creates segment `segment` holding `hard_state` and `start`, with `reserve`
/// bytes set aside for it, durably (file and name); returns it and the
/// length of its records.
fn new_segment(
    dir: &Path,
    segment: u64,
    hard_state: &HardState,
    start: &Start,
    reserve: u64,
) -> Result<(Arc<File>, u64), String> {
    let path = segment_path(dir, segment);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let first = first_records(hard_state, start);
    file.write_all_at(&first, 0).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    reserve_space(&file, reserve);
    file.sync_all().map_err(|e| format!("cannot fsync {}: {e}", path.display()))?;
    fsync_dir(dir)?;
    Ok((Arc::new(file), first.len() as u64))
}

/// What a segment begins with: the header, the hard state and the start.
fn first_records(hard_state: &HardState, start: &Start) -> Vec<u8> {
    let mut batch = Batch { bytes: HEADER.to_vec(), ..Batch::default() };
    batch.hard_state(hard_state);
    batch.start(start);
    batch.bytes
}

/// Makes the next segment in place of the one made ahead, `file`: its
/// first records written and synced before it takes its name, as in
/// [`new_segment`]. Its size and blocks are already durable, so the sync
/// writes data only.
fn install_segment(
    dir: &Path,
    segment: u64,
    file: File,
    hard_state: &HardState,
    start: &Start,
) -> Result<(Arc<File>, u64), String> {
    let path = segment_path(dir, segment);
    let first = first_records(hard_state, start);
    let prepared = dir.join(PREPARED);
    // As `create_new` refuses for a segment made here: never replace one.
    if fs::symlink_metadata(&path).is_ok() {
        return Err(format!("cannot create {}: it exists already", path.display()));
    }
    file.write_all_at(&first, 0).map_err(|e| format!("cannot write {}: {e}", prepared.display()))?;
    file.sync_data().map_err(|e| format!("cannot fsync {}: {e}", prepared.display()))?;
    fs::rename(&prepared, &path)
        .map_err(|e| format!("cannot rename {} to {}: {e}", prepared.display(), path.display()))?;
    fsync_dir(dir)?;
    Ok((Arc::new(file), first.len() as u64))
}

/// Where the next segment's file is made ahead: not a segment's name, so
/// opening the log passes it by, and each new one overwrites it.
const PREPARED: &str = "next.wal.tmp";

/// A segment file being made on a thread of its own (`None`: the thread
/// could not be started; the next rollover does without).
struct Prepared {
    handle: Option<JoinHandle<Result<File, String>>>,
    bytes: u64,
}

/// Starts making a file of `bytes` zeros in `dir`, written and synced, for
/// the segment after the current one. Appending into blocks written before
/// changes no metadata, so each fdatasync writes the data and nothing else:
/// [`preallocate`]'s blocks are unwritten extents, which every append into
/// new blocks converts, and on an ext4 with a journal that is a journal
/// commit per sync (measured on a loop-mounted ext4, 8 KiB appended per
/// fdatasync: 5-9 device writes and 0.4-0.7 ms a sync into a fallocated
/// file, 2 writes and 0.22 ms into one written with zeros first). Off the
/// appending thread: writing 8 MiB takes tens of milliseconds.
fn prepare(dir: &Path, bytes: u64) -> Prepared {
    let target = dir.join(PREPARED);
    let spawned = thread::Builder::new().name("wal-ahead".into()).spawn(move || {
        let made = zero_filled(&target, bytes);
        if made.is_err() {
            // Likely a full disk: the space is better left free.
            let _ = fs::remove_file(&target);
        }
        made
    });
    let handle = spawned.map_err(|e| log::debug!("cannot start making a log segment ahead: {e}")).ok();
    Prepared { handle, bytes }
}

fn zero_filled(path: &Path, bytes: u64) -> Result<File, String> {
    let err = |e: io::Error| format!("cannot make {}: {e}", path.display());
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path).map_err(err)?;
    // The space first, at once or not at all, as for a segment made at
    // rollover: on a disk without room for it, writing zeros until it is
    // full would leave nothing, for a moment, to anything else.
    if let Err(e) = preallocate(&file, bytes)
        && e.raw_os_error() == Some(libc::ENOSPC)
    {
        return Err(err(e));
    }
    let zeros = vec![0; 1 << 20];
    let mut at = 0;
    while at < bytes {
        let n = (bytes - at).min(zeros.len() as u64);
        file.write_all_at(&zeros[..n as usize], at).map_err(err)?;
        // Not all at the sync: the log's own syncs share the device.
        super::start_writeback(&file, at, n as usize);
        at += n;
    }
    file.sync_all().map_err(err)?;
    Ok(file)
}

impl Drop for Wal {
    /// A segment still being made ahead is waited for: the next `Wal` in
    /// this directory makes its own, in the same file.
    fn drop(&mut self) {
        if let Some(handle) = self.next.take().and_then(|next| next.handle) {
            let _ = handle.join();
        }
    }
}

/// Sets aside the blocks of a segment up to `bytes` (its size becomes that,
/// the space reading as zeros). Appending inside them changes neither the
/// file's size nor which blocks it has, so an fdatasync writes less
/// metadata: measured on this VM's ext4, 0.16-0.18 ms a sync before, 0.11
/// ms after. Only an optimisation: where the file system cannot (or the
/// disk is too full to), the log grows as it is written, as before.
fn preallocate(file: &File, bytes: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    if file.metadata().is_ok_and(|m| m.len() >= bytes) {
        return Ok(());
    }
    let len = libc::off_t::try_from(bytes).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: fallocate only reads its plain integer arguments; the fd is
    // open for as long as `file` is borrowed.
    match unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// [`preallocate`] where doing without is fine.
fn reserve_space(file: &File, bytes: u64) {
    if let Err(e) = preallocate(file, bytes) {
        log::debug!("cannot reserve space for a log segment: {e}");
    }
}

/// Deletes `segments` oldest first, each durably before the next (no file
/// system promises to keep unlinks in order through a crash otherwise), so
/// that a crash leaves the newest ones.
fn delete_segments(dir: &Path, segments: &[u64]) -> Result<(), String> {
    for &segment in segments {
        let path = segment_path(dir, segment);
        fs::remove_file(&path).map_err(|e| format!("cannot delete {}: {e}", path.display()))?;
        fsync_dir(dir)?;
    }
    Ok(())
}

fn fsync_dir(dir: &Path) -> Result<(), String> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| format!("cannot fsync {}: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: Index, term: Term) -> Entry {
        Entry { index, term, payload: Payload::Command(vec![index as u8; 100].into()) }
    }

    fn fresh(dir: &Path) -> Wal {
        Wal::create(dir, HardState::default(), Start { restart: true, ..Start::default() }).unwrap()
    }

    fn write(wal: &mut Wal, hard_state: Option<HardState>, entries: &[Entry]) {
        let mut batch = Batch::default();
        entries.iter().for_each(|e| batch.entry(e));
        hard_state.iter().for_each(|hs| batch.hard_state(hs));
        wal.write(batch).unwrap();
    }

    fn start_at(wal: &mut Wal, index: Index, term: Term, restart: bool) {
        let mut batch = Batch::default();
        batch.start(&Start { meta: SnapshotMeta { index, term }, membership: None, restart });
        wal.write(batch).unwrap();
    }

    fn reopen(dir: &Path) -> (Wal, Replayed) {
        Wal::open(dir, usize::MAX).unwrap().expect("segments")
    }

    fn indexes(replayed: &Replayed) -> Vec<Index> {
        replayed.tail.iter().map(|e| e.index).collect()
    }

    fn all(wal: &Wal, from: Index, to: Index) -> Vec<Entry> {
        (from..=to).map(|i| wal.reader().read(i).unwrap()).collect()
    }

    #[test]
    fn an_empty_dir_holds_no_log() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(Wal::open(&tmp.path().join("log"), 0).unwrap().is_none());
        fs::create_dir(tmp.path().join("log")).unwrap();
        assert!(Wal::open(&tmp.path().join("log"), 0).unwrap().is_none());
    }

    #[test]
    fn entries_and_hard_state_replay_with_truncations_applied() {
        let tmp = tempfile::tempdir().unwrap();
        let entries: Vec<Entry> = (1..=5).map(|i| entry(i, 1)).collect();
        {
            let mut wal = fresh(tmp.path());
            write(&mut wal, Some(HardState { term: 1, vote: Some(2), commit: 3 }), &entries);
            write(&mut wal, Some(HardState { term: 2, vote: None, commit: 3 }), &[entry(4, 2)]);
            assert_eq!(all(&wal, 1, 4), [&entries[..3], &[entry(4, 2)]].concat());
            wal.syncer().sync().unwrap();
        }
        let (wal, replayed) = reopen(tmp.path());
        assert_eq!(replayed.hard_state, Some(HardState { term: 2, vote: None, commit: 3 }));
        assert_eq!((replayed.last, indexes(&replayed)), (4, vec![1, 2, 3, 4]));
        assert_eq!(replayed.tail.iter().nth(3), Some(&entry(4, 2)));
        assert_eq!(wal.term(4), Some(2));
        assert_eq!(all(&wal, 1, 4), replayed.tail.iter().cloned().collect::<Vec<_>>());
    }

    #[test]
    fn a_torn_last_record_is_cut_off_and_writing_goes_on_after_the_valid_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let len = {
            let mut wal = fresh(tmp.path());
            write(&mut wal, None, &[entry(1, 1), entry(2, 1)]);
            wal.len
        };
        let path = segment_path(tmp.path(), 1);
        // The last record loses its final bytes, as a crash mid-write leaves it.
        OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 3).unwrap();
        {
            let (mut wal, replayed) = reopen(tmp.path());
            assert_eq!(indexes(&replayed), vec![1]);
            write(&mut wal, None, &[entry(2, 2)]);
        }
        let (_, replayed) = reopen(tmp.path());
        assert_eq!(replayed.tail.iter().map(|e| (e.index, e.term)).collect::<Vec<_>>(), vec![(1, 1), (2, 2)]);
    }

    /// Whether any extent of `file` is unwritten (allocated, reading as
    /// zeros until written); `None` where the file system cannot tell.
    fn has_unwritten_extents(file: &File) -> Option<bool> {
        use std::os::fd::AsRawFd;
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Extent {
            logical: u64,
            physical: u64,
            length: u64,
            reserved64: [u64; 2],
            flags: u32,
            reserved: [u32; 3],
        }
        #[repr(C)]
        struct Fiemap {
            start: u64,
            length: u64,
            flags: u32,
            mapped: u32,
            count: u32,
            reserved: u32,
            extents: [Extent; 64],
        }
        const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
        const FIEMAP_FLAG_SYNC: u32 = 1;
        const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x800;
        let mut map = Fiemap {
            start: 0,
            length: u64::MAX,
            flags: FIEMAP_FLAG_SYNC,
            mapped: 0,
            count: 64,
            reserved: 0,
            extents: [Extent::default(); 64],
        };
        // SAFETY: the kernel fills at most `count` extents of `map`, which lives across the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, &mut map) };
        (rc == 0).then(|| map.extents[..map.mapped as usize].iter().any(|e| e.flags & FIEMAP_EXTENT_UNWRITTEN != 0))
    }

    /// A segment after the first is a file of zeros made ahead: appends into
    /// it convert no unwritten extent (no metadata to sync), and it replays
    /// like any other, its zeros the newest segment's reserved space.
    #[test]
    fn the_next_segment_is_made_ahead_with_its_blocks_written() {
        let tmp = tempfile::tempdir().unwrap();
        let mut wal = fresh(tmp.path());
        wal.set_segment_bytes(64 << 10);
        write(&mut wal, None, &[entry(1, 1)]);
        assert!(!tmp.path().join(PREPARED).exists(), "nothing made ahead in a segment far from full");
        let mut index = 2;
        while wal.len < 32 << 10 {
            write(&mut wal, None, &[entry(index, 1)]);
            index += 1;
        }
        write(&mut wal, None, &[entry(index, 1)]);
        index += 1;
        let Some(first_unwritten) = has_unwritten_extents(&wal.file) else {
            return eprintln!("skipped: this file system does not map extents (FIEMAP)");
        };
        if !first_unwritten {
            return eprintln!("skipped: fallocate makes no unwritten extents on this file system");
        }
        wal.wait_for_next();
        let made = fs::metadata(tmp.path().join(PREPARED)).unwrap();
        assert_eq!(made.len(), 64 << 10);
        while wal.segment == 1 {
            write(&mut wal, None, &[entry(index, 1)]);
            index += 1;
        }
        assert!(!tmp.path().join(PREPARED).exists(), "the file made ahead became segment 2");
        assert_eq!(has_unwritten_extents(&wal.file), Some(false), "segment 2 has its blocks written");
        assert_eq!(fs::metadata(segment_path(tmp.path(), 2)).unwrap().len(), 64 << 10);
        let last = index - 1;
        drop(wal);
        let (_, replayed) = reopen(tmp.path());
        assert_eq!(indexes(&replayed), (1..=last).collect::<Vec<_>>());
    }

    /// The newest segment's reserved space replays as the end of the log,
    /// not as a torn write, and stays reserved; a segment the log moves on
    /// from gives back what it did not use.
    #[test]
    fn a_segments_reserved_space_is_kept_while_it_is_the_newest_and_given_back_after() {
        let tmp = tempfile::tempdir().unwrap();
        let path = segment_path(tmp.path(), 1);
        let size = || fs::metadata(&path).unwrap().len();
        let written = {
            let mut wal = fresh(tmp.path());
            write(&mut wal, None, &[entry(1, 1), entry(2, 1)]);
            wal.len
        };
        assert_eq!(size(), SEGMENT_BYTES, "reserved at creation");
        let (mut wal, replayed) = reopen(tmp.path());
        assert_eq!(indexes(&replayed), vec![1, 2]);
        assert_eq!((wal.len, size()), (written, SEGMENT_BYTES), "nothing cut, nothing lost");
        wal.set_segment_bytes(1);
        write(&mut wal, None, &[entry(3, 1)]);
        assert_eq!(size(), written, "an older segment ends at its last record");
        drop(wal);
        assert_eq!(indexes(&reopen(tmp.path()).1), vec![1, 2, 3]);
    }

    #[test]
    fn a_flipped_byte_ends_the_newest_segment_but_is_refused_in_an_older_one() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let mut wal = fresh(tmp.path());
            wal.set_segment_bytes(1);
            for i in 1..=3 {
                write(&mut wal, None, &[entry(i, 1)]);
            }
            assert_eq!(wal.segments(), vec![1, 2, 3, 4], "each write in a new segment");
        }
        let flip = |segment: u64| {
            let path = segment_path(tmp.path(), segment);
            let mut bytes = fs::read(&path).unwrap();
            let at = bytes.len() - 5;
            bytes[at] ^= 0xff;
            fs::write(&path, bytes).unwrap();
        };
        flip(4);
        let (_, replayed) = reopen(tmp.path());
        assert_eq!(indexes(&replayed), vec![1, 2]);
        flip(2);
        let e = Wal::open(tmp.path(), usize::MAX).err().unwrap();
        assert!(e.contains("only the newest segment may end in a torn write"), "{e}");
    }

    #[test]
    fn a_segment_torn_while_being_created_is_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        // As the log does before it starts the next segment.
        let seal = |wal: Wal| wal.file.set_len(wal.len).unwrap();
        {
            let mut wal = fresh(tmp.path());
            write(&mut wal, None, &[entry(1, 1)]);
            seal(wal);
        }
        let first = first_records(&HardState::default(), &Start::default());
        let torn_starts = [HEADER[..4].to_vec(), vec![0; 64], first[..first.len() - 3].to_vec()];
        for (i, torn) in torn_starts.into_iter().enumerate() {
            fs::write(segment_path(tmp.path(), 2), torn).unwrap();
            let (mut wal, replayed) = reopen(tmp.path());
            assert_eq!(indexes(&replayed), (1..=i as u64 + 1).collect::<Vec<_>>());
            assert_eq!(wal.segments(), vec![1]);
            write(&mut wal, None, &[entry(i as u64 + 2, 1)]);
            seal(wal);
        }
        assert_eq!(indexes(&reopen(tmp.path()).1), vec![1, 2, 3, 4]);
    }

    #[test]
    fn damage_that_passes_the_crc_is_refused_not_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let mut wal = fresh(tmp.path());
        write(&mut wal, None, &[entry(1, 1)]);
        // A well-formed record that leaves a gap.
        let mut batch = Batch::default();
        batch.record(KIND_ENTRY, &entry(3, 1));
        let len = wal.len;
        wal.file.write_all_at(&batch.bytes, len).unwrap();
        drop(wal);
        let e = Wal::open(tmp.path(), usize::MAX).err().unwrap();
        assert!(e.contains("log entry 3 follows a gap: expected index 2"), "{e}");
        fs::write(tmp.path().join("00000000000000000001.wal"), b"something else entirely").unwrap();
        let e = Wal::open(tmp.path(), usize::MAX).err().unwrap();
        assert!(e.contains("not a raft-zmq log segment"), "{e}");
    }

    #[test]
    fn terms_must_not_go_back() {
        let tmp = tempfile::tempdir().unwrap();
        let mut wal = fresh(tmp.path());
        write(&mut wal, None, &[entry(1, 2)]);
        let mut batch = Batch::default();
        batch.entry(&entry(2, 1));
        assert!(wal.write(batch).unwrap_err().contains("log entry 2 has term 1 after term 2 at index 1"));
    }

    #[test]
    fn compaction_deletes_the_segments_it_empties_and_the_rest_replays() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let mut wal = fresh(tmp.path());
            wal.set_segment_bytes(300);
            for i in 1..=10 {
                write(&mut wal, Some(HardState { term: 1, vote: None, commit: i - 1 }), &[entry(i, 1)]);
            }
            let before = wal.segments();
            assert!(before.len() >= 4, "{before:?}");
            start_at(&mut wal, 6, 1, false);
            wal.syncer().sync().unwrap();
            wal.delete_obsolete().unwrap();
            let after = wal.segments();
            assert!(after[0] > before[0] && after.len() <= before.len(), "{before:?} {after:?}");
            assert!(wal.reader().read(5).is_err(), "compacted");
            assert_eq!(wal.reader().read(7).unwrap(), entry(7, 1));
        }
        let (_, replayed) = reopen(tmp.path());
        assert_eq!(replayed.start.meta, SnapshotMeta { index: 6, term: 1 });
        assert_eq!(indexes(&replayed), vec![7, 8, 9, 10]);
        assert_eq!(replayed.hard_state.unwrap().commit, 9);
    }

    #[test]
    fn a_restart_empties_the_log_and_a_crash_while_deleting_leaves_a_suffix_that_replays_the_same() {
        let tmp = tempfile::tempdir().unwrap();
        let segments;
        {
            let mut wal = fresh(tmp.path());
            wal.set_segment_bytes(300);
            for i in 1..=6 {
                write(&mut wal, None, &[entry(i, 1)]);
            }
            start_at(&mut wal, 20, 3, true);
            write(&mut wal, None, &[entry(21, 3)]);
            segments = wal.segments();
        }
        // As if deletion had removed only the oldest segment.
        fs::remove_file(segment_path(tmp.path(), segments[0])).unwrap();
        let (mut wal, replayed) = reopen(tmp.path());
        assert_eq!((replayed.start.meta.index, indexes(&replayed)), (20, vec![21]));
        wal.delete_obsolete().unwrap();
        assert_eq!(wal.segments(), vec![*segments.last().unwrap()]);
        drop(wal);
        assert_eq!(indexes(&reopen(tmp.path()).1), vec![21]);
    }

    #[test]
    fn a_lost_older_segment_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let mut wal = fresh(tmp.path());
            wal.set_segment_bytes(1);
            for i in 1..=3 {
                write(&mut wal, None, &[entry(i, 1)]);
            }
        }
        fs::remove_file(segment_path(tmp.path(), 2)).unwrap();
        let e = Wal::open(tmp.path(), usize::MAX).err().unwrap();
        assert!(e.contains("holds entries from 2 on, but starts after 0"), "{e}");
    }

    #[test]
    fn create_replaces_an_older_log() {
        let tmp = tempfile::tempdir().unwrap();
        let mut wal = fresh(tmp.path());
        write(&mut wal, None, &[entry(1, 1)]);
        drop(wal);
        let start = Start { meta: SnapshotMeta { index: 4, term: 2 }, membership: None, restart: true };
        let wal = Wal::create(tmp.path(), HardState { term: 5, vote: None, commit: 4 }, start.clone()).unwrap();
        assert_eq!(wal.segments(), vec![2]);
        drop(wal);
        let (_, replayed) = reopen(tmp.path());
        assert_eq!((replayed.start, replayed.last, replayed.hard_state.unwrap().term), (start, 4, 5));
    }

    #[test]
    fn the_tail_is_bounded_and_memberships_follow_truncation() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let mut wal = fresh(tmp.path());
            let change = Entry { index: 3, term: 1, payload: Payload::Membership(Membership::default()) };
            write(&mut wal, None, &[entry(1, 1), entry(2, 1), change.clone(), entry(4, 1)]);
            let (_, replayed) = Wal::open(tmp.path(), 300).unwrap().unwrap();
            assert_eq!(replayed.memberships.iter().map(|m| m.0).collect::<Vec<_>>(), vec![3]);
            assert_eq!(indexes(&replayed), vec![2, 3, 4]);
            write(&mut wal, None, &[entry(3, 2)]);
        }
        let (_, replayed) = Wal::open(tmp.path(), 300).unwrap().unwrap();
        assert!(replayed.memberships.is_empty());
        assert_eq!(replayed.last, 3);
    }

    #[test]
    fn a_reader_on_another_thread_reads_while_the_log_grows_and_rolls_over() {
        let tmp = tempfile::tempdir().unwrap();
        let mut wal = fresh(tmp.path());
        wal.set_segment_bytes(1000);
        write(&mut wal, None, &[entry(1, 1)]);
        let reader = wal.reader();
        let reading = std::thread::spawn(move || (0..200).all(|_| reader.read(1) == Ok(entry(1, 1))));
        for i in 2..=100 {
            write(&mut wal, None, &[entry(i, 1)]);
        }
        assert!(reading.join().unwrap());
        assert!(wal.segments().len() > 5);
        assert_eq!(wal.reader().read(77).unwrap(), entry(77, 1));
    }
}
