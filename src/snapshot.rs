//! Snapshot files: the state machine at one applied index, in
//! `state/<id>/snapshots/<index>-<term>.snap`.
//!
//! ```text
//! "raft-zmq snapshot 1\n" | index u64 BE | term u64 BE | length u64 BE | data | CRC-32 u32 BE
//! ```
//!
//! The CRC covers everything before it, so a torn or corrupted file is
//! always told apart from a good one. A file is written under a temporary
//! name, fsynced, renamed into place and the directory fsynced: a crash at
//! any point leaves the previous snapshot usable, and at most a temporary
//! file that the next open deletes.
//!
//! A snapshot received from the leader is staged as `incoming-<from>.tmp`
//! while its pieces arrive, renamed `received-<index>-<term>.ready` once it
//! is complete, checked and fsynced, and adopted (renamed to its final
//! name) when the node installs it. Opening deletes both kinds of leftovers:
//! the leader sends the snapshot again.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::raft::{Index, NodeId, SnapshotMeta};

/// Version of the snapshot file format: the number in its first line, `raft-zmq snapshot 1`.
pub const SNAPSHOT_FORMAT_VERSION: u32 = 1;

const MAGIC: &[u8] = b"raft-zmq snapshot 1\n";
// The header names the version: changing one without the other fails the build.
const _: () = assert!(MAGIC[MAGIC.len() - 2] == b'0' + SNAPSHOT_FORMAT_VERSION as u8);
const HEADER_LEN: usize = MAGIC.len() + 24;
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

/// Encodes a snapshot file's bytes.
pub fn encode(meta: SnapshotMeta, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + data.len() + 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&meta.index.to_be_bytes());
    out.extend_from_slice(&meta.term.to_be_bytes());
    out.extend_from_slice(&(data.len() as u64).to_be_bytes());
    out.extend_from_slice(data);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

/// Decodes and checks a snapshot file's bytes.
pub fn decode(bytes: &[u8]) -> Result<(SnapshotMeta, &[u8]), String> {
    if bytes.len() < HEADER_LEN + 4 || !bytes.starts_with(MAGIC) {
        return Err("not a raft-zmq snapshot (bad header)".into());
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(body).to_be_bytes() != crc {
        return Err("checksum mismatch: the file is torn or corrupted".into());
    }
    let number = |at: usize| u64::from_be_bytes(body[at..at + 8].try_into().expect("8 bytes"));
    let meta = SnapshotMeta { index: number(MAGIC.len()), term: number(MAGIC.len() + 8) };
    let data = &body[HEADER_LEN..];
    if number(MAGIC.len() + 16) != data.len() as u64 {
        return Err("length mismatch".into());
    }
    Ok((meta, data))
}

/// Where a node's snapshots live, inside its state dir.
pub fn dir_in(state_dir: &Path) -> PathBuf {
    state_dir.join("snapshots")
}

/// Reads the snapshot file at `path`, checking it is intact and holds `meta`.
fn read_checked(path: &Path, meta: SnapshotMeta) -> Result<Vec<u8>, SnapshotError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| SnapshotError::new(path, format!("cannot read: {e}")))?;
    let (held, data) = decode(&bytes).map_err(|problem| SnapshotError::new(path, problem))?;
    if held != meta {
        let problem = format!("holds {}/{}, not {}/{}", held.index, held.term, meta.index, meta.term);
        return Err(SnapshotError::new(path, problem));
    }
    Ok(data.to_vec())
}

/// The snapshots directory of one node.
#[derive(Clone, Debug)]
pub struct Snapshots {
    dir: PathBuf,
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
        Ok(Snapshots { dir: dir.to_path_buf() })
    }

    /// Writes the snapshot durably, then deletes all but the newest older one.
    pub fn save(&self, meta: SnapshotMeta, data: &[u8]) -> Result<(), SnapshotError> {
        let path = self.path(meta);
        let temp = path.with_extension(&TEMP_SUFFIX[1..]);
        let err = |what: &str, e: io::Error| SnapshotError::new(&path, format!("cannot {what}: {e}"));
        let mut file = File::create(&temp).map_err(|e| err("create", e))?;
        file.write_all(&encode(meta, data)).map_err(|e| err("write", e))?;
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

    /// The data of snapshot `meta`, checked.
    pub fn load(&self, meta: SnapshotMeta) -> Result<Vec<u8>, SnapshotError> {
        read_checked(&self.path(meta), meta)
    }

    /// Where the pieces of a snapshot from `from` are collected.
    pub fn incoming(&self, from: NodeId) -> PathBuf {
        self.dir.join(format!("incoming-{from}{TEMP_SUFFIX}"))
    }

    /// Marks the complete snapshot collected in `incoming` as received:
    /// checks it is `meta` and intact, makes it durable.
    pub fn receive(&self, incoming: &Path, meta: SnapshotMeta) -> Result<(), SnapshotError> {
        read_checked(incoming, meta)?;
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

    /// The newest snapshot and its data, checked; `None` if there is none.
    /// A damaged newest snapshot is an error, not a reason to fall back to an
    /// older one: the log may have been compacted past the older one.
    pub fn latest(&self) -> Result<Option<(SnapshotMeta, Vec<u8>)>, SnapshotError> {
        let listed = self.list().map_err(|e| SnapshotError::new(&self.dir, format!("cannot list: {e}")))?;
        let Some((path, named)) = listed.into_iter().last() else { return Ok(None) };
        Ok(Some((named, read_checked(&path, named)?)))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_snapshots_come_back_newest_first_and_old_ones_are_pruned() {
        let tmp = tempfile::tempdir().unwrap();
        let snapshots = Snapshots::open(&tmp.path().join("snapshots")).unwrap();
        assert!(snapshots.latest().unwrap().is_none());
        for index in [10, 30, 20] {
            snapshots.save(SnapshotMeta { index, term: 2 }, &[index as u8; 100]).unwrap();
        }
        let (meta, data) = snapshots.latest().unwrap().unwrap();
        assert_eq!((meta, data), (SnapshotMeta { index: 30, term: 2 }, vec![30; 100]));
        assert_eq!(fs::read_dir(tmp.path().join("snapshots")).unwrap().count(), 2, "the newest and one older");
    }

    #[test]
    fn a_damaged_snapshot_is_refused_and_a_leftover_temporary_file_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("snapshots");
        let snapshots = Snapshots::open(&dir).unwrap();
        let meta = SnapshotMeta { index: 7, term: 3 };
        snapshots.save(meta, b"state").unwrap();
        fs::write(dir.join("x.tmp"), b"half").unwrap();
        let path = snapshots.path(meta);
        let mut bytes = fs::read(&path).unwrap();
        bytes[HEADER_LEN] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let snapshots = Snapshots::open(&dir).unwrap();
        assert!(!dir.join("x.tmp").exists());
        let e = snapshots.latest().unwrap_err().to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
        assert!(decode(b"short").is_err());
        assert_eq!(decode(&encode(meta, b"ok")).unwrap(), (meta, &b"ok"[..]));
    }
}
