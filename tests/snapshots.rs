//! Snapshots and log compaction with real processes: periodic snapshots and
//! the `snapshot` op, restarts from a snapshot, followers caught up by a
//! streamed snapshot (one of them over 64 MiB), and a node restored from a
//! snapshot serving as the source for others; and peers that could not be
//! the leader, which make a node stage nothing.

mod common;

use std::fs;

use common::*;
use raft_zmq::kv::{Command, Value};
use raft_zmq::raft::{Body, Message, SnapshotMeta};
use raft_zmq::wire::envelope::{Chunk, Envelope, PROTOCOL_VERSION};
use raft_zmq::wire::protocol::{Reply, Request};

fn value(s: &str) -> Option<Value> {
    Some(Value::Str(s.to_string()))
}

fn start(n: usize, extra: &str) -> TestCluster {
    let mut cluster = TestCluster::configure(n, extra);
    for id in 0..n {
        cluster.start_node(id);
    }
    cluster
}

/// Waits until every running node applied what the leader has committed,
/// and returns the leader's commit index.
fn settle(cluster: &TestCluster, leader: usize) -> u64 {
    let Reply::Status(status) = cluster.call_ok(leader, &Request::Status) else { panic!() };
    cluster.wait_applied(status.commit_index);
    status.commit_index
}

/// The mirror's lines from index `from` on (a `# snapshot` line counts as
/// its index).
fn mirror_from(cluster: &TestCluster, id: usize, from: u64) -> Vec<String> {
    let index = |line: &str| -> u64 {
        let line = line.strip_prefix("# snapshot ").unwrap_or(line);
        line.split(", ").next().unwrap().parse().unwrap()
    };
    cluster.mirror(id).lines().filter(|l| index(l) >= from).map(str::to_owned).collect()
}

#[test]
fn nodes_snapshot_every_snapshot_entries_and_restart_from_the_snapshot() {
    let mut cluster = start(3, r#", "snapshot_entries": 40"#);
    let leader = cluster.wait_for_leader();
    for i in 0..100 {
        cluster.call_ok(leader, &put(&format!("k{}", i % 30), &format!("v{i}")));
    }
    let Reply::Status(status) = cluster.call_ok(leader, &Request::Status) else { panic!() };
    cluster.wait_applied(status.commit_index);
    for id in 0..3 {
        let status = cluster.status(id).unwrap();
        assert!(status.snapshot_index >= 80, "node {id} snapshots every 40 entries: {status:?}");
        assert!(status.first_log_index > 1, "node {id} compacted its log: {status:?}");
    }
    // The `snapshot` op takes one at once, at the applied index.
    let follower = (0..3).find(|&id| id != leader).unwrap();
    let Reply::Snapshot { index } = cluster.call_ok(follower, &Request::Snapshot) else { panic!() };
    assert_eq!(index, cluster.status(follower).unwrap().last_applied);
    assert_eq!(cluster.status(follower).unwrap().snapshot_index, index);

    let mirrors_before: Vec<String> = (0..3).map(|id| cluster.mirror(id)).collect();
    for id in 0..3 {
        cluster.kill(id);
    }
    for id in 0..3 {
        cluster.start_node(id);
    }
    let leader = cluster.wait_for_leader();
    for i in 70..100 {
        assert_eq!(cluster.get_value(leader, &format!("k{}", i % 30)), value(&format!("v{i}")));
    }
    for (id, before) in mirrors_before.iter().enumerate() {
        let output = read_path(&cluster.output_path(id));
        assert!(output.contains("restored the state machine from snapshot"), "node {id}:\n{output}");
        assert!(cluster.mirror(id).starts_with(before), "node {id}'s mirror lost lines");
    }
    cluster.call_ok(leader, &put("after", "restart"));
    let Reply::Status(status) = cluster.call_ok(leader, &Request::Status) else { panic!() };
    cluster.wait_applied(status.commit_index);
    wait_for("identical mirrors", || {
        let reference = cluster.mirror(leader);
        (0..3).all(|id| cluster.mirror(id) == reference).then_some(())
    });
}

#[test]
fn a_follower_behind_the_compacted_log_catches_up_by_snapshot_and_can_then_rebuild_the_others() {
    let mut cluster = start(3, r#", "snapshot_entries": 40"#);
    let leader = cluster.wait_for_leader();
    let lagger = (0..3).find(|&id| id != leader).unwrap();
    cluster.kill(lagger);
    for i in 0..150 {
        cluster.call_ok(leader, &put(&format!("k{}", i % 30), &format!("v{i}")));
    }
    wait_for("the leader to compact its log", || cluster.status(leader).filter(|s| s.first_log_index > 40).map(|_| ()));
    cluster.start_node(lagger);
    let commit = settle(&cluster, leader);
    let status = cluster.status(lagger).unwrap();
    assert!(status.snapshot_index > 40 && status.first_log_index > 40, "caught up by a snapshot: {status:?}");
    let mirror = cluster.mirror(lagger);
    let snapshot_line = format!("# snapshot {}, ", status.snapshot_index);
    assert!(mirror.contains(&snapshot_line), "{mirror}");
    assert_eq!(
        mirror_from(&cluster, lagger, status.snapshot_index + 1),
        mirror_from(&cluster, leader, status.snapshot_index + 1),
        "the entries after the snapshot agree"
    );
    assert!(read_path(&cluster.output_path(lagger)).contains("restored from the leader's snapshot"));

    // The old leader loses its disk. The node restored from a snapshot,
    // made leader, rebuilds it from its own snapshot, in the cluster's
    // fingerprint (a wiped node has not learned the cluster's name). A
    // wiped node's vote never counts that way: with the third node down
    // too, no leader could be elected (that takes --force-new-cluster).
    cluster.kill(leader);
    fs::remove_dir_all(cluster.state_dir(leader)).unwrap();
    fs::remove_file(cluster.mirror_path(leader)).unwrap();
    cluster.make_leader(lagger);
    for i in 120..150 {
        assert_eq!(cluster.get_value(lagger, &format!("k{}", i % 30)), value(&format!("v{i}")));
    }
    cluster.call_ok(lagger, &put("after", "rebuild"));
    cluster.start_node(leader);
    let commit = settle(&cluster, lagger).max(commit);
    let rebuilt = cluster.status(leader).unwrap();
    assert!(rebuilt.snapshot_index > 0 && rebuilt.last_applied >= commit, "{rebuilt:?}");
    // Learned on the tick after the naming membership commits there.
    let name = wait_for("the rebuilt node to learn the cluster's name", || cluster.status(leader)?.cluster_id);
    assert_eq!(Some(name), cluster.status(lagger).unwrap().cluster_id, "it learned the name");
    assert!(read_path(&cluster.output_path(lagger)).contains("sent snapshot"), "it sent its snapshot");
}

/// A power cut between adopting a snapshot received from the leader and
/// recording in the state dir that the log starts over after it: the node
/// comes back with the membership the snapshot holds, not the older one its
/// log still holds (here: from before a member was removed).
#[test]
fn a_power_cut_between_adopting_a_snapshot_and_recording_it_keeps_the_snapshots_membership() {
    let mut cluster = TestCluster::configure(4, r#", "snapshot_entries": 40"#).on_lazy_disks();
    (0..4).for_each(|id| cluster.start_node(id));
    let leader = cluster.wait_for_leader();
    let mut followers = (0..4).filter(|&id| id != leader);
    let (lagger, removed) = (followers.next().unwrap(), followers.next().unwrap());
    cluster.kill(lagger);
    cluster.call_ok(leader, &Request::RemoveNode { id: removed as u64 });
    // It stops once it hears of its removal; it applies nothing more.
    cluster.kill(removed);
    for i in 0..150 {
        cluster.call_ok(leader, &put(&format!("k{}", i % 30), &format!("v{i}")));
    }
    wait_for("the leader to compact its log", || cluster.status(leader).filter(|s| s.first_log_index > 40).map(|_| ()));

    cluster.start_node_crashing_at(lagger, raft_zmq::crash_point::SNAPSHOT_ADOPTED);
    assert!(!cluster.wait_exit(lagger).success(), "it stopped at the crash point");
    let output = read_path(&cluster.output_path(lagger));
    assert!(output.contains("crash point snapshot-adopted reached"), "{output}");
    cluster.power_off(lagger);

    cluster.start_node(lagger);
    let commit = settle(&cluster, leader);
    let status = cluster.status(lagger).unwrap();
    assert!(status.last_applied >= commit && status.snapshot_index > 40, "{status:?}");
    let mut expected: Vec<u64> = (0..4).filter(|&id| id != removed).map(|id| id as u64).collect();
    expected.sort();
    assert_eq!(status.members, expected, "the snapshot's membership, without node {removed}");
    let output = read_path(&cluster.output_path(lagger));
    assert!(output.contains("the log does not hold snapshot"), "it repaired the cut at start:\n{output}");
}

/// CONTRACT.md "Limits": a peer that is not a member, or not the leader of
/// the current term, makes a node store nothing. Without CURVE anyone may
/// send a raft frame; each of these first pieces is dropped unanswered
/// before anything is staged.
#[test]
fn a_snapshot_piece_from_a_peer_that_cannot_be_the_leader_stages_nothing() {
    let cluster = start(3, "");
    let leader = cluster.wait_for_leader();
    let follower = (0..3).find(|&id| id != leader).unwrap();
    let other = 3 - leader - follower;
    let cluster_id = cluster.wait_for_name(leader);
    let term = cluster.status(follower).unwrap().term;
    let piece = |from: u64, term: u64| {
        let snapshot = SnapshotMeta { index: 1 << 20, term };
        let body = Body::InstallSnapshot { snapshot, membership: Default::default() };
        let message = Message { from, to: follower as u64, term, body };
        let chunk = Chunk::Data { offset: 0, total: 1 << 20, data: vec![0; 1 << 16] };
        let envelope = Envelope {
            version: PROTOCOL_VERSION,
            cluster: cluster_id,
            from,
            term,
            message,
            chunk: Some(chunk),
            window: None,
        };
        rmp_serde::to_vec_named(&envelope).unwrap()
    };
    let senders = [
        ("a node that is not a member", piece(7, term)),
        ("a node that is not a member, claiming a newer term", piece(7, term + 1)),
        ("a member that is not the leader", piece(other as u64, term)),
    ];
    let staging = cluster.state_dir(follower).join("snapshots");
    for (who, frame) in senders {
        let socket = cluster.socket(zmq::REQ, &cluster.nodes[follower].raft);
        socket.send(frame, 0).unwrap();
        assert_eq!(socket.poll(zmq::POLLIN, 1000).unwrap(), 0, "{who} got an answer");
        let files: Vec<_> = fs::read_dir(&staging).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(files.is_empty(), "{who} made node {follower} stage {files:?}");
    }
    let status = cluster.status(follower).unwrap();
    assert_eq!((status.term, status.leader), (term, Some(leader as u64)), "the follower was not disturbed");
}

#[test]
fn a_snapshot_over_64_mib_is_streamed_to_a_follower() {
    // 200: no snapshot is due by itself, and the margin kept (100) is below
    // the entries written.
    let mut cluster = start(3, r#", "snapshot_entries": 200"#);
    let leader = cluster.wait_for_leader();
    let lagger = (0..3).find(|&id| id != leader).unwrap();
    cluster.kill(lagger);
    let big = "x".repeat(512 << 10);
    for i in 0..140 {
        cluster.call_ok(leader, &put(&format!("big-{i}"), &format!("{i}{big}")));
    }
    // Snapshot now, which also compacts the log up to a margin before it.
    let Reply::Snapshot { index } = cluster.call_ok(leader, &Request::Snapshot) else { panic!() };
    wait_for("the leader to compact its log", || cluster.status(leader).filter(|s| s.first_log_index > 1).map(|_| ()));
    let size: u64 = fs::read_dir(cluster.state_dir(leader).join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .max()
        .unwrap();
    assert!(size > 64 << 20, "the snapshot is {size} bytes");
    cluster.start_node(lagger);
    settle(&cluster, leader);
    let status = cluster.status(lagger).unwrap();
    assert_eq!(status.snapshot_index, index, "{status:?}");
    let output = read_path(&cluster.output_path(leader));
    let sent = output.lines().find(|l| l.contains(&format!("sent snapshot {index}/")));
    eprintln!("{}", sent.unwrap_or_else(|| panic!("no snapshot sent:\n{output}")));
    let taken = output.lines().find(|l| l.contains(&format!("snapshot at {index}/")));
    eprintln!("{}", taken.unwrap_or_else(|| panic!("no snapshot taken:\n{output}")));
    // Its state is the leader's: once the leader is gone, reads see it.
    cluster.kill(leader);
    let new_leader = cluster.wait_for_leader();
    let Some(Value::Str(got)) = cluster.get_value(new_leader, "big-139") else { panic!() };
    assert_eq!(got.len(), big.len() + 3);
}

#[test]
fn a_backup_restores_into_a_new_cluster_and_a_corrupted_one_is_refused() {
    let mut old = start(3, "");
    let leader = old.wait_for_leader();
    for i in 0..50 {
        old.call_ok(leader, &put(&format!("k{i}"), &format!("v{i}")));
    }
    let session = |value: &str| Request::Write {
        command: Command::Put { key: Value::Str("s".into()), value: Value::Str(value.into()) },
        client_id: Some("backup-client".into()),
        seq: Some(7),
    };
    let Reply::Put { index: first } = old.call_ok(leader, &session("once")) else { panic!() };
    settle(&old, leader);
    let backup = old.dir.path().join("backup.snap");
    let follower = (0..3).find(|&id| id != leader).unwrap();
    let config = old.config_path.to_str().unwrap().to_string();
    let saved = run_to_exit([
        "snapshot",
        "save",
        backup.to_str().unwrap(),
        "--node",
        &follower.to_string(),
        "--config",
        &config,
    ]);
    assert!(saved.status.success(), "{}{}", saved.stdout, saved.stderr);
    assert!(saved.stdout.contains("51 keys"), "{}", saved.stdout);
    old.kill(0);
    old.kill(1);
    old.kill(2);

    let mut new = TestCluster::configure(3, "");
    let new_config = new.config_path.to_str().unwrap().to_string();
    let restore = |file: &std::path::Path, id: usize, config: &str| {
        run_to_exit(["snapshot", "restore", file.to_str().unwrap(), "--node-id", &id.to_string(), "--config", config])
    };
    for id in 0..3 {
        let restored = restore(&backup, id, &new_config);
        assert!(restored.status.success(), "{}{}", restored.stdout, restored.stderr);
    }
    let again = restore(&backup, 0, &new_config);
    assert!(!again.status.success() && again.stderr.contains("already exists"), "{}", again.stderr);
    for id in 0..3 {
        new.start_node(id);
    }
    let leader = new.wait_for_leader();
    for i in 0..50 {
        assert_eq!(new.get_value(leader, &format!("k{i}")), value(&format!("v{i}")));
    }
    // Sessions came along: a retry is answered from them, not applied again.
    assert_eq!(new.call_ok(leader, &session("twice")), Reply::Put { index: first });
    assert_eq!(new.get_value(leader, "s"), value("once"));
    new.call_ok(leader, &put("after", "restore"));
    settle(&new, leader);
    for id in 0..3 {
        assert!(new.mirror(id).starts_with("# snapshot "), "node {id}: {}", new.mirror(id));
    }

    // A damaged backup is refused with a clear error and creates nothing.
    let mut bytes = fs::read(&backup).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    let damaged = old.dir.path().join("damaged.snap");
    fs::write(&damaged, bytes).unwrap();
    let fresh = TestCluster::configure(1, "");
    let fresh_config = fresh.config_path.to_str().unwrap().to_string();
    let refused = restore(&damaged, 0, &fresh_config);
    assert_eq!(refused.status.code(), Some(1));
    assert!(refused.stderr.contains("checksum mismatch"), "{}", refused.stderr);
    assert!(!fresh.state_dir(0).exists());
}
