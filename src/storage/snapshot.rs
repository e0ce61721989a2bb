//! Snapshot files: the state machine at one applied index, in
//! `state/<id>/snapshots/<index>-<term>.snap`.
//!
//! ```text
//! "raft-zmq snapshot 2\n" | index u64 BE | term u64 BE
//!     | membership length u64 BE | membership (MessagePack)
//!     | data length u64 BE | data | CRC-32 u32 BE
//! ```
//!
//! The membership is the one in force at the snapshot's index, so a node
//! that finds a snapshot its log does not hold (a crash between adopting a
//! received one and recording it in sled) starts over from exactly what the
//! snapshot says, never from an older membership its log still holds. The
//! CRC covers everything before it, so a torn or corrupted file is always
//! told apart from a good one. Format 1 (no membership; the session table
//! holding client replies) is refused with a message saying what to do. A file is written under a temporary
//! name, fsynced, renamed into place and the directory fsynced: a crash at
//! any point leaves the previous snapshot usable, and at most a temporary
//! file that the next open deletes.
//!
//! A snapshot received from the leader is staged as `incoming.tmp` while
//! its pieces arrive (one at a time, see [`Staging`]), renamed
//! `received-<index>-<term>.ready` once it is complete, checked and
//! fsynced, and adopted (renamed to its final name) when the node installs
//! it. Opening deletes both kinds of leftovers: the leader sends the
//! snapshot again.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use log::warn;

use crate::raft::{Index, Membership, NodeId, SnapshotMeta, Term};
use crate::storage::disk_space::free_bytes;
use crate::storage::start_writeback;

/// Version of the snapshot file format: the number in its first line, `raft-zmq snapshot 2`.
pub const SNAPSHOT_FORMAT_VERSION: u32 = 2;

/// The first line without its version number.
const MAGIC_PREFIX: &[u8] = b"raft-zmq snapshot ";
const MAGIC: &[u8] = b"raft-zmq snapshot 2\n";
// The header names the version: changing one without the other fails the build.
const _: () = assert!(MAGIC[MAGIC.len() - 2] == b'0' + SNAPSHOT_FORMAT_VERSION as u8);
/// The magic line, index and term.
const HEADER_LEN: usize = MAGIC.len() + 16;
const SUFFIX: &str = ".snap";
const TEMP_SUFFIX: &str = ".tmp";
const RECEIVED_SUFFIX: &str = ".ready";
/// Older snapshots kept besides the newest, as a fallback for an operator.
const KEEP_OLDER: usize = 1;

#[derive(Debug)]
pub struct SnapshotError {
    path: PathBuf,
    problem: String,
}

impl SnapshotError {
    fn new(path: &Path, problem: impl Into<String>) -> SnapshotError {
        SnapshotError { path: path.to_path_buf(), problem: problem.into() }
    }
}

impl fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "snapshot {}: {}", self.path.display(), self.problem)
    }
}

impl std::error::Error for SnapshotError {}

/// What a snapshot file holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotFile {
    pub meta: SnapshotMeta,
    /// In force at `meta.index`.
    pub membership: Membership,
    /// The state machine's image ([`crate::kv::KvImage::encode`]).
    pub data: Vec<u8>,
}

/// Encodes a snapshot file's bytes.
pub fn encode(meta: SnapshotMeta, membership: &Membership, data: &[u8]) -> Vec<u8> {
    let membership = rmp_serde::to_vec_named(membership).expect("a membership always encodes");
    let mut out = Vec::with_capacity(HEADER_LEN + 16 + membership.len() + data.len() + 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&meta.index.to_be_bytes());
    out.extend_from_slice(&meta.term.to_be_bytes());
    for part in [&membership[..], data] {
        out.extend_from_slice(&(part.len() as u64).to_be_bytes());
        out.extend_from_slice(part);
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

/// Decodes and checks a snapshot file's bytes. The data is cut out of
/// `bytes` in place: a snapshot is never held twice in memory.
pub fn decode(mut bytes: Vec<u8>) -> Result<SnapshotFile, String> {
    check_header(&bytes, bytes.len())?;
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(body).to_be_bytes() != crc {
        return Err(CHECKSUM_MISMATCH.into());
    }
    let (meta, membership, data) = parse_head(&bytes, bytes.len())?;
    bytes.truncate(data.end);
    bytes.drain(..data.start);
    Ok(SnapshotFile { meta, membership, data: bytes })
}

/// Whether a `len`-byte file whose first bytes are `head` is of this
/// format and long enough for its header (checked before the CRC, so that
/// another format is named as such).
fn check_header(head: &[u8], len: usize) -> Result<(), String> {
    if !head.starts_with(MAGIC) {
        return Err(unknown_format(head));
    }
    if len < HEADER_LEN + 4 || head.len() < HEADER_LEN {
        return Err("truncated header".into());
    }
    Ok(())
}

const CHECKSUM_MISMATCH: &str = "checksum mismatch: the file is torn or corrupted";

/// What the head of a `len`-byte file says: its snapshot, membership, and
/// where its data lies. `head` holds the file's bytes at least up to its
/// data. Two parts, each after its length; nothing but the CRC may follow
/// the second.
fn parse_head(head: &[u8], len: usize) -> Result<(SnapshotMeta, Membership, Range<usize>), String> {
    check_header(head, len)?;
    let body_len = len - 4;
    let number = |at: usize| head.get(at..at + 8).map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")));
    let meta = SnapshotMeta { index: number(MAGIC.len()).unwrap_or(0), term: number(MAGIC.len() + 8).unwrap_or(0) };
    let part = |at: usize| -> Result<Range<usize>, String> {
        let end = number(at)
            .and_then(|len| usize::try_from(len).ok())
            .and_then(|len| (at + 8).checked_add(len))
            .filter(|&end| end <= body_len);
        Ok(at + 8..end.ok_or("length mismatch")?)
    };
    let membership = part(HEADER_LEN)?;
    let data = part(membership.end)?;
    if data.end != body_len {
        return Err("length mismatch".into());
    }
    let membership = head.get(membership).ok_or("length mismatch")?;
    let membership = rmp_serde::from_slice(membership).map_err(|e| format!("unreadable membership: {e}"))?;
    Ok((meta, membership, data))
}

/// Checks a snapshot file as its bytes go by, in order, without holding
/// them: a received snapshot is checked while it is written to disk, and
/// read into memory only once, when it is installed.
struct StreamCheck {
    total: u64,
    seen: u64,
    crc: crc32fast::Hasher,
    /// The file's last four bytes: the CRC it declares.
    declared: [u8; 4],
    /// The bytes up to the data, as far as they came.
    head: Vec<u8>,
}

/// A membership list is a few hundred bytes; a head longer than this is
/// not kept (and the file is refused).
const MAX_HEAD: usize = 1 << 20;

impl StreamCheck {
    fn new(total: u64) -> StreamCheck {
        StreamCheck { total, seen: 0, crc: crc32fast::Hasher::new(), declared: [0; 4], head: Vec::new() }
    }

    /// The next bytes of the file.
    fn feed(&mut self, mut bytes: &[u8]) {
        let body_len = self.total.saturating_sub(4);
        let hashed = body_len.saturating_sub(self.seen).min(bytes.len() as u64) as usize;
        self.crc.update(&bytes[..hashed]);
        // Past the body: the CRC, from this position of it on.
        let first = (self.seen + hashed as u64).saturating_sub(body_len);
        for (at, &byte) in (first..).zip(&bytes[hashed..]) {
            if let Some(slot) = self.declared.get_mut(at as usize) {
                *slot = byte;
            }
        }
        self.seen += bytes.len() as u64;
        // The head's length is known once its membership's length is in.
        while self.head.len() < self.head_len() && !bytes.is_empty() {
            let take = (self.head_len() - self.head.len()).min(bytes.len());
            self.head.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
        }
    }

    fn head_len(&self) -> usize {
        let Some(len) = self.head.get(HEADER_LEN..HEADER_LEN + 8) else { return HEADER_LEN + 8 };
        let membership = u64::from_be_bytes(len.try_into().expect("8 bytes"));
        usize::try_from(membership).map_or(MAX_HEAD, |m| (HEADER_LEN + 16).saturating_add(m).min(MAX_HEAD))
    }

    /// Once every byte went by: whether the file is intact and holds `meta`.
    fn finish(self, meta: SnapshotMeta) -> Result<(), String> {
        if self.seen != self.total {
            return Err("length mismatch".into());
        }
        let len = usize::try_from(self.total).map_err(|_| "length mismatch")?;
        check_header(&self.head, len)?;
        if self.crc.finalize().to_be_bytes() != self.declared {
            return Err(CHECKSUM_MISMATCH.into());
        }
        let (held, ..) = parse_head(&self.head, len)?;
        if held != meta {
            return Err(format!("holds {}/{}, not {}/{}", held.index, held.term, meta.index, meta.term));
        }
        Ok(())
    }
}

/// Why a file that is not a format-2 snapshot cannot be read.
fn unknown_format(bytes: &[u8]) -> String {
    let version = bytes
        .strip_prefix(MAGIC_PREFIX)
        .and_then(|rest| rest.split(|&b| b == b'\n').next())
        .and_then(|v| std::str::from_utf8(v).ok())
        .filter(|v| !v.is_empty() && v.len() <= 4 && v.bytes().all(|b| b.is_ascii_digit()));
    match version {
        Some(v) => format!(
            "snapshot format {v}, and this raft-zmq reads format {SNAPSHOT_FORMAT_VERSION} only: run the release that \
             wrote it, or move this node's state dir away and add it again (it gets a snapshot from the leader)"
        ),
        None => "not a raft-zmq snapshot (bad header)".into(),
    }
}

/// Where a node's snapshots live, inside its state dir.
pub fn dir_in(state_dir: &Path) -> PathBuf {
    state_dir.join("snapshots")
}

/// Reads the snapshot file at `path`, checking it is intact and holds `meta`.
fn read_checked(path: &Path, meta: SnapshotMeta) -> Result<SnapshotFile, SnapshotError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| SnapshotError::new(path, format!("cannot read: {e}")))?;
    let file = decode(bytes).map_err(|problem| SnapshotError::new(path, problem))?;
    if file.meta != meta {
        let problem = format!("holds {}/{}, not {}/{}", file.meta.index, file.meta.term, meta.index, meta.term);
        return Err(SnapshotError::new(path, problem));
    }
    Ok(file)
}

/// The snapshots directory of one node.
#[derive(Clone, Debug)]
pub struct Snapshots {
    dir: PathBuf,
    /// Bytes the snapshot being staged declared and has not written yet,
    /// shared by every clone: the disk alarm counts them as used.
    promised: Arc<AtomicU64>,
}

impl Snapshots {
    /// Opens (creating if absent) `dir`, deleting leftovers of interrupted writes.
    pub fn open(dir: &Path) -> Result<Snapshots, SnapshotError> {
        let err = |e: io::Error| SnapshotError::new(dir, format!("cannot open the directory: {e}"));
        fs::create_dir_all(dir).map_err(err)?;
        for entry in fs::read_dir(dir).map_err(err)? {
            let path = entry.map_err(err)?.path();
            let name = path.to_string_lossy();
            if name.ends_with(TEMP_SUFFIX) || name.ends_with(RECEIVED_SUFFIX) {
                fs::remove_file(&path).map_err(err)?;
            }
        }
        if let Some(parent) = dir.parent() {
            File::open(parent).and_then(|d| d.sync_all()).map_err(err)?;
        }
        Ok(Snapshots { dir: dir.to_path_buf(), promised: Arc::default() })
    }

    /// Writes the snapshot durably, then deletes all but the newest older one.
    pub fn save(&self, meta: SnapshotMeta, membership: &Membership, data: &[u8]) -> Result<(), SnapshotError> {
        let path = self.path(meta);
        let temp = path.with_extension(&TEMP_SUFFIX[1..]);
        let err = |what: &str, e: io::Error| SnapshotError::new(&path, format!("cannot {what}: {e}"));
        let mut file = File::create(&temp).map_err(|e| err("create", e))?;
        file.write_all(&encode(meta, membership, data)).map_err(|e| err("write", e))?;
        file.sync_all().map_err(|e| err("fsync", e))?;
        fs::rename(&temp, &path).map_err(|e| err("rename into place", e))?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|e| err("fsync its directory", e))?;
        self.prune().map_err(|e| err("delete an older snapshot", e))
    }

    fn prune(&self) -> io::Result<()> {
        for (older, _) in self.list()?.into_iter().rev().skip(1 + KEEP_OLDER) {
            fs::remove_file(older)?;
        }
        Ok(())
    }

    /// Snapshot `meta`, checked.
    pub fn load(&self, meta: SnapshotMeta) -> Result<SnapshotFile, SnapshotError> {
        read_checked(&self.path(meta), meta)
    }

    /// Where the pieces of a snapshot being received are collected.
    fn incoming(&self) -> PathBuf {
        self.dir.join(format!("incoming{TEMP_SUFFIX}"))
    }

    /// Bytes a snapshot being received declared and has not written yet.
    pub fn promised_bytes(&self) -> u64 {
        self.promised.load(Ordering::Acquire)
    }

    /// Marks the complete snapshot collected in `incoming`, checked as it
    /// came in, as received: makes it durable.
    fn receive(&self, incoming: &Path, meta: SnapshotMeta) -> Result<(), SnapshotError> {
        let received = self.received(meta);
        let err = |what: &str, e: io::Error| SnapshotError::new(incoming, format!("cannot {what}: {e}"));
        File::open(incoming).and_then(|f| f.sync_all()).map_err(|e| err("fsync", e))?;
        fs::rename(incoming, &received).map_err(|e| err("rename", e))?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|e| err("fsync its directory", e))
    }

    /// Makes the received snapshot `meta` this node's newest.
    pub fn adopt(&self, meta: SnapshotMeta) -> Result<(), SnapshotError> {
        let received = self.received(meta);
        let err = |what: &str, e: io::Error| SnapshotError::new(&received, format!("cannot {what}: {e}"));
        fs::rename(&received, self.path(meta)).map_err(|e| err("adopt", e))?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|e| err("fsync its directory", e))?;
        self.prune().map_err(|e| err("delete an older snapshot", e))
    }

    fn received(&self, meta: SnapshotMeta) -> PathBuf {
        self.dir.join(format!("received-{}-{}{RECEIVED_SUFFIX}", meta.index, meta.term))
    }

    /// The newest snapshot, checked; `None` if there is none. A damaged
    /// newest snapshot is an error, not a reason to fall back to an older
    /// one: the log may have been compacted past the older one.
    pub fn latest(&self) -> Result<Option<SnapshotFile>, SnapshotError> {
        let listed = self.list().map_err(|e| SnapshotError::new(&self.dir, format!("cannot list: {e}")))?;
        let Some((path, named)) = listed.into_iter().last() else { return Ok(None) };
        Ok(Some(read_checked(&path, named)?))
    }

    /// The snapshot at `index`, or the newest if `None`, if there is one.
    pub fn find(&self, index: Option<Index>) -> io::Result<Option<SnapshotMeta>> {
        let mut listed = self.list()?.into_iter().map(|(_, meta)| meta);
        Ok(match index {
            Some(index) => listed.rfind(|meta| meta.index == index),
            None => listed.next_back(),
        })
    }

    /// Snapshot files, oldest first.
    fn list(&self) -> io::Result<Vec<(PathBuf, SnapshotMeta)>> {
        let mut found = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let parsed = name
                .strip_suffix(SUFFIX)
                .and_then(|stem| stem.split_once('-'))
                .and_then(|(i, t)| Some(SnapshotMeta { index: i.parse::<Index>().ok()?, term: t.parse().ok()? }));
            if let Some(meta) = parsed {
                found.push((path, meta));
            }
        }
        found.sort_by_key(|(_, meta)| meta.index);
        Ok(found)
    }

    /// The file of snapshot `meta` (which may not exist).
    pub fn path(&self, meta: SnapshotMeta) -> PathBuf {
        self.dir.join(format!("{:020}-{}{SUFFIX}", meta.index, meta.term))
    }
}

/// A staging that gets no piece for this long was abandoned (its sender
/// stopped or gave up), and its file is removed without waiting for a
/// restart. A live transfer pauses at most a reply timeout between two
/// pieces, well under an election timeout.
pub const ABANDONED_AFTER: Duration = Duration::from_secs(30);

/// Receives snapshot files from the leader into `incoming.tmp`, one at a
/// time. The caller checks the sender may be the leader (a member, in the
/// current term) before handing a piece over; here, nothing is written before a new
/// transfer is known to fit on the disk above the reserve, and the bytes it
/// declared and has not written yet count as used for the disk alarm
/// ([`Snapshots::promised_bytes`]). A cap of this kind, not a constant, is
/// what keeps a transfer from ever filling the disk: sled cannot recover
/// from a failed write.
pub struct Staging {
    snapshots: Snapshots,
    reserve: u64,
    current: Option<Incoming>,
}

/// The transfer being staged: who sends it, in which term, and how far it got.
struct Incoming {
    from: NodeId,
    term: Term,
    meta: SnapshotMeta,
    total: u64,
    received: u64,
    file: File,
    check: StreamCheck,
    last_piece: Instant,
}

impl Staging {
    /// Staging in `snapshots`' directory, keeping `reserve` bytes free.
    pub fn new(snapshots: Snapshots, reserve: u64) -> Staging {
        Staging { snapshots, reserve, current: None }
    }

    /// Adds the piece at `offset` of the `total`-byte file of snapshot
    /// `meta` that node `from` sends in `term`. Returns how much is held
    /// when more is to come (a piece out of order is not written: the answer
    /// tells the sender where to go on; 0 once a complete file turned out
    /// damaged, so the sender gives up at once), or `None` once the whole
    /// file is in, intact and durable, ready to be adopted. A piece from
    /// another sender while a transfer is in progress, or of a transfer
    /// that does not fit, is refused, nothing written.
    pub fn piece(
        &mut self,
        (from, term): (NodeId, Term),
        meta: SnapshotMeta,
        offset: u64,
        total: u64,
        data: &[u8],
    ) -> Result<Option<u64>, String> {
        let fresh =
            self.current.as_ref().is_none_or(|c| (c.from, c.term, c.meta, c.total) != (from, term, meta, total));
        if fresh {
            if let Some(busy) = self.current.as_ref().filter(|c| c.from != from) {
                return Err(format!(
                    "node {} is sending snapshot {}/{} already",
                    busy.from, busy.meta.index, busy.meta.term
                ));
            }
            if offset != 0 {
                return Ok(Some(0));
            }
            self.start((from, term), meta, total)?;
        }
        let path = self.snapshots.incoming();
        let current = self.current.as_mut().expect("started above");
        current.last_piece = Instant::now();
        if offset != current.received {
            return Ok(Some(current.received));
        }
        if let Err(e) = current.file.write_all(data) {
            self.discard();
            return Err(format!("cannot write {}: {e}", path.display()));
        }
        start_writeback(&current.file, current.received, data.len());
        current.check.feed(data);
        current.received += data.len() as u64;
        let received = current.received;
        self.snapshots.promised.store(total.saturating_sub(received), Ordering::Release);
        if received < total {
            return Ok(Some(received));
        }
        let check = self.current.take().expect("started above").check;
        let checked = check.finish(meta).map_err(|problem| SnapshotError::new(&path, problem));
        if let Err(e) = checked.and_then(|()| self.snapshots.receive(&path, meta)) {
            warn!("snapshot from node {from} refused: {e}");
            let _ = fs::remove_file(&path);
            return Ok(Some(0));
        }
        Ok(None)
    }

    /// Starts staging a new transfer in place of any other, if the disk
    /// has room for it above the reserve.
    fn start(&mut self, (from, term): (NodeId, Term), meta: SnapshotMeta, total: u64) -> Result<(), String> {
        self.discard();
        let dir = &self.snapshots.dir;
        let free = free_bytes(dir).map_err(|e| format!("cannot tell the free space of {}: {e}", dir.display()))?;
        let room = free.saturating_sub(self.reserve);
        if total > room {
            return Err(format!(
                "it declares {total} bytes; {} has room for {room} above the reserve of {}",
                dir.display(),
                self.reserve
            ));
        }
        let path = self.snapshots.incoming();
        let file = File::create(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        self.snapshots.promised.store(total, Ordering::Release);
        let check = StreamCheck::new(total);
        self.current = Some(Incoming { from, term, meta, total, received: 0, file, check, last_piece: Instant::now() });
        Ok(())
    }

    /// Drops the transfer in progress if it got no piece for
    /// [`ABANDONED_AFTER`] by `now`, or if its sender, in the term it sent
    /// in, is no longer `admitted` (leadership moved on): either way it will
    /// never be completed. Returns the sender of a transfer dropped.
    pub fn expire(&mut self, now: Instant, admitted: impl Fn(NodeId, Term) -> bool) -> Option<NodeId> {
        let current = self.current.as_ref()?;
        let abandoned = now.saturating_duration_since(current.last_piece) >= ABANDONED_AFTER;
        if !abandoned && admitted(current.from, current.term) {
            return None;
        }
        let from = current.from;
        self.discard();
        Some(from)
    }

    /// Removes the staging file and releases what it promised.
    fn discard(&mut self) {
        if self.current.take().is_some() {
            let path = self.snapshots.incoming();
            if let Err(e) = fs::remove_file(&path) {
                warn!("cannot remove {}: {e}", path.display());
            }
            self.snapshots.promised.store(0, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A membership of voters 0..n.
    fn members(n: u64) -> Membership {
        Membership::of_voters(0..n, Vec::new())
    }

    #[test]
    fn every_length_in_a_file_is_checked_and_another_format_is_named() {
        let meta = SnapshotMeta { index: 5, term: 1 };
        let file = encode(meta, &members(3), b"data");
        let body = file.len() - 4;
        for cut in 0..body {
            // Whatever the checksum says, a file cut short is never read.
            let mut short = file[..cut].to_vec();
            let crc = crc32fast::hash(&short).to_be_bytes();
            short.extend_from_slice(&crc);
            assert!(decode(short).is_err(), "cut at {cut}");
        }
        // Or one with bytes after its data.
        let mut long = file[..body].to_vec();
        long.push(0);
        let crc = crc32fast::hash(&long).to_be_bytes();
        long.extend_from_slice(&crc);
        assert_eq!(decode(long).unwrap_err(), "length mismatch");
        let mut v1 = b"raft-zmq snapshot 1\n".to_vec();
        v1.extend_from_slice(&[0; 40]);
        let e = decode(v1).unwrap_err();
        assert!(e.contains("snapshot format 1, and this raft-zmq reads format 2 only"), "{e}");
        assert_eq!(decode(b"raft-zmq snapshot x\n....".to_vec()).unwrap_err(), "not a raft-zmq snapshot (bad header)");
    }

    #[test]
    fn saved_snapshots_come_back_newest_first_and_old_ones_are_pruned() {
        let tmp = tempfile::tempdir().unwrap();
        let snapshots = Snapshots::open(&tmp.path().join("snapshots")).unwrap();
        assert!(snapshots.latest().unwrap().is_none());
        for index in [10, 30, 20] {
            snapshots.save(SnapshotMeta { index, term: 2 }, &members(index), &[index as u8; 100]).unwrap();
        }
        let latest = snapshots.latest().unwrap().unwrap();
        let expected =
            SnapshotFile { meta: SnapshotMeta { index: 30, term: 2 }, membership: members(30), data: vec![30; 100] };
        assert_eq!(latest, expected);
        assert_eq!(fs::read_dir(tmp.path().join("snapshots")).unwrap().count(), 2, "the newest and one older");
    }

    #[test]
    fn a_damaged_snapshot_is_refused_and_a_leftover_temporary_file_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("snapshots");
        let snapshots = Snapshots::open(&dir).unwrap();
        let meta = SnapshotMeta { index: 7, term: 3 };
        snapshots.save(meta, &members(1), b"state").unwrap();
        fs::write(dir.join("x.tmp"), b"half").unwrap();
        let path = snapshots.path(meta);
        let mut bytes = fs::read(&path).unwrap();
        bytes[HEADER_LEN] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let snapshots = Snapshots::open(&dir).unwrap();
        assert!(!dir.join("x.tmp").exists());
        let e = snapshots.latest().unwrap_err().to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
        assert!(decode(b"short".to_vec()).is_err());
        let ok = SnapshotFile { meta, membership: members(2), data: b"ok".to_vec() };
        assert_eq!(decode(encode(meta, &ok.membership, &ok.data)).unwrap(), ok);
    }

    /// Staging in a fresh directory, with `reserve`; the directory and the
    /// pieces of a 2,500-byte snapshot file.
    fn staging(reserve: u64) -> (tempfile::TempDir, Staging, Snapshots, SnapshotMeta, Vec<u8>) {
        let tmp = tempfile::tempdir().unwrap();
        let snapshots = Snapshots::open(&tmp.path().join("snapshots")).unwrap();
        let meta = SnapshotMeta { index: 9, term: 2 };
        let file = encode(meta, &members(3), &[7; 2500]);
        (tmp, Staging::new(snapshots.clone(), reserve), snapshots, meta, file)
    }

    fn staged(snapshots: &Snapshots) -> bool {
        snapshots.incoming().exists()
    }

    #[test]
    fn a_staged_snapshot_promises_its_bytes_until_it_is_received() {
        let (_tmp, mut staging, snapshots, meta, file) = staging(0);
        let total = file.len() as u64;
        assert_eq!(staging.piece((1, 2), meta, 0, total, &file[..1000]), Ok(Some(1000)));
        assert_eq!(snapshots.promised_bytes(), total - 1000, "declared and not written yet");
        assert_eq!(staging.piece((1, 2), meta, 1000, total, &file[1000..]), Ok(None));
        assert_eq!(snapshots.promised_bytes(), 0);
        assert!(!staged(&snapshots));
        snapshots.adopt(meta).unwrap();
        assert_eq!(snapshots.load(meta).unwrap().data, vec![7; 2500]);
    }

    /// A received file is checked piece by piece as it is written (never
    /// read back whole): whatever the pieces, it is received exactly when
    /// reading it whole would accept it.
    #[test]
    fn a_received_snapshot_is_checked_as_its_pieces_come_in() {
        let (_tmp, mut staging, snapshots, meta, file) = staging(0);
        let total = file.len() as u64;
        let send = |staging: &mut Staging, meta, bytes: &[u8], piece: usize| {
            let mut outcome = Ok(Some(0));
            for (i, chunk) in bytes.chunks(piece).enumerate() {
                outcome = staging.piece((1, 2), meta, (i * piece) as u64, bytes.len() as u64, chunk);
            }
            outcome
        };
        for piece in [1, 3, 4, 5, 999, 2533, file.len()] {
            assert_eq!(send(&mut staging, meta, &file, piece), Ok(None), "pieces of {piece}");
            fs::remove_file(snapshots.received(meta)).unwrap();
        }
        let other = SnapshotMeta { index: 10, term: 2 };
        assert_eq!(send(&mut staging, other, &file, 1000), Ok(Some(0)), "not the snapshot it claims");
        // Every byte matters: the header, the lengths, the data, the CRC.
        for at in (0..file.len()).step_by(7).chain(file.len() - 4..file.len()) {
            let mut damaged = file.clone();
            damaged[at] ^= 0x10;
            assert!(decode(damaged.clone()).is_err());
            assert_eq!(send(&mut staging, meta, &damaged, 1000), Ok(Some(0)), "byte {at} changed");
        }
        let long = [&file[..], b"x"].concat();
        assert_eq!(send(&mut staging, meta, &long, 1000), Ok(Some(0)), "a byte too many");
        assert_eq!(staging.piece((1, 2), meta, 0, total, &long), Ok(Some(0)), "a last piece past the end");
        assert!(!staged(&snapshots) && snapshots.promised_bytes() == 0);
    }

    #[test]
    fn a_snapshot_that_does_not_fit_above_the_reserve_is_not_staged() {
        let (tmp, mut staging, snapshots, meta, file) = staging(0);
        let free = free_bytes(tmp.path()).unwrap();
        let refused = staging.piece((1, 2), meta, 0, free.saturating_mul(2), &file[..1000]).unwrap_err();
        assert!(refused.contains("has room for"), "{refused}");
        let mut short = Staging::new(snapshots.clone(), u64::MAX);
        let refused = short.piece((1, 2), meta, 0, file.len() as u64, &file[..1000]).unwrap_err();
        assert!(
            refused.contains("room for 0 above the reserve"),
            "a small one, the disk short of its reserve: {refused}"
        );
        assert!(!staged(&snapshots) && snapshots.promised_bytes() == 0, "nothing written or promised");
    }

    #[test]
    fn one_staging_at_a_time_until_it_is_abandoned() {
        let (_tmp, mut staging, snapshots, meta, file) = staging(0);
        let total = file.len() as u64;
        assert_eq!(staging.piece((1, 2), meta, 0, total, &file[..1000]), Ok(Some(1000)));
        let busy = staging.piece((2, 2), meta, 0, total, &file[..1000]).unwrap_err();
        assert!(busy.contains("node 1 is sending"), "{busy}");
        let now = Instant::now();
        let leads = |leader, term| move |from, sent_in| (from, sent_in) == (leader, term);
        assert_eq!(staging.expire(now, leads(1, 2)), None, "its sender still leads");
        assert!(staged(&snapshots));
        assert_eq!(staging.expire(now + ABANDONED_AFTER, leads(1, 2)), Some(1), "no piece for too long");
        assert!(!staged(&snapshots) && snapshots.promised_bytes() == 0, "file removed, promise released");
        assert_eq!(staging.piece((2, 2), meta, 0, total, &file[..1000]), Ok(Some(1000)), "another may start");
        assert_eq!(staging.expire(now, leads(1, 3)), Some(2), "its sender no longer leads");
        assert!(!staged(&snapshots));
        assert_eq!(staging.piece((1, 3), meta, 1000, total, &file[1000..]), Ok(Some(0)), "start from the beginning");
    }
}
