//! The client wire protocol (CONTRACT.md "Client protocol"): one frame, one
//! MessagePack map with string keys, each way.
//!
//! Frames are decoded into a generic `rmpv::ValueRef` (borrowing the
//! frame's strings and bytes) and picked apart by hand, not through serde
//! derive, so that every malformed request gets a `bad_request` naming the
//! exact field and problem.

use rmpv::ValueRef;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;

use crate::config::Member;
use crate::kv::{self, Command, Field, Outcome, Value};
use crate::raft::{Index, NodeId, Term};

/// Default and maximum number of entries one `log` request returns; the cap
/// bounds the size of a reply.
pub const LOG_LIMIT_DEFAULT: u64 = 100;
pub const LOG_LIMIT_MAX: u64 = 1000;

/// Our maps nest at most four levels (a `log` reply); rmpv counts about two
/// units per level, and a tighter bound than its default of 1024 stops
/// deeply nested junk early.
const MAX_DEPTH: usize = 16;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// `put`, `delete`, `cas` or `propose`, with its optional session.
    Write {
        command: Command,
        client_id: Option<String>,
        seq: Option<u64>,
    },
    Get {
        key: Value,
    },
    Status,
    /// Committed entries from index `from`, at most `limit` of them.
    Log {
        from: Index,
        limit: u64,
    },
    /// Snapshot the state machine of the node asked, now.
    Snapshot,
    /// A piece of the file of the node's snapshot at `index` (default: its
    /// newest), from byte `offset`: what `raft-zmq snapshot save` reads.
    SnapshotData {
        index: Option<Index>,
        offset: u64,
    },
    /// The members as this node knows them.
    Members,
    /// A new member, which joins as a learner (promoted once caught up when
    /// `voter`).
    AddNode {
        member: Member,
        voter: bool,
    },
    RemoveNode {
        id: NodeId,
    },
    /// A learner becomes a voter (etcd's `member promote`); only once it has
    /// caught up, else `busy`.
    PromoteNode {
        id: NodeId,
    },
    /// Hand leadership to `to`, or to the most up-to-date voter.
    TransferLeader {
        to: Option<NodeId>,
    },
}

impl Request {
    /// Every op's wire name.
    pub const OPS: [&'static str; 14] = [
        "put",
        "delete",
        "cas",
        "propose",
        "get",
        "status",
        "log",
        "snapshot",
        "snapshot_data",
        "members",
        "add_node",
        "remove_node",
        "promote_node",
        "transfer_leader",
    ];

    /// The ops only admin keys may run (CONTRACT.md "Authorization").
    pub const ADMIN_OPS: [&'static str; 6] =
        ["add_node", "remove_node", "promote_node", "transfer_leader", "snapshot", "snapshot_data"];

    /// Whether any node serves it from its own state; every other op needs
    /// the leader, and a follower forwards it there.
    pub fn is_local(&self) -> bool {
        matches!(
            self,
            Request::Status | Request::Members | Request::Log { .. } | Request::Snapshot | Request::SnapshotData { .. }
        )
    }

    /// The wire name of the operation.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Write { command, .. } => command.op(),
            Request::Get { .. } => "get",
            Request::Status => "status",
            Request::Log { .. } => "log",
            Request::Snapshot => "snapshot",
            Request::SnapshotData { .. } => "snapshot_data",
            Request::Members => "members",
            Request::AddNode { .. } => "add_node",
            Request::RemoveNode { .. } => "remove_node",
            Request::PromoteNode { .. } => "promote_node",
            Request::TransferLeader { .. } => "transfer_leader",
        }
    }
}

/// One member in the `members` reply; the leader adds how far each other
/// member's log matches its own and when it last heard from it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub id: NodeId,
    pub raft: String,
    pub client: String,
    /// "voter" or "learner".
    pub role: String,
    pub match_index: Option<Index>,
    pub last_contact_ms: Option<u64>,
    /// Its CURVE public key (Z85), when the cluster uses CURVE: how tools
    /// reach a member added at run time.
    pub public_key: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    NoLeader,
    Timeout,
    BadRequest,
    TooLarge,
    ShuttingDown,
    /// Overloaded: the request was not taken, nothing was applied; retry later.
    Busy,
    /// The client's key may not run this op; nothing was applied.
    Forbidden,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 7] = [
        ErrorCode::NoLeader,
        ErrorCode::Timeout,
        ErrorCode::BadRequest,
        ErrorCode::TooLarge,
        ErrorCode::ShuttingDown,
        ErrorCode::Busy,
        ErrorCode::Forbidden,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NoLeader => "no_leader",
            ErrorCode::Timeout => "timeout",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Busy => "busy",
            ErrorCode::Forbidden => "forbidden",
        }
    }

    pub fn from_wire(name: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|code| code.as_str() == name)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `status` reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    pub id: NodeId,
    /// "leader", "follower" or "candidate".
    pub role: String,
    pub term: Term,
    pub leader: Option<NodeId>,
    pub commit_index: Index,
    pub last_applied: Index,
    pub last_log_index: Index,
    /// Voters.
    pub members: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// The oldest entry still in the log, and the last index covered by the
    /// latest snapshot (0: none).
    pub first_log_index: Index,
    pub snapshot_index: Index,
    /// Conditions an operator must act on, e.g. "nospace" (as etcd's alarms).
    pub alarms: Vec<String>,
    /// Our extensions, for `raft-zmq status` and the web view: whom this
    /// node voted for in its term; how long ago it last heard from its
    /// leader (on the leader: from a majority of voters; none when it knows
    /// no leader); the bytes its state dir takes; and the cluster's name
    /// as 16 hex digits (none while this node does not know it).
    pub vote: Option<NodeId>,
    pub leader_contact_ms: Option<u64>,
    pub state_bytes: u64,
    pub cluster_id: Option<String>,
}

#[cfg(test)]
impl StatusInfo {
    /// Node `id`, a follower of a healthy 3-node cluster that node 0 leads.
    pub(crate) fn sample(id: NodeId) -> StatusInfo {
        StatusInfo {
            id,
            role: "follower".into(),
            term: 3,
            leader: Some(0),
            commit_index: 10,
            last_applied: 10,
            last_log_index: 10,
            members: vec![0, 1, 2],
            learners: vec![],
            first_log_index: 1,
            snapshot_index: 0,
            alarms: vec![],
            vote: Some(0),
            leader_contact_ms: Some(40),
            state_bytes: 2048,
            cluster_id: Some("00000000c0ffee00".into()),
        }
    }
}

/// One entry of a `log` reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntryView {
    pub index: Index,
    pub term: Term,
    /// The entry as the mirror shows it ([`kv::command_json`]).
    pub command: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Put {
        index: Index,
    },
    Delete {
        index: Index,
        existed: bool,
    },
    /// `value` is the current value when not swapped (`None`: absent).
    Cas {
        index: Index,
        swapped: bool,
        value: Option<Value>,
    },
    Propose {
        index: Index,
    },
    /// `add_node` and `remove_node`: the index of the membership entry.
    Membership {
        index: Index,
    },
    Members {
        members: Vec<MemberInfo>,
    },
    /// The new leader, once it has taken over.
    TransferLeader {
        leader: NodeId,
    },
    Get {
        value: Option<Value>,
    },
    Status(Box<StatusInfo>),
    Log {
        entries: Vec<LogEntryView>,
    },
    /// The applied index the node's newest snapshot was taken at.
    Snapshot {
        index: Index,
    },
    /// Bytes `offset..offset + data.len()` of the `total` bytes of the
    /// snapshot file at `index`/`term`.
    SnapshotData {
        index: Index,
        term: Term,
        total: u64,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// `leader` is the leader this node knows of, so a client can go there.
    Error {
        code: ErrorCode,
        message: String,
        leader: Option<NodeId>,
    },
}

impl Reply {
    pub fn error(code: ErrorCode, message: impl Into<String>, leader: Option<NodeId>) -> Reply {
        Reply::Error { code, message: message.into(), leader }
    }

    /// The answer to a write that took its place in the log.
    pub fn of_write(outcome: Outcome) -> Reply {
        match outcome {
            Outcome::Put { index } => Reply::Put { index },
            Outcome::Delete { index, existed } => Reply::Delete { index, existed },
            Outcome::Cas { index, swapped, value } => Reply::Cas { index, swapped, value },
            Outcome::Propose { index } => Reply::Propose { index },
            Outcome::Refused { reason } => Reply::error(ErrorCode::BadRequest, reason, None),
        }
    }

    /// "ok", or the error code's wire name.
    pub fn code(&self) -> &'static str {
        match self {
            Reply::Error { code, .. } => code.as_str(),
            _ => "ok",
        }
    }

    /// [`Reply::code`] of an encoded reply, without decoding the rest of it
    /// ("bad_reply" when it is not one).
    pub fn code_of(frame: &[u8]) -> &'static str {
        let Ok(mut fields) = Fields::parse(frame) else { return "bad_reply" };
        match fields.required("ok", to_bool) {
            Ok(true) => "ok",
            Ok(false) => fields.required("error", to_error_code).map_or("bad_reply", ErrorCode::as_str),
            Err(_) => "bad_reply",
        }
    }

    /// One MessagePack map with string keys, `ok` first. Absent values
    /// (and an unknown leader) are nil.
    pub fn encode(&self) -> Vec<u8> {
        let ok = !matches!(self, Reply::Error { .. });
        let mut map = Vec::with_capacity(20);
        map.push(("ok", ValueRef::Boolean(ok)));
        match self {
            Reply::Put { index }
            | Reply::Propose { index }
            | Reply::Snapshot { index }
            | Reply::Membership { index } => map.push(("index", (*index).into())),
            Reply::TransferLeader { leader } => map.push(("leader", (*leader).into())),
            Reply::Members { members } => {
                let members = members.iter().map(|m| {
                    let mut fields = vec![
                        ("id", m.id.into()),
                        ("raft", m.raft.as_str().into()),
                        ("client", m.client.as_str().into()),
                        ("role", m.role.as_str().into()),
                    ];
                    fields.extend(m.match_index.map(|i| ("match_index", i.into())));
                    fields.extend(m.last_contact_ms.map(|ms| ("last_contact_ms", ms.into())));
                    fields.extend(m.public_key.as_deref().map(|key| ("public_key", key.into())));
                    to_map(fields)
                });
                map.push(("members", ValueRef::Array(members.collect())));
            }
            Reply::SnapshotData { index, term, total, offset, data } => map.extend([
                ("index", (*index).into()),
                ("term", (*term).into()),
                ("total", (*total).into()),
                ("offset", (*offset).into()),
                ("data", ValueRef::Binary(data)),
            ]),
            Reply::Delete { index, existed } => {
                map.push(("index", (*index).into()));
                map.push(("existed", ValueRef::Boolean(*existed)));
            }
            Reply::Cas { index, swapped, value } => {
                map.push(("index", (*index).into()));
                map.push(("swapped", ValueRef::Boolean(*swapped)));
                map.push(("value", value_or_nil(value.as_ref())));
            }
            Reply::Get { value } => map.push(("value", value_or_nil(value.as_ref()))),
            Reply::Status(status) => map.extend([
                ("id", status.id.into()),
                ("role", status.role.as_str().into()),
                ("term", status.term.into()),
                ("leader", uint_or_nil(status.leader)),
                ("commit_index", status.commit_index.into()),
                ("last_applied", status.last_applied.into()),
                ("last_log_index", status.last_log_index.into()),
                ("members", ValueRef::Array(status.members.iter().map(|&m| m.into()).collect())),
                ("learners", ValueRef::Array(status.learners.iter().map(|&m| m.into()).collect())),
                ("first_log_index", status.first_log_index.into()),
                ("snapshot_index", status.snapshot_index.into()),
                ("alarms", ValueRef::Array(status.alarms.iter().map(|a| a.as_str().into()).collect())),
                ("vote", uint_or_nil(status.vote)),
                ("leader_contact_ms", uint_or_nil(status.leader_contact_ms)),
                ("state_bytes", status.state_bytes.into()),
                ("cluster_id", status.cluster_id.as_deref().map_or(ValueRef::Nil, Into::into)),
            ]),
            Reply::Log { entries } => {
                let entries = entries.iter().map(|entry| {
                    to_map(vec![
                        ("index", entry.index.into()),
                        ("term", entry.term.into()),
                        ("command", entry.command.as_str().into()),
                    ])
                });
                map.push(("entries", ValueRef::Array(entries.collect())));
            }
            Reply::Error { code, message, leader } => map.extend([
                ("error", code.as_str().into()),
                ("message", message.as_str().into()),
                ("leader", uint_or_nil(*leader)),
            ]),
        }
        write(&to_map(map))
    }

    /// Decodes the reply to `request`. The request is needed because some
    /// replies look alike on the wire (`put` and `propose` both carry just
    /// `index`).
    pub fn decode(frame: &[u8], request: &Request) -> Result<Reply, String> {
        let mut fields = Fields::parse(frame)?;
        if !fields.required("ok", to_bool)? {
            return Ok(Reply::Error {
                code: fields.required("error", to_error_code)?,
                message: fields.required("message", to_string)?,
                leader: fields.required("leader", nullable(to_u64))?,
            });
        }
        let reply = match request {
            Request::Write { command, .. } => {
                let index = fields.required("index", to_u64)?;
                match command {
                    Command::Put { .. } => Reply::Put { index },
                    Command::Propose { .. } => Reply::Propose { index },
                    Command::Delete { .. } => Reply::Delete { index, existed: fields.required("existed", to_bool)? },
                    Command::Cas { .. } => Reply::Cas {
                        index,
                        swapped: fields.required("swapped", to_bool)?,
                        value: fields.required("value", nullable(to_value))?,
                    },
                }
            }
            Request::Get { .. } => Reply::Get { value: fields.required("value", nullable(to_value))? },
            Request::Status => Reply::Status(Box::new(StatusInfo {
                id: fields.required("id", to_u64)?,
                role: fields.required("role", to_string)?,
                term: fields.required("term", to_u64)?,
                leader: fields.required("leader", nullable(to_u64))?,
                commit_index: fields.required("commit_index", to_u64)?,
                last_applied: fields.required("last_applied", to_u64)?,
                last_log_index: fields.required("last_log_index", to_u64)?,
                members: fields.required("members", list(to_u64))?,
                learners: fields.required("learners", list(to_u64))?,
                first_log_index: fields.required("first_log_index", to_u64)?,
                snapshot_index: fields.required("snapshot_index", to_u64)?,
                alarms: fields.required("alarms", list(to_string))?,
                // Absent from nodes of earlier versions.
                vote: fields.optional("vote", to_u64)?,
                leader_contact_ms: fields.optional("leader_contact_ms", to_u64)?,
                state_bytes: fields.optional("state_bytes", to_u64)?.unwrap_or(0),
                cluster_id: fields.optional("cluster_id", to_string)?,
            })),
            Request::Log { .. } => Reply::Log { entries: fields.required("entries", list(to_log_entry))? },
            Request::Snapshot => Reply::Snapshot { index: fields.required("index", to_u64)? },
            Request::SnapshotData { .. } => Reply::SnapshotData {
                index: fields.required("index", to_u64)?,
                term: fields.required("term", to_u64)?,
                total: fields.required("total", to_u64)?,
                offset: fields.required("offset", to_u64)?,
                data: fields.required("data", to_bin)?,
            },
            Request::AddNode { .. } | Request::RemoveNode { .. } | Request::PromoteNode { .. } => {
                Reply::Membership { index: fields.required("index", to_u64)? }
            }
            Request::TransferLeader { .. } => Reply::TransferLeader { leader: fields.required("leader", to_u64)? },
            Request::Members => Reply::Members { members: fields.required("members", list(to_member_info))? },
        };
        Ok(reply)
    }
}

/// Decodes one request frame; any problem becomes the `bad_request` reply to
/// send back. Fields the op does not use are ignored.
pub fn decode_request(frame: &[u8]) -> Result<Request, Reply> {
    parse_request(frame).map_err(|message| Reply::error(ErrorCode::BadRequest, message, None))
}

/// Whether `frame` asks for an admin op. Nothing else in it is checked:
/// authorization is decided before whatever else is wrong with a request.
pub fn is_admin_request(frame: &[u8]) -> bool {
    let op = Fields::parse(frame).and_then(|mut fields| fields.required("op", to_str));
    op.is_ok_and(|op| Request::ADMIN_OPS.contains(&op))
}

fn parse_request(frame: &[u8]) -> Result<Request, String> {
    let mut fields = Fields::parse(frame)?;
    let op = fields.required("op", to_str)?;
    let command = match op {
        "get" => {
            return Ok(Request::Get { key: fields.required("key", to_value)? });
        }
        "status" => return Ok(Request::Status),
        "snapshot" => return Ok(Request::Snapshot),
        "snapshot_data" => {
            return Ok(Request::SnapshotData {
                index: fields.optional("index", to_u64)?,
                offset: fields.optional("offset", to_u64)?.unwrap_or(0),
            });
        }
        "members" => return Ok(Request::Members),
        "add_node" => {
            let member = Member {
                id: fields.required("id", to_u64)?,
                raft: fields.required("raft", to_string)?,
                client: fields.required("client", to_string)?,
                public_key: fields.optional("public_key", to_public_key)?,
            };
            return Ok(Request::AddNode { member, voter: fields.optional("voter", to_bool)?.unwrap_or(true) });
        }
        "remove_node" => return Ok(Request::RemoveNode { id: fields.required("id", to_u64)? }),
        "promote_node" => return Ok(Request::PromoteNode { id: fields.required("id", to_u64)? }),
        "transfer_leader" => return Ok(Request::TransferLeader { to: fields.optional("to", to_u64)? }),
        "log" => {
            return Ok(Request::Log {
                from: fields.optional("from", to_u64)?.unwrap_or(1),
                limit: fields.optional("limit", to_u64)?.unwrap_or(LOG_LIMIT_DEFAULT).min(LOG_LIMIT_MAX),
            });
        }
        "put" => Command::Put { key: fields.required("key", to_value)?, value: fields.required("value", to_value)? },
        "delete" => Command::Delete { key: fields.required("key", to_value)? },
        // `expect` must be present: nil means "must be absent", and a
        // missing field is more likely a client bug than that.
        "cas" => Command::Cas {
            key: fields.required("key", to_value)?,
            expect: fields.required("expect", nullable(to_value))?,
            value: fields.required("value", to_value)?,
        },
        "propose" => Command::Propose { command: fields.required("command", to_string)? },
        other => return Err(format!("unknown op {other:?}")),
    };
    let client_id = fields.optional("client_id", to_client_id)?;
    let seq = fields.optional("seq", to_u64)?;
    kv::session(client_id.as_deref(), seq)?;
    Ok(Request::Write { command, client_id, seq })
}

/// Encodes a request map, `op` first; the inverse of [`decode_request`].
pub fn encode_request(request: &Request) -> Vec<u8> {
    let map = match request {
        Request::Write { command, client_id, seq } => kv::write_fields(command, client_id.as_deref(), *seq)
            .into_iter()
            .map(|(name, field)| {
                let value = match field {
                    Field::Value(v) => value_or_nil(v),
                    Field::Text(s) => s.into(),
                    Field::Uint(n) => n.into(),
                };
                (name, value)
            })
            .collect(),
        Request::Get { key } => vec![("op", "get".into()), ("key", value_or_nil(Some(key)))],
        Request::Status => vec![("op", "status".into())],
        Request::Snapshot => vec![("op", "snapshot".into())],
        Request::SnapshotData { index, offset } => {
            let mut map = vec![("op", "snapshot_data".into()), ("offset", (*offset).into())];
            map.extend(index.map(|index| ("index", index.into())));
            map
        }
        Request::Log { from, limit } => {
            vec![("op", "log".into()), ("from", (*from).into()), ("limit", (*limit).into())]
        }
        Request::Members => vec![("op", "members".into())],
        Request::AddNode { member, voter } => vec![
            ("op", "add_node".into()),
            ("id", member.id.into()),
            ("raft", member.raft.as_str().into()),
            ("client", member.client.as_str().into()),
            ("voter", ValueRef::Boolean(*voter)),
        ]
        .into_iter()
        .chain(member.public_key.as_deref().map(|key| ("public_key", key.into())))
        .collect(),
        Request::RemoveNode { id } => vec![("op", "remove_node".into()), ("id", (*id).into())],
        Request::PromoteNode { id } => vec![("op", "promote_node".into()), ("id", (*id).into())],
        Request::TransferLeader { to } => {
            let mut map = vec![("op", "transfer_leader".into())];
            map.extend(to.map(|to| ("to", to.into())));
            map
        }
    };
    write(&to_map(map))
}

fn to_map<'a>(pairs: Vec<(&'a str, ValueRef<'a>)>) -> ValueRef<'a> {
    ValueRef::Map(pairs.into_iter().map(|(name, value)| (name.into(), value)).collect())
}

/// Encodes a map, the frame sized up front: a value of up to a MiB is
/// copied into it once, not regrown into it.
fn write(value: &ValueRef<'_>) -> Vec<u8> {
    let bound = encoded_size_bound(value);
    let mut frame = Vec::with_capacity(bound);
    rmpv::encode::write_value_ref(&mut frame, value).expect("writing to a Vec cannot fail");
    debug_assert!(frame.len() <= bound, "{} bytes encoded, {bound} reserved", frame.len());
    frame
}

/// At least the bytes `value` encodes to: a marker and length of at most 9
/// bytes per item, plus its strings' and binaries' bytes.
fn encoded_size_bound(value: &ValueRef<'_>) -> usize {
    9 + match value {
        ValueRef::String(s) => s.as_bytes().len(),
        ValueRef::Binary(b) | ValueRef::Ext(_, b) => b.len(),
        ValueRef::Array(items) => items.iter().map(encoded_size_bound).sum(),
        ValueRef::Map(pairs) => pairs.iter().map(|(k, v)| encoded_size_bound(k) + encoded_size_bound(v)).sum(),
        _ => 0,
    }
}

fn value_or_nil(value: Option<&Value>) -> ValueRef<'_> {
    match value {
        None => ValueRef::Nil,
        Some(Value::Str(s)) => s.as_str().into(),
        Some(Value::Bin(b)) => b.as_slice().into(),
    }
}

fn uint_or_nil<'a>(n: Option<u64>) -> ValueRef<'a> {
    n.map_or(ValueRef::Nil, ValueRef::from)
}

/// A MessagePack map with string keys, consumed field by field; it borrows
/// from the frame, so only the fields taken are copied.
struct Fields<'a>(HashMap<&'a str, ValueRef<'a>>);

impl<'a> Fields<'a> {
    /// Parses a whole frame, which must be exactly one map.
    fn parse(frame: &'a [u8]) -> Result<Fields<'a>, String> {
        if frame.is_empty() {
            return Err("empty frame, expected a MessagePack map".into());
        }
        let mut rest = frame;
        let value = rmpv::decode::read_value_ref_with_max_depth(&mut rest, MAX_DEPTH).map_err(|e| match e {
            rmpv::decode::Error::DepthLimitExceeded => "nested too deeply".to_owned(),
            // Reading from a slice fails only when the slice runs out.
            _ => "not MessagePack: the frame ends in the middle of a value".to_owned(),
        })?;
        let fields = to_fields(value)?;
        if !rest.is_empty() {
            return Err(format!("trailing data after the MessagePack map ({} bytes)", rest.len()));
        }
        Ok(fields)
    }

    /// Takes field `name`, which must be present (nil counts as present).
    fn required<T>(
        &mut self,
        name: &str,
        convert: impl FnOnce(ValueRef<'a>) -> Result<T, String>,
    ) -> Result<T, String> {
        let value = self.0.remove(name).ok_or_else(|| format!("missing field `{name}`"))?;
        convert(value).map_err(|problem| format!("field `{name}` {problem}"))
    }

    /// Takes field `name`; absent and nil both give `None`.
    fn optional<T>(
        &mut self,
        name: &str,
        convert: impl FnOnce(ValueRef<'a>) -> Result<T, String>,
    ) -> Result<Option<T>, String> {
        if self.0.contains_key(name) { self.required(name, nullable(convert)) } else { Ok(None) }
    }
}

fn to_fields(value: ValueRef<'_>) -> Result<Fields<'_>, String> {
    let ValueRef::Map(pairs) = value else {
        return Err(format!("expected a map, got {}", type_name(&value)));
    };
    let mut fields = HashMap::with_capacity(pairs.len());
    for (key, value) in pairs {
        let key = match key {
            ValueRef::String(s) => s.into_str().ok_or("map key is not valid UTF-8")?,
            other => return Err(format!("map keys must be str, got {}", type_name(&other))),
        };
        // Two values for one field would make the request ambiguous.
        if fields.insert(key, value).is_some() {
            return Err(format!("duplicate field `{key}`"));
        }
    }
    Ok(Fields(fields))
}

/// The MessagePack type name, for error messages.
fn type_name(value: &ValueRef<'_>) -> &'static str {
    match value {
        ValueRef::Nil => "nil",
        ValueRef::Boolean(_) => "bool",
        ValueRef::Integer(_) => "integer",
        ValueRef::F32(_) | ValueRef::F64(_) => "float",
        ValueRef::String(_) => "str",
        ValueRef::Binary(_) => "bin",
        ValueRef::Array(_) => "array",
        ValueRef::Map(_) => "map",
        ValueRef::Ext(..) => "ext",
    }
}

fn nullable<'a, T>(
    convert: impl FnOnce(ValueRef<'a>) -> Result<T, String>,
) -> impl FnOnce(ValueRef<'a>) -> Result<Option<T>, String> {
    move |value| {
        if matches!(value, ValueRef::Nil) { Ok(None) } else { convert(value).map(Some) }
    }
}

fn list<'a, T>(
    convert: impl Fn(ValueRef<'a>) -> Result<T, String>,
) -> impl FnOnce(ValueRef<'a>) -> Result<Vec<T>, String> {
    move |value| match value {
        ValueRef::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| convert(item).map_err(|problem| format!("item {i} {problem}")))
            .collect(),
        other => Err(format!("must be an array, got {}", type_name(&other))),
    }
}

fn to_value(value: ValueRef<'_>) -> Result<Value, String> {
    match value {
        ValueRef::String(_) => to_str(value).map(|s| Value::Str(s.to_owned())),
        ValueRef::Binary(b) => Ok(Value::Bin(b.to_vec())),
        other => Err(format!("must be str or bin, got {}", type_name(&other))),
    }
}

fn to_bin(value: ValueRef<'_>) -> Result<Vec<u8>, String> {
    match value {
        ValueRef::Binary(b) => Ok(b.to_vec()),
        other => Err(format!("must be bin, got {}", type_name(&other))),
    }
}

fn to_member_info(value: ValueRef<'_>) -> Result<MemberInfo, String> {
    let mut fields = to_fields(value)?;
    Ok(MemberInfo {
        id: fields.required("id", to_u64)?,
        raft: fields.required("raft", to_string)?,
        client: fields.required("client", to_string)?,
        role: fields.required("role", to_string)?,
        match_index: fields.optional("match_index", to_u64)?,
        last_contact_ms: fields.optional("last_contact_ms", to_u64)?,
        public_key: fields.optional("public_key", to_string)?,
    })
}

/// A str field, still borrowed from the frame.
fn to_str(value: ValueRef<'_>) -> Result<&str, String> {
    match value {
        ValueRef::String(s) => s.into_str().ok_or_else(|| "must be valid UTF-8".into()),
        other => Err(format!("must be str, got {}", type_name(&other))),
    }
}

fn to_string(value: ValueRef<'_>) -> Result<String, String> {
    to_str(value).map(str::to_owned)
}

/// Session ids are kept on every replica: a few bytes (a UUID is 36) do.
pub const MAX_CLIENT_ID_BYTES: usize = 128;

fn to_client_id(value: ValueRef<'_>) -> Result<String, String> {
    let id = to_str(value)?;
    match id.len() {
        len if len > MAX_CLIENT_ID_BYTES => Err(format!("is {len} bytes; at most {MAX_CLIENT_ID_BYTES}")),
        _ => Ok(id.to_owned()),
    }
}

/// A CURVE public key as Z85 text.
fn to_public_key(value: ValueRef<'_>) -> Result<String, String> {
    let text = to_string(value)?;
    crate::keys::PublicKey::parse(&text).map_err(|why| format!("is not a CURVE public key: {why}"))?;
    Ok(text)
}

fn to_u64(value: ValueRef<'_>) -> Result<u64, String> {
    match value {
        ValueRef::Integer(n) => n.as_u64().ok_or_else(|| format!("must be a non-negative integer, got {n}")),
        other => Err(format!("must be a non-negative integer, got {}", type_name(&other))),
    }
}

fn to_bool(value: ValueRef<'_>) -> Result<bool, String> {
    match value {
        ValueRef::Boolean(b) => Ok(b),
        other => Err(format!("must be a bool, got {}", type_name(&other))),
    }
}

fn to_error_code(value: ValueRef<'_>) -> Result<ErrorCode, String> {
    let name = to_str(value)?;
    ErrorCode::from_wire(name).ok_or_else(|| format!("is an unknown error code {name:?}"))
}

fn to_log_entry(value: ValueRef<'_>) -> Result<LogEntryView, String> {
    let mut fields = to_fields(value)?;
    Ok(LogEntryView {
        index: fields.required("index", to_u64)?,
        term: fields.required("term", to_u64)?,
        command: fields.required("command", to_string)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::test_values::{b, s};
    use rmpv::Value as M;

    /// A frame holding a map with the given string keys.
    fn frame(pairs: Vec<(&str, M)>) -> Vec<u8> {
        write(&to_map(pairs.iter().map(|(name, value)| (*name, value.as_ref())).collect()))
    }

    /// The `bad_request` message `frame` must be refused with.
    fn bad(frame: &[u8]) -> String {
        match decode_request(frame) {
            Err(Reply::Error { code: ErrorCode::BadRequest, message, leader: None }) => message,
            other => panic!("expected bad_request, got {other:?}"),
        }
    }

    fn put_with(extra: Vec<(&str, M)>) -> Vec<u8> {
        let mut pairs = vec![("op", "put".into()), ("key", "k".into()), ("value", "v".into())];
        pairs.extend(extra);
        frame(pairs)
    }

    /// The keys of an encoded map, in order.
    fn keys(frame: &[u8]) -> Vec<String> {
        let M::Map(pairs) = rmpv::decode::read_value(&mut &frame[..]).unwrap() else { panic!("not a map") };
        pairs.into_iter().map(|(k, _)| k.as_str().unwrap().to_owned()).collect()
    }

    fn write_request(command: Command, session: Option<(&str, u64)>) -> Request {
        Request::Write { command, client_id: session.map(|(c, _)| c.to_owned()), seq: session.map(|(_, n)| n) }
    }

    fn all_requests() -> Vec<Request> {
        vec![
            write_request(Command::Put { key: s("a"), value: b(b"\x00\xff") }, None),
            write_request(Command::Put { key: b(b"a"), value: s("1") }, Some(("c1", 0))),
            write_request(Command::Delete { key: s("a") }, Some(("c1", u64::MAX))),
            write_request(Command::Cas { key: s("a"), expect: None, value: s("1") }, None),
            write_request(Command::Cas { key: s("a"), expect: Some(b(b"0")), value: s("1") }, Some(("c", 2))),
            write_request(Command::Propose { command: "x".into() }, None),
            Request::Get { key: b(b"\x01") },
            Request::Status,
            Request::Log { from: 5, limit: 7 },
        ]
    }

    #[test]
    fn every_request_roundtrips() {
        for request in all_requests() {
            let encoded = encode_request(&request);
            assert_eq!(keys(&encoded)[0], "op");
            assert_eq!(decode_request(&encoded), Ok(request));
        }
    }

    #[test]
    fn request_op_names() {
        let ops: Vec<&str> = all_requests().iter().map(Request::op).collect();
        assert_eq!(ops, ["put", "put", "delete", "cas", "cas", "propose", "get", "status", "log"]);
        let more = [
            Request::Snapshot,
            Request::SnapshotData { index: None, offset: 0 },
            Request::Members,
            Request::AddNode {
                member: Member { id: 1, raft: "tcp://a:1".into(), client: "tcp://a:2".into(), public_key: None },
                voter: true,
            },
            Request::RemoveNode { id: 1 },
            Request::PromoteNode { id: 1 },
            Request::TransferLeader { to: None },
        ];
        let every: Vec<&str> = all_requests().iter().chain(&more).map(Request::op).collect();
        assert!(Request::OPS.iter().all(|op| every.contains(op)) && every.iter().all(|op| Request::OPS.contains(op)));
    }

    #[test]
    fn write_fields_are_encoded_in_wire_order() {
        let cas = write_request(Command::Cas { key: s("a"), expect: None, value: s("1") }, Some(("c", 1)));
        assert_eq!(keys(&encode_request(&cas)), ["op", "key", "expect", "value", "client_id", "seq"]);
    }

    #[test]
    fn every_reply_roundtrips() {
        let status = StatusInfo {
            id: 1,
            role: "leader".into(),
            term: 4,
            leader: Some(1),
            commit_index: 9,
            last_applied: 8,
            last_log_index: 10,
            members: vec![0, 1, 2],
            learners: vec![],
            first_log_index: 1,
            snapshot_index: 0,
            alarms: vec!["nospace".into()],
            vote: Some(1),
            leader_contact_ms: Some(0),
            state_bytes: 12345,
            cluster_id: None,
        };
        let requests = all_requests();
        let (put, delete, cas, propose, get, status_req, log) =
            (&requests[0], &requests[2], &requests[3], &requests[5], &requests[6], &requests[7], &requests[8]);
        let cases = [
            (put, Reply::Put { index: 3 }),
            (propose, Reply::Propose { index: 3 }),
            (delete, Reply::Delete { index: 4, existed: true }),
            (cas, Reply::Cas { index: 5, swapped: true, value: None }),
            (cas, Reply::Cas { index: 5, swapped: false, value: Some(b(b"\x00")) }),
            (get, Reply::Get { value: Some(s("v")) }),
            (get, Reply::Get { value: Some(b(b"v")) }),
            (get, Reply::Get { value: None }),
            (status_req, Reply::Status(Box::new(status.clone()))),
            (status_req, Reply::Status(Box::new(StatusInfo { leader: None, role: "candidate".into(), ..status }))),
            (
                log,
                Reply::Log {
                    entries: vec![
                        LogEntryView { index: 1, term: 1, command: r#"{"op":"noop"}"#.into() },
                        LogEntryView { index: 2, term: 1, command: r#"{"op":"propose","command":"x"}"#.into() },
                    ],
                },
            ),
            (log, Reply::Log { entries: vec![] }),
            (get, Reply::error(ErrorCode::NoLeader, "no leader", None)),
            (put, Reply::error(ErrorCode::Timeout, "t", Some(2))),
        ];
        for (request, reply) in cases {
            let encoded = reply.encode();
            assert_eq!(keys(&encoded)[0], "ok", "{reply:?}");
            assert_eq!(Reply::decode(&encoded, request), Ok(reply));
        }
    }

    #[test]
    fn error_reply_matches_the_contract_exactly() {
        let reply = Reply::error(ErrorCode::NoLeader, "election in progress", Some(1));
        let expected = frame(vec![
            ("ok", false.into()),
            ("error", "no_leader".into()),
            ("message", "election in progress".into()),
            ("leader", 1u64.into()),
        ]);
        assert_eq!(reply.encode(), expected);
        let unknown_leader = Reply::error(ErrorCode::TooLarge, "big", None).encode();
        let expected = frame(vec![
            ("ok", false.into()),
            ("error", "too_large".into()),
            ("message", "big".into()),
            ("leader", M::Nil),
        ]);
        assert_eq!(unknown_leader, expected);
    }

    #[test]
    fn ok_replies_match_the_contract_exactly() {
        assert_eq!(Reply::Put { index: 7 }.encode(), frame(vec![("ok", true.into()), ("index", 7u64.into())]));
        assert_eq!(
            Reply::Cas { index: 2, swapped: false, value: None }.encode(),
            frame(vec![("ok", true.into()), ("index", 2u64.into()), ("swapped", false.into()), ("value", M::Nil)])
        );
    }

    #[test]
    fn error_codes_have_contract_names() {
        let names: Vec<String> = ErrorCode::ALL.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["no_leader", "timeout", "bad_request", "too_large", "shutting_down", "busy", "forbidden"]);
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_wire(code.as_str()), Some(code));
        }
        assert_eq!(ErrorCode::from_wire("nope"), None);
    }

    #[test]
    fn admin_requests_are_told_apart_before_anything_else_is_checked() {
        let admin = [
            Request::Snapshot,
            Request::SnapshotData { index: None, offset: 0 },
            Request::RemoveNode { id: 3 },
            Request::PromoteNode { id: 3 },
            Request::TransferLeader { to: None },
        ];
        for request in &admin {
            assert!(is_admin_request(&encode_request(request)), "{request:?}");
        }
        assert!(!is_admin_request(&encode_request(&Request::Status)));
        assert!(!is_admin_request(&encode_request(&Request::Members)));
        // Missing or mistyped fields do not make it less an admin request.
        assert!(is_admin_request(&frame(vec![("op", "add_node".into())])));
        assert!(is_admin_request(&frame(vec![("op", "remove_node".into()), ("id", "x".into())])));
        assert!(!is_admin_request(&frame(vec![("op", "put".into())])));
        assert!(!is_admin_request(b"\xc1 not msgpack"));
        let ops: Vec<&str> = Request::ADMIN_OPS.iter().filter(|op| !Request::OPS.contains(op)).copied().collect();
        assert!(ops.is_empty(), "not ops: {ops:?}");
    }

    #[test]
    fn str_and_bin_keep_their_msgpack_types() {
        // 0xa1 = fixstr of length 1; 0xc4 0x01 = bin8 of length 1.
        let str_reply = Reply::Get { value: Some(s("v")) }.encode();
        assert!(str_reply.ends_with(&[0xa1, b'v']));
        let bin_reply = Reply::Get { value: Some(b(b"v")) }.encode();
        assert!(bin_reply.ends_with(&[0xc4, 0x01, b'v']));
        let put = decode_request(&frame(vec![
            ("op", "put".into()),
            ("key", M::Binary(b"k".to_vec())),
            ("value", "v".into()),
        ]));
        let expected = write_request(Command::Put { key: b(b"k"), value: s("v") }, None);
        assert_eq!(put, Ok(expected));
    }

    #[test]
    fn frames_that_are_not_one_map() {
        assert_eq!(bad(&[]), "empty frame, expected a MessagePack map");
        let truncated = "not MessagePack: the frame ends in the middle of a value";
        // A map announcing one pair but holding none, and a cut-off str.
        assert_eq!(bad(&[0x81]), truncated);
        assert_eq!(bad(&[0x81, 0xa2, b'o']), truncated);
        // rmpv reads the reserved marker 0xc1 as nil.
        assert_eq!(bad(&[0xc1]), "expected a map, got nil");
        let mut trailing = frame(vec![("op", "status".into())]);
        trailing.extend([0xc0, 0xc0]);
        assert_eq!(bad(&trailing), "trailing data after the MessagePack map (2 bytes)");
        assert_eq!(bad(&[0x01, 0x02]), "expected a map, got integer");
        assert_eq!(bad(&write(&M::Array(vec![]).as_ref())), "expected a map, got array");
        assert_eq!(bad(&write(&M::from("put").as_ref())), "expected a map, got str");
        let mut deep = M::Nil;
        for _ in 0..100 {
            deep = M::Array(vec![deep]);
        }
        assert_eq!(bad(&frame(vec![("op", "status".into()), ("junk", deep)])), "nested too deeply");
    }

    #[test]
    fn map_keys_must_be_unique_utf8_strings() {
        let int_key = write(&M::Map(vec![(M::from(1), M::from("put"))]).as_ref());
        assert_eq!(bad(&int_key), "map keys must be str, got integer");
        // fixmap(1) { fixstr(1) 0xff : nil }
        assert_eq!(bad(&[0x81, 0xa1, 0xff, 0xc0]), "map key is not valid UTF-8");
        let twice = frame(vec![("op", "get".into()), ("key", "a".into()), ("key", "b".into())]);
        assert_eq!(bad(&twice), "duplicate field `key`");
    }

    #[test]
    fn op_must_be_a_known_string() {
        assert_eq!(bad(&frame(vec![("key", "a".into())])), "missing field `op`");
        assert_eq!(bad(&frame(vec![("op", 3.into())])), "field `op` must be str, got integer");
        assert_eq!(bad(&frame(vec![("op", "frob".into())])), r#"unknown op "frob""#);
    }

    #[test]
    fn missing_and_mistyped_fields() {
        assert_eq!(bad(&frame(vec![("op", "get".into())])), "missing field `key`");
        assert_eq!(bad(&frame(vec![("op", "put".into()), ("key", "k".into())])), "missing field `value`");
        assert_eq!(
            bad(&frame(vec![("op", "put".into()), ("key", "k".into()), ("value", 1.into())])),
            "field `value` must be str or bin, got integer"
        );
        assert_eq!(
            bad(&frame(vec![("op", "delete".into()), ("key", M::Nil)])),
            "field `key` must be str or bin, got nil"
        );
        // fixmap(2) { "op": "get", "key": fixstr(1) 0xff }
        let invalid_utf8 = [0x82, 0xa2, b'o', b'p', 0xa3, b'g', b'e', b't', 0xa3, b'k', b'e', b'y', 0xa1, 0xff];
        assert_eq!(bad(&invalid_utf8), "field `key` must be valid UTF-8");
        assert_eq!(
            bad(&frame(vec![("op", "propose".into()), ("command", M::Binary(vec![1]))])),
            "field `command` must be str, got bin"
        );
    }

    #[test]
    fn cas_requires_expect_but_accepts_nil() {
        let without = frame(vec![("op", "cas".into()), ("key", "k".into()), ("value", "v".into())]);
        assert_eq!(bad(&without), "missing field `expect`");
        let with_nil =
            frame(vec![("op", "cas".into()), ("key", "k".into()), ("expect", M::Nil), ("value", "v".into())]);
        let expected = write_request(Command::Cas { key: s("k"), expect: None, value: s("v") }, None);
        assert_eq!(decode_request(&with_nil), Ok(expected));
        let wrong =
            frame(vec![("op", "cas".into()), ("key", "k".into()), ("expect", true.into()), ("value", "v".into())]);
        assert_eq!(bad(&wrong), "field `expect` must be str or bin, got bool");
    }

    #[test]
    fn session_fields() {
        assert_eq!(
            bad(&put_with(vec![("client_id", "c".into()), ("seq", (-1).into())])),
            "field `seq` must be a non-negative integer, got -1"
        );
        assert_eq!(
            bad(&put_with(vec![("client_id", "c".into()), ("seq", M::F64(1.0))])),
            "field `seq` must be a non-negative integer, got float"
        );
        assert_eq!(
            bad(&put_with(vec![("client_id", 5.into()), ("seq", 1.into())])),
            "field `client_id` must be str, got integer"
        );
        let long = "c".repeat(MAX_CLIENT_ID_BYTES + 1);
        assert_eq!(
            bad(&put_with(vec![("client_id", long.as_str().into()), ("seq", 1.into())])),
            "field `client_id` is 129 bytes; at most 128"
        );
        let longest = "c".repeat(MAX_CLIENT_ID_BYTES);
        assert!(decode_request(&put_with(vec![("client_id", longest.as_str().into()), ("seq", 1.into())])).is_ok());
        assert_eq!(bad(&put_with(vec![("seq", 1.into())])), "seq given without client_id");
        assert_eq!(bad(&put_with(vec![("client_id", "c".into())])), "client_id given without seq");
        // Nil is the same as absent, as many client libraries send it.
        let nil_session = put_with(vec![("client_id", M::Nil), ("seq", M::Nil)]);
        let expected = write_request(Command::Put { key: s("k"), value: s("v") }, None);
        assert_eq!(decode_request(&nil_session), Ok(expected));
    }

    #[test]
    fn log_defaults_bounds_and_types() {
        let log = |extra: Vec<(&str, M)>| {
            let mut pairs = vec![("op", "log".into())];
            pairs.extend(extra);
            frame(pairs)
        };
        assert_eq!(decode_request(&log(vec![])), Ok(Request::Log { from: 1, limit: LOG_LIMIT_DEFAULT }));
        assert_eq!(
            decode_request(&log(vec![("from", 3.into()), ("limit", 5000.into())])),
            Ok(Request::Log { from: 3, limit: LOG_LIMIT_MAX })
        );
        assert_eq!(bad(&log(vec![("from", (-2).into())])), "field `from` must be a non-negative integer, got -2");
        assert_eq!(bad(&log(vec![("limit", "10".into())])), "field `limit` must be a non-negative integer, got str");
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let status = frame(vec![("op", "status".into()), ("verbose", true.into()), ("key", 1.into())]);
        assert_eq!(decode_request(&status), Ok(Request::Status));
        // A session on a read is not part of its op, so it is ignored too.
        let get = frame(vec![("op", "get".into()), ("key", "k".into()), ("seq", 1.into())]);
        assert_eq!(decode_request(&get), Ok(Request::Get { key: s("k") }));
    }

    #[test]
    fn malformed_replies_are_named() {
        let get = Request::Get { key: s("k") };
        let decode = |pairs: Vec<(&str, M)>| Reply::decode(&frame(pairs), &get).unwrap_err();
        assert_eq!(decode(vec![]), "missing field `ok`");
        assert_eq!(decode(vec![("ok", true.into())]), "missing field `value`");
        assert_eq!(
            decode(vec![("ok", false.into()), ("error", "oops".into())]),
            r#"field `error` is an unknown error code "oops""#
        );
        let log = Request::Log { from: 1, limit: 1 };
        let entries = M::Array(vec![M::Map(vec![("index".into(), 1.into()), ("term".into(), "x".into())])]);
        let bad_entry = frame(vec![("ok", true.into()), ("entries", entries)]);
        assert_eq!(
            Reply::decode(&bad_entry, &log).unwrap_err(),
            "field `entries` item 0 field `term` must be a non-negative integer, got str"
        );
    }
}
