//! Runtime membership with real processes: a node joins a running cluster
//! with `--join`, is added and promoted to voter once caught up; a follower
//! and then the leader are removed (each exits by itself); leadership moves
//! on request. Client writes are checked to survive every step.

mod common;

use std::process::ExitStatus;

use common::*;
use raft_zmq::wire::protocol::{Reply, Request};

/// Waits until node `id` (which was asked to leave) exits by itself.
fn exits(cluster: &mut TestCluster, id: usize) -> ExitStatus {
    let process = cluster.nodes[id].process.as_mut().expect("running");
    let status = wait_for("a removed node to exit", || process.try_wait().unwrap());
    cluster.nodes[id].process = None;
    status
}

/// The leader every running node but `gone` agrees on (the harness's own
/// wait counts a majority of all the nodes it ever had).
fn leader_among(cluster: &TestCluster, gone: &[usize]) -> usize {
    let ids: Vec<usize> = cluster.running().into_iter().filter(|id| !gone.contains(id)).collect();
    wait_for("a new leader", || {
        let statuses: Vec<_> = ids.iter().map(|&id| cluster.status(id)).collect::<Option<_>>()?;
        let leader = statuses.iter().find(|s| s.role == "leader")?;
        statuses.iter().all(|s| s.leader == Some(leader.id)).then_some(leader.id as usize)
    })
}

/// Four slots, with a cluster of nodes 0 to 2 started and `keys` keys
/// written as `<prefix>-<i>`; returns it and its leader.
fn three_of_four(prefix: &str, keys: usize) -> (TestCluster, usize) {
    let mut cluster = TestCluster::configure(4, "");
    cluster.write_config_of(&cluster.config_path.clone(), 0..3, "");
    (0..3).for_each(|id| cluster.start_node(id));
    let leader = cluster.wait_for_leader();
    for i in 0..keys {
        cluster.call_ok(leader, &put(&format!("{prefix}-{i}"), "v"));
    }
    (cluster, leader)
}

/// Starts node 3 with `--join` and a config listing it and `members`, and
/// has `leader` add it (to become a voter if `voter`); returns the reply.
fn join_node_3(cluster: &mut TestCluster, members: &[usize], leader: usize, voter: bool) -> Reply {
    let join = cluster.dir.path().join("join.json");
    cluster.write_config_of(&join, members.iter().copied().chain([3]), "");
    cluster.start_node_from(3, &join, &["--join".to_string()]);
    cluster.call_ok(leader, &Request::AddNode { member: cluster.member(3), voter })
}

/// The voters and learners `id` reports.
fn membership(cluster: &TestCluster, id: usize) -> Option<(Vec<u64>, Vec<u64>)> {
    cluster.status(id).map(|s| (s.members, s.learners))
}

#[test]
fn a_node_joins_and_is_promoted_then_a_follower_and_the_leader_leave() {
    let (mut cluster, leader) = three_of_four("before", 50);
    // Node 3 joins with a config that lists itself and the others.
    let Reply::Membership { index } = join_node_3(&mut cluster, &[0, 1, 2], leader, true) else { panic!("add_node") };
    assert!(index > 50);
    wait_for("node 3 to be promoted to voter everywhere", || {
        (0..4).all(|id| membership(&cluster, id) == Some((vec![0, 1, 2, 3], vec![]))).then_some(())
    });
    assert_eq!(cluster.get_value(3, "before-49"), Some(raft_zmq::kv::Value::Str("v".into())));
    // It restarts from its state like any member (`--join` then changes nothing).
    cluster.kill(3);
    cluster.start_node_from(3, &cluster.dir.path().join("join.json"), &["--join".to_string()]);
    wait_for("node 3 to be back as a voter", || {
        (membership(&cluster, 3) == Some((vec![0, 1, 2, 3], vec![]))).then_some(())
    });
    // And heard from by the leader again (until the leader's link notices the
    // restart, it is silent). Without node 3, the leader could not reach a
    // majority of the voters left once it removes itself below: it would step
    // down (CheckQuorum) before answering, and then stop as removed.
    wait_for("the leader to hear from node 3 again", || {
        let Reply::Members { members } = cluster.call_ok(leader, &Request::Members) else { return None };
        members.iter().find(|m| m.id == 3)?.last_contact_ms.filter(|&ms| ms < 100).map(|_| ())
    });
    let Reply::Members { members } = cluster.call_ok(leader, &Request::Members) else { panic!("members") };
    assert_eq!(members.len(), 4);
    assert!(members.iter().all(|m| m.role == "voter"));
    assert!(members.iter().filter(|m| m.id != leader as u64).all(|m| m.match_index.is_some()));
    // Adding a member twice is a bad request.
    let mut client = cluster.client(leader);
    let again = client.call(&Request::AddNode { member: cluster.member(3), voter: true }).unwrap();
    assert!(matches!(again, Reply::Error { code: raft_zmq::wire::protocol::ErrorCode::BadRequest, .. }), "{again:?}");

    // A follower leaves: it exits by itself, with status 0.
    let follower = (0..3).find(|&id| id != leader).unwrap();
    cluster.call_ok(leader, &Request::RemoveNode { id: follower as u64 });
    assert!(exits(&mut cluster, follower).success());
    assert!(read_path(&cluster.output_path(follower)).contains("removed from the cluster"));
    cluster.call_ok(leader, &put("after-follower", "v"));

    // The leader leaves: it hands over first; the others go on. On a loaded
    // machine it may lose its quorum for a moment and step down before it
    // answers (the change then commits under the next leader, or not at
    // all): the request is asked again of whoever leads, as a client would,
    // until the leader is no member.
    let remove_leader = Request::RemoveNode { id: leader as u64 };
    wait_for("the leader to be removed", || {
        let asked =
            (0..4).filter(|&id| id != follower).find(|&id| cluster.status(id).is_some_and(|s| s.role == "leader"))?;
        let answered = matches!(cluster.client(asked).call(&remove_leader), Ok(Reply::Membership { .. }));
        let removed = || membership(&cluster, asked).is_some_and(|(voters, _)| !voters.contains(&(leader as u64)));
        (answered || removed()).then_some(())
    });
    assert!(exits(&mut cluster, leader).success());
    let new_leader = leader_among(&cluster, &[leader, follower]);
    assert_ne!(new_leader, leader);
    cluster.call_ok(new_leader, &put("after-leader", "v"));
    let remaining: Vec<u64> = (0..4).filter(|&id| id != leader && id != follower).map(|id| id as u64).collect();
    assert_eq!(membership(&cluster, new_leader).map(|m| m.0), Some(remaining.clone()));
    for id in [leader, follower] {
        // Restarted with its old state, a removed node says so and stops.
        let exited = cluster.run_node_to_exit(id);
        assert!(exited.status.success(), "{}", exited.stderr);
        assert!(exited.stderr.contains("removed from the cluster"), "{}", exited.stderr);
    }
    // `raft-zmq status` shows the members (the joined node included), not
    // the config's entries of removed ones.
    let table = run_to_exit(["status", "--config", cluster.config_path.to_str().unwrap(), "-w", "json"]);
    assert!(table.status.success(), "{}{}", table.stdout, table.stderr);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&table.stdout).unwrap();
    assert_eq!(rows.iter().map(|r| r["id"].as_u64().unwrap()).collect::<Vec<_>>(), remaining);

    // Leadership moves on request.
    let to = remaining.iter().copied().find(|&id| id != new_leader as u64).unwrap();
    let Reply::TransferLeader { leader: moved } =
        cluster.call_ok(new_leader, &Request::TransferLeader { to: Some(to) })
    else {
        panic!("transfer_leader")
    };
    assert_eq!(moved, to);
    for id in remaining {
        assert_eq!(cluster.get_value(id as usize, "after-leader"), Some(raft_zmq::kv::Value::Str("v".into())));
    }
}

/// The majority is lost for good: `--force-new-cluster` restarts a survivor
/// alone with its data; old members that come back are told to stop; a new
/// node joins it.
#[test]
fn a_survivor_forced_into_a_new_cluster_keeps_its_data_and_grows_again() {
    let (mut cluster, leader) = three_of_four("key", 20);
    cluster.wait_applied(cluster.status(leader).unwrap().commit_index);
    (0..3).for_each(|id| cluster.kill(id));

    let survivor = (leader + 1) % 3;
    cluster.start_node_with(survivor, &["--force-new-cluster".to_string()]);
    assert_eq!(leader_among(&cluster, &[]), survivor);
    assert_eq!(membership(&cluster, survivor), Some((vec![survivor as u64], vec![])));
    assert_eq!(cluster.get_value(survivor, "key-19"), Some(raft_zmq::kv::Value::Str("v".into())));
    cluster.call_ok(survivor, &put("after-force", "v"));
    assert!(read_path(&cluster.output_path(survivor)).contains("FORCED A NEW CLUSTER"));

    // An old member back with its state is told it was removed, and stops.
    let old = (survivor + 1) % 3;
    cluster.start_node(old);
    assert!(exits(&mut cluster, old).success());
    assert!(read_path(&cluster.output_path(old)).contains("removed from the cluster"));

    // And the cluster grows again: node 3 as a learner, then promoted by
    // hand (`raft-zmq member promote`, refused with `busy` until caught up).
    join_node_3(&mut cluster, &[survivor], survivor, false);
    let both = {
        let mut ids = vec![survivor as u64, 3];
        ids.sort_unstable();
        ids
    };
    let learner = Some((vec![survivor as u64], vec![3]));
    wait_for("node 3 to be a learner", || (membership(&cluster, 3) == learner).then_some(()));
    let config = cluster.config_path.to_str().unwrap().to_string();
    wait_for("member promote to be taken", || {
        let promote = run_to_exit(["member", "--config", &config, "--node", &survivor.to_string(), "promote", "3"]);
        promote.status.success().then_some(())
    });
    wait_for("node 3 to become a voter", || (membership(&cluster, 3) == Some((both.clone(), vec![]))).then_some(()));
    assert_eq!(cluster.get_value(3, "after-force"), Some(raft_zmq::kv::Value::Str("v".into())));
}

/// Every running node's name for the cluster, once each knows one.
fn names(cluster: &TestCluster, ids: &[usize]) -> Vec<u64> {
    ids.iter().map(|&id| cluster.wait_for_name(id)).collect()
}

/// Nodes 0 and 1 wiped and the cluster started again from the same config,
/// node 2 keeping the old cluster's state (a higher term, a longer log): the
/// new cluster gets a new name, and node 2 is never heard by it.
#[test]
fn a_new_cluster_names_itself_and_shuts_out_a_node_with_an_old_clusters_state() {
    let mut cluster = TestCluster::start(3);
    let leader = cluster.wait_for_leader();
    for i in 0..20 {
        cluster.call_ok(leader, &put(&format!("old-{i}"), "v"));
    }
    let old = names(&cluster, &[0, 1, 2]);
    assert!(old.iter().all(|&name| name == old[0]), "one name: {old:x?}");
    (0..3).for_each(|id| cluster.kill(id));
    for id in [0, 1] {
        std::fs::remove_dir_all(cluster.state_dir(id)).unwrap();
        std::fs::remove_file(cluster.mirror_path(id)).unwrap();
    }
    (0..3).for_each(|id| cluster.start_node(id));

    let leader = leader_among(&cluster, &[2]);
    let new = names(&cluster, &[0, 1]);
    assert!(new[0] == new[1] && new[0] != old[0], "a new name for the new cluster: {new:x?}, was {:x}", old[0]);
    cluster.call_ok(leader, &put("new", "v"));
    assert_eq!(cluster.get_value(leader, "old-0"), None, "the old cluster's data stays out");
    let stale = cluster.status(2).expect("node 2 runs");
    assert_eq!(stale.cluster_id, Some(format!("{:016x}", old[0])));
    assert_ne!(stale.leader, Some(leader as u64), "node 2 follows nobody of the new cluster");
    assert!(!cluster.mirror(2).contains("\"new\""), "nor does node 2 get the new cluster's");
    wait_for("node 2 to log the refusals", || read_path(&cluster.output_path(2)).contains("cluster").then_some(()));
}

/// A member of a new cluster that starts only after the others named it
/// (and compacted their logs) is brought the log, by snapshot, in the
/// cluster's fingerprint, learns the name and takes part.
#[test]
fn a_member_that_starts_after_the_cluster_was_named_learns_the_name() {
    let mut cluster = TestCluster::configure(3, r#", "snapshot_entries": 20"#);
    cluster.start_node(0);
    cluster.start_node(1);
    let leader = leader_among(&cluster, &[2]);
    let name = names(&cluster, &[0, 1]);
    for i in 0..60 {
        cluster.call_ok(leader, &put(&format!("k-{i}"), "v"));
    }
    let Reply::Status(status) = cluster.call_ok(leader, &Request::Status) else { panic!("status") };
    cluster.start_node(2);
    assert_eq!(cluster.wait_for_name(2), name[0]);
    wait_for("node 2 to catch up", || {
        cluster.status(2).filter(|s| s.last_applied >= status.commit_index && s.leader == Some(leader as u64))
    });
    let out = read_path(&cluster.output_path(2));
    assert!(out.contains("snapshot"), "caught up by snapshot:\n{out}");
    // It counts: with node 0 gone, nodes 1 and 2 still commit.
    cluster.kill(0);
    let leader = leader_among(&cluster, &[0]);
    cluster.call_ok(leader, &put("after", "v"));
}

/// `add_node` endpoints are checked like the config's (#23 item 7): a raft
/// endpoint without a port, or without a host, or a wildcard, is refused with
/// `bad_request` and never committed, so no restart can trip on it.
#[test]
fn add_node_refuses_an_endpoint_a_node_could_not_connect_to() {
    let cluster = TestCluster::start(1);
    cluster.wait_for_leader();
    cluster.wait_for_name(0);
    let Reply::Put { index: before } = cluster.call_ok(0, &put("before", "v")) else { panic!("put") };
    let wildcard = format!("tcp://0.0.0.0:{}", free_port());
    for (raft, why) in [
        ("tcp://127.0.0.1", "must be tcp://host:port"),
        ("tcp://:x", "host is empty"),
        (wildcard.as_str(), "a wildcard address cannot be connected to"),
    ] {
        let client = format!("tcp://127.0.0.1:{}", free_port());
        let member = raft_zmq::config::Member { id: 1, raft: raft.into(), client, public_key: None };
        let reply = cluster.client(0).call(&Request::AddNode { member, voter: true }).unwrap();
        assert!(
            matches!(&reply, Reply::Error { code: raft_zmq::wire::protocol::ErrorCode::BadRequest, message, .. }
                if message.contains(raft) && message.contains(why)),
            "{raft}: {reply:?}"
        );
    }
    // A write after the refusals commits right after what was there: no
    // membership entry went into the log.
    let Reply::Put { index } = cluster.call_ok(0, &put("after", "v")) else { panic!("put") };
    assert_eq!(index, before + 1);
    assert_eq!(membership(&cluster, 0), Some((vec![0], vec![])));
}
