//! `config.json`: the initial membership and the timing knobs (CONTRACT.md
//! "config.json").
//!
//! Everything is validated up front so that a typo stops the process at
//! start-up with one line naming the file and the problem, instead of
//! surfacing later as a cluster that never elects a leader.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::keys::PublicKey;
use crate::raft::NodeId;

/// Frames beyond this size may be dropped unread (CONTRACT.md `too_large`),
/// so a larger limit could never be honoured.
pub const MAX_REQUEST_BYTES_LIMIT: usize = 64 * 1024 * 1024;

/// One entry of `nodes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub id: NodeId,
    /// Endpoint peers use for Raft traffic.
    pub raft: String,
    /// Endpoint external clients use.
    pub client: String,
    /// Its CURVE public key (Z85), when the cluster uses CURVE: the config
    /// gives the first members', `add_node` those of nodes added later, and
    /// the membership carries them to every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
}

/// One entry of `nodes` as written: a [`Member`] and its CURVE key. The key
/// is not part of the membership a node records, so that adding keys to a
/// running cluster's config takes effect.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMember {
    id: NodeId,
    raft: String,
    client: String,
    #[serde(default)]
    public_key: Option<String>,
    #[serde(default)]
    http: Option<String>,
    #[serde(default)]
    raft_listen: Option<String>,
    #[serde(default)]
    client_listen: Option<String>,
}

/// What a node binds instead of the endpoints it advertises (`raft_listen`,
/// `client_listen`), e.g. `tcp://0.0.0.0:7000` in a container whose
/// advertised name is not a local address. Like `http`, not part of the
/// membership: each node reads its own from the file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listen {
    pub raft: Option<String>,
    pub client: Option<String>,
}

/// CURVE settings: present when every node has a `public_key`.
#[derive(Clone, Debug)]
pub struct CurveConfig {
    pub node_keys: BTreeMap<NodeId, PublicKey>,
    /// The clients a client endpoint lets in besides the nodes; `None`: any
    /// CURVE client.
    pub client_keys: Option<Vec<PublicKey>>,
    /// The clients that may run admin ops (and use the client endpoint);
    /// `None`: any client when `client_keys` is `None` too, else none.
    pub admin_keys: Option<Vec<PublicKey>>,
}

/// A validated `config.json`.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it came from, so that later errors can name it.
    pub path: PathBuf,
    pub nodes: Vec<Member>,
    /// Randomised election timeout range `[min, max)`.
    pub election_timeout_ms: (u64, u64),
    pub heartbeat_ms: u64,
    pub max_request_bytes: usize,
    /// Our extension: how long a client write or read may wait for commit
    /// before it is answered with `timeout`.
    pub request_timeout_ms: u64,
    /// Already resolved against the config file's folder.
    pub state_dir: PathBuf,
    /// Already resolved against the config file's folder.
    pub logs_dir: PathBuf,
    /// Our extension: free space the state dir's file system must keep. Below
    /// it the node raises the `nospace` alarm and stops taking new entries
    /// until space returns (see `node::disk`).
    pub disk_reserve_bytes: u64,
    /// A node snapshots its state machine once this many entries were
    /// applied since its last snapshot (CONTRACT.md).
    pub snapshot_entries: u64,
    /// Our extension: `logs/<id>.txt` starts a new file every
    /// `snapshot_entries` entries and keeps this many older ones.
    pub log_mirror_files: usize,
    /// Our extension: AppendEntries a leader keeps in flight to each
    /// follower (1: the next only once the last is answered).
    pub max_appends_in_flight: usize,
    /// Where node N finds its secret key `N.key`; already resolved against
    /// the config file's folder.
    pub keys_dir: PathBuf,
    /// `None`: no keys, plaintext.
    pub curve: Option<CurveConfig>,
    /// Where each node that has one serves HTTP (`HOST:PORT`): metrics,
    /// health, status and the web view. Not part of the membership: each
    /// node reads its own from the file.
    pub http: BTreeMap<NodeId, String>,
    /// The nodes that bind other endpoints than they advertise.
    pub listen: BTreeMap<NodeId, Listen>,
}

/// Why a config could not be used. Displays as one line, `<path>: <problem>`,
/// which is what the process prints before exiting with status 2.
#[derive(Debug)]
pub struct ConfigError {
    path: PathBuf,
    problem: String,
}

impl ConfigError {
    fn new(path: &Path, problem: impl Into<String>) -> ConfigError {
        ConfigError { path: path.to_path_buf(), problem: problem.into() }
    }

    /// The problem without the path.
    pub fn problem(&self) -> &str {
        &self.problem
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.problem)
    }
}

impl std::error::Error for ConfigError {}

/// The file as written. `nodes` has no default: a node must not guess its
/// cluster.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    nodes: Vec<RawMember>,
    #[serde(default = "defaults::election_timeout_ms")]
    election_timeout_ms: (u64, u64),
    #[serde(default = "defaults::heartbeat_ms")]
    heartbeat_ms: u64,
    #[serde(default = "defaults::max_request_bytes")]
    max_request_bytes: usize,
    #[serde(default = "defaults::request_timeout_ms")]
    request_timeout_ms: u64,
    #[serde(default = "defaults::state_dir")]
    state_dir: PathBuf,
    #[serde(default = "defaults::logs_dir")]
    logs_dir: PathBuf,
    disk_reserve_bytes: Option<u64>,
    #[serde(default = "defaults::snapshot_entries")]
    snapshot_entries: u64,
    #[serde(default = "defaults::log_mirror_files")]
    log_mirror_files: usize,
    #[serde(default = "defaults::max_appends_in_flight")]
    max_appends_in_flight: usize,
    #[serde(default = "defaults::keys_dir")]
    keys_dir: PathBuf,
    #[serde(default)]
    client_keys: Option<Vec<String>>,
    #[serde(default)]
    admin_keys: Option<Vec<String>>,
}

mod defaults {
    use std::path::PathBuf;

    pub fn election_timeout_ms() -> (u64, u64) {
        (300, 600)
    }
    pub fn heartbeat_ms() -> u64 {
        50
    }
    pub fn max_request_bytes() -> usize {
        1024 * 1024
    }
    pub fn request_timeout_ms() -> u64 {
        5000
    }
    pub fn snapshot_entries() -> u64 {
        10_000
    }
    pub fn log_mirror_files() -> usize {
        10
    }
    /// One: on one machine, where this project measures, a second append
    /// out costs more CPU than it saves waiting (docs/running.md).
    pub fn max_appends_in_flight() -> usize {
        1
    }
    pub fn state_dir() -> PathBuf {
        PathBuf::from("state")
    }
    pub fn logs_dir() -> PathBuf {
        PathBuf::from("logs")
    }
    pub fn keys_dir() -> PathBuf {
        PathBuf::from("keys")
    }
}

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::new(path, format!("cannot read: {e}")))?;
        let raw: RawConfig = serde_json::from_str(&text).map_err(|e| {
            let problem = if e.is_data() { e.to_string() } else { format!("invalid JSON: {e}") };
            ConfigError::new(path, problem)
        })?;
        validate(&raw).map_err(|problem| ConfigError::new(path, problem))?;
        let curve = curve_config(&raw).map_err(|problem| ConfigError::new(path, problem))?;
        let folder = path.parent().unwrap_or(Path::new(""));
        let http = raw.nodes.iter().filter_map(|n| Some((n.id, n.http.clone()?))).collect();
        let listen = raw
            .nodes
            .iter()
            .map(|n| (n.id, Listen { raft: n.raft_listen.clone(), client: n.client_listen.clone() }))
            .filter(|(_, listen)| *listen != Listen::default())
            .collect();
        Ok(Config {
            path: path.to_path_buf(),
            nodes: raw
                .nodes
                .into_iter()
                .map(|n| Member { id: n.id, raft: n.raft, client: n.client, public_key: n.public_key })
                .collect(),
            election_timeout_ms: raw.election_timeout_ms,
            heartbeat_ms: raw.heartbeat_ms,
            max_request_bytes: raw.max_request_bytes,
            request_timeout_ms: raw.request_timeout_ms,
            snapshot_entries: raw.snapshot_entries,
            log_mirror_files: raw.log_mirror_files,
            max_appends_in_flight: raw.max_appends_in_flight,
            // `join` keeps an absolute path as it is.
            state_dir: folder.join(raw.state_dir),
            logs_dir: folder.join(raw.logs_dir),
            // Room for a few of the largest appends besides sled's own overhead.
            disk_reserve_bytes: raw.disk_reserve_bytes.unwrap_or((32 << 20).max(4 * raw.max_request_bytes as u64)),
            keys_dir: folder.join(raw.keys_dir),
            curve,
            http,
            listen,
        })
    }

    /// What node `id` binds instead of its advertised endpoints, if anything.
    pub fn listen_of(&self, id: NodeId) -> Listen {
        self.listen.get(&id).cloned().unwrap_or_default()
    }

    pub fn member(&self, id: NodeId) -> Option<&Member> {
        self.nodes.iter().find(|m| m.id == id)
    }

    /// Like [`Config::member`], but a missing id is a config error, because
    /// `--node-id` must name a listed node.
    pub fn require_member(&self, id: NodeId) -> Result<&Member, ConfigError> {
        self.member(id).ok_or_else(|| {
            let ids: Vec<String> = self.nodes.iter().map(|m| m.id.to_string()).collect();
            ConfigError::new(&self.path, format!("node id {id} is not in nodes (ids: {})", ids.join(", ")))
        })
    }

    /// `state/<id>/`: the node's database folder.
    pub fn node_state_dir(&self, id: NodeId) -> PathBuf {
        self.state_dir.join(id.to_string())
    }

    /// `logs/<id>.txt`: the human-readable mirror of the committed log.
    pub fn node_log_path(&self, id: NodeId) -> PathBuf {
        self.logs_dir.join(format!("{id}.txt"))
    }

    /// `keys/<id>.key`: the node's CURVE secret key.
    pub fn node_key_path(&self, id: NodeId) -> PathBuf {
        self.keys_dir.join(format!("{id}.key"))
    }

    /// Node `id`'s CURVE public key, if the config has keys.
    pub fn node_key(&self, id: NodeId) -> Option<PublicKey> {
        self.curve.as_ref()?.node_keys.get(&id).copied()
    }
}

fn validate(raw: &RawConfig) -> Result<(), String> {
    if raw.nodes.is_empty() {
        return Err("nodes is empty".into());
    }
    let mut ids = HashSet::new();
    let mut addresses = Addresses::default();
    for member in &raw.nodes {
        if !ids.insert(member.id) {
            return Err(format!("duplicate node id {}", member.id));
        }
        let endpoints = [
            ("raft", Some(&member.raft)),
            ("client", Some(&member.client)),
            ("raft_listen", member.raft_listen.as_ref()),
            ("client_listen", member.client_listen.as_ref()),
        ];
        for (field, endpoint) in endpoints {
            let Some(endpoint) = endpoint else { continue };
            let checked = if field.ends_with("_listen") {
                check_listen_endpoint(endpoint).map(|_| ())
            } else {
                check_endpoint(endpoint)
            };
            checked.map_err(|why| format!("node {} {field} endpoint {endpoint:?}: {why}", member.id))?;
            addresses.claim(member.id, field.trim_end_matches("_listen"), field, endpoint)?;
        }
        if let Some(http) = &member.http {
            check_http(http).map_err(|why| format!("node {} http {http:?}: {why}", member.id))?;
            addresses.claim(member.id, "http", "http", http)?;
        }
    }
    let (min, max) = raw.election_timeout_ms;
    if min == 0 {
        return Err("election_timeout_ms minimum must be > 0".into());
    }
    if min >= max {
        return Err(format!("election_timeout_ms [{min}, {max}]: minimum must be < maximum"));
    }
    if raw.heartbeat_ms == 0 {
        return Err("heartbeat_ms must be > 0".into());
    }
    // A peer of 0.2.0 takes one request at a time, and a link keeps only
    // the newest request queued behind the one out: a third append would
    // replace the second, and the follower would refuse the ones after it.
    if !(1..=2).contains(&raw.max_appends_in_flight) {
        return Err(format!("max_appends_in_flight {} must be 1 or 2", raw.max_appends_in_flight));
    }
    // Followers would time out between heartbeats and depose a healthy leader.
    if raw.heartbeat_ms >= min {
        return Err(format!("heartbeat_ms {} must be < election_timeout_ms minimum {min}", raw.heartbeat_ms));
    }
    if raw.max_request_bytes == 0 || raw.max_request_bytes > MAX_REQUEST_BYTES_LIMIT {
        return Err(format!(
            "max_request_bytes {} must be between 1 and {MAX_REQUEST_BYTES_LIMIT}",
            raw.max_request_bytes
        ));
    }
    if raw.request_timeout_ms == 0 {
        return Err("request_timeout_ms must be > 0".into());
    }
    if raw.snapshot_entries == 0 {
        return Err("snapshot_entries must be > 0".into());
    }
    Ok(())
}

/// The keys, checked: valid Z85, on every node or on none, no two nodes
/// sharing one, and `client_keys` / `admin_keys` only with node keys.
fn curve_config(raw: &RawConfig) -> Result<Option<CurveConfig>, String> {
    let mut node_keys = BTreeMap::new();
    for node in &raw.nodes {
        let Some(text) = &node.public_key else { continue };
        let key = PublicKey::parse(text).map_err(|why| format!("node {} public_key {text:?}: {why}", node.id))?;
        if let Some((other, _)) = node_keys.iter().find(|(_, k)| **k == key) {
            return Err(format!("nodes {other} and {} have the same public_key", node.id));
        }
        node_keys.insert(node.id, key);
    }
    let Some(&keyed) = node_keys.keys().next() else {
        return match (&raw.client_keys, &raw.admin_keys) {
            (Some(_), _) => Err("client_keys needs a public_key on every node".into()),
            (_, Some(_)) => Err("admin_keys needs a public_key on every node".into()),
            (None, None) => Ok(None),
        };
    };
    if let Some(node) = raw.nodes.iter().find(|n| n.public_key.is_none()) {
        return Err(format!(
            "node {} has no public_key but node {keyed} has one: give every node a public_key, or none",
            node.id
        ));
    }
    let client_keys = key_list("client_keys", &raw.client_keys)?;
    let admin_keys = key_list("admin_keys", &raw.admin_keys)?;
    if let Some(key) = admin_keys.iter().flatten().find(|key| node_keys.values().any(|k| k == *key)) {
        return Err(format!("admin_keys lists node key {key}: a key belongs to one node or client only"));
    }
    Ok(Some(CurveConfig { node_keys, client_keys, admin_keys }))
}

/// The keys of the list `name`, each valid Z85.
fn key_list(name: &str, keys: &Option<Vec<String>>) -> Result<Option<Vec<PublicKey>>, String> {
    let parse =
        |(i, text): (usize, &String)| PublicKey::parse(text).map_err(|why| format!("{name}[{i}] {text:?}: {why}"));
    keys.as_ref().map(|keys| keys.iter().enumerate().map(parse).collect()).transpose()
}

/// Which node's socket each address belongs to, so that no two sockets
/// claim one: two cannot bind it, and a peer or client that reached the
/// wrong one would misread every message.
#[derive(Default)]
struct Addresses {
    /// By (`Some(node)` for a wildcard, `None` for any other host, HOST:PORT):
    /// the node and socket (`raft`, `client` or `http`) it belongs to.
    owners: HashMap<(Option<NodeId>, String), (NodeId, &'static str)>,
}

impl Addresses {
    /// Claims `endpoint` (`tcp://HOST:PORT` or HOST:PORT, already checked)
    /// for node `node`'s socket `socket`, written as its key `field`. The
    /// same socket may claim an address twice (`raft_listen` equal to
    /// `raft`). A wildcard is an address of the node's own host, so nodes
    /// on separate hosts (containers, pods) may each bind the same one.
    fn claim(&mut self, node: NodeId, socket: &'static str, field: &str, endpoint: &str) -> Result<(), String> {
        let address = endpoint.strip_prefix("tcp://").unwrap_or(endpoint);
        let (host, port) = address.rsplit_once(':').expect("checked: HOST:PORT");
        let key = if is_wildcard(host) { (Some(node), format!("*:{port}")) } else { (None, address.to_string()) };
        match self.owners.entry(key) {
            Entry::Vacant(free) => {
                free.insert((node, socket));
                Ok(())
            }
            Entry::Occupied(owner) if *owner.get() == (node, socket) => Ok(()),
            Entry::Occupied(_) => Err(format!("duplicate endpoint {endpoint:?} (node {node} {field})")),
        }
    }
}

/// Accepts `tcp://host:port` with a non-empty host that is not a wildcard
/// (peers and clients connect to it) and a port in 1..=65535 (port 0 would
/// bind a random port that peers cannot know). The host may be a DNS name:
/// ZeroMQ resolves it on every connect. `add_node` checks the endpoints of
/// a new member with it too.
pub fn check_endpoint(endpoint: &str) -> Result<(), &'static str> {
    let host = check_listen_endpoint(endpoint)?;
    if is_wildcard(host) {
        return Err("a wildcard address cannot be connected to: advertise an address or name that peers and \
                    clients reach, and bind the wildcard with raft_listen / client_listen");
    }
    Ok(())
}

/// Accepts what a node may bind (`raft_listen`, `client_listen`): like
/// [`check_endpoint`], and a wildcard (`tcp://0.0.0.0:7000`, `tcp://*:7000`)
/// too. Returns the host.
pub fn check_listen_endpoint(endpoint: &str) -> Result<&str, &'static str> {
    let rest = endpoint.strip_prefix("tcp://").ok_or("must start with tcp://")?;
    check_host_port(rest).map_err(|why| if why == NO_PORT { "must be tcp://host:port" } else { why })
}

/// An address that stands for every interface of the host: what a node
/// binds, never what others connect to.
fn is_wildcard(host: &str) -> bool {
    matches!(host, "*" | "0.0.0.0" | "[::]" | "[*]")
}

/// An `http` address: `HOST:PORT`, as a TCP listener takes it (no scheme:
/// it is not a ZeroMQ endpoint).
fn check_http(address: &str) -> Result<(), &'static str> {
    if address.contains("://") {
        return Err("must be host:port without a scheme, e.g. 127.0.0.1:7200");
    }
    check_host_port(address)
        .map(|_| ())
        .map_err(|why| if why == NO_PORT { "must be host:port, e.g. 127.0.0.1:7200" } else { why })
}

const NO_PORT: &str = "no port";

/// Checks `HOST:PORT` and returns the host.
fn check_host_port(address: &str) -> Result<&str, &'static str> {
    let (host, port) = address.rsplit_once(':').ok_or(NO_PORT)?;
    if host.is_empty() {
        return Err("host is empty");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 && port.bytes().all(|b| b.is_ascii_digit()) => Ok(host),
        _ => Err("port must be a number in 1..=65535"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODES: &str = r#""nodes": [
        {"id": 0, "raft": "tcp://127.0.0.1:7000", "client": "tcp://127.0.0.1:7100"},
        {"id": 1, "raft": "tcp://127.0.0.1:7001", "client": "tcp://127.0.0.1:7101"},
        {"id": 2, "raft": "tcp://127.0.0.1:7002", "client": "tcp://127.0.0.1:7102"}
    ]"#;

    /// Writes `text` as `config.json` in a fresh folder and loads it.
    fn load(text: &str) -> (tempfile::TempDir, Result<Config, ConfigError>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, text).unwrap();
        let result = Config::load(&path);
        (dir, result)
    }

    /// Loads `{NODES, extra}` and returns the problem it must report.
    fn problem_with(extra: &str) -> String {
        let (_dir, result) = load(&format!("{{{NODES}{extra}}}"));
        result.expect_err("config should be rejected").problem().to_string()
    }

    fn problem_with_nodes(nodes: &str) -> String {
        let (_dir, result) = load(&format!(r#"{{"nodes": [{nodes}]}}"#));
        result.expect_err("config should be rejected").problem().to_string()
    }

    #[test]
    fn defaults_apply_and_dirs_resolve_against_config_folder() {
        let (dir, result) = load(&format!("{{{NODES}}}"));
        let config = result.unwrap();
        assert_eq!(config.path, dir.path().join("config.json"));
        assert_eq!(config.nodes.len(), 3);
        assert_eq!(config.nodes[1].client, "tcp://127.0.0.1:7101");
        assert_eq!(config.election_timeout_ms, (300, 600));
        assert_eq!(config.heartbeat_ms, 50);
        assert_eq!(config.max_request_bytes, 1_048_576);
        assert_eq!(config.request_timeout_ms, 5000);
        assert_eq!(config.node_state_dir(2), dir.path().join("state").join("2"));
        assert_eq!(config.node_log_path(2), dir.path().join("logs").join("2.txt"));
    }

    #[test]
    fn explicit_values_are_used() {
        let (dir, result) = load(&format!(
            r#"{{{NODES}, "election_timeout_ms": [100, 200], "heartbeat_ms": 20,
                "max_request_bytes": 4096, "request_timeout_ms": 750,
                "state_dir": "/var/lib/raft", "logs_dir": "out/logs"}}"#
        ));
        let config = result.unwrap();
        assert_eq!(config.election_timeout_ms, (100, 200));
        assert_eq!(config.heartbeat_ms, 20);
        assert_eq!(config.max_request_bytes, 4096);
        assert_eq!(config.request_timeout_ms, 750);
        assert_eq!(config.state_dir, PathBuf::from("/var/lib/raft"));
        assert_eq!(config.logs_dir, dir.path().join("out/logs"));
    }

    #[test]
    fn member_lookup() {
        let (_dir, result) = load(&format!("{{{NODES}}}"));
        let config = result.unwrap();
        assert_eq!(config.member(1).unwrap().raft, "tcp://127.0.0.1:7001");
        assert!(config.member(7).is_none());
        assert_eq!(config.require_member(2).unwrap().id, 2);
        let err = config.require_member(7).unwrap_err();
        assert_eq!(err.problem(), "node id 7 is not in nodes (ids: 0, 1, 2)");
        assert_eq!(err.to_string(), format!("{}: node id 7 is not in nodes (ids: 0, 1, 2)", config.path.display()));
    }

    #[test]
    fn unreadable_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.json");
        let err = Config::load(&path).unwrap_err();
        assert!(err.problem().starts_with("cannot read: "), "{err}");
        assert!(err.to_string().starts_with(&format!("{}: ", path.display())));
    }

    #[test]
    fn bad_json_names_line_and_column() {
        let (_dir, result) = load("{\n  \"nodes\": [,]\n}");
        let err = result.unwrap_err();
        assert!(err.problem().starts_with("invalid JSON: "), "{err}");
        assert!(err.problem().contains("line 2 column"), "{err}");
        assert_eq!(err.to_string().lines().count(), 1);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        assert!(problem_with(r#", "heartbeat": 10"#).contains("unknown field `heartbeat`"));
        let nested = problem_with_nodes(r#"{"id": 0, "raft": "tcp://a:1", "client": "tcp://a:2", "port": 3}"#);
        assert!(nested.contains("unknown field `port`"), "{nested}");
    }

    #[test]
    fn wrong_types_and_missing_nodes() {
        assert!(problem_with(r#", "heartbeat_ms": "50""#).contains("invalid type"));
        assert!(problem_with(r#", "election_timeout_ms": [300]"#).contains("invalid length"));
        assert!(problem_with(r#", "heartbeat_ms": -1"#).contains("invalid value"));
        let (_dir, result) = load(r#"{"heartbeat_ms": 50}"#);
        assert!(result.unwrap_err().problem().contains("missing field `nodes`"));
    }

    #[test]
    fn empty_nodes() {
        assert_eq!(problem_with_nodes(""), "nodes is empty");
    }

    #[test]
    fn duplicate_id() {
        let problem = problem_with_nodes(
            r#"{"id": 4, "raft": "tcp://a:1", "client": "tcp://a:2"},
               {"id": 4, "raft": "tcp://a:3", "client": "tcp://a:4"}"#,
        );
        assert_eq!(problem, "duplicate node id 4");
    }

    #[test]
    fn duplicate_endpoint_across_raft_and_client() {
        let problem = problem_with_nodes(
            r#"{"id": 0, "raft": "tcp://a:1", "client": "tcp://a:2"},
               {"id": 1, "raft": "tcp://a:2", "client": "tcp://a:3"}"#,
        );
        assert_eq!(problem, r#"duplicate endpoint "tcp://a:2" (node 1 raft)"#);
        let same_node = problem_with_nodes(r#"{"id": 0, "raft": "tcp://a:1", "client": "tcp://a:1"}"#);
        assert_eq!(same_node, r#"duplicate endpoint "tcp://a:1" (node 0 client)"#);
    }

    #[test]
    fn malformed_endpoints() {
        for (endpoint, why) in [
            ("ipc:///tmp/x", "must start with tcp://"),
            ("127.0.0.1:7000", "must start with tcp://"),
            ("tcp://localhost", "must be tcp://host:port"),
            ("tcp://:7000", "host is empty"),
            ("tcp://a:http", "port must be a number in 1..=65535"),
            ("tcp://a:0", "port must be a number in 1..=65535"),
            ("tcp://a:70000", "port must be a number in 1..=65535"),
            ("tcp://a:+80", "port must be a number in 1..=65535"),
        ] {
            let problem = problem_with_nodes(&format!(r#"{{"id": 3, "raft": "tcp://a:1", "client": "{endpoint}"}}"#));
            assert_eq!(problem, format!("node 3 client endpoint {endpoint:?}: {why}"));
        }
        assert!(check_endpoint("tcp://[::1]:7000").is_ok());
    }

    #[test]
    fn advertised_endpoints_may_be_names_but_not_wildcards() {
        let (_dir, result) = load(
            r#"{"nodes": [{"id": 0, "raft": "tcp://raft-0.raft.default.svc.cluster.local:7000",
                           "client": "tcp://node0:7100"}]}"#,
        );
        assert_eq!(result.unwrap().nodes[0].raft, "tcp://raft-0.raft.default.svc.cluster.local:7000");
        for host in ["0.0.0.0", "*", "[::]"] {
            let endpoint = format!("tcp://{host}:7000");
            let problem = problem_with_nodes(&format!(r#"{{"id": 3, "raft": "{endpoint}", "client": "tcp://a:2"}}"#));
            assert_eq!(
                problem,
                format!(
                    "node 3 raft endpoint {endpoint:?}: a wildcard address cannot be connected to: advertise an \
                     address or name that peers and clients reach, and bind the wildcard with raft_listen / \
                     client_listen"
                )
            );
        }
    }

    #[test]
    fn listen_endpoints_are_what_a_node_binds() {
        let (_dir, result) = load(
            r#"{"nodes": [
                {"id": 0, "raft": "tcp://node0:7000", "client": "tcp://node0:7100",
                 "raft_listen": "tcp://0.0.0.0:7000", "client_listen": "tcp://*:7100"},
                {"id": 1, "raft": "tcp://node1:7000", "client": "tcp://node1:7100", "raft_listen": "tcp://10.0.0.2:7000"},
                {"id": 2, "raft": "tcp://node2:7000", "client": "tcp://node2:7100"}]}"#,
        );
        let config = result.unwrap();
        let listen = |raft: Option<&str>, client: Option<&str>| Listen {
            raft: raft.map(String::from),
            client: client.map(String::from),
        };
        assert_eq!(config.listen_of(0), listen(Some("tcp://0.0.0.0:7000"), Some("tcp://*:7100")));
        assert_eq!(config.listen_of(1), listen(Some("tcp://10.0.0.2:7000"), None));
        assert_eq!(config.listen_of(2), Listen::default(), "binds what it advertises");
        assert_eq!(config.member(0).unwrap().raft, "tcp://node0:7000", "the membership has the advertised one");

        for (endpoint, why) in [
            ("0.0.0.0:7000", "must start with tcp://"),
            ("tcp://0.0.0.0", "must be tcp://host:port"),
            ("tcp://*:0", "port must be a number in 1..=65535"),
        ] {
            let problem = problem_with_nodes(&format!(
                r#"{{"id": 3, "raft": "tcp://a:1", "client": "tcp://a:2", "client_listen": "{endpoint}"}}"#
            ));
            assert_eq!(problem, format!("node 3 client_listen endpoint {endpoint:?}: {why}"));
        }
    }

    #[test]
    fn a_wildcard_may_be_bound_by_every_node_but_by_one_socket_of_each() {
        // Every container or pod binds the same wildcard ports.
        let nodes: Vec<String> = (0..3)
            .map(|id| {
                format!(
                    r#"{{"id": {id}, "raft": "tcp://node{id}:7000", "client": "tcp://node{id}:7100",
                        "raft_listen": "tcp://0.0.0.0:7000", "client_listen": "tcp://0.0.0.0:7100",
                        "http": "0.0.0.0:7200"}}"#
                )
            })
            .collect();
        let (_dir, result) = load(&format!(r#"{{"nodes": [{}]}}"#, nodes.join(", ")));
        assert_eq!(result.unwrap().listen.len(), 3);

        let one_node = |listen: &str| {
            problem_with_nodes(&format!(r#"{{"id": 0, "raft": "tcp://a:1", "client": "tcp://a:2", {listen}}}"#))
        };
        assert_eq!(
            one_node(r#""raft_listen": "tcp://*:7000", "client_listen": "tcp://0.0.0.0:7000""#),
            r#"duplicate endpoint "tcp://0.0.0.0:7000" (node 0 client_listen)"#
        );
        assert_eq!(
            one_node(r#""raft_listen": "tcp://0.0.0.0:7200", "http": "0.0.0.0:7200""#),
            r#"duplicate endpoint "0.0.0.0:7200" (node 0 http)"#
        );
        assert_eq!(one_node(r#""raft_listen": "tcp://a:2""#), r#"duplicate endpoint "tcp://a:2" (node 0 raft_listen)"#);
        assert_eq!(one_node(r#""http": "a:1""#), r#"duplicate endpoint "a:1" (node 0 http)"#);
        let (_dir, result) =
            load(r#"{"nodes": [{"id": 0, "raft": "tcp://a:1", "client": "tcp://a:2", "raft_listen": "tcp://a:1"}]}"#);
        assert!(result.is_ok(), "binding its own advertised endpoint is no conflict");

        let another_nodes = problem_with_nodes(
            r#"{"id": 0, "raft": "tcp://a:1", "client": "tcp://a:2", "raft_listen": "tcp://127.0.0.1:7001"},
               {"id": 1, "raft": "tcp://127.0.0.1:7001", "client": "tcp://a:4"}"#,
        );
        assert_eq!(another_nodes, r#"duplicate endpoint "tcp://127.0.0.1:7001" (node 1 raft)"#);
    }

    #[test]
    fn http_addresses() {
        let with_http = |http: &str| {
            problem_with_nodes(&format!(r#"{{"id": 3, "raft": "tcp://a:1", "client": "tcp://a:2", "http": "{http}"}}"#))
        };
        assert_eq!(
            with_http("http://a:80"),
            r#"node 3 http "http://a:80": must be host:port without a scheme, e.g. 127.0.0.1:7200"#
        );
        assert_eq!(with_http("localhost"), r#"node 3 http "localhost": must be host:port, e.g. 127.0.0.1:7200"#);
        assert_eq!(with_http("a:0"), r#"node 3 http "a:0": port must be a number in 1..=65535"#);
        let duplicate = problem_with_nodes(
            r#"{"id": 0, "raft": "tcp://a:1", "client": "tcp://a:2", "http": "a:80"},
               {"id": 1, "raft": "tcp://a:3", "client": "tcp://a:4", "http": "a:80"}"#,
        );
        assert_eq!(duplicate, r#"duplicate endpoint "a:80" (node 1 http)"#);
        let (_dir, config) = load(
            r#"{"nodes": [{"id": 0, "raft": "tcp://a:1", "client": "tcp://a:2", "http": "127.0.0.1:7200"},
                         {"id": 1, "raft": "tcp://a:3", "client": "tcp://a:4"}]}"#,
        );
        let config = config.unwrap();
        assert_eq!(config.http.get(&0).map(String::as_str), Some("127.0.0.1:7200"));
        assert_eq!(config.http.get(&1), None);
    }

    #[test]
    fn election_timeout_range() {
        assert_eq!(
            problem_with(r#", "election_timeout_ms": [600, 600]"#),
            "election_timeout_ms [600, 600]: minimum must be < maximum"
        );
        assert_eq!(
            problem_with(r#", "election_timeout_ms": [700, 600]"#),
            "election_timeout_ms [700, 600]: minimum must be < maximum"
        );
        assert_eq!(problem_with(r#", "election_timeout_ms": [0, 600]"#), "election_timeout_ms minimum must be > 0");
    }

    #[test]
    fn appends_in_flight_are_one_or_two_one_unless_said() {
        assert_eq!(problem_with(r#", "max_appends_in_flight": 0"#), "max_appends_in_flight 0 must be 1 or 2");
        assert_eq!(problem_with(r#", "max_appends_in_flight": 3"#), "max_appends_in_flight 3 must be 1 or 2");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let nodes = r#""nodes":[{"id":0,"raft":"tcp://127.0.0.1:1","client":"tcp://127.0.0.1:2"}]"#;
        std::fs::write(&path, format!("{{{nodes}}}")).unwrap();
        assert_eq!(Config::load(&path).unwrap().max_appends_in_flight, 1);
        std::fs::write(&path, format!(r#"{{{nodes}, "max_appends_in_flight": 2}}"#)).unwrap();
        assert_eq!(Config::load(&path).unwrap().max_appends_in_flight, 2);
    }

    #[test]
    fn heartbeat_bounds() {
        assert_eq!(problem_with(r#", "heartbeat_ms": 0"#), "heartbeat_ms must be > 0");
        assert_eq!(
            problem_with(r#", "heartbeat_ms": 300"#),
            "heartbeat_ms 300 must be < election_timeout_ms minimum 300"
        );
    }

    #[test]
    fn max_request_bytes_bounds() {
        assert_eq!(problem_with(r#", "max_request_bytes": 0"#), "max_request_bytes 0 must be between 1 and 67108864");
        assert_eq!(
            problem_with(r#", "max_request_bytes": 67108865"#),
            "max_request_bytes 67108865 must be between 1 and 67108864"
        );
        let (_dir, result) = load(&format!(r#"{{{NODES}, "max_request_bytes": 67108864}}"#));
        assert_eq!(result.unwrap().max_request_bytes, MAX_REQUEST_BYTES_LIMIT);
    }

    const KEY_A: &str = "Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID";
    const KEY_B: &str = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7";
    const KEY_C: &str = "5FkP!5FkP!5FkP!5FkP!5FkP!5FkP!5FkP!5FkP!";

    /// Two nodes with these public keys (`None`: no key), then `extra`.
    fn keyed(keys: [Option<&str>; 2], extra: &str) -> String {
        let nodes: Vec<String> = keys
            .iter()
            .enumerate()
            .map(|(id, key)| {
                let key = key.map_or(String::new(), |k| format!(r#", "public_key": "{k}""#));
                format!(r#"{{"id": {id}, "raft": "tcp://a:{}", "client": "tcp://b:{}"{key}}}"#, id + 1, id + 1)
            })
            .collect();
        format!(r#"{{"nodes": [{}]{extra}}}"#, nodes.join(", "))
    }

    fn keys_problem(keys: [Option<&str>; 2], extra: &str) -> String {
        let (_dir, result) = load(&keyed(keys, extra));
        result.expect_err("config should be rejected").problem().to_string()
    }

    #[test]
    fn keys_on_every_node_turn_curve_on() {
        let (dir, result) = load(&keyed([Some(KEY_A), Some(KEY_B)], &format!(r#", "client_keys": ["{KEY_C}"]"#)));
        let config = result.unwrap();
        let curve = config.curve.as_ref().expect("keys on every node");
        assert_eq!(curve.node_keys.values().map(|k| k.to_string()).collect::<Vec<_>>(), [KEY_A, KEY_B]);
        assert_eq!(config.node_key(1), Some(PublicKey::parse(KEY_B).unwrap()));
        assert_eq!(curve.client_keys, Some(vec![PublicKey::parse(KEY_C).unwrap()]));
        assert_eq!(curve.admin_keys, None);
        assert_eq!(config.node_key_path(1), dir.path().join("keys").join("1.key"));
        assert_eq!(
            config.nodes[0],
            Member { id: 0, raft: "tcp://a:1".into(), client: "tcp://b:1".into(), public_key: Some(KEY_A.into()) },
            "the key goes into the membership"
        );

        let (dir, result) = load(&keyed([Some(KEY_A), Some(KEY_B)], r#", "keys_dir": "secrets""#));
        let config = result.unwrap();
        assert_eq!(config.curve.as_ref().unwrap().client_keys, None, "any client");
        assert_eq!(config.node_key_path(0), dir.path().join("secrets").join("0.key"));

        let (_dir, result) = load(&keyed([None, None], ""));
        let config = result.unwrap();
        assert!(config.curve.is_none() && config.node_key(0).is_none(), "no keys: plaintext");
    }

    #[test]
    fn keys_must_be_valid_distinct_and_on_every_node() {
        assert_eq!(
            keys_problem([Some(KEY_A), None], ""),
            "node 1 has no public_key but node 0 has one: give every node a public_key, or none"
        );
        assert_eq!(
            keys_problem([None, Some(KEY_A)], ""),
            "node 0 has no public_key but node 1 has one: give every node a public_key, or none"
        );
        assert_eq!(
            keys_problem([Some(KEY_A), Some("abc")], ""),
            r#"node 1 public_key "abc": must be 40 Z85 characters, not 3"#
        );
        assert_eq!(keys_problem([Some(KEY_A), Some(KEY_A)], ""), "nodes 0 and 1 have the same public_key");
        assert_eq!(
            keys_problem([None, None], &format!(r#", "client_keys": ["{KEY_C}"]"#)),
            "client_keys needs a public_key on every node"
        );
        assert_eq!(
            keys_problem([Some(KEY_A), Some(KEY_B)], &format!(r#", "client_keys": ["{KEY_C}", "{KEY_C} "]"#)),
            format!(r#"client_keys[1] "{KEY_C} ": contains a character outside the Z85 alphabet"#)
        );
        assert_eq!(
            keys_problem([None, None], &format!(r#", "admin_keys": ["{KEY_C}"]"#)),
            "admin_keys needs a public_key on every node"
        );
        assert_eq!(
            keys_problem([Some(KEY_A), Some(KEY_B)], r#", "admin_keys": ["x"]"#),
            r#"admin_keys[0] "x": must be 40 Z85 characters, not 1"#
        );
        assert_eq!(
            keys_problem([Some(KEY_A), Some(KEY_B)], &format!(r#", "admin_keys": ["{KEY_B}"]"#)),
            format!("admin_keys lists node key {KEY_B}: a key belongs to one node or client only")
        );
        let (_dir, result) = load(&keyed([Some(KEY_A), Some(KEY_B)], &format!(r#", "admin_keys": ["{KEY_C}"]"#)));
        assert_eq!(result.unwrap().curve.unwrap().admin_keys, Some(vec![PublicKey::parse(KEY_C).unwrap()]));
    }

    #[test]
    fn request_timeout_must_be_positive() {
        assert_eq!(problem_with(r#", "request_timeout_ms": 0"#), "request_timeout_ms must be > 0");
    }
}
