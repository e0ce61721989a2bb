//! What the simulated clients write and read. Every write is named by the id
//! of the client operation that first sent it (its retries keep the name):
//! a put or a cas stores that id as its value, which makes every value ever
//! written unique, and a write in a session uses `op<id>`, seq 1, so a retry
//! of it is the same session write and must be applied at most once. A
//! delete stores nothing, so it always has a session, whose client_id names
//! it in the log. The node's real `KvStore` holds the data; the checker
//! replays the log on a model of one register per key, so it knows which
//! value each key held after every index.

use raft_zmq::kv::{Command, LoggedCommand, Value};
use raft_zmq::raft::{Entry, Payload};

use super::history::OpId;

pub type Key = char;

pub const KEYS: [Key; 3] = ['a', 'b', 'c'];

/// What a key holds: the write that stored its value, or nothing.
pub type Held = Option<OpId>;

/// What a write does to its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Put,
    Delete,
    /// Stores the write's value if the key holds `expect` (`None`: only if
    /// the key is absent).
    Cas(Held),
}

/// A write as a client asks for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Write {
    pub key: Key,
    pub action: Action,
    /// With a session (`op<id>`, seq 1), or without: then a `timeout` (or
    /// no answer) leaves it unknown for good, and it is not sent again.
    pub session: bool,
}

/// What a write did, as the state machine answers it: the `kv::Outcome`
/// without the index, in the simulation's values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteResult {
    Put,
    Delete {
        existed: bool,
    },
    /// `current`: what the key held when the swap failed (`None` when it
    /// succeeded, as the node answers).
    Cas {
        swapped: bool,
        current: Held,
    },
}

impl WriteResult {
    /// What `action` does to a key holding `held`, writing `value`: the
    /// register's rules, the specification the real `KvStore` must meet.
    pub fn of(action: Action, held: &mut Held, value: OpId) -> WriteResult {
        match action {
            Action::Put => {
                *held = Some(value);
                WriteResult::Put
            }
            Action::Delete => WriteResult::Delete { existed: held.take().is_some() },
            Action::Cas(expect) if *held == expect => {
                *held = Some(value);
                WriteResult::Cas { swapped: true, current: None }
            }
            Action::Cas(_) => WriteResult::Cas { swapped: false, current: *held },
        }
    }
}

/// A key as the client protocol carries it.
pub fn key_value(key: Key) -> Value {
    Value::Str(key.to_string())
}

/// A value as the client protocol carries it.
pub fn value_of(op: OpId) -> Value {
    Value::Str(op.to_string())
}

/// The write a value names.
pub fn held(value: &Value) -> OpId {
    match value {
        Value::Str(v) => v.parse().expect("values are op ids"),
        Value::Bin(_) => panic!("the simulation writes str values"),
    }
}

/// The command a write sends: every write its own session, if it has one.
pub fn command_of(name: OpId, write: Write) -> LoggedCommand {
    let key = key_value(write.key);
    let command = match write.action {
        Action::Put => Command::Put { key, value: value_of(name) },
        Action::Delete => Command::Delete { key },
        Action::Cas(expect) => Command::Cas { key, expect: expect.map(value_of), value: value_of(name) },
    };
    let (client_id, seq) = if write.session { (Some(format!("op{name}")), Some(1)) } else { (None, None) };
    LoggedCommand { command, client_id, seq }
}

/// The write a committed entry holds, and its name, if it holds one.
pub fn logged_write(entry: &Entry) -> Option<(OpId, Write)> {
    let Payload::Command(bytes) = &entry.payload else { return None };
    let logged = LoggedCommand::decode(bytes).ok()?;
    let session = logged.client_id.as_deref().and_then(|c| c.strip_prefix("op")).map(|n| n.parse().expect("op<id>"));
    let key_of = |key: &Value| match key {
        Value::Str(k) => k.chars().next().expect("one-letter keys"),
        Value::Bin(_) => panic!("the simulation writes str keys"),
    };
    let (key, action, name) = match &logged.command {
        Command::Put { key, value } => (key_of(key), Action::Put, Some(held(value))),
        Command::Delete { key } => (key_of(key), Action::Delete, session),
        Command::Cas { key, expect, value } => (key_of(key), Action::Cas(expect.as_ref().map(held)), Some(held(value))),
        Command::Propose { .. } => return None,
    };
    let name = name.expect("a delete has a session");
    Some((name, Write { key, action, session: session.is_some() }))
}
