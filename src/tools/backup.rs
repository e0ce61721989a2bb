//! `raft-zmq snapshot save|restore` (CONTRACT.md "Backup").
//!
//! `save` has a node take a snapshot now and copies its file over the client
//! protocol (`snapshot` then `snapshot_data` in pieces), so it works against
//! a remote node; the copy is checked before it replaces FILE. `restore`
//! builds a node's state dir for a new cluster from such a file: its log
//! starts after the snapshot, and its state machine is the snapshot's.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::kv::KvStore;
use crate::raft::{HardState, NodeId, SnapshotMeta};
use crate::storage::Storage;
use crate::storage::snapshot::{self, Snapshots};
use crate::wire::protocol::{Reply, Request};

use crate::client::Client;

/// What a backup holds.
pub struct Summary {
    pub snapshot: SnapshotMeta,
    pub bytes: usize,
    pub keys: usize,
}

/// Has the node behind `client` snapshot its state now and writes the file
/// to `file` (through a temporary file, fsynced, then renamed).
pub fn save(client: &mut Client, file: &Path) -> Result<Summary, String> {
    let index = match client.call(&Request::Snapshot) {
        Ok(Reply::Snapshot { index }) => index,
        other => return Err(format!("the node did not take a snapshot: {}", describe(other))),
    };
    let mut bytes = Vec::new();
    loop {
        let request = Request::SnapshotData { index: Some(index), offset: bytes.len() as u64 };
        match client.call(&request) {
            Ok(Reply::SnapshotData { total, offset, data, .. }) if offset == bytes.len() as u64 => {
                bytes.extend_from_slice(&data);
                if bytes.len() as u64 >= total || data.is_empty() {
                    break;
                }
            }
            other => return Err(format!("cannot read snapshot {index}: {}", describe(other))),
        }
    }
    let temp = file.with_extension("tmp");
    let err = |what: &str, e: std::io::Error| format!("{}: cannot {what}: {e}", file.display());
    let mut out = File::create(&temp).map_err(|e| err("create", e))?;
    out.write_all(&bytes).and_then(|()| out.sync_all()).map_err(|e| err("write", e))?;
    // Checked before it replaces FILE (and taking the bytes: held once).
    let checked = check(bytes);
    if checked.is_err() {
        let _ = fs::remove_file(&temp);
    }
    let (summary, _) = checked?;
    fs::rename(&temp, file).map_err(|e| err("rename into place", e))?;
    Ok(summary)
}

/// Creates node `id`'s state dir from the backup at `file`, for a new
/// cluster made of the config's nodes. Refuses to touch a node that has a
/// state dir or a log mirror already.
pub fn restore(config: &Config, id: NodeId, file: &Path) -> Result<Summary, String> {
    config.require_member(id).map_err(|e| e.to_string())?;
    let bytes = fs::read(file).map_err(|e| format!("{}: cannot read: {e}", file.display()))?;
    let (summary, data) = check(bytes).map_err(|e| format!("{}: {e}", file.display()))?;
    let (state_dir, mirror) = (config.node_state_dir(id), config.node_log_path(id));
    for existing in [&state_dir, &mirror] {
        if existing.exists() {
            return Err(format!(
                "{} already exists: restore builds a new node; move it away first",
                existing.display()
            ));
        }
    }
    // Built aside and renamed into place, so an interrupted restore leaves
    // no half-made state dir for a node to start from.
    let building = PathBuf::from(format!("{}.restoring", state_dir.display()));
    let err = |what: &str, e: String| format!("{}: cannot {what}: {e}", building.display());
    if building.exists() {
        fs::remove_dir_all(&building).map_err(|e| err("clear a previous attempt", e.to_string()))?;
    }
    {
        let (mut storage, _) = Storage::open(&building).map_err(|e| e.to_string())?;
        // A new cluster of the config's nodes: it names itself anew.
        let membership = crate::wire::members::first_membership(&config.nodes);
        let snapshots = Snapshots::open(&snapshot::dir_in(&building)).map_err(|e| e.to_string())?;
        snapshots.save(summary.snapshot, &membership, &data).map_err(|e| e.to_string())?;
        storage.install_snapshot(summary.snapshot, &membership).map_err(|e| e.to_string())?;
        let hard_state = HardState { term: summary.snapshot.term, vote: None, commit: summary.snapshot.index };
        storage.write(Some(&hard_state), &[]).map_err(|e| e.to_string())?;
        storage.sync().map_err(|e| e.to_string())?;
    }
    fs::rename(&building, &state_dir).map_err(|e| err("rename into place", e.to_string()))?;
    let parent = state_dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(parent).and_then(|d| d.sync_all()).map_err(|e| err("fsync the parent", e.to_string()))?;
    Ok(summary)
}

/// Checks a snapshot file's bytes: checksum, and a state machine inside
/// that loads. Returns what it holds, and the state machine's data.
fn check(bytes: Vec<u8>) -> Result<(Summary, Vec<u8>), String> {
    let len = bytes.len();
    let file = snapshot::decode(bytes).map_err(|e| format!("not a usable snapshot: {e}"))?;
    let mut kv = KvStore::new();
    kv.restore(&file.data).map_err(|e| format!("not a usable snapshot: {e}"))?;
    Ok((Summary { snapshot: file.meta, bytes: len, keys: kv.len() }, file.data))
}

fn describe(outcome: Result<Reply, crate::client::CallError>) -> String {
    match outcome {
        Ok(Reply::Error { code, message, .. }) => format!("{} ({message})", code.as_str()),
        Ok(other) => format!("unexpected reply {other:?}"),
        Err(e) => e.to_string(),
    }
}
