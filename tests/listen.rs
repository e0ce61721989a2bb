//! Listen vs advertise (docs/running.md "config.json"): nodes that bind a wildcard
//! and are reached by DNS name, as in a container or a pod, and a member
//! whose name does not resolve (yet). Traffic goes to loopback only:
//! `localhost` is 127.0.0.1.

mod common;

use common::*;
use raft_zmq::kv::Value;
use raft_zmq::wire::protocol::Reply;

/// The port of a `tcp://HOST:PORT` endpoint.
fn port(endpoint: &str) -> &str {
    endpoint.rsplit(':').next().expect("HOST:PORT")
}

/// Waits until node `id`'s output has a line that contains `text`.
fn wait_for_line(cluster: &TestCluster, id: usize, text: &str) {
    wait_for(&format!("node {id} to log {text:?}"), || read_path(&cluster.output_path(id)).contains(text).then_some(()))
}

/// A put through every running node in `ids` (a follower forwards it to
/// the leader), then each node reads every key.
fn put_through_every_node_and_read_everywhere(cluster: &TestCluster, ids: &[usize]) {
    for &id in ids {
        let Reply::Put { index } = cluster.call_ok(id, &put(&format!("via-{id}"), "v")) else { panic!("put") };
        assert!(index > 0);
    }
    for &reader in ids {
        for &writer in ids {
            let value = cluster.get_value(reader, &format!("via-{writer}"));
            assert_eq!(value, Some(Value::Str("v".into())), "node {reader} reads node {writer}'s write");
        }
    }
}

#[test]
fn nodes_that_bind_wildcards_and_advertise_a_name_form_a_cluster() {
    let cluster = TestCluster::configure_nodes(3, |_, node| {
        let (raft_port, client_port) = (port(&node.raft).to_string(), port(&node.client).to_string());
        node.raft_listen = Some(format!("tcp://0.0.0.0:{raft_port}"));
        node.client_listen = Some(format!("tcp://*:{client_port}"));
        node.raft = format!("tcp://localhost:{raft_port}");
        node.client = format!("tcp://localhost:{client_port}");
    })
    .start_all();
    let leader = cluster.wait_for_leader();
    for id in 0..3 {
        let node = &cluster.nodes[id];
        let line = format!("serving peers on tcp://0.0.0.0:{} (advertised as {})", port(&node.raft), node.raft);
        wait_for_line(&cluster, id, &line);
    }
    // The harness's clients connect to the advertised names too.
    let followers: Vec<usize> = (0..3).filter(|&id| id != leader).collect();
    put_through_every_node_and_read_everywhere(&cluster, &[followers[0], leader, followers[1]]);

    // The command-line tools reach nodes by the config's names.
    let config = cluster.config_path.as_os_str();
    let follower = followers[0].to_string();
    let got = run_to_exit([
        "client".as_ref(),
        "--config".as_ref(),
        config,
        "--node".as_ref(),
        follower.as_ref(),
        "get".as_ref(),
        "via-0".as_ref(),
    ]);
    assert!(got.status.success(), "client get: {}", got.stderr);
    assert!(got.stdout.contains(r#""value":"v""#), "{}", got.stdout);
    let status = run_to_exit(["status".as_ref(), "--config".as_ref(), config]);
    assert!(status.status.success(), "every node answers status: {}{}", status.stdout, status.stderr);
}

#[test]
fn a_member_whose_name_does_not_resolve_leaves_the_majority_working_and_is_warned_about() {
    let mut cluster = TestCluster::configure_nodes(3, |id, node| {
        if id == 2 {
            node.raft = format!("tcp://no-such-host.invalid:{}", port(&node.raft));
            node.client = format!("tcp://no-such-host.invalid:{}", port(&node.client));
        }
    });
    cluster.start_node(0);
    cluster.start_node(1);
    cluster.wait_for_leader();
    put_through_every_node_and_read_everywhere(&cluster, &[0, 1]);
    let unresolved = &cluster.nodes[2].raft;
    let warned = wait_for("a warning about node 2's name", || {
        [0, 1].into_iter().find_map(|id| {
            let output = read_path(&cluster.output_path(id));
            output.lines().find(|line| line.contains("WARN") && line.contains(unresolved.as_str())).map(String::from)
        })
    });
    assert!(warned.contains("peer 2") && warned.contains("does not resolve"), "{warned}");
    assert!(cluster.running().iter().all(|&id| cluster.status(id).is_some()), "both nodes still serve");
}

/// Runs a one-node cluster whose node is changed by `edit` until it
/// exits by itself, with the status and the one line it prints.
fn run_alone_until_it_exits(edit: impl FnMut(usize, &mut Node)) -> (TestCluster, Option<i32>, String) {
    let cluster = TestCluster::configure_nodes(1, edit);
    let exited = cluster.run_node_to_exit(0);
    let lines: Vec<&str> = exited.stderr.lines().filter(|line| !line.contains(" INFO ")).collect();
    assert_eq!(lines.len(), 1, "one line says why: {}", exited.stderr);
    let line = lines[0].to_string();
    (cluster, exited.status.code(), line)
}

#[test]
fn a_name_cannot_be_bound_and_the_node_says_to_listen_on_an_address() {
    let (cluster, code, line) =
        run_alone_until_it_exits(|_, node| node.raft = format!("tcp://localhost:{}", port(&node.raft)));
    assert_eq!(code, Some(1), "{line}");
    assert!(line.contains(&format!("cannot bind raft endpoint {}", cluster.nodes[0].raft)), "{line}");
    assert!(line.contains("with raft_listen"), "says what to do: {line}");
}

#[test]
fn an_advertised_wildcard_is_a_bad_config() {
    let (cluster, code, line) =
        run_alone_until_it_exits(|_, node| node.client = format!("tcp://0.0.0.0:{}", port(&node.client)));
    assert_eq!(code, Some(2), "{line}");
    assert!(line.contains(&cluster.config_path.display().to_string()), "names the file: {line}");
    assert!(line.contains("a wildcard address cannot be connected to"), "{line}");
}
