//! CONTRACT.md "Observability" and "Command-line tools" on real processes:
//! `/metrics` scraped and parsed, `/health`, `/status`, `/cluster` and the
//! web view's page over HTTP, `raft-zmq status` with a node down, the shell
//! driven through standard input, and what `--version` names. (The web view
//! in a real browser is tests/python/test_web.py.)

mod common;

use std::collections::HashMap;

use common::{Exited, TestCluster, http_get, put, run_to_exit, run_to_exit_with_input, wait_for};
use raft_zmq::wire::protocol::Reply;

/// A Prometheus text exposition: `name{labels}` → value. Every line must
/// parse, so a malformed exposition fails the test.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|e| panic!("bad value in {line:?}: {e}"));
        assert!(samples.insert(series.to_string(), value).is_none(), "duplicate series {series}");
    }
    samples
}

fn metrics(cluster: &TestCluster, id: usize) -> HashMap<String, f64> {
    let (code, body) = http_get(cluster.nodes[id].http.as_ref().unwrap(), "/metrics").expect("/metrics answers");
    assert_eq!(code, 200, "{body}");
    parse_metrics(&body)
}

fn json(cluster: &TestCluster, id: usize, path: &str) -> (u16, serde_json::Value) {
    let (code, body) = http_get(cluster.nodes[id].http.as_ref().unwrap(), path).expect("answers");
    (code, serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {body}")))
}

#[test]
fn metrics_health_status_cluster_and_the_page_over_http() {
    let mut cluster = TestCluster::configure_with_http(3).start_all();
    let leader = cluster.wait_for_leader();
    for i in 0..20 {
        assert!(matches!(cluster.call_ok(leader, &put(&format!("k{i}"), "v")), Reply::Put { .. }));
    }

    // Counted where the requests arrived (forwarded ones, should leadership
    // move, are counted by the follower that forwarded them); a retry by the
    // test client counts too, hence at least.
    let on_leader = metrics(&cluster, leader);
    for name in [
        "raft_term",
        "raft_is_leader",
        "raft_commit_index",
        "raft_applied_index",
        "raft_fsync_seconds_count",
        "raft_leader_changes_total",
        "raft_disk_bytes",
    ] {
        assert!(on_leader.contains_key(name), "{name} missing");
    }
    assert!(on_leader["raft_commit_index"] >= 21.0, "{}", on_leader["raft_commit_index"]);
    assert!(on_leader[r#"raft_client_requests_total{code="ok",op="put"}"#] >= 20.0);
    assert!(on_leader[r#"raft_client_request_seconds_count{op="put"}"#] >= 20.0);
    assert!(on_leader[r#"raft_client_request_seconds_bucket{op="put",le="+Inf"}"#] >= 20.0);
    assert!(on_leader["raft_fsync_seconds_count"] > 0.0 && on_leader["raft_disk_bytes"] > 0.0);
    // Exactly one leader among the three, in one term, once all settle.
    wait_for("every node to report the same term and one leader", || {
        let all: Vec<_> = (0..3).map(|id| metrics(&cluster, id)).collect();
        let leaders: f64 = all.iter().map(|m| m["raft_is_leader"]).sum();
        (leaders == 1.0 && all.iter().all(|m| m["raft_term"] == all[0]["raft_term"])).then_some(())
    });

    for id in 0..3 {
        wait_for("every node to be healthy", || (json(&cluster, id, "/health").0 == 200).then_some(()));
        let probe = health_probe(&cluster, id);
        assert_eq!(probe.status.code(), Some(0), "raft-zmq health: {}{}", probe.stdout, probe.stderr);
        assert!(probe.stdout.contains(r#""health":"true""#), "{}", probe.stdout);
        let (code, status) = json(&cluster, id, "/status");
        assert_eq!((code, status["id"].as_u64()), (200, Some(id as u64)));
    }
    wait_for("/cluster to show every member with its last 5 entries", || {
        let (code, members) = json(&cluster, leader, "/cluster?log=5");
        let members = members.as_array()?.clone();
        let complete = members.iter().all(|m| m["log"].as_array().is_some_and(|log| log.len() == 5));
        let leaders = members.iter().filter(|m| m["role"] == "leader").count();
        (code == 200 && members.len() == 3 && complete && leaders == 1).then_some(())
    });

    let (code, page) = http_get(cluster.nodes[leader].http.as_ref().unwrap(), "/").unwrap();
    assert_eq!(code, 200);
    assert!(page.contains("<html") && page.contains("cluster"), "{page}");
    for outside in ["src=\"http", "href=\"http", "src=\"//", "href=\"//", "@import", "url(http"] {
        assert!(!page.contains(outside), "the page loads something from outside: {outside}");
    }
    assert_eq!(http_get(cluster.nodes[leader].http.as_ref().unwrap(), "/nothing").unwrap().0, 404);

    // A dead member is shown with an error; the others stay healthy.
    let follower = (leader + 1) % 3;
    cluster.kill(follower);
    wait_for("the dead member to show as unreachable", || {
        let (_, members) = json(&cluster, leader, "/cluster");
        let dead = members.as_array()?.iter().find(|m| m["id"] == follower as u64)?.clone();
        dead["error"].is_string().then_some(())
    });
    assert_eq!(json(&cluster, leader, "/health").0, 200, "a majority is still there");

    // With the majority gone, the survivor is not healthy.
    let other = (leader + 2) % 3;
    cluster.kill(other);
    wait_for("the lone leader to report unhealthy", || {
        let (code, body) = json(&cluster, leader, "/health");
        (code == 503 && body["health"] == "false").then_some(())
    });
    let probe = health_probe(&cluster, leader);
    assert_eq!(probe.status.code(), Some(1), "unhealthy: {}{}", probe.stdout, probe.stderr);
    assert!(probe.stdout.contains(r#""health":"false""#), "says why: {}", probe.stdout);
    cluster.kill(leader);
    let probe = health_probe(&cluster, leader);
    assert_eq!(probe.status.code(), Some(1), "no node: {}", probe.stderr);
    assert!(probe.stderr.contains("cannot reach"), "{}", probe.stderr);
}

/// `raft-zmq health` against node `id`'s HTTP address.
fn health_probe(cluster: &TestCluster, id: usize) -> Exited {
    run_to_exit(["health", "--http", cluster.nodes[id].http.as_deref().unwrap()])
}

#[test]
fn the_status_table_has_a_row_for_a_node_that_is_down() {
    let mut cluster = TestCluster::start(3);
    let leader = cluster.wait_for_leader();
    let config = cluster.config_path.to_str().unwrap().to_string();
    let all_up = run_to_exit(["status", "--config", &config]);
    assert!(all_up.status.success(), "{}{}", all_up.stdout, all_up.stderr);
    assert_eq!(all_up.stdout.lines().count(), 3 + 4, "border, header, border, 3 rows, border:\n{}", all_up.stdout);
    assert_eq!(all_up.stdout.matches("| leader ").count(), 1, "{}", all_up.stdout);

    let down = (leader + 1) % 3;
    cluster.kill(down);
    let table = run_to_exit(["status", "--config", &config]);
    assert_eq!(table.status.code(), Some(1), "a node did not answer: {}{}", table.stdout, table.stderr);
    let row = table.stdout.lines().find(|l| l.starts_with(&format!("| {down} "))).expect("a row for the dead node");
    assert!(row.contains("unreachable"), "{}", table.stdout);

    let endpoints: Vec<&str> = cluster.nodes.iter().map(|n| n.client.as_str()).collect();
    let as_json = run_to_exit(["status", "--endpoints", &endpoints.join(","), "-w", "json"]);
    assert_eq!(as_json.status.code(), Some(1));
    let rows: Vec<serde_json::Value> = serde_json::from_str(&as_json.stdout).unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows.iter().filter(|r| r["error"].is_string()).count(), 1, "{rows:?}");
    assert_eq!(rows.iter().filter(|r| r["role"] == "leader").count(), 1, "{rows:?}");
}

#[test]
fn version_names_the_release_and_every_format() {
    let out = run_to_exit(["--version"]);
    assert!(out.status.success(), "{}", out.stderr);
    let expected = format!(
        "raft-zmq {}\npeer protocol: {}\nstate dir format: {}\nsnapshot format: {}\nmirror format: {}\n",
        env!("CARGO_PKG_VERSION"),
        raft_zmq::wire::envelope::PROTOCOL_VERSION,
        raft_zmq::storage::STATE_FORMAT_VERSION,
        raft_zmq::storage::snapshot::SNAPSHOT_FORMAT_VERSION,
        raft_zmq::storage::mirror::MIRROR_FORMAT_VERSION,
    );
    assert_eq!(out.stdout, expected);
}

#[test]
fn the_shell_reads_commands_from_standard_input() {
    let cluster = TestCluster::start(3);
    let leader = cluster.wait_for_leader();
    let config = cluster.config_path.to_str().unwrap().to_string();
    // Node 0 first, whoever leads: the shell's writes are forwarded.
    let script = "put greeting \"hello world\"\nget greeting\n\n# a comment\ncas greeting x --expect nope\n\
                  bogus\nleader\nexit\nput never 1\n";
    let json = run_to_exit_with_input(["client", "--config", &config, "--json"], Some(script));
    assert!(json.status.success(), "{}", json.stderr);
    let replies: Vec<serde_json::Value> =
        json.stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}"))).collect();
    assert_eq!(replies.len(), 5, "one line per command, none after exit:\n{}", json.stdout);
    assert_eq!((replies[0]["ok"].as_bool(), replies[0]["index"].is_u64()), (Some(true), true));
    assert_eq!(replies[1]["value"], "hello world");
    assert_eq!((replies[2]["swapped"].as_bool(), &replies[2]["value"]), (Some(false), &"hello world".into()));
    assert_eq!((replies[3]["ok"].as_bool(), &replies[3]["error"]), (Some(false), &"bad_request".into()));
    assert!(replies[4]["leader"].as_u64().is_some_and(|id| id < 3), "{}", replies[4]);
    assert_eq!(cluster.get_value(leader, "never"), None, "nothing after exit runs");
    let no_exit = run_to_exit_with_input(["client", "--config", &config, "--json"], Some("get greeting\nstatus"));
    assert!(no_exit.status.success(), "the end of input ends it: {}", no_exit.stderr);
    assert_eq!(no_exit.stdout.lines().count(), 2, "a last line without a newline counts: {}", no_exit.stdout);

    let human =
        run_to_exit_with_input(["client", "--config", &config], Some("get greeting\ndelete greeting\nget greeting\n"));
    assert!(human.status.success(), "{}", human.stderr);
    let lines: Vec<&str> = human.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "no prompt, no banner:\n{}", human.stdout);
    assert_eq!((lines[0], lines[2]), ("hello world", "(nil)"));
    assert!(lines[1].starts_with("deleted (index "), "{}", human.stdout);
}

#[test]
fn json_logs_are_one_object_per_line_with_the_node_term_and_fields() {
    let mut cluster = TestCluster::configure(1, "");
    cluster.start_node_with(0, &["--log-format".to_string(), "json".to_string()]);
    cluster.wait_for_leader();
    let lines = wait_for("the node to log that it leads", || {
        let text = common::read_path(&cluster.output_path(0));
        text.contains("role leader").then_some(text)
    });
    let objects: Vec<serde_json::Value> = lines
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON object: {l:?}: {e}")))
        .collect();
    for object in &objects {
        for key in ["time", "level", "node", "term", "target", "event", "fields"] {
            assert!(object.get(key).is_some(), "{key} missing from {object}");
        }
    }
    let leads = objects.iter().find(|o| o["fields"]["role"] == "leader").expect("a role change with its fields");
    assert_eq!((leads["node"].as_u64(), leads["fields"]["leader"].as_u64()), (Some(0), Some(0)));
    assert!(leads["fields"]["term"].as_u64().is_some_and(|term| term >= 1), "{leads}");
}
