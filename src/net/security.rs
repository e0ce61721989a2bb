//! CURVE: encryption and authentication of every ZeroMQ endpoint, on when
//! the config gives each node a `public_key` (docs/running.md, "Security").
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{info, warn};

use crate::config::{Config, Member};
use crate::keys::{CurveIdentity, PublicKey};
use crate::raft::NodeId;
use crate::warnings::Warnings;

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
    socket.set_curve_secretkey(identity.secret())?;
    socket.set_zap_domain(domain.name())
}

/// Makes `socket`, before it connects, a CURVE client speaking as
/// `identity` to the server whose public key is `server`.
pub fn configure_client(socket: &zmq::Socket, identity: &CurveIdentity, server: &PublicKey) -> zmq::Result<()> {
    socket.set_curve_serverkey(server.as_bytes())?;
    socket.set_curve_publickey(identity.public().as_bytes())?;
    socket.set_curve_secretkey(identity.secret())
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
/// came on (`None` without CURVE): who sent it, as its key proved. The
/// frames stay ZeroMQ's: a request is read where it landed, not copied.
pub fn recv_with_user(socket: &zmq::Socket, flags: i32) -> zmq::Result<(Vec<zmq::Message>, Option<String>)> {
    // Routing id, delimiter and body, often one more (a forwarding tag or a
    // REQ_CORRELATE request id).
    let mut frames = Vec::with_capacity(4);
    let mut user = None;
    // Only CURVE's ZAP handler names users. Looking for the property costs,
    // frame by frame, a twentieth of a leader's core loop under gets.
    let curve = socket.get_mechanism()? == zmq::Mechanism::ZMQ_CURVE;
    loop {
        let mut frame = socket.recv_msg(flags)?;
        // Not the first frame: a ROUTER makes up the routing id frame itself,
        // without the connection's properties.
        if curve && user.is_none() {
            user = frame.gets("User-Id").filter(|user| !user.is_empty()).map(str::to_owned);
        }
        let more = frame.get_more();
        frames.push(frame);
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
        if identity.public() != *configured {
            return Err(format!(
                "{} does not match node {id}'s public_key in {} (its public key is {})",
                path.display(),
                config.path.display(),
                identity.public()
            ));
        }
        info!("node {id}: CURVE on, public key {}", identity.public());
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
            match <[u8; 32]>::try_from(key.as_slice()).map(PublicKey::from_bytes) {
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

    #[test]
    fn a_node_connects_only_to_members_with_keys() {
        let identity = CurveIdentity::generate().unwrap();
        let nodes = BTreeMap::from([(0, identity.public()), (1, CurveIdentity::generate().unwrap().public())]);
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
        let added = Member { public_key: Some(CurveIdentity::generate().unwrap().public().to_string()), ..member(2) };
        security.learn(std::slice::from_ref(&added));
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
            NodeSecurity::Curve(NodeKeys {
                identity: identity.clone(),
                nodes,
                removed: Arc::default(),
                clients,
                admins,
            })
        };
        let some = Some(vec![PublicKey::from_bytes([9; 32])]);
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
        let nodes = Arc::new(RwLock::new(BTreeMap::from([(0, PublicKey::from_bytes(node))])));
        let removed = Arc::new(RwLock::new(BTreeMap::from([(2, PublicKey::from_bytes(removed_key))])));
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
        nodes.write().unwrap().insert(5, PublicKey::from_bytes(client));
        assert_eq!(status(&zap_request("raft", &client)), "200");
        let admin = [4; 32];
        assert_eq!(user(&allowed, &zap_request("raft", &removed_key)), "removed:2", "only to be told so");
        assert_eq!(status(&zap_request("client", &removed_key)), "200", "as any client, with no client_keys");
        let listed = Gate {
            nodes,
            removed,
            clients: Some(HashSet::from([PublicKey::from_bytes(stranger)])),
            admins: HashSet::from([PublicKey::from_bytes(admin)]),
        };
        assert_eq!(answer(&listed, &zap_request("client", &stranger)).0[2], b"200");
        assert_eq!(user(&listed, &zap_request("client", &node)), "node:0", "a node forwards");
        assert_eq!(user(&listed, &zap_request("client", &admin)), "admin", "an admin key is a client key too");
        assert_eq!(answer(&listed, &zap_request("client", &[5; 32])).0[2], b"400");
        assert_eq!(answer(&listed, &zap_request("raft", &admin)).0[2], b"400");
        assert_eq!(answer(&listed, &zap_request("client", &removed_key)).0[2], b"400", "a member's no longer");
    }
}
