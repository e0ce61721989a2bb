//! The `raft-zmq client` subcommand, built on [`crate::client`].

use std::path::PathBuf;

use crate::keys::{CurveIdentity, PublicKey};
use crate::kv::{Command, Value, bin_json};
use crate::net::security::ClientCurve;
use crate::wire::protocol::Request;

/// The CURVE flags of every subcommand that talks to a node.
#[derive(Debug, clap::Args)]
pub struct CurveArgs {
    /// The node's CURVE public key: Z85 text or a .pub file (default: the
    /// node's public_key in the config, if it has keys).
    #[arg(long, value_name = "KEY")]
    pub server_key: Option<String>,
    /// This client's secret key file, from `raft-zmq keygen NAME` (default:
    /// a new key pair for this run, which a cluster with client_keys refuses).
    #[arg(long, value_name = "NAME.key")]
    pub key: Option<PathBuf>,
}

impl CurveArgs {
    /// Reads the keys the flags name. `config_has_keys`: whether the nodes
    /// talk CURVE without a --server-key (their keys are in the config).
    pub fn load(&self, config_has_keys: bool) -> Result<ClientKeys, String> {
        let server_key = self.server_key.as_deref().map(PublicKey::from_text_or_file).transpose()?;
        let identity = match (&self.key, server_key.is_some() || config_has_keys) {
            (Some(path), true) => Some(CurveIdentity::load(path)?),
            (Some(_), false) => return Err("--key needs --server-key, or a config whose nodes have public keys".into()),
            (None, true) => Some(CurveIdentity::generate().map_err(|e| format!("cannot generate a key pair: {e}"))?),
            (None, false) => None,
        };
        Ok(ClientKeys { identity, server_key })
    }
}

/// A client tool's keys: plaintext, or CURVE with one key pair for every node.
pub struct ClientKeys {
    identity: Option<CurveIdentity>,
    server_key: Option<PublicKey>,
}

impl ClientKeys {
    /// How to reach a node whose configured public key is `configured`:
    /// CURVE towards --server-key if given, else towards `configured`.
    pub fn towards(&self, configured: Option<PublicKey>) -> Option<ClientCurve> {
        let server = self.server_key.or(configured)?;
        Some(ClientCurve { identity: self.identity.clone()?, server })
    }
}

/// Renders a MessagePack reply as one line of JSON for people and scripts
/// (bin values as `{"$bin": "<hex>"}`, as in the log mirror).
pub fn reply_to_json(frame: &[u8]) -> String {
    match rmpv::decode::read_value(&mut &frame[..]) {
        Ok(value) => to_json(&value).to_string(),
        Err(e) => format!("{{\"undecodable_reply\":\"{e}\"}}"),
    }
}

fn to_json(value: &rmpv::Value) -> serde_json::Value {
    use rmpv::Value as M;
    use serde_json::Value as J;
    match value {
        M::Nil => J::Null,
        M::Boolean(b) => J::Bool(*b),
        M::Integer(i) => i.as_u64().map(J::from).or_else(|| i.as_i64().map(J::from)).unwrap_or(J::Null),
        M::F32(f) => J::from(*f as f64),
        M::F64(f) => J::from(*f),
        M::String(s) => {
            J::String(s.as_str().map_or_else(|| String::from_utf8_lossy(s.as_bytes()).into(), String::from))
        }
        M::Binary(b) => bin_json(b),
        M::Array(items) => J::Array(items.iter().map(to_json).collect()),
        M::Map(pairs) => J::Object(
            pairs.iter().map(|(k, v)| (k.as_str().map_or_else(|| k.to_string(), String::from), to_json(v))).collect(),
        ),
        M::Ext(_, bytes) => serde_json::json!({ "$ext": bytes.len() }),
    }
}

/// A node to add: the arguments of `client add-node` and `member add`.
#[derive(Debug, clap::Args)]
pub struct NewMember {
    id: u64,
    raft: String,
    client: String,
    #[arg(long)]
    learner: bool,
    /// Its CURVE public key, Z85 text or a .pub file (required when the
    /// cluster uses CURVE).
    #[arg(long, value_name = "KEY")]
    public_key: Option<String>,
}

/// The operations of `raft-zmq client`.
#[derive(Debug, clap::Subcommand)]
pub enum Op {
    /// Set KEY to VALUE.
    Put {
        #[arg(allow_hyphen_values = true)]
        key: String,
        #[arg(allow_hyphen_values = true)]
        value: String,
    },
    /// Read KEY (linearizable).
    Get {
        #[arg(allow_hyphen_values = true)]
        key: String,
    },
    /// Remove KEY.
    Delete {
        #[arg(allow_hyphen_values = true)]
        key: String,
    },
    /// Set KEY to VALUE if its current value is --expect (without it: if KEY is absent).
    Cas {
        #[arg(allow_hyphen_values = true)]
        key: String,
        #[arg(allow_hyphen_values = true)]
        value: String,
        #[arg(long, allow_hyphen_values = true)]
        expect: Option<String>,
    },
    /// Append an opaque command to the log.
    Propose {
        #[arg(allow_hyphen_values = true)]
        command: String,
    },
    /// Show the node's role, term, leader and indexes.
    Status,
    /// Show committed log entries.
    #[command(alias = "show-log")]
    Log {
        #[arg(long, default_value_t = 1)]
        from: u64,
        #[arg(long, default_value_t = 100)]
        limit: u64,
    },
    /// Snapshot the node's state machine now.
    Snapshot,
    /// List the members: id, endpoints, voter or learner (and, asked of the
    /// leader, how far each has replicated and when it was last heard from).
    Members,
    /// Add node ID, reachable at RAFT and CLIENT; it joins as a learner and
    /// is promoted to voter once caught up (never, with --learner). Start it
    /// with `raft-zmq --node-id ID --join` and a config listing it.
    AddNode(NewMember),
    /// Remove node ID (removing the leader hands leadership over first).
    /// Its id can never be used again.
    RemoveNode { id: u64 },
    /// Make learner ID a voter (once it has caught up; else `busy`).
    PromoteNode { id: u64 },
    /// Hand leadership to node --to (default: the most up-to-date voter).
    TransferLeader {
        #[arg(long)]
        to: Option<u64>,
    },
}

impl Op {
    pub fn into_request(self, client_id: Option<String>, seq: Option<u64>) -> Request {
        let write = |command| Request::Write { command, client_id, seq };
        match self {
            Op::Put { key, value } => write(Command::Put { key: Value::Str(key), value: Value::Str(value) }),
            Op::Get { key } => Request::Get { key: Value::Str(key) },
            Op::Delete { key } => write(Command::Delete { key: Value::Str(key) }),
            Op::Cas { key, value, expect } => {
                write(Command::Cas { key: Value::Str(key), expect: expect.map(Value::Str), value: Value::Str(value) })
            }
            Op::Propose { command } => write(Command::Propose { command }),
            Op::Status => Request::Status,
            Op::Log { from, limit } => Request::Log { from, limit },
            Op::Snapshot => Request::Snapshot,
            Op::Members => Request::Members,
            Op::AddNode(NewMember { id, raft, client, learner, public_key }) => {
                // A .pub file becomes its text; anything else goes as given,
                // for the node to judge.
                let public_key = public_key.map(|k| PublicKey::from_text_or_file(&k).map_or(k, |key| key.to_string()));
                Request::AddNode { member: crate::config::Member { id, raft, client, public_key }, voter: !learner }
            }
            Op::RemoveNode { id } => Request::RemoveNode { id },
            Op::PromoteNode { id } => Request::PromoteNode { id },
            Op::TransferLeader { to } => Request::TransferLeader { to },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(server_key: Option<String>, key: Option<PathBuf>) -> CurveArgs {
        CurveArgs { server_key, key }
    }

    #[test]
    fn curve_flags_choose_the_server_key_and_the_client_key_pair() {
        let configured = CurveIdentity::generate().unwrap().public();
        assert!(flags(None, None).load(false).unwrap().towards(None).is_none(), "no keys anywhere: plaintext");
        let ephemeral = flags(None, None).load(true).unwrap().towards(Some(configured)).unwrap();
        assert_eq!(ephemeral.server, configured, "the config's key by default");

        let given = CurveIdentity::generate().unwrap().public();
        let explicit = flags(Some(given.to_string()), None).load(false).unwrap();
        assert_eq!(explicit.towards(Some(configured)).unwrap().server, given, "--server-key wins");

        let dir = tempfile::tempdir().unwrap();
        let mine = CurveIdentity::write_new(&dir.path().join("me")).unwrap();
        let keyed = flags(None, Some(dir.path().join("me.key"))).load(true).unwrap();
        assert_eq!(keyed.towards(Some(configured)).unwrap().identity.public(), mine.public());
        let Err(error) = flags(None, Some(dir.path().join("me.key"))).load(false) else { panic!("--key alone") };
        assert_eq!(error, "--key needs --server-key, or a config whose nodes have public keys");
    }
}
