//! The replicated state machine: the node's real `KvStore`, with its
//! sessions. Every write puts a unique value (the id of the client operation
//! that first wrote it) under one of a few keys, in a session of its own
//! (`op<id>`, seq 1), so a retry of it is the same session write and must be
//! applied at most once. The index that applied each value is remembered
//! (and travels in snapshots), so a read result can be placed exactly in the
//! order of writes.

use std::collections::BTreeMap;

use raft_zmq::kv::{Command, KvStore, LoggedCommand, Value};
use raft_zmq::protocol::Reply;
use raft_zmq::raft::{Entry, Index, Payload};

use super::history::OpId;

pub type Key = char;

pub const KEYS: [Key; 3] = ['a', 'b', 'c'];

/// What a read returns: the writing operation and the index it was applied
/// at, or `None` for a key never written.
pub type Version = Option<(OpId, Index)>;

/// The command of the write that first wrote `value` (a retry sends it again).
pub fn encode_write(key: Key, value: OpId) -> Vec<u8> {
    let command = Command::Put { key: Value::Str(key.to_string()), value: Value::Str(value.to_string()) };
    LoggedCommand { command, client_id: Some(format!("op{value}")), seq: Some(1) }.encode()
}

/// One applied write command.
pub struct Applied {
    /// The write it belongs to (its value).
    pub value: OpId,
    /// The index its reply names: where it was first applied.
    pub index: Index,
    /// Skipped by the session check: a retry already applied.
    pub duplicate: bool,
}

/// A snapshot of the state machine: the `KvStore`'s own bytes, and where
/// each value was applied.
#[derive(Clone, Debug)]
pub struct Image {
    kv: Vec<u8>,
    applied_at: BTreeMap<OpId, Index>,
}

#[derive(Default)]
pub struct Register {
    kv: KvStore,
    applied_at: BTreeMap<OpId, Index>,
}

impl Register {
    pub fn apply(&mut self, entry: &Entry) -> Option<Applied> {
        let Payload::Command(bytes) = &entry.payload else { return None };
        let value = LoggedCommand::decode(bytes).ok().and_then(|logged| match logged.command {
            Command::Put { value: Value::Str(value), .. } => value.parse().ok(),
            _ => None,
        })?;
        let applied = self.kv.apply(entry.index, &entry.payload).expect("a command has a reply");
        let Reply::Put { index } = applied.reply else { panic!("a put got {:?}", applied.reply) };
        if !applied.duplicate {
            self.applied_at.insert(value, entry.index);
        }
        Some(Applied { value, index, duplicate: applied.duplicate })
    }

    pub fn get(&self, key: Key) -> Version {
        let value = match self.kv.get(&Value::Str(key.to_string()))? {
            Value::Str(value) => value.parse::<OpId>().expect("values are op ids"),
            Value::Bin(_) => panic!("the simulation writes str values"),
        };
        Some((value, self.applied_at[&value]))
    }

    pub fn snapshot(&self) -> Image {
        Image { kv: self.kv.snapshot(), applied_at: self.applied_at.clone() }
    }

    pub fn restore(image: &Image) -> Register {
        let mut kv = KvStore::new();
        kv.restore(&image.kv).expect("a snapshot the simulation took");
        Register { kv, applied_at: image.applied_at.clone() }
    }
}
