//! The replicated key-value state machine.
//!
//! Every replica applies the same committed entries in the same order, so
//! everything here is deterministic: no clocks, no randomness, no iteration
//! over hash maps. Client sessions give writes exactly-once semantics across
//! retries (Raft thesis §6.3): a retried (client_id, seq) gets its first reply
//! back instead of being executed a second time.

pub mod sessions;

use imbl::OrdMap;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use crate::raft::{Index, Payload};
use sessions::{SessionTable, Verdict};

/// A key or value as the client sent it. The type is kept so that a value
/// comes back as str or bin exactly as it was written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Value {
    Str(String),
    Bin(#[serde(with = "serde_bytes")] Vec<u8>),
}

impl Value {
    /// The raw bytes. Keys are identified by these alone, so str "a" and
    /// bin b"a" name the same key whatever a client library chose to send.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Value::Str(s) => s.as_bytes(),
            Value::Bin(b) => b,
        }
    }

    fn into_bytes(self) -> Vec<u8> {
        match self {
            Value::Str(s) => s.into_bytes(),
            Value::Bin(b) => b,
        }
    }
}

/// A state-machine operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Put {
        key: Value,
        value: Value,
    },
    Delete {
        key: Value,
    },
    /// Sets `key` to `value` if its current value equals `expect`
    /// (`None`: the key must be absent).
    Cas {
        key: Value,
        expect: Option<Value>,
        value: Value,
    },
    /// An opaque command: it only takes a log slot.
    Propose {
        command: String,
    },
}

impl Command {
    /// The wire name of the operation.
    pub fn op(&self) -> &'static str {
        match self {
            Command::Put { .. } => "put",
            Command::Delete { .. } => "delete",
            Command::Cas { .. } => "cas",
            Command::Propose { .. } => "propose",
        }
    }
}

/// What a log entry's `Payload::Command` holds: the command and the client
/// session it belongs to, if any.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedCommand {
    pub command: Command,
    pub client_id: Option<String>,
    pub seq: Option<u64>,
}

impl LoggedCommand {
    pub fn encode(&self) -> Vec<u8> {
        // Sized up front: regrowing the buffer through a value copies it over and over.
        let text = |v: &Value| v.as_bytes().len();
        let data = match &self.command {
            Command::Put { key, value } => text(key) + text(value),
            Command::Delete { key } => text(key),
            Command::Cas { key, expect, value } => text(key) + expect.as_ref().map_or(0, text) + text(value),
            Command::Propose { command } => command.len(),
        };
        let mut bytes = Vec::with_capacity(128 + data + self.client_id.as_ref().map_or(0, String::len));
        // Plain strings, bytes, integers and enums: MessagePack can hold them all.
        rmp_serde::encode::write_named(&mut bytes, self).expect("a LoggedCommand is always serializable");
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<LoggedCommand, String> {
        rmp_serde::from_slice(bytes).map_err(|e| format!("undecodable command: {e}"))
    }

    /// Written straight into one buffer: the mirror formats every applied
    /// entry on every node.
    fn to_json(&self, duplicate: bool) -> String {
        let fields = write_fields(&self.command, self.client_id.as_deref(), self.seq);
        // Sized up front (unless escapes make it longer): regrowing the
        // buffer through a value copies it over and over.
        let size = |field: &Field| match field {
            Field::Value(Some(Value::Str(s))) => s.len(),
            Field::Text(s) => s.len(),
            Field::Value(Some(Value::Bin(b))) => 12 + 2 * b.len(),
            Field::Value(None) | Field::Uint(_) => 20,
        };
        let mut out =
            Vec::with_capacity(16 + fields.iter().map(|(name, field)| 6 + name.len() + size(field)).sum::<usize>());
        out.push(b'{');
        for (i, (name, field)) in fields.into_iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_json(&mut out, name);
            out.push(b':');
            match field {
                // A value shows as a JSON string, bin as `{"$bin": hex}`.
                Field::Value(Some(Value::Str(s))) => write_json(&mut out, s),
                Field::Text(s) => write_json(&mut out, s),
                Field::Value(Some(Value::Bin(b))) => write_json(&mut out, &bin_json(b)),
                Field::Value(None) => out.extend_from_slice(b"null"),
                Field::Uint(n) => write_json(&mut out, &n),
            }
        }
        if duplicate {
            out.extend_from_slice(br#","dup":true"#);
        }
        out.push(b'}');
        String::from_utf8(out).expect("JSON is UTF-8")
    }
}

fn write_json<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    serde_json::to_writer(out, value).expect("strings and numbers always serialize to JSON in memory");
}

/// One field of a write, borrowed, so that the MessagePack request encoder
/// and the JSON mirror share one definition of which fields a write has and
/// in what order.
pub(crate) enum Field<'a> {
    /// A key or value; `None` only for cas's `expect` (nil / null).
    Value(Option<&'a Value>),
    Text(&'a str),
    Uint(u64),
}

/// The fields of a write in wire order: op, key, expect, value, command,
/// client_id, seq (only those the command has).
pub(crate) fn write_fields<'a>(
    command: &'a Command,
    client_id: Option<&'a str>,
    seq: Option<u64>,
) -> Vec<(&'static str, Field<'a>)> {
    let mut fields = vec![("op", Field::Text(command.op()))];
    match command {
        Command::Put { key, value } => {
            fields.push(("key", Field::Value(Some(key))));
            fields.push(("value", Field::Value(Some(value))));
        }
        Command::Delete { key } => fields.push(("key", Field::Value(Some(key)))),
        Command::Cas { key, expect, value } => {
            fields.push(("key", Field::Value(Some(key))));
            fields.push(("expect", Field::Value(expect.as_ref())));
            fields.push(("value", Field::Value(Some(value))));
        }
        Command::Propose { command } => fields.push(("command", Field::Text(command))),
    }
    fields.extend(client_id.map(|c| ("client_id", Field::Text(c))));
    fields.extend(seq.map(|s| ("seq", Field::Uint(s))));
    fields
}

/// A write's session: both `client_id` and `seq`, or neither. Half a session
/// could not be deduplicated, so it is refused rather than guessed at.
pub fn session(client_id: Option<&str>, seq: Option<u64>) -> Result<Option<(&str, u64)>, String> {
    match (client_id, seq) {
        (Some(c), Some(s)) => Ok(Some((c, s))),
        (None, None) => Ok(None),
        (Some(_), None) => Err("client_id given without seq".into()),
        (None, Some(_)) => Err("seq given without client_id".into()),
    }
}

/// What a write did, as the state machine tells it. The client protocol
/// turns it into a reply; the session table keeps it for retries, so it is
/// part of the snapshot format and changes only with that format's version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Put {
        index: Index,
    },
    Delete {
        index: Index,
        existed: bool,
    },
    /// `value`: the current value when the swap failed (`None` if the key
    /// is absent, or the swap succeeded: the client knows what it wrote).
    Cas {
        index: Index,
        swapped: bool,
        value: Option<Value>,
    },
    Propose {
        index: Index,
    },
    /// Not executed, for the reason given: an undecodable entry, half a
    /// session, a superseded seq or a forgotten session.
    Refused {
        reason: String,
    },
}

/// What applying one committed entry did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// For the client that proposed it.
    pub outcome: Outcome,
    /// The session check refused it (a retry, a superseded seq or a forgotten
    /// session): it changed nothing, and the log shows it with `"dup": true`.
    pub duplicate: bool,
}

/// The key-value map plus the session table. The map is ordered so that
/// two replicas holding the same state also iterate (and snapshot) the same
/// way, and persistent (imbl: structural sharing), so that [`KvStore::image`]
/// is a copy in O(1) that a snapshot can be written from on another thread
/// while this one goes on applying.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvStore {
    data: OrdMap<Key, Value>,
    sessions: SessionTable,
}

/// A key as the map holds it: up to 16 bytes inside the map's node, so that
/// a lookup's binary search does not wait on a key's heap memory at every
/// step (which took a tenth of the leader's core loop under gets).
type Key = SmallVec<[u8; 16]>;

fn key_of(bytes: Vec<u8>) -> Key {
    if bytes.len() <= 16 { Key::from_slice(&bytes) } else { Key::from_vec(bytes) }
}

/// The state machine as of one applied index, frozen: what a snapshot holds.
pub struct KvImage(KvStore);

impl KvImage {
    /// The snapshot's bytes: data and sessions.
    pub fn encode(&self) -> Vec<u8> {
        let data: Vec<(&serde_bytes::Bytes, &Value)> =
            self.0.data.iter().map(|(key, value)| (serde_bytes::Bytes::new(key), value)).collect();
        rmp_serde::to_vec_named(&(data, &self.0.sessions)).expect("plain data always encodes")
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl KvStore {
    pub fn new() -> KvStore {
        KvStore::default()
    }

    /// The session table, which answers retries of decided writes.
    pub fn sessions(&self) -> &SessionTable {
        &self.sessions
    }

    /// The state as it stands, to snapshot (cheap: the map is shared).
    pub fn image(&self) -> KvImage {
        KvImage(self.clone())
    }

    /// The whole state, data and sessions, as bytes for a snapshot.
    pub fn snapshot(&self) -> Vec<u8> {
        self.image().encode()
    }

    /// Replaces the whole state by a snapshot's.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), String> {
        let (data, sessions): (Vec<(serde_bytes::ByteBuf, Value)>, SessionTable) =
            rmp_serde::from_slice(bytes).map_err(|e| format!("the state machine in it is unreadable: {e}"))?;
        self.data = data.into_iter().map(|(key, value)| (key_of(key.into_vec()), value)).collect();
        self.sessions = sessions;
        self.sessions.recount();
        Ok(())
    }

    /// Applies a committed entry's payload at `index` (`None` for a no-op or
    /// a membership entry, which the core applied already).
    ///
    /// A command with (client_id, seq) executes only if the session table
    /// says it is new; otherwise it is a duplicate answered per
    /// [`Verdict`]: a retry gets the first reply, original index included.
    /// An undecodable payload yields a `bad_request` reply: every replica
    /// reaches the same verdict, so it is still deterministic.
    pub fn apply(&mut self, index: Index, payload: &Payload) -> Option<Applied> {
        let bytes = match payload {
            Payload::Noop | Payload::Membership(_) => return None,
            Payload::Command(bytes) => bytes,
        };
        Some(match LoggedCommand::decode(bytes) {
            Ok(logged) => self.apply_command(index, logged),
            Err(e) => Applied { outcome: Outcome::Refused { reason: format!("entry {index}: {e}") }, duplicate: false },
        })
    }

    fn apply_command(&mut self, index: Index, logged: LoggedCommand) -> Applied {
        let (client_id, seq) = match session(logged.client_id.as_deref(), logged.seq) {
            Ok(Some(session)) => session,
            Ok(None) => return Applied { outcome: self.execute(index, logged.command), duplicate: false },
            Err(reason) => return Applied { outcome: Outcome::Refused { reason }, duplicate: false },
        };
        let verdict = self.sessions.check(client_id, seq);
        if let Some(outcome) = decided(verdict, seq) {
            return Applied { outcome, duplicate: true };
        }
        let outcome = self.execute(index, logged.command);
        self.sessions.record(client_id, seq, outcome.clone(), index);
        Applied { outcome, duplicate: false }
    }

    fn execute(&mut self, index: Index, command: Command) -> Outcome {
        match command {
            Command::Put { key, value } => {
                self.data.insert(key_of(key.into_bytes()), value);
                Outcome::Put { index }
            }
            Command::Delete { key } => Outcome::Delete { index, existed: self.data.remove(key.as_bytes()).is_some() },
            Command::Cas { key, expect, value } => {
                let current = self.data.get(key.as_bytes());
                // Compared by bytes, like keys, so the str/bin choice of a
                // client library cannot make an equal value look different.
                if current.map(Value::as_bytes) == expect.as_ref().map(Value::as_bytes) {
                    self.data.insert(key_of(key.into_bytes()), value);
                    // The client knows the value it just wrote; not keeping a
                    // copy keeps the session table small.
                    Outcome::Cas { index, swapped: true, value: None }
                } else {
                    Outcome::Cas { index, swapped: false, value: current.cloned() }
                }
            }
            Command::Propose { .. } => Outcome::Propose { index },
        }
    }

    pub fn get(&self, key: &Value) -> Option<&Value> {
        self.data.get(key.as_bytes())
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// The outcome of a write whose session already decided it, or `None` if
/// it is new and must be executed. The server answers early with the same
/// rule, so a client gets the same answer whichever of the two answers it.
pub fn decided(verdict: Verdict, seq: u64) -> Option<Outcome> {
    let refused = |reason: String| Some(Outcome::Refused { reason });
    match verdict {
        Verdict::New => None,
        Verdict::Retry(outcome) => Some(outcome),
        Verdict::Superseded { latest } => refused(format!("seq {seq} already superseded by {latest}")),
        Verdict::Forgotten => refused(
            "this client_id's session was forgotten (over 10000 more recently active clients); \
             whether the write applied is unknown: use a new client_id"
                .into(),
        ),
    }
}

/// How bytes appear in JSON (the log mirror, the CLI client's output):
/// `{"$bin": "<lowercase hex>"}`.
pub fn bin_json(bytes: &[u8]) -> serde_json::Value {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(2 * bytes.len());
    for &byte in bytes {
        hex.push(DIGITS[usize::from(byte >> 4)].into());
        hex.push(DIGITS[usize::from(byte & 0xf)].into());
    }
    serde_json::json!({ "$bin": hex })
}

/// The mirror's JSON for an entry (CONTRACT.md "On disk"): compact, keys in
/// the order op, key, expect, value, command, client_id, seq, then
/// `"dup":true` for a `duplicate` the state machine skipped. An undecodable
/// payload still gets one deterministic line, so replicas' mirrors stay
/// byte-identical.
pub fn command_json(payload: &Payload, duplicate: bool) -> String {
    match payload {
        Payload::Noop => r#"{"op":"noop"}"#.to_owned(),
        Payload::Command(bytes) => match LoggedCommand::decode(bytes) {
            Ok(logged) => logged.to_json(duplicate),
            Err(_) => format!(r#"{{"op":"undecodable","raw":{}}}"#, bin_json(bytes)),
        },
        Payload::Membership(membership) => {
            // The node's context is the members' JSON; anything else shows as bytes.
            let members = serde_json::from_slice::<serde_json::Value>(&membership.context)
                .unwrap_or_else(|_| bin_json(&membership.context));
            let ids = |set: &std::collections::BTreeSet<u64>| serde_json::to_string(set).expect("a list of numbers");
            let cluster = match membership.cluster {
                0 => String::new(),
                named => format!(r#","cluster":"{named:016x}""#),
            };
            format!(
                r#"{{"op":"config","voters":{},"learners":{},"promote":{},"members":{members}{cluster}}}"#,
                ids(&membership.voters),
                ids(&membership.learners),
                ids(&membership.promote)
            )
        }
    }
}

/// Short constructors for tests of this module and of `protocol`.
#[cfg(test)]
pub(crate) mod test_values {
    use super::Value;

    pub fn s(text: &str) -> Value {
        Value::Str(text.into())
    }

    pub fn b(bytes: &[u8]) -> Value {
        Value::Bin(bytes.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::test_values::{b, s};
    use super::*;
    use crate::kv::sessions::MAX_SESSIONS;

    fn payload(command: Command, client_id: Option<&str>, seq: Option<u64>) -> Payload {
        let logged = LoggedCommand { command, client_id: client_id.map(str::to_owned), seq };
        Payload::Command(logged.encode().into())
    }

    fn plain(command: Command) -> Payload {
        payload(command, None, None)
    }

    fn put(key: Value, value: Value) -> Command {
        Command::Put { key, value }
    }

    /// The outcome of applying `payload`.
    fn apply(kv: &mut KvStore, index: Index, payload: &Payload) -> Option<Outcome> {
        kv.apply(index, payload).map(|applied| applied.outcome)
    }

    fn refusal(outcome: Option<Outcome>) -> String {
        match outcome {
            Some(Outcome::Refused { reason }) => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn logged_command_roundtrips() {
        for logged in [
            LoggedCommand { command: put(s("k"), b(&[0, 255])), client_id: None, seq: None },
            LoggedCommand {
                command: Command::Cas { key: b(b"k"), expect: None, value: s("v") },
                client_id: Some("c".into()),
                seq: Some(u64::MAX),
            },
            LoggedCommand { command: Command::Propose { command: "x".into() }, client_id: None, seq: None },
        ] {
            assert_eq!(LoggedCommand::decode(&logged.encode()), Ok(logged));
        }
        assert!(LoggedCommand::decode(&[0xc1]).unwrap_err().starts_with("undecodable command: "));
    }

    #[test]
    fn noop_has_no_reply() {
        assert_eq!(KvStore::new().apply(1, &Payload::Noop), None);
    }

    #[test]
    fn put_then_get_keeps_the_value_type() {
        let mut kv = KvStore::new();
        assert_eq!(apply(&mut kv, 3, &plain(put(s("a"), s("1")))), Some(Outcome::Put { index: 3 }));
        assert_eq!(apply(&mut kv, 4, &plain(put(s("b"), b(b"\x00\x01")))), Some(Outcome::Put { index: 4 }));
        assert_eq!(kv.get(&s("a")), Some(&s("1")));
        assert_eq!(kv.get(&s("b")), Some(&b(b"\x00\x01")));
        assert_eq!(kv.get(&s("c")), None);
        assert_eq!(kv.len(), 2);
        assert!(!kv.is_empty());
    }

    #[test]
    fn str_and_bin_keys_with_equal_bytes_are_the_same_key() {
        let mut kv = KvStore::new();
        apply(&mut kv, 1, &plain(put(s("a"), s("1"))));
        assert_eq!(kv.get(&b(b"a")), Some(&s("1")));
        apply(&mut kv, 2, &plain(put(b(b"a"), b(b"2"))));
        assert_eq!(kv.get(&s("a")), Some(&b(b"2")));
        assert_eq!(kv.len(), 1);
    }

    #[test]
    fn delete_reports_whether_the_key_existed() {
        let mut kv = KvStore::new();
        apply(&mut kv, 1, &plain(put(s("a"), s("1"))));
        let delete = plain(Command::Delete { key: s("a") });
        assert_eq!(apply(&mut kv, 2, &delete), Some(Outcome::Delete { index: 2, existed: true }));
        assert_eq!(apply(&mut kv, 3, &delete), Some(Outcome::Delete { index: 3, existed: false }));
        assert!(kv.is_empty());
    }

    #[test]
    fn cas_swaps_only_on_match() {
        let mut kv = KvStore::new();
        let cas = |expect: Option<Value>, value: &str| plain(Command::Cas { key: s("a"), expect, value: s(value) });
        // Absent key: expect nil matches.
        assert_eq!(apply(&mut kv, 1, &cas(None, "1")), Some(Outcome::Cas { index: 1, swapped: true, value: None }));
        // Present key: expect nil fails and shows the current value.
        assert_eq!(
            apply(&mut kv, 2, &cas(None, "2")),
            Some(Outcome::Cas { index: 2, swapped: false, value: Some(s("1")) })
        );
        assert_eq!(
            apply(&mut kv, 3, &cas(Some(s("9")), "2")),
            Some(Outcome::Cas { index: 3, swapped: false, value: Some(s("1")) })
        );
        // Equal bytes match even if the types differ.
        assert_eq!(
            apply(&mut kv, 4, &cas(Some(b(b"1")), "2")),
            Some(Outcome::Cas { index: 4, swapped: true, value: None })
        );
        assert_eq!(kv.get(&s("a")), Some(&s("2")));
        // Expecting a value of an absent key fails with nil.
        let other = plain(Command::Cas { key: s("z"), expect: Some(s("1")), value: s("2") });
        assert_eq!(apply(&mut kv, 5, &other), Some(Outcome::Cas { index: 5, swapped: false, value: None }));
        assert_eq!(kv.get(&s("z")), None);
    }

    #[test]
    fn propose_only_takes_a_slot() {
        let mut kv = KvStore::new();
        let reply = apply(&mut kv, 8, &plain(Command::Propose { command: "x".into() }));
        assert_eq!(reply, Some(Outcome::Propose { index: 8 }));
        assert!(kv.is_empty());
    }

    #[test]
    fn retry_returns_the_first_reply_with_the_original_index() {
        let mut kv = KvStore::new();
        let first = payload(Command::Delete { key: s("a") }, Some("c1"), Some(1));
        apply(&mut kv, 1, &plain(put(s("a"), s("1"))));
        assert_eq!(apply(&mut kv, 2, &first), Some(Outcome::Delete { index: 2, existed: true }));
        apply(&mut kv, 3, &plain(put(s("a"), s("again"))));
        // The retry is not executed: the key stays, the reply is the first one.
        assert_eq!(apply(&mut kv, 4, &first), Some(Outcome::Delete { index: 2, existed: true }));
        assert_eq!(kv.get(&s("a")), Some(&s("again")));
    }

    #[test]
    fn stale_seq_is_refused() {
        let mut kv = KvStore::new();
        apply(&mut kv, 1, &payload(put(s("a"), s("1")), Some("c1"), Some(5)));
        let stale = apply(&mut kv, 2, &payload(put(s("a"), s("0")), Some("c1"), Some(4)));
        assert_eq!(refusal(stale), "seq 4 already superseded by 5");
        assert_eq!(kv.get(&s("a")), Some(&s("1")));
        // A later seq executes; seqs may skip.
        assert_eq!(
            apply(&mut kv, 3, &payload(put(s("a"), s("2")), Some("c1"), Some(9))),
            Some(Outcome::Put { index: 3 })
        );
        assert_eq!(kv.get(&s("a")), Some(&s("2")));
    }

    #[test]
    fn clients_have_independent_sessions() {
        let mut kv = KvStore::new();
        apply(&mut kv, 1, &payload(put(s("a"), s("1")), Some("c1"), Some(7)));
        assert_eq!(
            apply(&mut kv, 2, &payload(put(s("a"), s("2")), Some("c2"), Some(7))),
            Some(Outcome::Put { index: 2 })
        );
        // c2's session advanced to 7, so its seq 1 is stale; c1's retry of 7
        // still gets c1's own first reply.
        let stale = apply(&mut kv, 3, &payload(put(s("b"), s("3")), Some("c2"), Some(1)));
        assert_eq!(refusal(stale), "seq 1 already superseded by 7");
        assert_eq!(
            apply(&mut kv, 4, &payload(put(s("a"), s("1")), Some("c1"), Some(7))),
            Some(Outcome::Put { index: 1 })
        );
        assert_eq!(kv.get(&s("a")), Some(&s("2")));
    }

    #[test]
    fn half_sessions_are_refused() {
        let mut kv = KvStore::new();
        let reply = apply(&mut kv, 1, &payload(put(s("a"), s("1")), Some("c1"), None));
        assert_eq!(refusal(reply), "client_id given without seq");
        let reply = apply(&mut kv, 2, &payload(put(s("a"), s("1")), None, Some(1)));
        assert_eq!(refusal(reply), "seq given without client_id");
        assert!(kv.is_empty());
    }

    #[test]
    fn undecodable_payload_is_a_bad_request() {
        let mut kv = KvStore::new();
        let reply = apply(&mut kv, 6, &Payload::Command(vec![0xc1, 0x00].into()));
        assert!(refusal(reply).starts_with("entry 6: undecodable command: "));
        assert_eq!(kv, KvStore::new());
    }

    #[test]
    fn same_log_gives_same_store() {
        let log = [
            plain(put(s("a"), s("1"))),
            payload(put(b(b"b"), b(b"\xff")), Some("c"), Some(1)),
            Payload::Noop,
            payload(Command::Cas { key: s("a"), expect: Some(s("1")), value: s("2") }, Some("c"), Some(2)),
            payload(Command::Delete { key: s("b") }, Some("d"), Some(1)),
            payload(Command::Delete { key: s("b") }, Some("d"), Some(1)),
            Payload::Command(b"junk".to_vec().into()),
        ];
        let (mut one, mut two) = (KvStore::new(), KvStore::new());
        for (i, entry) in log.iter().enumerate() {
            let index = i as Index + 1;
            assert_eq!(one.apply(index, entry), two.apply(index, entry));
        }
        assert_eq!(one, two);
        assert_eq!(one.get(&s("a")), Some(&s("2")));
    }

    #[test]
    fn command_json_exact_strings() {
        let cases = [
            (Payload::Noop, r#"{"op":"noop"}"#),
            (plain(put(s("a"), s("1"))), r#"{"op":"put","key":"a","value":"1"}"#),
            (plain(put(s("q\"\n"), b(&[0x00, 0xab, 0xff]))), r#"{"op":"put","key":"q\"\n","value":{"$bin":"00abff"}}"#),
            (
                plain(Command::Cas { key: s("a"), expect: None, value: s("2") }),
                r#"{"op":"cas","key":"a","expect":null,"value":"2"}"#,
            ),
            (
                payload(Command::Cas { key: b(b""), expect: Some(s("1")), value: s("2") }, Some("c1"), Some(4)),
                r#"{"op":"cas","key":{"$bin":""},"expect":"1","value":"2","client_id":"c1","seq":4}"#,
            ),
            (plain(Command::Propose { command: "x".into() }), r#"{"op":"propose","command":"x"}"#),
            (
                payload(Command::Delete { key: s("a") }, Some("c1"), Some(3)),
                r#"{"op":"delete","key":"a","client_id":"c1","seq":3}"#,
            ),
            (Payload::Command(vec![0xc1, 0x0f].into()), r#"{"op":"undecodable","raw":{"$bin":"c10f"}}"#),
        ];
        for (payload, json) in cases {
            assert_eq!(command_json(&payload, false), json);
        }
    }

    #[test]
    fn duplicates_are_flagged_and_change_nothing() {
        let mut kv = KvStore::new();
        let write = payload(put(s("a"), s("1")), Some("c"), Some(2));
        assert_eq!(kv.apply(1, &write), Some(Applied { outcome: Outcome::Put { index: 1 }, duplicate: false }));
        kv.apply(2, &plain(put(s("a"), s("2"))));
        assert_eq!(kv.apply(3, &write), Some(Applied { outcome: Outcome::Put { index: 1 }, duplicate: true }));
        let older = kv.apply(4, &payload(put(s("a"), s("0")), Some("c"), Some(1))).unwrap();
        assert!(older.duplicate);
        assert_eq!(kv.get(&s("a")), Some(&s("2")));
        assert_eq!(
            command_json(&write, true),
            r#"{"op":"put","key":"a","value":"1","client_id":"c","seq":2,"dup":true}"#
        );
    }

    #[test]
    fn a_forgotten_session_is_refused_never_applied_twice() {
        let mut kv = KvStore::new();
        let write = payload(put(s("k"), s("first")), Some("old"), Some(1));
        kv.apply(1, &write);
        for i in 0..MAX_SESSIONS as Index {
            kv.apply(i + 2, &payload(put(s("other"), s("x")), Some(&format!("c{i}")), Some(1)));
        }
        kv.apply(20_000, &plain(put(s("k"), s("second"))));
        let retry = kv.apply(20_001, &write).unwrap();
        assert!(retry.duplicate);
        assert!(refusal(Some(retry.outcome)).contains("forgotten"));
        assert_eq!(kv.get(&s("k")), Some(&s("second")));
        assert_eq!(kv.sessions().len(), MAX_SESSIONS);
    }

    #[test]
    fn a_restored_snapshot_holds_the_same_data_and_sessions() {
        let mut kv = KvStore::new();
        apply(&mut kv, 1, &payload(put(s("a"), b(b"\x00\xff")), Some("c1"), Some(4)));
        apply(&mut kv, 2, &plain(put(b(b"k"), s("v"))));
        let mut restored = KvStore::new();
        let image = kv.image();
        restored.restore(&image.encode()).unwrap();
        assert_eq!(restored, kv);
        assert!(matches!(restored.sessions().check("c1", 4), Verdict::Retry(_)));
        apply(&mut kv, 3, &plain(put(s("later"), s("x"))));
        assert_eq!(image.len(), 2, "an image does not follow later writes");
        assert!(restored.restore(b"junk").unwrap_err().contains("unreadable"));
    }
}
