//! CURVE: encryption and authentication of every ZeroMQ endpoint, on when
//! the config gives each node a `public_key` (README "Security").
//!
//! Every rule of socket setup lives here; the transport, the client endpoint
//! and the tools only say which role a socket plays:
//! - a *server* socket (the raft and client ROUTERs) is a CURVE server with
//!   the node's key pair, in the ZAP domain of its allow-list ([`Domain`]);
//! - a *client* socket (a peer REQ, the forwarding DEALER, a CLI client) is a
//!   CURVE client with its own key pair and the server's public key.
//!
//! CURVE by itself lets any key pair in. Who may connect is decided by the
//! [`Authenticator`], the ZAP handler (ZeroMQ RFC 27) that libzmq asks during
//! every handshake on a server socket of its context. A refused client's
//! handshake fails, so the node never reads a frame from it.

use std::collections::{BTreeMap, HashSet};
use std::ffi::{CString, c_char, c_int};
use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{info, warn};

use crate::config::{Config, Member};
use crate::raft::NodeId;
use crate::transport::Warnings;

/// The Z85 alphabet (ZeroMQ RFC 32), in digit order.
const Z85: &[u8; 85] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#";
/// A 32-byte key is 40 Z85 characters.
const Z85_KEY_CHARS: usize = 40;

/// A CURVE public key: a node's or a client's identity on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// Parses the Z85 text of a key, as found in a `.pub` file or the config.
    pub fn parse(text: &str) -> Result<PublicKey, String> {
        decode_key(text).map(PublicKey)
    }

    /// A `--server-key` argument: the Z85 text of a key, or a `.pub` file.
    pub fn from_text_or_file(arg: &str) -> Result<PublicKey, String> {
        if let Ok(key) = PublicKey::parse(arg) {
            return Ok(key);
        }
        let text = fs::read_to_string(arg)
            .map_err(|e| format!("{arg:?} is neither a Z85 public key nor a readable .pub file ({e})"))?;
        PublicKey::parse(text.trim_end()).map_err(|e| format!("{arg}: {e}"))
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&z85(&self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// A key pair: who this process is on CURVE connections.
#[derive(Clone)]
pub struct CurveIdentity {
    public: PublicKey,
    secret: [u8; 32],
}

impl CurveIdentity {
    /// A fresh key pair (an ephemeral client, or `raft-zmq keygen`).
    pub fn generate() -> zmq::Result<CurveIdentity> {
        let pair = zmq::CurveKeyPair::new()?;
        Ok(CurveIdentity { public: PublicKey(pair.public_key), secret: pair.secret_key })
    }

    /// Reads a secret key file written by `raft-zmq keygen`; the public key
    /// is derived from it, so a `.pub` file beside it is not needed. A file
    /// other users may read or write is refused, as ssh refuses one: the
    /// key may be theirs already.
    pub fn load(path: &Path) -> Result<CurveIdentity, String> {
        let mode = fs::metadata(path).map(|m| m.permissions().mode() & 0o777).unwrap_or(0);
        if mode & 0o077 != 0 {
            return Err(format!(
                "secret key {} is open to other users (mode {mode:04o}); run `chmod 600 {}`",
                path.display(),
                path.display()
            ));
        }
        let text = fs::read_to_string(path).map_err(|e| format!("cannot read secret key {}: {e}", path.display()))?;
        let secret = decode_key(text.trim_end()).map_err(|e| format!("{}: not a secret key: {e}", path.display()))?;
        let public =
            public_of(&secret).map_err(|e| format!("{}: cannot derive its public key: {e}", path.display()))?;
        Ok(CurveIdentity { public, secret })
    }

    pub fn public(&self) -> PublicKey {
        self.public
    }

    /// `raft-zmq keygen NAME`: writes `NAME.key` (the Z85 secret key, mode
    /// 0600) and `NAME.pub` (the Z85 public key), one line each, creating
    /// missing folders. Refuses if either file exists.
    pub fn write_new(name: &Path) -> Result<CurveIdentity, String> {
        let with_extension = |extension: &str| {
            let mut path = name.as_os_str().to_owned();
            path.push(extension);
            PathBuf::from(path)
        };
        let (secret_path, public_path) = (with_extension(".key"), with_extension(".pub"));
        for path in [&secret_path, &public_path] {
            // symlink_metadata: a dangling link is in the way too.
            if path.symlink_metadata().is_ok() {
                return Err(format!("{} already exists; not overwriting it", path.display()));
            }
        }
        if let Some(folder) = name.parent().filter(|folder| !folder.as_os_str().is_empty()) {
            fs::create_dir_all(folder).map_err(|e| format!("cannot create {}: {e}", folder.display()))?;
        }
        let identity = CurveIdentity::generate().map_err(|e| format!("cannot generate a CURVE key pair: {e}"))?;
        write_line(&secret_path, 0o600, &z85(&identity.secret))?;
        if let Err(e) = write_line(&public_path, 0o644, &identity.public.to_string()) {
            // Half a key pair is worse than none: a rerun would refuse.
            let _ = fs::remove_file(&secret_path);
            return Err(e);
        }
        Ok(identity)
    }
}

/// Never prints the secret key.
impl fmt::Debug for CurveIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CurveIdentity({})", self.public)
    }
}

/// Creates `path` (never over an existing file) holding `text` and a newline.
fn write_line(path: &Path, mode: u32, text: &str) -> Result<(), String> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    writeln!(file, "{text}").map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn z85(key: &[u8; 32]) -> String {
    zmq::z85_encode(key).expect("32 bytes are a whole number of Z85 groups")
}

/// Strict Z85 decoding of a 32-byte key. `zmq::z85_decode` is not used:
/// it maps characters outside the alphabet to arbitrary bytes, and a typo in
/// a key must be an error, not somebody else's key.
fn decode_key(text: &str) -> Result<[u8; 32], String> {
    let digits: Vec<u64> = text
        .chars()
        .map(|c| Z85.iter().position(|&z| char::from(z) == c).map(|d| d as u64))
        .collect::<Option<_>>()
        .ok_or("contains a character outside the Z85 alphabet")?;
    if digits.len() != Z85_KEY_CHARS {
        return Err(format!("must be {Z85_KEY_CHARS} Z85 characters, not {}", digits.len()));
    }
    let mut key = [0; 32];
    for (group, bytes) in digits.chunks(5).zip(key.chunks_mut(4)) {
        let value = group.iter().fold(0, |value, digit| value * 85 + digit);
        let value = u32::try_from(value).map_err(|_| "is not valid Z85 (a group exceeds 32 bits)")?;
        bytes.copy_from_slice(&value.to_be_bytes());
    }
    Ok(key)
}

// Neither the zmq crate nor zmq-sys exposes zmq_curve_public (libzmq
// 4.2+); the library is linked anyway (.cargo/config.toml).
unsafe extern "C" {
    fn zmq_curve_public(z85_public_key: *mut c_char, z85_secret_key: *const c_char) -> c_int;
}

/// The public key that belongs to `secret`, computed by libzmq.
fn public_of(secret: &[u8; 32]) -> Result<PublicKey, zmq::Error> {
    let secret = CString::new(z85(secret)).expect("Z85 has no NUL");
    let mut public = [0u8; Z85_KEY_CHARS + 1];
    // SAFETY: libzmq reads the NUL-terminated 40-character Z85 `secret` and
    // writes 40 Z85 characters plus a NUL into `public`, which has room for them.
    let rc = unsafe { zmq_curve_public(public.as_mut_ptr().cast(), secret.as_ptr()) };
    if rc != 0 {
        // Its only failure with a well-formed key: no CURVE in this libzmq.
        return Err(zmq::Error::ENOTSUP);
    }
    let text = std::str::from_utf8(&public[..Z85_KEY_CHARS]).expect("libzmq writes Z85");
    Ok(PublicKey::parse(text).expect("libzmq writes a valid key"))
}

/// Which allow-list a server socket's clients are checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Domain {
    /// Raft endpoints: the nodes only.
    Raft,
    /// Client endpoints: `client_keys` and the nodes (which forward), or anyone.
    Client,
}

impl Domain {
    /// The ZAP domain name libzmq hands the [`Authenticator`].
    fn name(self) -> &'static str {
        match self {
            Domain::Raft => "raft",
            Domain::Client => "client",
        }
    }
}

/// Makes `socket`, before it binds, a CURVE server speaking as `identity`
/// whose clients the [`Authenticator`] checks against `domain`.
pub fn configure_server(socket: &zmq::Socket, identity: &CurveIdentity, domain: Domain) -> zmq::Result<()> {
    socket.set_curve_server(true)?;
    socket.set_curve_secretkey(&identity.secret)?;
    socket.set_zap_domain(domain.name())
}

/// Makes `socket`, before it connects, a CURVE client speaking as
/// `identity` to the server whose public key is `server`.
pub fn configure_client(socket: &zmq::Socket, identity: &CurveIdentity, server: &PublicKey) -> zmq::Result<()> {
    socket.set_curve_serverkey(&server.0)?;
    socket.set_curve_publickey(&identity.public.0)?;
    socket.set_curve_secretkey(&identity.secret)
}

/// A client's side of CURVE towards one server.
#[derive(Clone, Debug)]
pub struct ClientCurve {
    pub identity: CurveIdentity,
    pub server: PublicKey,
}

impl ClientCurve {
    pub fn configure(&self, socket: &zmq::Socket) -> zmq::Result<()> {
        configure_client(socket, &self.identity, &self.server)
    }
}

/// How a node secures its sockets: not at all, or CURVE.
#[derive(Clone, Debug)]
pub enum NodeSecurity {
    Plain,
    Curve(NodeKeys),
}

#[derive(Clone, Debug)]
pub struct NodeKeys {
    identity: CurveIdentity,
    /// Every member's public key: the servers this node connects to, and the
    /// only clients its raft endpoint lets in. The config's nodes to start
    /// with; members added later as the membership brings their keys.
    nodes: Arc<RwLock<BTreeMap<NodeId, PublicKey>>>,
    /// The keys of nodes whose removal is committed: let in on the raft
    /// endpoint only to be told so ([`Caller::Removed`]).
    removed: Arc<RwLock<BTreeMap<NodeId, PublicKey>>>,
    /// Who else may use the client endpoint; `None`: any CURVE client.
    clients: Option<Vec<PublicKey>>,
    /// Who may run admin ops; `None`: see [`NodeSecurity::may_administer`].
    admins: Option<Vec<PublicKey>>,
}

/// Who sent a request, as the ZAP handler named its key for the
/// connection (the message's User-Id): what a node lets it do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// No CURVE: the network is trusted, and so is everyone on it.
    Anyone,
    /// A member's key: a node acting for itself, or forwarding a request
    /// the node it came to authorized first.
    Node(NodeId),
    /// The key of a node whose removal is committed, on a raft endpoint:
    /// nothing it sends reaches Raft but a vote request, which is answered
    /// by telling it it was removed (CONTRACT.md "Membership").
    Removed(NodeId),
    /// A key of `admin_keys`.
    Admin,
    /// Any other client key.
    Client,
}

impl Caller {
    /// The User-Id the ZAP handler gives a connection made with this key.
    fn user_id(self) -> String {
        match self {
            Caller::Node(id) => format!("node:{id}"),
            Caller::Removed(id) => format!("removed:{id}"),
            Caller::Admin => "admin".into(),
            Caller::Client | Caller::Anyone => "client".into(),
        }
    }

    /// The caller a message's User-Id names; `None` (no CURVE): anyone.
    pub fn of(user_id: Option<&str>) -> Caller {
        match user_id {
            None => Caller::Anyone,
            Some("admin") => Caller::Admin,
            Some(user) => {
                let id = |prefix| user.strip_prefix(prefix).and_then(|id: &str| id.parse().ok());
                match (id("node:"), id("removed:")) {
                    (Some(id), _) => Caller::Node(id),
                    (_, Some(id)) => Caller::Removed(id),
                    _ => Caller::Client,
                }
            }
        }
    }
}

/// Receives one multipart message, with the User-Id of the connection it
/// came on (`None` without CURVE): who sent it, as its key proved.
pub fn recv_with_user(socket: &zmq::Socket, flags: i32) -> zmq::Result<(Vec<Vec<u8>>, Option<String>)> {
    let mut frames = Vec::new();
    let mut user = None;
    loop {
        let mut frame = socket.recv_msg(flags)?;
        // Not the first frame: a ROUTER makes up the routing id frame itself,
        // without the connection's properties.
        if user.is_none() {
            user = frame.gets("User-Id").filter(|user| !user.is_empty()).map(str::to_owned);
        }
        let more = frame.get_more();
        frames.push(frame.to_vec());
        if !more {
            return Ok((frames, user));
        }
    }
}

impl NodeSecurity {
    /// Plain when the config has no keys; otherwise node `id`'s secret key,
    /// read from `<keys_dir>/<id>.key`, which must match its `public_key`.
    pub fn load(config: &Config, id: NodeId) -> Result<NodeSecurity, String> {
        let Some(curve) = &config.curve else { return Ok(NodeSecurity::Plain) };
        let path = config.node_key_path(id);
        let configured = curve.node_keys.get(&id).ok_or_else(|| format!("node {id} has no public_key"))?;
        let identity = CurveIdentity::load(&path).map_err(|e| {
            let name = path.with_extension("");
            let hint = if path.exists() {
                String::new()
            } else {
                format!(
                    " (make a pair with `raft-zmq keygen {}` and put {}.pub in the config as node {id}'s public_key)",
                    name.display(),
                    name.display()
                )
            };
            format!("{e}{hint}")
        })?;
        if identity.public != *configured {
            return Err(format!(
                "{} does not match node {id}'s public_key in {} (its public key is {})",
                path.display(),
                config.path.display(),
                identity.public
            ));
        }
        info!("node {id}: CURVE on, public key {}", identity.public);
        let nodes = Arc::new(RwLock::new(curve.node_keys.clone()));
        let (clients, admins) = (curve.client_keys.clone(), curve.admin_keys.clone());
        let keys = NodeKeys { identity, nodes, removed: Arc::default(), clients, admins };
        Ok(NodeSecurity::Curve(keys))
    }

    /// Every member this node talks to must have a public key. The config's
    /// nodes all do; a member recorded in the state dir may not be listed.
    pub fn check_members(&self, members: &[Member]) -> Result<(), String> {
        let NodeSecurity::Curve(keys) = self else { return Ok(()) };
        let nodes = keys.nodes();
        match members.iter().find(|m| !nodes.contains_key(&m.id)) {
            Some(m) => Err(format!("node {} is a member but the config gives it no public_key", m.id)),
            None => Ok(()),
        }
    }

    /// Takes the keys of members added at run time from the membership, so
    /// that this node connects to them and lets them in. A key already known
    /// for an id stays (the config's, or the first one heard), and a key
    /// another node holds is not taken: a key speaks for one node only.
    pub fn learn(&self, members: &[Member]) {
        let NodeSecurity::Curve(keys) = self else { return };
        let mut nodes = keys.nodes.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        for member in members {
            let Some(text) = &member.public_key else { continue };
            if nodes.contains_key(&member.id) {
                continue;
            }
            match PublicKey::parse(text) {
                Ok(key) => match nodes.iter().find(|(_, k)| **k == key) {
                    Some((other, _)) => warn!("member {}: public_key {key} is node {other}'s; not taken", member.id),
                    None => {
                        info!("node {} has CURVE public key {key}", member.id);
                        nodes.insert(member.id, key);
                    }
                },
                Err(why) => warn!("member {}: public_key {text:?} in the membership is unusable: {why}", member.id),
            }
        }
    }

    /// Takes the keys of nodes whose removal is committed off the members':
    /// from now on they are let in only to hear that they were removed.
    pub fn revoke(&self, removed: &[NodeId]) {
        let NodeSecurity::Curve(keys) = self else { return };
        let mut nodes = keys.nodes.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut gone = keys.removed.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        for id in removed {
            if let Some(key) = nodes.remove(id) {
                info!("node {id} was removed: its CURVE key {key} is a member's no longer");
                gone.insert(*id, key);
            }
        }
    }

    /// Whether `caller` may run admin ops (CONTRACT.md "Authorization"):
    /// nodes and `admin_keys` may; other clients only when the config
    /// lists neither `client_keys` nor `admin_keys` (a trusted network).
    pub fn may_administer(&self, caller: Caller) -> bool {
        match (self, caller) {
            (NodeSecurity::Plain, _) | (_, Caller::Anyone | Caller::Node(_) | Caller::Admin) => true,
            (_, Caller::Removed(_)) => false,
            (NodeSecurity::Curve(keys), Caller::Client) => keys.clients.is_none() && keys.admins.is_none(),
        }
    }

    /// Whether `add_node` must carry a public key (the cluster uses CURVE).
    pub fn is_curve(&self) -> bool {
        matches!(self, NodeSecurity::Curve(_))
    }

    /// Sets up a server socket of `domain` before it binds.
    pub fn server(&self, socket: &zmq::Socket, domain: Domain) -> zmq::Result<()> {
        match self {
            NodeSecurity::Plain => Ok(()),
            NodeSecurity::Curve(keys) => configure_server(socket, &keys.identity, domain),
        }
    }

    /// Sets up a socket that connects to `node`'s raft or client endpoint.
    /// A node without a key (ruled out by [`NodeSecurity::check_members`])
    /// is `EINVAL`.
    pub fn client(&self, socket: &zmq::Socket, node: NodeId) -> zmq::Result<()> {
        match self {
            NodeSecurity::Plain => Ok(()),
            NodeSecurity::Curve(keys) => {
                let server = *keys.nodes().get(&node).ok_or(zmq::Error::EINVAL)?;
                configure_client(socket, &keys.identity, &server)
            }
        }
    }

    /// How this node, as a client, reaches `node`'s client endpoint (its own
    /// included): with its own key pair, which every client endpoint lets in.
    pub fn client_curve(&self, node: NodeId) -> Option<ClientCurve> {
        match self {
            NodeSecurity::Plain => None,
            NodeSecurity::Curve(keys) => {
                Some(ClientCurve { identity: keys.identity.clone(), server: *keys.nodes().get(&node)? })
            }
        }
    }

    /// With CURVE, starts the ZAP handler of `ctx`. It must run before any
    /// server socket of `ctx` binds and until the last one is closed: while
    /// no handler is bound, libzmq lets every CURVE client in.
    pub fn authenticate(&self, ctx: &zmq::Context) -> Result<Option<Authenticator>, String> {
        let NodeSecurity::Curve(keys) = self else { return Ok(None) };
        let clients = keys.clients.as_ref().map(|clients| clients.iter().copied().collect());
        let admins = keys.admins.iter().flatten().copied().collect();
        let gate = Gate { nodes: keys.nodes.clone(), removed: keys.removed.clone(), clients, admins };
        Authenticator::start(ctx, gate).map(Some)
    }
}

impl NodeKeys {
    fn nodes(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<NodeId, PublicKey>> {
        self.nodes.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Who the ZAP handler lets in: on the raft endpoint the members' keys only;
/// on the client endpoint the members', `admins` and `clients` (`None`: any key).
struct Gate {
    nodes: Arc<RwLock<BTreeMap<NodeId, PublicKey>>>,
    removed: Arc<RwLock<BTreeMap<NodeId, PublicKey>>>,
    clients: Option<HashSet<PublicKey>>,
    admins: HashSet<PublicKey>,
}

impl Gate {
    /// Who `key` is on `domain`, or why it may not in.
    fn identify(&self, domain: &str, key: &PublicKey) -> Result<Caller, &'static str> {
        let nodes = self.nodes.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        let member = nodes.iter().find(|(_, k)| *k == key).map(|(&id, _)| Caller::Node(id));
        if domain == Domain::Raft.name() {
            let removed = || {
                let removed = self.removed.read().unwrap_or_else(|poisoned| poisoned.into_inner());
                removed.iter().find(|(_, k)| *k == key).map(|(&id, _)| Caller::Removed(id))
            };
            member.or_else(removed).ok_or("not a member's key")
        } else if domain == Domain::Client.name() {
            let client = self.clients.as_ref().is_none_or(|clients| clients.contains(key));
            match member {
                Some(node) => Ok(node),
                None if self.admins.contains(key) => Ok(Caller::Admin),
                None if client => Ok(Caller::Client),
                None => Err("not on client_keys or admin_keys"),
            }
        } else {
            Err("unknown ZAP domain")
        }
    }
}

/// The ZAP handler of one zmq context: a thread that answers libzmq's
/// question "may this key in?" for every CURVE handshake on the context's
/// server sockets. Dropping it stops the thread.
pub struct Authenticator {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Authenticator {
    /// Where libzmq sends ZAP requests (RFC 27).
    const ENDPOINT: &'static str = "inproc://zeromq.zap.01";
    /// How long the thread may go without noticing it is to stop.
    const STOP_CHECK: Duration = Duration::from_millis(50);

    fn start(ctx: &zmq::Context, allowed: Gate) -> Result<Authenticator, String> {
        let bind = || -> zmq::Result<zmq::Socket> {
            let socket = ctx.socket(zmq::REP)?;
            socket.set_linger(0)?;
            socket.bind(Self::ENDPOINT)?;
            Ok(socket)
        };
        let socket = bind().map_err(|e| format!("cannot start the ZAP handler: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            thread::Builder::new()
                .name("zap".into())
                .spawn(move || serve(&socket, &allowed, &stop))
                .map_err(|e| format!("cannot start the ZAP handler: {e}"))?
        };
        Ok(Authenticator { stop, thread: Some(thread) })
    }
}

impl Drop for Authenticator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Answers ZAP requests until stopped. A handler that cannot answer must not
/// quietly stop: libzmq would then let every key in. So any socket error
/// panics, which takes the whole node down (`node::abort_on_panic`).
fn serve(socket: &zmq::Socket, allowed: &Gate, stop: &AtomicBool) {
    let mut warnings = Warnings::default();
    let poll_ms = Authenticator::STOP_CHECK.as_millis() as i64;
    while !stop.load(Ordering::Acquire) {
        match socket.poll(zmq::POLLIN, poll_ms) {
            Ok(0) | Err(zmq::Error::EINTR) => continue,
            Ok(_) => {}
            Err(e) => panic!("ZAP handler cannot poll: {e}"),
        }
        let request = socket.recv_multipart(0).unwrap_or_else(|e| panic!("ZAP handler cannot receive: {e}"));
        let (reply, refused) = answer(allowed, &request);
        if let Some(refused) = refused {
            warnings.warn("CURVE key refused", refused);
        }
        socket.send_multipart(reply, 0).unwrap_or_else(|e| panic!("ZAP handler cannot reply: {e}"));
    }
}

/// One ZAP reply: status 200 for a key on the domain's allow-list, with the
/// caller it is as the User-Id every message of the connection carries;
/// 400 otherwise, and a line for the log.
fn answer(allowed: &Gate, request: &[Vec<u8>]) -> (Vec<Vec<u8>>, Option<String>) {
    // [version, request id, domain, address, routing id, mechanism, credentials...]
    let request_id = request.get(1).cloned().unwrap_or_default();
    let verdict = match request {
        [version, _, domain, address, _, mechanism, key] if version == b"1.0" && mechanism == b"CURVE" => {
            let domain = String::from_utf8_lossy(domain);
            let address = String::from_utf8_lossy(address);
            match <[u8; 32]>::try_from(key.as_slice()).map(PublicKey) {
                Ok(key) => allowed
                    .identify(&domain, &key)
                    .map_err(|why| format!("refused CURVE key {key} from {address} on the {domain} endpoint ({why})")),
                Err(_) => Err(format!("refused a handshake from {address}: malformed CURVE key")),
            }
        }
        _ => Err("refused a malformed ZAP request".to_string()),
    };
    let (code, text, user, refused) = match verdict {
        Ok(caller) => ("200", "OK", caller.user_id(), None),
        Err(why) => ("400", "key not allowed", String::new(), Some(why)),
    };
    let reply = [&b"1.0"[..], &request_id, code.as_bytes(), text.as_bytes(), user.as_bytes(), b""];
    (reply.iter().map(|frame| frame.to_vec()).collect(), refused)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key pair from libzmq's CURVE documentation (zmq_curve(7)).
    const DOC_PUBLIC: &str = "Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID";
    const DOC_SECRET: &str = "D:)Q[IlAW!ahhC2ac:9*A}h:p?([4%wOTJ%JR%cs";

    #[test]
    fn libzmq_supports_curve() {
        assert_eq!(
            zmq::has("curve"),
            Some(true),
            "this libzmq has no CURVE: install Debian's libzmq3-dev (built with libsodium; \
             `apt-get install --no-install-recommends libzmq3-dev`) and rebuild"
        );
    }

    #[test]
    fn z85_keys_round_trip_and_typos_are_refused() {
        let key = PublicKey::parse(DOC_PUBLIC).unwrap();
        assert_eq!(key.to_string(), DOC_PUBLIC);
        assert_eq!(decode_key(&z85(&[0xff; 32])), Ok([0xff; 32]));
        assert_eq!(decode_key(&DOC_PUBLIC[1..]), Err("must be 40 Z85 characters, not 39".into()));
        assert_eq!(decode_key(""), Err("must be 40 Z85 characters, not 0".into()));
        let typo = DOC_PUBLIC.replace('Y', "~");
        assert_eq!(decode_key(&typo), Err("contains a character outside the Z85 alphabet".into()));
        assert_eq!(decode_key(&"é".repeat(40)), Err("contains a character outside the Z85 alphabet".into()));
        // "%nSc1" is 2^32, one more than four bytes hold.
        assert!(decode_key(&format!("%nSc1{}", &DOC_PUBLIC[5..])).unwrap_err().contains("exceeds 32 bits"));
    }

    #[test]
    fn the_public_key_is_derived_from_the_secret_key() {
        assert_eq!(public_of(&decode_key(DOC_SECRET).unwrap()).unwrap().to_string(), DOC_PUBLIC);
        let fresh = CurveIdentity::generate().unwrap();
        assert_eq!(public_of(&fresh.secret).unwrap(), fresh.public);
    }

    #[test]
    fn server_key_is_z85_text_or_a_pub_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.pub");
        fs::write(&file, format!("{DOC_PUBLIC}\n")).unwrap();
        let expected = PublicKey::parse(DOC_PUBLIC).unwrap();
        assert_eq!(PublicKey::from_text_or_file(DOC_PUBLIC), Ok(expected));
        assert_eq!(PublicKey::from_text_or_file(file.to_str().unwrap()), Ok(expected));
        let missing = dir.path().join("missing.pub");
        let error = PublicKey::from_text_or_file(missing.to_str().unwrap()).unwrap_err();
        assert!(error.contains("neither a Z85 public key nor a readable .pub file"), "{error}");
    }

    #[test]
    fn a_secret_key_file_open_to_other_users_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let written = CurveIdentity::write_new(&dir.path().join("node")).unwrap();
        let path = dir.path().join("node.key");
        let shown = path.display();
        for mode in [0o640, 0o604, 0o620, 0o602] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let error = CurveIdentity::load(&path).unwrap_err();
            assert_eq!(
                error,
                format!("secret key {shown} is open to other users (mode {mode:04o}); run `chmod 600 {shown}`")
            );
        }
        for mode in [0o600, 0o400] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(CurveIdentity::load(&path).unwrap().public, written.public, "mode {mode:o}");
        }
    }

    #[test]
    fn key_files_hold_one_z85_line_each_and_are_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let name = dir.path().join("a/b/node0");
        let written = CurveIdentity::write_new(&name).unwrap();
        let secret = fs::read_to_string(dir.path().join("a/b/node0.key")).unwrap();
        let public = fs::read_to_string(dir.path().join("a/b/node0.pub")).unwrap();
        assert_eq!((secret.len(), public.len()), (41, 41));
        assert_eq!(public, format!("{}\n", written.public));
        let mode = fs::metadata(dir.path().join("a/b/node0.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(CurveIdentity::load(&dir.path().join("a/b/node0.key")).unwrap().public, written.public);

        let error = CurveIdentity::write_new(&name).unwrap_err();
        assert!(error.ends_with("node0.key already exists; not overwriting it"), "{error}");
        fs::remove_file(dir.path().join("a/b/node0.key")).unwrap();
        let error = CurveIdentity::write_new(&name).unwrap_err();
        assert!(error.ends_with("node0.pub already exists; not overwriting it"), "{error}");
        assert_eq!(fs::read_to_string(dir.path().join("a/b/node0.pub")).unwrap(), public, "left alone");
        assert!(!dir.path().join("a/b/node0.key").exists(), "no half pair written");
    }

    #[test]
    fn a_node_connects_only_to_members_with_keys() {
        let identity = CurveIdentity::generate().unwrap();
        let nodes = BTreeMap::from([(0, identity.public), (1, CurveIdentity::generate().unwrap().public)]);
        let nodes = Arc::new(RwLock::new(nodes));
        let keys = NodeKeys { identity, nodes, removed: Arc::default(), clients: None, admins: None };
        let security = NodeSecurity::Curve(keys);
        let member =
            |id| Member { id, raft: format!("tcp://127.0.0.1:{}", 7000 + id), client: String::new(), public_key: None };
        assert_eq!(security.check_members(&[member(0), member(1)]), Ok(()));
        assert_eq!(
            security.check_members(&[member(0), member(2)]),
            Err("node 2 is a member but the config gives it no public_key".into())
        );
        assert_eq!(NodeSecurity::Plain.check_members(&[member(2)]), Ok(()));

        let socket = zmq::Context::new().socket(zmq::REQ).unwrap();
        assert_eq!(security.client(&socket, 2), Err(zmq::Error::EINVAL));
        security.client(&socket, 1).unwrap();
        assert_eq!(socket.get_mechanism().unwrap(), zmq::Mechanism::ZMQ_CURVE);

        // A member added at run time brings its key in the membership.
        let added = Member { public_key: Some(CurveIdentity::generate().unwrap().public.to_string()), ..member(2) };
        security.learn(&[added.clone()]);
        assert_eq!(security.check_members(&[member(0), member(2)]), Ok(()));
        security.client(&socket, 2).unwrap();

        // A key speaks for one node: node 3 cannot claim node 2's.
        security.learn(&[Member { id: 3, ..added }]);
        assert!(security.check_members(&[member(3)]).is_err());
        // Once its removal is committed, a node is let in nowhere.
        security.revoke(&[2]);
        assert!(security.check_members(&[member(2)]).is_err());
        assert_eq!(security.client(&socket, 2), Err(zmq::Error::EINVAL));
    }

    #[test]
    fn admin_ops_need_an_admin_key_once_the_config_lists_clients_or_admins() {
        let identity = CurveIdentity::generate().unwrap();
        let curve = |clients: Option<Vec<PublicKey>>, admins: Option<Vec<PublicKey>>| {
            let nodes = Arc::new(RwLock::new(BTreeMap::new()));
            NodeSecurity::Curve(NodeKeys { identity: identity.clone(), nodes, removed: Arc::default(), clients, admins })
        };
        let some = Some(vec![PublicKey([9; 32])]);
        let cases = [
            (NodeSecurity::Plain, [true, true, true]),
            (curve(None, None), [true, true, true]),
            (curve(some.clone(), None), [true, true, false]),
            (curve(None, some.clone()), [true, true, false]),
            (curve(some.clone(), some), [true, true, false]),
        ];
        for (security, expected) in cases {
            let may = [Caller::Node(1), Caller::Admin, Caller::Client].map(|caller| security.may_administer(caller));
            assert_eq!(may, expected, "{security:?}");
        }
        assert!(!curve(None, None).may_administer(Caller::Removed(3)));
        for caller in [Caller::Node(12), Caller::Removed(3), Caller::Admin, Caller::Client] {
            assert_eq!(Caller::of(Some(&caller.user_id())), caller);
        }
        assert_eq!(Caller::of(None), Caller::Anyone);
        assert_eq!(Caller::of(Some("node:x")), Caller::Client, "never a node by mistake");
    }

    fn zap_request(domain: &str, key: &[u8]) -> Vec<Vec<u8>> {
        [&b"1.0"[..], b"7", domain.as_bytes(), b"127.0.0.1", b"", b"CURVE", key].iter().map(|f| f.to_vec()).collect()
    }

    #[test]
    fn zap_answers_from_the_domain_allow_list() {
        let (node, client, stranger, removed_key) = ([1; 32], [2; 32], [3; 32], [6; 32]);
        let nodes = Arc::new(RwLock::new(BTreeMap::from([(0, PublicKey(node))])));
        let removed = Arc::new(RwLock::new(BTreeMap::from([(2, PublicKey(removed_key))])));
        let allowed = Gate { nodes: nodes.clone(), removed: removed.clone(), clients: None, admins: HashSet::new() };
        let status = |request: &[Vec<u8>]| {
            let (reply, refused) = answer(&allowed, request);
            assert_eq!((&reply[0][..], &reply[1][..]), (&b"1.0"[..], &b"7"[..]), "version and request id");
            assert_eq!(reply.len(), 6);
            assert_eq!(reply[2] == b"400", refused.is_some(), "a refusal is logged");
            assert_eq!(reply[2] == b"400", reply[4].is_empty(), "a User-Id for those let in");
            String::from_utf8(reply[2].clone()).unwrap()
        };
        let user = |gate: &Gate, request: &[Vec<u8>]| String::from_utf8(answer(gate, request).0[4].clone()).unwrap();
        assert_eq!(status(&zap_request("raft", &node)), "200");
        assert_eq!(user(&allowed, &zap_request("raft", &node)), "node:0", "a node speaks for its own id");
        assert_eq!(status(&zap_request("raft", &client)), "400");
        assert_eq!(status(&zap_request("client", &stranger)), "200");
        assert_eq!(user(&allowed, &zap_request("client", &stranger)), "client");
        assert_eq!(status(&zap_request("other", &node)), "400");
        assert_eq!(status(&zap_request("raft", &node[..31])), "400");
        let mut plain = zap_request("raft", &node);
        plain[5] = b"NULL".to_vec();
        assert_eq!(status(&plain), "400");
        assert_eq!(status(&plain[..3]), "400");
        // Keys learnt later are let in; a client allow-list keeps strangers out.
        nodes.write().unwrap().insert(5, PublicKey(client));
        assert_eq!(status(&zap_request("raft", &client)), "200");
        let admin = [4; 32];
        assert_eq!(user(&allowed, &zap_request("raft", &removed_key)), "removed:2", "only to be told so");
        assert_eq!(status(&zap_request("client", &removed_key)), "200", "as any client, with no client_keys");
        let listed = Gate {
            nodes,
            removed,
            clients: Some(HashSet::from([PublicKey(stranger)])),
            admins: HashSet::from([PublicKey(admin)]),
        };
        assert_eq!(answer(&listed, &zap_request("client", &stranger)).0[2], b"200");
        assert_eq!(user(&listed, &zap_request("client", &node)), "node:0", "a node forwards");
        assert_eq!(user(&listed, &zap_request("client", &admin)), "admin", "an admin key is a client key too");
        assert_eq!(answer(&listed, &zap_request("client", &[5; 32])).0[2], b"400");
        assert_eq!(answer(&listed, &zap_request("raft", &admin)).0[2], b"400");
        assert_eq!(answer(&listed, &zap_request("client", &removed_key)).0[2], b"400", "a member's no longer");
    }
}
