//! What the simulated clients write and read: every write puts a unique
//! value (the id of the client operation that first wrote it) under one of
//! a few keys, in a session of its own (`op<id>`, seq 1), so a retry of it
//! is the same session write and must be applied at most once. The node's
//! real `KvStore` holds them; the checker knows the index that first applied
//! each value, so a read result can be placed exactly in the order of writes.

use raft_zmq::kv::Value;
use raft_zmq::raft::Index;

use super::history::OpId;

pub type Key = char;

pub const KEYS: [Key; 3] = ['a', 'b', 'c'];

/// What a read returns: the writing operation and the index it was applied
/// at, or `None` for a key never written.
pub type Version = Option<(OpId, Index)>;

/// A key as the client protocol carries it.
pub fn key_value(key: Key) -> Value {
    Value::Str(key.to_string())
}
