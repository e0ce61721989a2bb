//! The replicated state machine: a few registers, written by "set k=v"
//! commands. Every write stores a unique value (the id of the client
//! operation that wrote it) and remembers the log index that wrote it, so a
//! read result can be placed exactly in the order of writes.

use std::collections::BTreeMap;

use raft_zmq::raft::{Entry, Index, Payload};

use super::history::OpId;

pub type Key = char;

pub const KEYS: [Key; 3] = ['a', 'b', 'c'];

/// What a read returns: the writing operation and the index it was applied
/// at, or `None` for a register never written.
pub type Version = Option<(OpId, Index)>;

pub fn encode_set(key: Key, value: OpId) -> Vec<u8> {
    format!("set {key}={value}").into_bytes()
}

fn decode_set(command: &[u8]) -> (Key, OpId) {
    let text = std::str::from_utf8(command).expect("commands are UTF-8");
    let (key, value) = text.strip_prefix("set ").and_then(|kv| kv.split_once('=')).expect("set k=v");
    (key.chars().next().expect("one-letter key"), value.parse().expect("numeric value"))
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Register {
    values: BTreeMap<Key, (OpId, Index)>,
}

impl Register {
    pub fn apply(&mut self, entry: &Entry) {
        if let Payload::Command(command) = &entry.payload {
            let (key, value) = decode_set(command);
            self.values.insert(key, (value, entry.index));
        }
    }

    pub fn get(&self, key: Key) -> Version {
        self.values.get(&key).copied()
    }
}
