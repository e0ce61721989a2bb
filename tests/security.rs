//! CURVE against real `raft-zmq` processes (docs/running.md, "Security"): a cluster
//! with keys works end to end; clients and peers without an allowed key get
//! nothing; values never cross the wire in the clear; keys are generated and
//! checked. And the HTTP endpoint against slow clients.

mod common;

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::FromRawFd;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::*;
use raft_zmq::keys::{CurveIdentity, PublicKey};
use raft_zmq::net::security::ClientCurve;
use raft_zmq::raft::{Body, Message};
use raft_zmq::wire::envelope::{Envelope, PROTOCOL_VERSION};
use raft_zmq::wire::protocol::{Reply, Request};

/// How long a refused client waits for the reply that must not come.
const REFUSED_WAIT: Duration = Duration::from_secs(1);

fn path(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

/// The `raft-zmq client` arguments that reach node `id` of `cluster`.
fn client_args(cluster: &TestCluster, id: usize) -> Vec<String> {
    let (config, id) = (path(&cluster.config_path).to_string(), id.to_string());
    ["client", "--config", &config, "--node", &id].map(String::from).to_vec()
}

/// Runs `raft-zmq client` until it exits 0 (a node may still be settling),
/// and returns its stdout.
fn cli_ok(args: &[String]) -> String {
    let mut last = None;
    let what = format!("`raft-zmq {}` to succeed", args.join(" "));
    let succeeded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for(&what, || {
            let exited = run_to_exit(args);
            let ok = exited.status.success().then(|| exited.stdout.clone());
            last = Some(exited);
            ok
        })
    }));
    succeeded.unwrap_or_else(|_| {
        let said = last.map(|e| format!("{}: {}{}", e.status, e.stdout, e.stderr)).unwrap_or_default();
        panic!("{what}: the last try said {said}")
    })
}

fn with(args: &[String], more: &[&str]) -> Vec<String> {
    args.iter().cloned().chain(more.iter().map(|s| s.to_string())).collect()
}

/// Asserts that a REQ-style request on `socket` gets no reply in `REFUSED_WAIT`.
fn assert_no_reply(socket: &zmq::Socket, request: &[u8], what: &str) {
    socket.set_rcvtimeo(REFUSED_WAIT.as_millis() as i32).unwrap();
    // A refused connection may leave the send queued forever: never block on it.
    let _ = socket.send(request, zmq::DONTWAIT);
    assert!(socket.recv_bytes(0).is_err(), "{what} got a reply");
}

/// A REQ socket that talks CURVE to node `id` as `identity`.
fn curve_req(cluster: &TestCluster, endpoint: &str, identity: &CurveIdentity, id: usize) -> zmq::Socket {
    let socket = zmq::Context::new().socket(zmq::REQ).unwrap();
    socket.set_linger(0).unwrap();
    let curve = ClientCurve { identity: identity.clone(), server: cluster.nodes[id].public_key.unwrap() };
    curve.configure(&socket).unwrap();
    socket.connect(endpoint).unwrap();
    socket
}

/// Waits until node `id`'s log says it refused `key`.
fn wait_for_refusal(cluster: &TestCluster, id: usize, key: PublicKey, endpoint: &str) {
    let line = format!("refused CURVE key {key} from 127.0.0.1 on the {endpoint} endpoint");
    wait_for(&format!("node {id} to log {line:?}"), || {
        read_path(&cluster.output_path(id)).contains(&line).then_some(())
    });
}

#[test]
fn a_curve_cluster_elects_a_leader_and_serves_the_cli_client() {
    let cluster = TestCluster::start_with_keys(3, false);
    // The harness's own status calls already talk CURVE.
    let leader = cluster.wait_for_leader();
    let follower = (leader + 1) % 3;

    // Keys from the config and an ephemeral client key pair; the follower
    // forwards the write to the leader over CURVE too.
    let put = cli_ok(&with(&client_args(&cluster, follower), &["put", "secure", "yes"]));
    assert!(put.contains(r#""ok":true"#), "{put}");
    let get = cli_ok(&with(&client_args(&cluster, leader), &["get", "secure"]));
    assert_eq!(get.trim(), r#"{"ok":true,"value":"yes"}"#);

    // Explicit keys, no config: --server-key as a .pub file and as text.
    let keys = cluster.dir.path().join("keys");
    let endpoint = cluster.nodes[follower].client.clone();
    let server_pub = keys.join(format!("{follower}.pub"));
    let server_text = cluster.nodes[follower].public_key.unwrap().to_string();
    let client_key = keys.join("client.key");
    for server_key in [path(&server_pub), &server_text] {
        let args = ["client", "--endpoint", &endpoint, "--server-key", server_key, "--key", path(&client_key)];
        let get = cli_ok(&with(&args.map(String::from), &["get", "secure"]));
        assert_eq!(get.trim(), r#"{"ok":true,"value":"yes"}"#);
    }

    // Plaintext gets nothing, not even an error reply.
    let plain = cluster.socket(zmq::REQ, &endpoint);
    assert_no_reply(&plain, &raft_zmq::wire::protocol::encode_request(&Request::Status), "a plaintext client");
    let refused = run_to_exit(["client", "--endpoint", &endpoint, "--timeout-ms", "500", "status"]);
    assert_eq!(refused.status.code(), Some(3), "no reply: {}", refused.stderr);
    assert!(refused.stdout.is_empty());
}

/// A node added at run time to a CURVE cluster: its key travels in the
/// membership, so the members let it in and it lets them in.
#[test]
fn a_node_added_at_run_time_joins_a_curve_cluster_with_its_key() {
    let mut cluster = TestCluster::configure_with_keys(4, false);
    cluster.write_config_of(&cluster.config_path.clone(), 0..3, "");
    (0..3).for_each(|id| cluster.start_node(id));
    let leader = cluster.wait_for_leader();
    cluster.call_ok(leader, &put("before", "v"));
    let join = cluster.dir.path().join("join.json");
    cluster.write_config_of(&join, 0..4, "");
    cluster.start_node_from(3, &join, &["--join".to_string()]);

    let without_key = raft_zmq::config::Member { public_key: None, ..cluster.member(3) };
    let refused = cluster.client(leader).call(&Request::AddNode { member: without_key, voter: true }).unwrap();
    assert!(
        matches!(&refused, Reply::Error { code: raft_zmq::wire::protocol::ErrorCode::BadRequest, message, .. }
            if message.contains("needs a public_key")),
        "{refused:?}"
    );
    cluster.call_ok(leader, &Request::AddNode { member: cluster.member(3), voter: true });
    wait_for("node 3 to be a voter", || cluster.status(3).filter(|s| s.members == [0, 1, 2, 3]).map(|_| ()));
    assert_eq!(cluster.get_value(3, "before"), Some(raft_zmq::kv::Value::Str("v".into())));
    // It can lead: the others let it in on their raft endpoints.
    let Reply::TransferLeader { leader: moved } = cluster.call_ok(leader, &Request::TransferLeader { to: Some(3) })
    else {
        panic!("transfer_leader")
    };
    assert_eq!(moved, 3);
    cluster.call_ok(3, &put("after", "v"));
}

#[test]
fn with_client_keys_only_those_clients_get_replies() {
    let cluster = TestCluster::start_with_keys(3, true);
    let leader = cluster.wait_for_leader();
    let follower = (leader + 1) % 3;
    let listed_key = cluster.dir.path().join("keys").join("client.key");
    let put = cli_ok(&with(&client_args(&cluster, follower), &["--key", path(&listed_key), "put", "k", "v"]));
    assert!(put.contains(r#""ok":true"#), "{put}");

    // Clients whose keys are not on client_keys. The node's log names the
    // first refused key (refusals are logged at most once a second).
    let stranger = CurveIdentity::generate().unwrap();
    let socket = curve_req(&cluster, &cluster.nodes[follower].client, &stranger, follower);
    assert_no_reply(&socket, &raft_zmq::wire::protocol::encode_request(&get("k")), "an unlisted CURVE key");
    wait_for_refusal(&cluster, follower, stranger.public(), "client");
    let refused = run_to_exit(with(&client_args(&cluster, follower), &["--timeout-ms", "500", "get", "k"]));
    assert_eq!(refused.status.code(), Some(3), "an ephemeral key got a reply: {}", refused.stdout);

    // Meanwhile, the listed client and forwarding between nodes still work.
    assert_eq!(cluster.get_value(follower, "k"), Some(raft_zmq::kv::Value::Str("v".into())));
}

#[test]
fn a_peer_without_a_node_key_is_ignored() {
    let cluster = TestCluster::start_with_keys(3, false);
    let leader = cluster.wait_for_leader();
    let Reply::Status(before) = cluster.call_ok(leader, &Request::Status) else { panic!("status") };
    let cluster_id = cluster.wait_for_name(leader);
    let envelope = |from, to, term, body| peer_frame(cluster_id, from, to, term, body);
    // A heartbeat in the leader's name, which a follower always answers; and
    // a vote request in a far higher term, which a node that read it would
    // adopt, deposing the leader.
    let heartbeat = |to| envelope(leader, to, before.term, empty_append());
    let vote = |to| {
        let (from, term) = ((to + 1) % 3, before.term + 100);
        let body = Body::RequestVote { last_log_index: 1 << 40, last_log_term: term, pre_vote: false, transfer: false };
        envelope(from, to, term, body)
    };
    // The harness's client key is let in on client endpoints, never on raft ones.
    let client_key = cluster.client_key.clone().unwrap();
    for to in 0..3 {
        let raft = &cluster.nodes[to].raft;
        let mut requests = vec![("vote request", vote(to))];
        if to != leader {
            requests.push(("heartbeat", heartbeat(to)));
        }
        for (what, request) in requests {
            let plain = cluster.socket(zmq::REQ, raft);
            assert_no_reply(&plain, &request, &format!("a plaintext {what} to node {to}"));
            let rogue = curve_req(&cluster, raft, &client_key, to);
            assert_no_reply(&rogue, &request, &format!("a {what} with a non-node key to node {to}"));
        }
        wait_for_refusal(&cluster, to, client_key.public(), "raft");
    }
    let Reply::Put { index } = cluster.call_ok(leader, &put("after-rogue", "1")) else { panic!("put") };
    cluster.wait_applied(index);
    // A node that read the vote request would be in its term. (A slow
    // machine may hold a real election meanwhile: the term may move a little.)
    for id in 0..3 {
        let status = cluster.status(id).expect("status");
        assert!(status.term < before.term + 100, "node {id} took the rogue vote's term: {status:?}");
    }
}

/// One peer request frame, as node `from` would send it.
fn peer_frame(cluster: u64, from: usize, to: usize, term: u64, body: Body) -> Vec<u8> {
    let (from, to) = (from as u64, to as u64);
    let message = Message { from, to, term, body };
    let envelope = Envelope { version: PROTOCOL_VERSION, cluster, from, term, message, chunk: None, window: None };
    rmp_serde::to_vec_named(&envelope).unwrap()
}

/// A heartbeat: an AppendEntries with nothing in it.
fn empty_append() -> Body {
    Body::AppendEntries { prev_log_index: 0, prev_log_term: 0, entries: vec![], leader_commit: 0, read_seq: 0 }
}

/// A REQ socket that talks CURVE to node `to`'s raft endpoint with node
/// `as_node`'s own key.
fn raft_req_as(cluster: &TestCluster, as_node: usize, to: usize) -> zmq::Socket {
    let key = CurveIdentity::load(&cluster.dir.path().join("keys").join(format!("{as_node}.key"))).unwrap();
    curve_req(cluster, &cluster.nodes[to].raft, &key, to)
}

/// With node 1's key, frames claiming to come from the leader are dropped
/// and counted; once node 2's removal is committed, its key is heard only
/// to be told so (CONTRACT.md "Identity", "Membership").
#[test]
fn a_raft_connection_speaks_only_for_the_node_whose_key_made_it() {
    let mut cluster = TestCluster::configure_with_keys(4, false);
    for node in &mut cluster.nodes {
        node.http = Some(format!("127.0.0.1:{}", free_port()));
    }
    cluster.write_config_of(&cluster.config_path.clone(), 0..4, "");
    let cluster = cluster.start_all();
    cluster.make_leader(0);
    let Reply::Status(before) = cluster.call_ok(0, &Request::Status) else { panic!("status") };
    let cluster_id = cluster.wait_for_name(0);

    // Node 1's key, node 0's name: a follower would answer a real heartbeat.
    let forged = peer_frame(cluster_id, 0, 3, before.term, empty_append());
    assert_no_reply(&raft_req_as(&cluster, 1, 3), &forged, "a heartbeat in the leader's name from node 1's key");
    let forged_count = |id: usize| {
        let (_, metrics) = http_get(cluster.nodes[id].http.as_ref().unwrap(), "/metrics")?;
        let line = metrics.lines().find(|l| l.starts_with("raft_peer_forged_messages_total "))?;
        line.rsplit(' ').next()?.parse::<u64>().ok()
    };
    wait_for("node 3 to count the forged message", || forged_count(3).filter(|&n| n >= 1));
    wait_for("node 3 to log the forged message", || {
        read_path(&cluster.output_path(3)).contains("node 1's connection sent a message from node 0").then_some(())
    });

    let Reply::Membership { index } = cluster.call_ok(0, &Request::RemoveNode { id: 2 }) else { panic!("remove") };
    // Node 2 stops by itself once removed; the others go on.
    let applied_by_the_rest = |index| {
        wait_for(&format!("nodes 0, 1 and 3 to apply {index}"), || {
            [0, 1, 3].iter().all(|&id| cluster.status(id).is_some_and(|s| s.last_applied >= index)).then_some(())
        })
    };
    applied_by_the_rest(index);
    let vote = peer_frame(
        cluster_id,
        2,
        3,
        before.term + 100,
        Body::RequestVote {
            last_log_index: 1 << 40,
            last_log_term: before.term + 100,
            pre_vote: false,
            transfer: false,
        },
    );
    // Node 2's key is heard only to be told it was removed...
    let removed = raft_req_as(&cluster, 2, 3);
    removed.set_rcvtimeo(5000).unwrap();
    removed.send(&vote, 0).unwrap();
    let told: Envelope = rmp_serde::from_slice(&removed.recv_bytes(0).expect("an answer")).unwrap();
    assert_eq!((told.message.from, told.message.body), (3, Body::Removed));
    // ...and nothing else it sends reaches Raft.
    let heartbeat = peer_frame(cluster_id, 2, 3, before.term + 100, empty_append());
    assert_no_reply(&raft_req_as(&cluster, 2, 3), &heartbeat, "a removed node's heartbeat");
    let Reply::Put { index } = cluster.call_ok(0, &put("after", "1")) else { panic!("put") };
    applied_by_the_rest(index);
    // Had either reached Raft, node 3 would be in their term. (A slow
    // machine may hold a real election meanwhile: the term may move a little.)
    let status = cluster.status(3).expect("node 3 answers");
    assert!(status.term < before.term + 100, "node 3 took the removed node's term: {status:?}");
}

/// With `admin_keys`, the keys of `client_keys` may read and write but not
/// change the cluster: `forbidden` on any node, whatever else is wrong with
/// the request; an admin key may, through a follower too (CONTRACT.md
/// "Authorization").
#[test]
fn only_admin_keys_run_admin_ops() {
    let cluster = TestCluster::configure_with_keys(3, false);
    let keys = cluster.dir.path().join("keys");
    let admin = CurveIdentity::write_new(&keys.join("admin")).unwrap();
    let client = cluster.client_key.clone().unwrap().public();
    let lists = format!(r#", "client_keys": ["{client}"], "admin_keys": ["{}"]"#, admin.public());
    cluster.write_config_of(&cluster.config_path.clone(), 0..3, &lists);
    let cluster = cluster.start_all();
    let leader = cluster.wait_for_leader();
    let follower = (leader + 1) % 3;
    cluster.call_ok(follower, &put("k", "v"));

    let forbidden =
        |reply: Reply| matches!(reply, Reply::Error { code: raft_zmq::wire::protocol::ErrorCode::Forbidden, .. });
    for id in [leader, follower] {
        for request in [
            Request::Snapshot,
            Request::TransferLeader { to: None },
            Request::RemoveNode { id: follower as u64 },
            Request::AddNode { member: cluster.member(1), voter: true },
        ] {
            let reply = cluster.client(id).call(&request).unwrap();
            assert!(forbidden(reply.clone()), "node {id}, {request:?}: {reply:?}");
        }
        // {"op": "remove_node"} without its id: forbidden, not bad_request.
        let bare = rmp_serde::to_vec_named(&std::collections::BTreeMap::from([("op", "remove_node")])).unwrap();
        let frame = cluster.client(id).call_raw(&bare).unwrap();
        let reply = Reply::decode(&frame, &Request::Status).unwrap();
        assert!(forbidden(reply.clone()), "node {id}: a malformed admin request: {reply:?}");
    }

    // The admin key, through the follower: forwarded and done.
    let config = path(&cluster.config_path).to_string();
    let admin_key = keys.join("admin.key");
    let moved = cli_ok(
        &[
            "transfer-leader",
            "--config",
            &config,
            "--node",
            &follower.to_string(),
            "--to",
            &follower.to_string(),
            "--key",
            path(&admin_key),
        ]
        .map(String::from),
    );
    assert!(moved.contains(&format!(r#""leader":{follower}"#)), "{moved}");
    let as_admin = ClientCurve { identity: admin, server: cluster.nodes[leader].public_key.unwrap() };
    let mut admin_client =
        raft_zmq::client::Client::new(&zmq::Context::new(), &cluster.nodes[leader].client, Duration::from_secs(5))
            .with_curve(Some(as_admin));
    let reply = admin_client.call(&Request::Snapshot).unwrap();
    assert!(matches!(reply, Reply::Snapshot { .. }), "{reply:?}");
}

/// A loopback TCP proxy that keeps a copy of every byte it forwards, one
/// buffer per connection and direction, so that no value is split by
/// another stream's bytes.
struct CaptureProxy {
    listen: SocketAddr,
    stop: Arc<AtomicBool>,
    acceptor: JoinHandle<Vec<Vec<u8>>>,
}

impl CaptureProxy {
    fn start(target: &str) -> CaptureProxy {
        let target: SocketAddr = target.trim_start_matches("tcp://").parse().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let listen = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let stop = stop.clone();
            thread::spawn(move || capture(&listener, target, &stop))
        };
        CaptureProxy { listen, stop, acceptor }
    }

    fn endpoint(&self) -> String {
        format!("tcp://{}", self.listen)
    }

    /// Stops forwarding; every stream's bytes.
    fn finish(self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::Release);
        self.acceptor.join().unwrap()
    }
}

/// How often idle proxy threads look at the stop flag.
const PROXY_POLL: Duration = Duration::from_millis(20);

fn capture(listener: &TcpListener, target: SocketAddr, stop: &Arc<AtomicBool>) -> Vec<Vec<u8>> {
    let mut pumps = Vec::new();
    while !stop.load(Ordering::Acquire) {
        let Ok((client, _)) = listener.accept() else {
            thread::sleep(PROXY_POLL);
            continue;
        };
        let Ok(server) = TcpStream::connect(target) else { continue };
        for (from, to) in [(&client, &server), (&server, &client)] {
            let (from, to, stop) = (from.try_clone().unwrap(), to.try_clone().unwrap(), stop.clone());
            pumps.push(thread::spawn(move || pump(from, to, &stop)));
        }
    }
    pumps.into_iter().map(|pump| pump.join().unwrap()).collect()
}

/// Copies `from` to `to` until either ends or the proxy stops; returns the bytes.
fn pump(mut from: TcpStream, mut to: TcpStream, stop: &AtomicBool) -> Vec<u8> {
    from.set_read_timeout(Some(PROXY_POLL)).unwrap();
    let (mut seen, mut buf) = (Vec::new(), vec![0; 64 * 1024]);
    while !stop.load(Ordering::Acquire) {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                seen.extend_from_slice(&buf[..n]);
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    seen
}

/// Runs a 3-node cluster whose peer traffic, and one client's traffic to the
/// leader, go through capturing proxies; writes `value` and reads it back
/// through them. Returns every captured stream.
fn wire_bytes(curve: bool, value: &str) -> Vec<Vec<u8>> {
    let mut cluster = if curve { TestCluster::configure_with_keys(3, false) } else { TestCluster::configure(3, "") };
    let raft_proxies: Vec<CaptureProxy> = cluster.nodes.iter().map(|n| CaptureProxy::start(&n.raft)).collect();
    for id in 0..3 {
        let routes: Vec<String> = (0..3)
            .filter(|&peer| peer != id)
            .flat_map(|peer| ["--peer".to_string(), format!("{peer}={}", raft_proxies[peer].endpoint())])
            .collect();
        cluster.start_node_with(id, &routes);
    }
    let leader = cluster.wait_for_leader();
    let client_proxy = CaptureProxy::start(&cluster.nodes[leader].client);
    let through_proxy = Endpoint { address: client_proxy.endpoint(), ..cluster.endpoint(leader) };
    let mut client = through_proxy.client(&zmq::Context::new(), Duration::from_secs(5));
    let index = wait_for("a put through the proxy", || match client.call(&put("wire", value)) {
        Ok(Reply::Put { index }) => Some(index),
        _ => None,
    });
    // The followers applied it, so it reached them through the proxies.
    cluster.wait_applied(index);
    let Ok(Reply::Get { value: Some(read) }) = client.call(&get("wire")) else { panic!("get through the proxy") };
    assert_eq!(read, raft_zmq::kv::Value::Str(value.into()));
    let mut streams = client_proxy.finish();
    raft_proxies.into_iter().for_each(|proxy| streams.extend(proxy.finish()));
    streams
}

fn carries(streams: &[Vec<u8>], value: &str) -> bool {
    streams.iter().any(|s| s.windows(value.len()).any(|w| w == value.as_bytes()))
}

#[test]
fn with_curve_a_value_never_crosses_the_wire_in_the_clear() {
    let value = format!("wire-secret-{:016x}", fastrand::u64(..));
    let streams = wire_bytes(true, &value);
    let total: usize = streams.iter().map(Vec::len).sum();
    assert!(total > 10_000, "only {total} bytes captured: the proxies saw too little");
    assert!(!carries(&streams, &value), "{value} crossed the wire in the clear");
}

/// The control: the same capture without keys does see the value, in the
/// client's traffic and in the AppendEntries to followers.
#[test]
fn without_curve_the_capture_sees_the_value() {
    let value = format!("wire-plain-{:016x}", fastrand::u64(..));
    let streams = wire_bytes(false, &value);
    let with_value = streams.iter().filter(|s| carries(std::slice::from_ref(s), &value)).count();
    // Client request and reply, and the AppendEntries to each follower.
    assert!(with_value >= 4, "the value is in {with_value} of {} streams", streams.len());
}

#[test]
fn keygen_writes_a_key_pair_once() {
    let dir = tempfile::tempdir().unwrap();
    let name = dir.path().join("new/folder/node");
    let made = run_to_exit(["keygen", path(&name)]);
    assert!(made.status.success(), "{}", made.stderr);
    let (secret_path, public_path) = (dir.path().join("new/folder/node.key"), dir.path().join("new/folder/node.pub"));
    let (secret, public) = (fs::read_to_string(&secret_path).unwrap(), fs::read_to_string(&public_path).unwrap());
    for text in [&secret, &public] {
        assert_eq!((text.len(), text.lines().count()), (41, 1), "40 characters and a newline: {text:?}");
    }
    assert_eq!(made.stdout, public, "prints the public key");
    let public_key = PublicKey::parse(public.trim_end()).unwrap();
    assert_eq!(CurveIdentity::load(&secret_path).unwrap().public(), public_key, "a pair");
    assert_eq!(fs::metadata(&secret_path).unwrap().permissions().mode() & 0o777, 0o600);

    let again = run_to_exit(["keygen", path(&name)]);
    assert!(!again.status.success(), "overwrote a key pair");
    assert_eq!(again.stderr.trim(), format!("raft-zmq: {} already exists; not overwriting it", secret_path.display()));
    assert_eq!(fs::read_to_string(&secret_path).unwrap(), secret, "the old key is kept");
}

#[test]
fn a_node_without_its_own_secret_key_does_not_start() {
    let cluster = TestCluster::configure_with_keys(1, false);
    let key_path = cluster.dir.path().join("keys").join("0.key");
    let other = CurveIdentity::write_new(&cluster.dir.path().join("other")).unwrap();
    let mismatch = format!(
        "does not match node 0's public_key in {} (its public key is {})",
        path(&cluster.config_path),
        other.public()
    );
    let own = fs::read_to_string(&key_path).unwrap();
    let open = format!("is open to other users (mode 0640); run `chmod 600 {}`", path(&key_path));
    let cases = [
        ("missing", None, "raft-zmq keygen"),
        ("not a key", Some(("hello\n".to_string(), 0o600)), "not a secret key"),
        ("another's key", Some((fs::read_to_string(cluster.dir.path().join("other.key")).unwrap(), 0o600)), &mismatch),
        // As ssh: a secret key others may read is refused, even the right one.
        ("readable by its group", Some((own, 0o640)), &open),
    ];
    for (case, content, problem) in cases {
        match content {
            Some((text, mode)) => {
                fs::write(&key_path, text).unwrap();
                fs::set_permissions(&key_path, fs::Permissions::from_mode(mode)).unwrap();
            }
            None => fs::remove_file(&key_path).unwrap(),
        }
        let exited = cluster.run_node_to_exit(0);
        assert_eq!(exited.status.code(), Some(1), "{case}: {}", exited.stderr);
        let error = exited.stderr.lines().find(|l| l.starts_with("raft-zmq: ")).unwrap_or_default();
        assert!(error.contains(path(&key_path)) && error.contains(problem), "{case}: {error:?}\n{}", exited.stderr);
        assert!(!cluster.state_dir(0).exists(), "{case}: state was created");
    }
}

/// A TCP connection to `to` from `from`: every 127.0.0.0/8 address is this
/// host, so a test can be two clients at two addresses.
fn connect_from(from: Ipv4Addr, to: SocketAddrV4) -> std::io::Result<TcpStream> {
    let address = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let (source, target) = (address(SocketAddrV4::new(from, 0)), address(to));
    // SAFETY: a fresh socket, owned by the TcpStream (which closes it on
    // every path) as soon as it exists; both addresses outlive the calls.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        if libc::bind(fd, (&raw const source).cast(), len) != 0
            || libc::connect(fd, (&raw const target).cast(), len) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}

/// A slowloris client: one byte of a request head every 1.5 s, a new
/// connection whenever the server closes one, until `stop`.
fn drip(from: Ipv4Addr, to: SocketAddrV4, stop: &AtomicBool, sent: &AtomicUsize) {
    const HEAD: &[u8] = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ";
    let mut connection: Option<(TcpStream, usize)> = None;
    while !stop.load(Ordering::Acquire) {
        if connection.is_none() {
            connection = connect_from(from, to).ok().map(|stream| (stream, 0));
        }
        if let Some((stream, at)) = &mut connection {
            match stream.write_all(&[HEAD.get(*at).copied().unwrap_or(b'x')]) {
                Ok(()) => {
                    *at += 1;
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => connection = None,
            }
        }
        let next = Instant::now() + Duration::from_millis(1500);
        while !stop.load(Ordering::Acquire) && Instant::now() < next {
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Slowloris (#23 item 8): 32 connections from one address, each sending a
/// byte of a request head every 1.5 s and reconnecting whenever closed, do
/// not keep `/health` from another address unanswered, over more than one
/// head deadline (5 s).
#[test]
fn slow_request_heads_do_not_keep_health_probes_waiting() {
    let cluster = TestCluster::configure_with_http(1).start_all();
    let http = cluster.nodes[0].http.clone().unwrap();
    wait_for("/health to answer 200", || (http_get(&http, "/health")?.0 == 200).then_some(()));
    let target: SocketAddrV4 = http.parse().unwrap();
    let attacker = Ipv4Addr::new(127, 0, 0, 2);
    let (stop, sent) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
    let attack: Vec<JoinHandle<()>> = (0..32)
        .map(|_| {
            let (stop, sent) = (stop.clone(), sent.clone());
            thread::spawn(move || drip(attacker, target, &stop, &sent))
        })
        .collect();
    wait_for("every slow client to have sent a byte", || (sent.load(Ordering::Relaxed) >= 32).then_some(()));
    // `http_get` gives up after 10 s: that is the bound an answer must meet.
    let probing = Instant::now();
    let mut probes = 0;
    while probing.elapsed() < Duration::from_secs(7) {
        let answer = http_get(&http, "/health");
        assert!(answer.is_some(), "probe {probes} unanswered while slow clients held connections");
        probes += 1;
        thread::sleep(Duration::from_millis(500));
    }
    stop.store(true, Ordering::Release);
    attack.into_iter().for_each(|attacker| attacker.join().unwrap());
    assert!(sent.load(Ordering::Relaxed) > 64, "the slow clients kept sending throughout");
}

/// With `client_keys`, keys and values are for those clients only: no HTTP
/// page shows any, and `/cluster?log=N` lists index, term and op alone
/// (CONTRACT.md "Security", HTTP; #23 item 8).
#[test]
fn with_client_keys_no_http_page_shows_keys_or_values() {
    let mut cluster = TestCluster::configure_with_keys(1, true);
    let http = format!("127.0.0.1:{}", free_port());
    cluster.nodes[0].http = Some(http.clone());
    let listed = cluster.client_key.as_ref().unwrap().public();
    cluster.write_config_of(&cluster.config_path.clone(), 0..1, &format!(r#", "client_keys": ["{listed}"]"#));
    cluster.start_node(0);
    let (key, value) = (format!("key-{:016x}", fastrand::u64(..)), format!("value-{:016x}", fastrand::u64(..)));
    let Reply::Put { index } = cluster.call_ok(0, &put(&key, &value)) else { panic!("put") };
    let log = wait_for("/cluster?log=50 to list the put", || {
        let (_, body) = http_get(&http, "/cluster?log=50")?;
        let members: serde_json::Value = serde_json::from_str(&body).ok()?;
        let log = members[0]["log"].as_array()?.clone();
        log.iter().any(|entry| entry["index"] == index).then_some(log)
    });
    for entry in &log {
        let fields: Vec<&String> = entry.as_object().unwrap().keys().collect();
        assert_eq!(fields, ["index", "op", "term"], "{entry}");
    }
    assert!(log.iter().any(|entry| entry["index"] == index && entry["op"] == "put"), "{log:?}");
    for page in ["/cluster?log=50", "/status", "/metrics", "/"] {
        let (code, body) = http_get(&http, page).expect("answers");
        assert_eq!(code, 200, "{page}: {body}");
        assert!(!body.contains(&key) && !body.contains(&value), "{page} shows a key or value: {body}");
    }
}
