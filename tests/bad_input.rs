//! Hostile and broken input against real `raft-zmq` processes: malformed and
//! oversized client frames, junk on the peer (Raft) endpoint, bad configs, a
//! taken port and a corrupt state dir. Whatever arrives, a node answers or
//! drops it and keeps serving; whatever it cannot start with, it refuses with
//! one clear line instead of a panic or a hang.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::Path;

use common::*;
use raft_zmq::wire::protocol::{Reply, Request};
use rmpv::Value as M;

// ---------------------------------------------------------------------------
// Helpers

/// Deterministic junk (xorshift64), so a failure reproduces.
fn junk(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn pack(value: &M) -> Vec<u8> {
    let mut frame = Vec::new();
    rmpv::encode::write_value(&mut frame, value).unwrap();
    frame
}

/// A MessagePack map with str keys, packed.
fn map(pairs: &[(&str, M)]) -> Vec<u8> {
    pack(&M::Map(pairs.iter().map(|(k, v)| (M::from(*k), v.clone())).collect()))
}

fn s(text: &str) -> M {
    M::from(text)
}

/// Checks that `frame` is exactly `{"ok": false, "error": code, "message":
/// <non-empty str>, "leader": <uint or nil>}` and returns the message.
fn assert_error_reply(frame: &[u8], code: &str, case: &str) -> String {
    let mut rest = frame;
    let value = rmpv::decode::read_value(&mut rest).unwrap_or_else(|e| panic!("{case}: reply is not MessagePack: {e}"));
    assert!(rest.is_empty(), "{case}: trailing bytes after the reply");
    let M::Map(pairs) = value else { panic!("{case}: reply is not a map: {value:?}") };
    let mut fields = BTreeMap::new();
    for (k, v) in pairs {
        let M::String(k) = k else { panic!("{case}: reply has a non-str key {k:?}") };
        let k = k.into_str().expect("utf-8 key");
        assert!(fields.insert(k.clone(), v).is_none(), "{case}: duplicate key {k}");
    }
    let keys: Vec<&str> = fields.keys().map(String::as_str).collect();
    assert_eq!(keys, ["error", "leader", "message", "ok"], "{case}: {fields:?}");
    assert_eq!(fields["ok"], M::Boolean(false), "{case}");
    assert_eq!(fields["error"].as_str(), Some(code), "{case}: {fields:?}");
    assert!(fields["error"].is_str(), "{case}");
    let message = fields["message"].as_str().unwrap_or_else(|| panic!("{case}: message is not a str"));
    assert!(!message.trim().is_empty(), "{case}: empty message");
    let leader = &fields["leader"];
    assert!(leader.is_nil() || leader.as_u64().is_some(), "{case}: leader is {leader:?}");
    message.to_string()
}

/// Sends one frame on a REQ socket and returns the single reply frame.
fn req_call(cluster: &TestCluster, id: usize, frame: &[u8], case: &str) -> Vec<u8> {
    let socket = cluster.socket(zmq::REQ, &cluster.nodes[id].client);
    socket.send(frame, 0).unwrap();
    let reply = socket.recv_multipart(0).unwrap_or_else(|e| panic!("{case}: no reply from node {id}: {e}"));
    assert_eq!(reply.len(), 1, "{case}: reply must be one frame");
    reply.into_iter().next().unwrap()
}

/// Sends `[empty delimiter, frames...]` on a DEALER socket and returns the
/// reply frame after the delimiter.
fn dealer_call(cluster: &TestCluster, id: usize, frames: &[&[u8]], case: &str) -> Vec<u8> {
    let socket = cluster.socket(zmq::DEALER, &cluster.nodes[id].client);
    let mut message: Vec<&[u8]> = vec![b""];
    message.extend_from_slice(frames);
    socket.send_multipart(message, 0).unwrap();
    let reply = socket.recv_multipart(0).unwrap_or_else(|e| panic!("{case}: no reply from node {id}: {e}"));
    assert_eq!(reply.len(), 2, "{case}: expected [delimiter, reply], got {} frames", reply.len());
    assert!(reply[0].is_empty(), "{case}: first reply frame must be the empty delimiter");
    reply.into_iter().nth(1).unwrap()
}

/// A node that still does a normal write and a linearizable read.
fn assert_serves(cluster: &TestCluster, id: usize, key: &str) {
    let Reply::Put { index } = cluster.call_ok(id, &put(key, "still-alive")) else { panic!("put") };
    assert!(index > 0);
    assert_eq!(cluster.get_value(id, key), Some(raft_zmq::kv::Value::Str("still-alive".into())));
}

/// Every malformed request the contract calls `bad_request`.
fn malformed_requests() -> Vec<(&'static str, Vec<u8>)> {
    let put = |extra: &[(&str, M)]| {
        let mut pairs = vec![("op", s("put")), ("key", s("a")), ("value", s("1"))];
        pairs.extend(extra.iter().cloned());
        map(&pairs)
    };
    let mut trailing = map(&[("op", s("status"))]);
    trailing.push(0xc0);
    let mut deep = M::from("x");
    for _ in 0..100 {
        deep = M::Array(vec![deep]);
    }
    vec![
        ("garbage bytes", b"\xc1\xc1\xc1 this is not MessagePack".to_vec()),
        ("random bytes", junk(7, 300)),
        ("empty frame", Vec::new()),
        ("truncated map", put(&[])[..9].to_vec()),
        ("trailing data after the map", trailing),
        ("str32 claiming 4 GiB", vec![0xdb, 0xff, 0xff, 0xff, 0xff, b'a']),
        ("array32 claiming 4G items", vec![0xdd, 0xff, 0xff, 0xff, 0xff, 0x01]),
        ("map32 claiming 4G pairs", vec![0xdf, 0xff, 0xff, 0xff, 0xff, 0xa1, b'o']),
        ("deeply nested", map(&[("op", s("get")), ("key", deep)])),
        ("a str, not a map", pack(&s("put"))),
        ("an array, not a map", pack(&M::Array(vec![s("op"), s("put"), s("key"), s("a")]))),
        ("non-str map key", pack(&M::Map(vec![(M::from(1), s("put")), (s("key"), s("a"))]))),
        ("bin map key", pack(&M::Map(vec![(M::Binary(b"op".to_vec()), s("status"))]))),
        ("duplicate op key", pack(&M::Map(vec![(s("op"), s("status")), (s("op"), s("get"))]))),
        ("unknown op", map(&[("op", s("frobnicate")), ("key", s("a"))])),
        ("op is not a str", map(&[("op", M::from(3))])),
        ("missing op", map(&[("key", s("a")), ("value", s("1"))])),
        ("put without key", map(&[("op", s("put")), ("value", s("1"))])),
        ("get without key", map(&[("op", s("get"))])),
        ("put without value", map(&[("op", s("put")), ("key", s("a"))])),
        ("int value", map(&[("op", s("put")), ("key", s("a")), ("value", M::from(5))])),
        ("int key", map(&[("op", s("get")), ("key", M::from(5))])),
        ("cas without expect", map(&[("op", s("cas")), ("key", s("a")), ("value", s("1"))])),
        ("propose with bin command", map(&[("op", s("propose")), ("command", M::Binary(vec![1]))])),
        ("negative seq", put(&[("client_id", s("c")), ("seq", M::from(-1))])),
        ("str seq", put(&[("client_id", s("c")), ("seq", s("1"))])),
        ("client_id without seq", put(&[("client_id", s("c"))])),
        ("seq without client_id", put(&[("seq", M::from(1))])),
        ("int client_id", put(&[("client_id", M::from(1)), ("seq", M::from(1))])),
        ("negative log limit", map(&[("op", s("log")), ("limit", M::from(-5))])),
    ]
}

// ---------------------------------------------------------------------------
// Client endpoint

#[test]
fn malformed_client_requests_get_bad_request_and_the_node_keeps_serving() {
    let cluster = TestCluster::start(3);
    cluster.wait_for_leader();
    // Node 0 may be leader or follower: a malformed request is answered
    // locally either way. Ask a follower too, where forwarding could go wrong.
    for (case, frame) in malformed_requests() {
        for id in [0, 1] {
            let reply = req_call(&cluster, id, &frame, case);
            assert_error_reply(&reply, "bad_request", &format!("REQ to node {id}, {case}"));
        }
        let reply = dealer_call(&cluster, 2, &[&frame], case);
        assert_error_reply(&reply, "bad_request", &format!("DEALER to node 2, {case}"));
    }
    for id in 0..3 {
        assert_serves(&cluster, id, &format!("after-bad-requests-{id}"));
    }
}

#[test]
fn a_flood_of_bad_requests_neither_wedges_nor_kills_the_node() {
    let cluster = TestCluster::start(1);
    cluster.wait_for_leader();
    // More error replies at once than the inproc reply queue holds (100k):
    // the endpoint must never wait on a queue only it drains.
    let dealers: Vec<zmq::Socket> = (0..2)
        .map(|_| {
            let dealer = cluster.socket(zmq::DEALER, &cluster.nodes[0].client);
            dealer.set_sndhwm(0).unwrap();
            dealer
        })
        .collect();
    for dealer in &dealers {
        for _ in 0..60_000 {
            dealer.send_multipart([&b""[..], &b"x"[..]], 0).unwrap();
        }
    }
    assert_serves(&cluster, 0, "after-flood");
    for dealer in &dealers {
        let answered = (0..60_000).take_while(|_| dealer.recv_multipart(0).is_ok()).count();
        assert_eq!(answered, 60_000, "every bad request gets its bad_request");
    }
}

#[test]
fn a_multi_frame_request_from_a_dealer_is_bad_request() {
    let cluster = TestCluster::start(3);
    cluster.wait_for_leader();
    let status = map(&[("op", s("status"))]);
    let put_frame = raft_zmq::wire::protocol::encode_request(&put("multi", "1"));
    for id in 0..3 {
        for (case, frames) in [
            ("two valid requests", vec![&status[..], &status[..]]),
            ("a put then junk", vec![&put_frame[..], b"junk"]),
            ("an empty frame then a request", vec![b"", &status[..]]),
        ] {
            let reply = dealer_call(&cluster, id, &frames, case);
            assert_error_reply(&reply, "bad_request", &format!("node {id}, {case}"));
        }
    }
    // Neither half of the rejected put was applied.
    let Reply::Get { value } = cluster.call_ok(0, &get("multi")) else { panic!() };
    assert_eq!(value, None);
    assert_serves(&cluster, 1, "after-multi-frame");
}

#[test]
fn oversized_requests_get_too_large_and_the_node_keeps_serving() {
    let cluster = {
        let mut cluster = TestCluster::configure(1, r#", "max_request_bytes": 1024"#);
        cluster.start_node(0);
        cluster
    };
    cluster.wait_for_leader();
    // A put of exactly the limit is fine; one byte more is not.
    let put_of_size = |size: usize| {
        let overhead = raft_zmq::wire::protocol::encode_request(&put("big", "")).len();
        // str8 holds up to 255 bytes, str16 up to 65535: both grow the header.
        let mut value_len = size - overhead;
        let mut frame = raft_zmq::wire::protocol::encode_request(&put("big", &"x".repeat(value_len)));
        while frame.len() > size {
            value_len -= 1;
            frame = raft_zmq::wire::protocol::encode_request(&put("big", &"x".repeat(value_len)));
        }
        assert_eq!(frame.len(), size, "cannot build a put of exactly {size} bytes");
        frame
    };
    let reply = req_call(&cluster, 0, &put_of_size(1024), "1024-byte put");
    let Ok(Reply::Put { .. }) = Reply::decode(&reply, &put("big", "")) else {
        panic!("a request of exactly max_request_bytes must be served: {:?}", rmpv::decode::read_value(&mut &reply[..]))
    };
    for (case, frame) in [
        ("1025-byte put", put_of_size(1025)),
        ("2 KiB put", put_of_size(2048)),
        ("2 KiB of junk", junk(11, 2048)),
        ("5 MiB put", put_of_size(5 << 20)),
    ] {
        assert_error_reply(&req_call(&cluster, 0, &frame, case), "too_large", case);
        let reply = dealer_call(&cluster, 0, &[&frame], case);
        assert_error_reply(&reply, "too_large", &format!("DEALER, {case}"));
    }
    assert_serves(&cluster, 0, "after-too-large");
}

// ---------------------------------------------------------------------------
// Peer (Raft) endpoint

#[test]
fn junk_on_the_raft_endpoint_neither_disturbs_the_leader_nor_stops_commits() {
    let cluster = TestCluster::start(3);
    let leader = cluster.wait_for_leader();
    let Reply::Status(before) = cluster.call_ok(leader, &Request::Status) else { panic!() };
    let cluster_id = cluster.wait_for_name(leader);
    let version = u64::from(raft_zmq::wire::envelope::PROTOCOL_VERSION);
    let mut truncated = map(&[
        ("version", M::from(version)),
        ("cluster", M::from(cluster_id)),
        ("from", M::from(1)),
        ("term", M::from(1_000_000)),
    ]);
    truncated.truncate(truncated.len() - 5);
    // Each of these must be dropped; several claim a huge term, which a node
    // that acted on them would adopt, deposing the leader.
    let payloads: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", junk(3, 512)),
        ("empty", Vec::new()),
        ("truncated envelope", truncated),
        ("str32 claiming 4 GiB", vec![0xdb, 0xff, 0xff, 0xff, 0xff, 0x00]),
        ("map with wrong fields", map(&[("hello", s("world")), ("term", M::from(1_000_000))])),
        (
            "wrong cluster",
            map(&[
                ("version", M::from(version)),
                ("cluster", M::from(cluster_id ^ 1)),
                ("from", M::from(1)),
                ("term", M::from(1_000_000)),
                ("message", map_value(&[("term", M::from(1_000_000))])),
            ]),
        ),
        (
            "future version",
            map(&[("version", M::from(version + 1)), ("cluster", M::from(cluster_id)), ("term", M::from(1_000_000))]),
        ),
        (
            "right cluster, nonsense message",
            map(&[
                ("version", M::from(version)),
                ("cluster", M::from(cluster_id)),
                ("from", M::from(1)),
                ("term", M::from(1_000_000)),
                ("message", s("vote for me")),
            ]),
        ),
        ("client put on the raft port", raft_zmq::wire::protocol::encode_request(&put("wrong-port", "1"))),
    ];
    // An idle stranger holding a TCP connection open for the whole test.
    let idle: Vec<TcpStream> = cluster.nodes.iter().map(|n| TcpStream::connect(addr(&n.raft)).unwrap()).collect();
    for round in 0..3 {
        for node in &cluster.nodes {
            spray(&cluster, &node.raft, &payloads);
        }
        let Reply::Put { index } = cluster.call_ok(leader, &put(&format!("after-junk-{round}"), "1")) else {
            panic!("put")
        };
        cluster.wait_applied(index);
    }
    drop(idle);
    for id in 0..3 {
        let mirror = cluster.mirror(id);
        assert!(mirror.contains(r#""key":"after-junk-2""#), "node {id} applied the writes: {mirror}");
        assert!(!mirror.contains("wrong-port"), "node {id} applied a client request sent to the raft port");
    }
    let Reply::Status(after) = cluster.call_ok(leader, &Request::Status) else { panic!() };
    assert_eq!((after.role.as_str(), after.term), ("leader", before.term), "junk must not cause an election");
    for id in 0..3 {
        let status = cluster.status(id).expect("status");
        assert!(status.term < 1_000_000, "node {id} adopted a forged term");
    }
}

/// Messages a buggy or forged peer could send with a valid envelope: each
/// must be dropped, never acted on, never persisted.
#[test]
fn inconsistent_peer_messages_with_a_valid_envelope_crash_nothing_and_never_reach_disk() {
    use raft_zmq::raft::{Body, Entry, Message, Payload};
    use raft_zmq::wire::envelope::Envelope;

    let mut cluster = TestCluster::start(3);
    let leader = cluster.wait_for_leader();
    for i in 0..3 {
        cluster.call_ok(leader, &put(&format!("before-{i}"), "1"));
    }
    let Reply::Status(before) = cluster.call_ok(leader, &Request::Status) else { panic!() };
    let term = before.term;
    let cluster_id = cluster.wait_for_name(leader);
    let entry = |index, term| Entry { index, term, payload: Payload::Command(b"forged".to_vec().into()) };
    let append = |prev: (u64, u64), entries: Vec<Entry>, leader_commit| Body::AppendEntries {
        prev_log_index: prev.0,
        prev_log_term: prev.1,
        entries,
        leader_commit,
        read_seq: 0,
    };
    let forged: Vec<(&str, u64, Body)> = vec![
        ("entry index 0", term, append((0, 0), vec![entry(0, term)], 0)),
        ("decreasing entry terms", term, append((0, 0), vec![entry(1, term), entry(2, term - 1)], 0)),
        ("entry term above the message's", term, append((0, 0), vec![entry(1, term + 5)], 100)),
        ("gap after prev", term, append((0, 0), vec![entry(2, term)], 100)),
        ("term 2^64-1 heartbeat", u64::MAX, append((0, 0), vec![], 0)),
        (
            "term 2^64-1 vote request",
            u64::MAX,
            Body::RequestVote { last_log_index: 1 << 40, last_log_term: 1 << 40, pre_vote: false, transfer: false },
        ),
        (
            "a snapshot far ahead, without its data",
            term,
            Body::InstallSnapshot {
                snapshot: raft_zmq::raft::SnapshotMeta { index: 1 << 40, term },
                membership: Default::default(),
            },
        ),
    ];
    for round in 0..2 {
        for to in 0..3u64 {
            // Forged in the name of the leader, or of a follower for the leader.
            let from = if to == leader as u64 { (to + 1) % 3 } else { leader as u64 };
            for (what, term, body) in &forged {
                let message = Message { from, to, term: *term, body: body.clone() };
                let envelope = Envelope {
                    version: raft_zmq::wire::envelope::PROTOCOL_VERSION,
                    cluster: cluster_id,
                    from,
                    term: *term,
                    message,
                    chunk: None,
                    window: None,
                };
                let req = cluster.socket(zmq::REQ, &cluster.nodes[to as usize].raft);
                req.set_rcvtimeo(100).unwrap();
                req.send(rmp_serde::to_vec_named(&envelope).unwrap(), 0).unwrap();
                assert!(req.recv_bytes(0).is_err(), "round {round}: node {to} answered {what}");
            }
        }
        let Reply::Put { index } = cluster.call_ok(leader, &put(&format!("after-{round}"), "1")) else { panic!() };
        cluster.wait_applied(index);
    }
    assert_eq!(cluster.running(), vec![0, 1, 2], "a node died");
    let Reply::Status(after) = cluster.call_ok(leader, &Request::Status) else { panic!() };
    assert_eq!((after.role.as_str(), after.term), ("leader", term), "forged messages caused an election");
    let mirrors: Vec<String> = (0..3).map(|id| cluster.mirror(id)).collect();
    assert!(mirrors.iter().all(|m| m == &mirrors[0] && !m.contains("forged")), "{mirrors:#?}");

    // Nothing forged reached a state dir: every node restarts from its own.
    for id in 0..3 {
        cluster.kill(id);
    }
    for id in 0..3 {
        cluster.start_node(id);
    }
    let leader = cluster.wait_for_leader();
    assert_eq!(cluster.get_value(leader, "after-1"), Some(raft_zmq::kv::Value::Str("1".into())));
}

fn map_value(pairs: &[(&str, M)]) -> M {
    M::Map(pairs.iter().map(|(k, v)| (M::from(*k), v.clone())).collect())
}

/// "tcp://127.0.0.1:7000" → "127.0.0.1:7000".
fn addr(endpoint: &str) -> &str {
    endpoint.strip_prefix("tcp://").unwrap()
}

/// Sends every payload to a raft endpoint over DEALER (with and without the
/// REQ-style delimiter, and as a multi-frame message), REQ and raw TCP.
/// Nothing here waits for an answer longer than a short timeout: a peer may
/// rightly never answer junk.
fn spray(cluster: &TestCluster, endpoint: &str, payloads: &[(&str, Vec<u8>)]) {
    let dealer = cluster.socket(zmq::DEALER, endpoint);
    for (_, payload) in payloads {
        let (empty, payload) = (&b""[..], &payload[..]);
        dealer.send_multipart([empty, payload], 0).unwrap();
        dealer.send(payload, 0).unwrap();
        dealer.send_multipart([empty, payload, payload], 0).unwrap();
        dealer.send_multipart([payload, empty, payload], 0).unwrap();
    }
    for (_, payload) in payloads {
        let req = cluster.socket(zmq::REQ, endpoint);
        req.set_rcvtimeo(50).unwrap();
        req.send(&payload[..], 0).unwrap();
        let _ = req.recv_bytes(0); // most likely EAGAIN; either way not asserted
    }
    // Raw TCP: junk where the ZMTP greeting belongs, a valid ZMTP 3.0
    // signature followed by junk, and a connect-then-close.
    let mut zmtp = vec![0xff, 0, 0, 0, 0, 0, 0, 0, 1, 0x7f, 3, 0];
    zmtp.extend_from_slice(b"NULL");
    zmtp.extend_from_slice(&[0; 16]);
    zmtp.extend_from_slice(&[0; 32]);
    zmtp.extend(junk(5, 4096));
    for bytes in [junk(9, 4096), zmtp, Vec::new()] {
        let mut tcp = TcpStream::connect(addr(endpoint)).unwrap();
        let _ = tcp.write_all(&bytes); // the node may hang up first
    }
    // Let the DEALER's queue drain before it is dropped with linger 0.
    dealer.set_rcvtimeo(100).unwrap();
    let _ = dealer.recv_bytes(0);
}

// ---------------------------------------------------------------------------
// Start-up failures

/// One well-formed node entry on fresh free ports.
fn node_json(id: u64) -> String {
    format!(r#"{{"id": {id}, "raft": "tcp://127.0.0.1:{}", "client": "tcp://127.0.0.1:{}"}}"#, free_port(), free_port())
}

/// A valid Z85 public key (libzmq's zmq_curve(7) example).
const KEY: &str = "Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID";

/// A node entry from [`node_json`] with a `public_key`.
fn keyed(node: &str, key: &str) -> String {
    format!(r#"{}, "public_key": "{key}"}}"#, node.strip_suffix('}').unwrap())
}

fn assert_config_rejected(dir: &Path, case: &str, config_path: &Path, node_id: &str) {
    let exited = run_to_exit(["--node-id".as_ref(), node_id.as_ref(), "--config".as_ref(), config_path.as_os_str()]);
    let path = config_path.display().to_string();
    assert_eq!(exited.status.code(), Some(2), "{case}: exit status; stderr: {}", exited.stderr);
    let lines: Vec<&str> = exited.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{case}: exactly one line on stderr, got {lines:?}");
    assert!(!lines[0].trim().is_empty(), "{case}: empty stderr line");
    assert!(lines[0].contains(&path), "{case}: {:?} does not name {path}", lines[0]);
    assert!(!dir.join("state").exists(), "{case}: a rejected config must not create state");
}

#[test]
fn bad_configs_exit_2_with_one_line_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (node_json(0), node_json(1), node_json(2));
    let nodes = format!("[{a}, {b}, {c}]");
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("missing file", None, "0"),
        ("bad JSON", Some(format!(r#"{{"nodes": {nodes}"#)), "0"),
        ("not an object", Some("[1, 2, 3]".into()), "0"),
        ("empty file", Some(String::new()), "0"),
        ("no nodes", Some(r#"{"heartbeat_ms": 50}"#.into()), "0"),
        ("unknown top-level key", Some(format!(r#"{{"nodes": {nodes}, "heartbeat": 50}}"#)), "0"),
        (
            "unknown node key",
            Some(format!(
                r#"{{"nodes": [{a}, {b}, {{"id": 2, "raft": "tcp://127.0.0.1:{}", "client": "tcp://127.0.0.1:{}", "weight": 1}}]}}"#,
                free_port(),
                free_port()
            )),
            "0",
        ),
        ("duplicate id", Some(format!(r#"{{"nodes": [{a}, {b}, {}]}}"#, node_json(1))), "0"),
        (
            "duplicate endpoint",
            Some(format!(
                r#"{{"nodes": [{a}, {b}, {{"id": 2, "raft": "tcp://127.0.0.1:{}", "client": {:?}}}]}}"#,
                free_port(),
                serde_json::from_str::<serde_json::Value>(&a).unwrap()["raft"].as_str().unwrap()
            )),
            "0",
        ),
        ("node id not listed", Some(format!(r#"{{"nodes": {nodes}}}"#)), "9"),
        ("election min > max", Some(format!(r#"{{"nodes": {nodes}, "election_timeout_ms": [600, 300]}}"#)), "0"),
        ("election min == max", Some(format!(r#"{{"nodes": {nodes}, "election_timeout_ms": [300, 300]}}"#)), "0"),
        (
            "heartbeat == election min",
            Some(format!(r#"{{"nodes": {nodes}, "election_timeout_ms": [300, 600], "heartbeat_ms": 300}}"#)),
            "0",
        ),
        (
            "heartbeat > election min",
            Some(format!(r#"{{"nodes": {nodes}, "election_timeout_ms": [300, 600], "heartbeat_ms": 400}}"#)),
            "0",
        ),
        ("public_key on some nodes only", Some(format!(r#"{{"nodes": [{}, {b}, {c}]}}"#, keyed(&a, KEY))), "1"),
        ("malformed public_key", Some(format!(r#"{{"nodes": [{}]}}"#, keyed(&a, "not-a-z85-key"))), "0"),
        (
            "malformed client key",
            Some(format!(r#"{{"nodes": [{}], "client_keys": ["{}"]}}"#, keyed(&a, KEY), &KEY[1..])),
            "0",
        ),
    ];
    for (i, (case, text, node_id)) in cases.into_iter().enumerate() {
        let case_dir = dir.path().join(format!("case{i}"));
        fs::create_dir(&case_dir).unwrap();
        let config_path = case_dir.join("config.json");
        if let Some(text) = text {
            fs::write(&config_path, text).unwrap();
        }
        assert_config_rejected(&case_dir, case, &config_path, node_id);
    }
    // Unreadable: tests may run as root, which reads any mode, so use a
    // folder where the file should be.
    let case_dir = dir.path().join("unreadable");
    let config_path = case_dir.join("config.json");
    fs::create_dir_all(&config_path).unwrap();
    assert_config_rejected(&case_dir, "config path is a folder", &config_path, "0");
}

fn assert_port_in_use_refused(which: &str) {
    let cluster = TestCluster::configure(1, "");
    let endpoint = match which {
        "raft" => cluster.nodes[0].raft.clone(),
        _ => cluster.nodes[0].client.clone(),
    };
    let _squatter = TcpListener::bind(addr(&endpoint)).unwrap();
    let exited = cluster.run_node_to_exit(0);
    assert!(!exited.status.success(), "{which}: started although {endpoint} is taken");
    assert!(exited.stderr.contains(&endpoint), "{which}: stderr does not name {endpoint}:\n{}", exited.stderr);
    assert!(
        exited.stderr.to_lowercase().contains("in use"),
        "{which}: stderr does not say 'in use':\n{}",
        exited.stderr
    );
    assert!(!exited.stderr.contains("panicked at"), "{which}: panicked:\n{}", exited.stderr);
}

#[test]
fn a_taken_raft_port_stops_the_node_with_a_clear_error() {
    assert_port_in_use_refused("raft");
}

#[test]
fn a_taken_client_port_stops_the_node_with_a_clear_error() {
    assert_port_in_use_refused("client");
}

/// Writes, stops node 0 of a 1-node cluster cleanly, overwrites `files` of
/// its state dir with junk and starts it again: it must refuse with an error
/// naming the state dir, not panic and not carry on as a blank node.
fn assert_corrupt_state_refused(files: &[&str]) {
    let mut cluster = TestCluster::start(1);
    cluster.wait_for_leader();
    cluster.call_ok(0, &put("a", "1"));
    assert!(cluster.terminate(0).success(), "clean shutdown on SIGTERM");
    let mirror_before = cluster.mirror(0);
    let state = cluster.state_dir(0);
    for (i, name) in files.iter().enumerate() {
        let path = state.join(name);
        assert!(path.exists(), "sled keeps {}", path.display());
        fs::write(&path, junk(100 + i as u64, 64 * 1024)).unwrap();
    }
    let exited = cluster.run_node_to_exit(0);
    assert!(!exited.status.success(), "started on a corrupt state dir:\n{}", exited.stderr);
    assert!(!exited.stderr.contains("panicked at"), "panicked instead of reporting:\n{}", exited.stderr);
    let state = state.display().to_string();
    let errors: Vec<&str> = exited.stderr.lines().filter(|l| l.contains(&state)).collect();
    assert!(!errors.is_empty(), "no error naming {state}:\n{}", exited.stderr);
    assert_eq!(cluster.mirror(0), mirror_before, "the committed-log mirror must be left alone");
}

#[test]
fn a_corrupt_state_dir_stops_the_node_with_a_clear_error_not_a_panic() {
    assert_corrupt_state_refused(&["db", "conf"]);
}

/// With sled's `conf` intact, a junk `db` opens as an EMPTY database: the
/// node forgets its term, vote and log, starts as a blank node and even
/// cuts its mirror back to nothing (src/node/mod.rs: "ahead of the durable
/// log; cutting it back"). In a real cluster that is a second vote in a term
/// it already voted in, and a lost copy of acknowledged writes.
#[test]
fn a_corrupt_sled_db_alone_is_refused_not_opened_as_empty() {
    assert_corrupt_state_refused(&["db"]);
}

// ---------------------------------------------------------------------------
// A full disk

/// A small tmpfs mounted over node 2's state dir, detached when dropped
/// (lazily, so a node still holding files open cannot make it fail).
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    /// None (and a note) when not root: mounting needs it. CI runs as root.
    fn mount(cluster: &TestCluster, id: usize, size: &str) -> Option<SmallDisk> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: mounting a tmpfs needs root");
            return None;
        }
        let dir = cluster.state_dir(id);
        fs::create_dir_all(&dir).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(status.success(), "mount tmpfs on {}", dir.display());
        Some(SmallDisk(dir))
    }

    fn resize(&self, size: &str) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn alarms(cluster: &TestCluster, id: usize) -> Option<Vec<String>> {
    cluster.status(id).map(|s| s.alarms)
}

/// Writes 300 kB values through any node until `done` holds.
fn fill_until(cluster: &TestCluster, what: &str, mut done: impl FnMut() -> bool) -> usize {
    let value = "v".repeat(300_000);
    for i in 0..200 {
        if done() {
            return i;
        }
        cluster.call_ok(i % 2, &put(&format!("fill-{i}"), &value));
    }
    panic!("{what} never happened");
}

#[test]
fn a_node_low_on_disk_raises_an_alarm_and_catches_up_by_itself_when_space_returns() {
    // The reserve must exceed what sled may write at once: with 300 kB
    // values it rewrites whole leaf pages of several MB as one blob, so a
    // 2 MB reserve on an 8 MB disk ran into ENOSPC before the alarm.
    let mut cluster = TestCluster::configure(3, r#", "disk_reserve_bytes": 12582912"#);
    let Some(disk) = SmallDisk::mount(&cluster, 2, "32m") else { return };
    for id in 0..3 {
        cluster.start_node(id);
    }
    cluster.wait_for_leader();
    fill_until(&cluster, "the nospace alarm", || alarms(&cluster, 2).is_some_and(|a| a == ["nospace"]));
    // The majority goes on, led by a node with space; node 2 still answers.
    for i in 0..5 {
        cluster.call_ok(i % 2, &put(&format!("during-alarm-{i}"), "x"));
    }
    let leader = cluster.wait_for_leader();
    assert_ne!(leader, 2, "a node low on space hands leadership over");
    assert_eq!(alarms(&cluster, 2), Some(vec!["nospace".to_string()]));

    disk.resize("128m");
    wait_for("the alarm to clear", || alarms(&cluster, 2).filter(Vec::is_empty));
    let Reply::Put { index } = cluster.call_ok(leader, &put("after-alarm", "x")) else { panic!() };
    cluster.wait_applied(index);
    wait_for("node 2 to catch up", || (cluster.mirror(2) == cluster.mirror(leader)).then_some(()));
    assert_eq!(cluster.running(), vec![0, 1, 2]);
}

#[test]
fn a_failed_write_stops_the_node_at_once_and_its_state_dir_still_opens() {
    // No reserve: the node runs into ENOSPC.
    let mut cluster = TestCluster::configure(3, r#", "disk_reserve_bytes": 0"#);
    let Some(disk) = SmallDisk::mount(&cluster, 2, "4m") else { return };
    for id in 0..3 {
        cluster.start_node(id);
    }
    cluster.wait_for_leader();
    let mut node2 = KillOnDrop(cluster.nodes[2].process.take().unwrap());
    let mut exited = None;
    fill_until(&cluster, "node 2 to stop", || {
        exited = node2.0.try_wait().unwrap();
        exited.is_some()
    });
    assert_eq!(exited.unwrap().code(), Some(1));
    let output = read_path(&cluster.output_path(2));
    let line = output.lines().find(|l| l.contains("stopping at once")).expect("one line saying why");
    assert!(line.contains("No space left on device"), "{line}");
    // The majority acknowledged meanwhile; node 2 restarts from its state dir
    // once space returns, and catches up.
    disk.resize("64m");
    cluster.start_node(2);
    let leader = cluster.wait_for_leader();
    let Reply::Put { index } = cluster.call_ok(leader, &put("after-restart", "x")) else { panic!() };
    cluster.wait_applied(index);
    wait_for("node 2 to catch up", || (cluster.mirror(2) == cluster.mirror(leader)).then_some(()));
}

/// The resident memory of node `id`'s process, in bytes.
fn rss_bytes(cluster: &TestCluster, id: usize) -> u64 {
    let pid = cluster.nodes[id].process.as_ref().expect("running").id();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).expect("VmRSS");
    kib.trim().trim_end_matches(" kB").trim().parse::<u64>().unwrap() * 1024
}

/// A DEALER client that asks for a 1 MiB value 600 times and reads none of
/// the replies must not make the node hold 600 MiB of them: at most 64 MiB
/// wait per connection (CONTRACT.md "Limits"), the rest is dropped; the
/// node goes on serving, and the client still gets the first replies, in order.
#[test]
fn replies_a_client_does_not_read_are_bounded_in_bytes() {
    let cluster = TestCluster::configure_with_http(1).start_all();
    cluster.wait_for_leader();
    let value = "v".repeat((1 << 20) - 4096);
    cluster.call_ok(0, &put("big", &value));
    let before = rss_bytes(&cluster, 0);
    let dealer = cluster.socket(zmq::DEALER, &cluster.nodes[0].client);
    // Its own side holds little: the replies pile up on the node.
    dealer.set_rcvhwm(1).unwrap();
    dealer.set_rcvbuf(64 * 1024).unwrap();
    let request = raft_zmq::wire::protocol::encode_request(&get("big"));
    const GETS: u64 = 600;
    for _ in 0..GETS {
        dealer.send_multipart([&b""[..], &request], 0).unwrap();
    }
    let answered = || {
        let (_, metrics) = http_get(cluster.nodes[0].http.as_ref().unwrap(), "/metrics")?;
        let line = metrics.lines().find(|l| l.starts_with(r#"raft_client_requests_total{code="ok",op="get"}"#))?;
        line.rsplit(' ').next()?.parse::<u64>().ok()
    };
    wait_for("the node to answer every get", || answered().filter(|&n| n >= GETS));
    assert_serves(&cluster, 0, "after-unread-replies");
    let grown = rss_bytes(&cluster, 0).saturating_sub(before);
    assert!(grown < 300 << 20, "the node grew by {} MiB holding unread replies", grown >> 20);
    dealer.set_rcvtimeo(2000).unwrap();
    let first = dealer.recv_multipart(0).expect("the first replies are kept");
    assert_eq!(
        Reply::decode(&first[1], &get("big")).unwrap(),
        Reply::Get { value: Some(raft_zmq::kv::Value::Str(value)) }
    );
}
