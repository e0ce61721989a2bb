//! Durability, observed from the outside: a write is acknowledged only after
//! an fdatasync completed on the node's log file, and no acknowledged
//! write is lost when nodes lose power (their unsynced writes with it).
//!
//! The node runs normally; `strace` attaches to it and records the syscalls
//! that matter (socket reads and writes, fdatasync). The trace must show,
//! between the client's request arriving and the acknowledgement leaving, a
//! successful fdatasync — the storage layer's own fsync, not sled's
//! `sync_file_range`, which does not flush a disk's write-back cache.
//!
//! The power-loss tests run nodes over lazyfs (tools/lazyfs): killing it
//! loses every write not fsynced, which `kill -9` alone never does (the page
//! cache survives a process).

mod common;

use std::fs;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use common::*;
use raft_zmq::client::Client;
use raft_zmq::kv::Value;
use raft_zmq::wire::protocol::Reply;

/// Traces `pids` with strace while `act` runs; returns each process's trace.
fn trace_while(cluster: &TestCluster, ids: &[usize], act: impl FnOnce()) -> Vec<String> {
    let traces: Vec<_> = ids
        .iter()
        .map(|&id| {
            let pid = cluster.nodes[id].process.as_ref().unwrap().id();
            let path = cluster.dir.path().join(format!("strace-{id}.txt"));
            let strace = Command::new("strace")
                .args(["-f", "-y", "-s", "4096", "-e", "trace=fdatasync,sendto,recvfrom,write,read", "-o"])
                .arg(&path)
                .args(["-p", &pid.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("strace must be installed (.ci/run installs it)");
            // Attached once our status requests show up in the trace.
            wait_for("strace to attach", || {
                cluster.status(id);
                fs::read_to_string(&path).ok().filter(|t| t.contains("status")).map(|_| ())
            });
            (KillOnDrop(strace), path)
        })
        .collect();
    act();
    traces
        .into_iter()
        .map(|(mut strace, path)| {
            // SIGINT makes strace detach and flush; the node keeps running.
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(strace.0.id() as libc::pid_t, libc::SIGINT) };
            wait_for("strace to exit", || strace.0.try_wait().unwrap());
            fs::read_to_string(&path).unwrap()
        })
        .collect()
}

/// A line showing data a socket received. strace prints a syscall another
/// thread interrupted in two lines, `recvfrom(... <unfinished ...>` and
/// `<... recvfrom resumed>"<data>"`; the data is on the second.
fn received(line: &str) -> bool {
    line.contains("recvfrom(") || line.contains("recvfrom resumed>")
}

/// Whether a completed fdatasync lies between the first line matching
/// `received` and the first `sendto` after it matching `replied`; None if
/// the trace has no such pair.
fn synced_between(trace: &str, received: impl Fn(&str) -> bool, replied: impl Fn(&str) -> bool) -> Option<bool> {
    let lines: Vec<&str> = trace.lines().collect();
    let request = lines.iter().position(|l| received(l))?;
    let reply = request + lines[request..].iter().position(|l| l.contains("sendto(") && replied(l))?;
    Some(lines[request..reply].iter().any(|l| l.contains("fdatasync") && l.trim_end().ends_with("= 0")))
}

#[test]
fn acknowledged_write_was_fdatasynced_first() {
    let cluster = TestCluster::start(1);
    cluster.wait_for_leader();
    cluster.call_ok(0, &put("warm-up", "1"));
    let trace = trace_while(&cluster, &[0], || {
        let Reply::Put { .. } = cluster.call_ok(0, &put("durable-key", "durable-value")) else { panic!("put") };
    })
    .remove(0);
    // The ack is the first msgpack map {"ok": true, "index": ...} sent after it.
    let synced = synced_between(&trace, |l| l.contains("durable-key"), |l| l.contains(r#"\242ok\303\245index"#));
    assert_eq!(synced, Some(true), "no completed fdatasync between request and acknowledgement:\n{trace}");
    let log = cluster.state_dir(0).join("log");
    assert!(
        trace.lines().any(|l| l.contains("fdatasync(") && l.contains(&*log.to_string_lossy()) && l.contains(".wal")),
        "the fdatasync is on a log segment under {}",
        log.display()
    );
}

/// A follower acknowledges new entries, and grants a vote, only once they
/// are durable: the node's own persist-before-send order, seen from outside.
#[test]
fn a_follower_syncs_before_it_acknowledges_entries_or_grants_a_vote() {
    let cluster = TestCluster::start(3);
    let leader = cluster.wait_for_leader();
    cluster.call_ok(leader, &put("warm-up", "1"));
    let followers: Vec<usize> = (0..3).filter(|&id| id != leader).collect();
    let traces = trace_while(&cluster, &followers, || {
        cluster.call_ok(leader, &put("replicated-key", "v"));
        cluster.signal(leader, libc::SIGKILL);
        let survivor = followers[0];
        wait_for("a new leader", || {
            cluster.status(survivor).filter(|s| s.leader.is_some_and(|l| l as usize != leader)).map(|_| ())
        });
    });
    // msgpack: "AppendEntriesReply" is a fixstr of 18 bytes (\262), true is \303.
    let acked = |l: &str| l.contains(r#"\262AppendEntriesReply"#) && l.contains(r#"\247success\303"#);
    // A follower slower than the majority may not have answered before the
    // leader died (its reply then never leaves): only answers sent count,
    // and at least one follower's must be seen.
    let mut answered = 0;
    for (id, trace) in followers.iter().zip(&traces) {
        let synced = synced_between(trace, |l| received(l) && l.contains("replicated-key"), acked);
        assert_ne!(synced, Some(false), "follower {id} acknowledged entries before an fdatasync:\n{trace}");
        answered += usize::from(synced.is_some());
    }
    assert!(answered > 0, "no follower acknowledged the entry in the traces:\n{traces:#?}");
    // A real vote (pre_vote false) granted after a vote request (a fixstr of
    // 11 bytes, \253, then a map of 4 fields, \204).
    let asked = |l: &str| received(l) && l.contains(r#"\253RequestVote\204"#) && l.contains(r#"pre_vote\302"#);
    let granted = |l: &str| l.contains(r#"\247granted\303\250pre_vote\302"#);
    let votes: Vec<bool> = traces.iter().filter_map(|t| synced_between(t, asked, granted)).collect();
    assert!(!votes.is_empty(), "no follower granted a vote in the trace:\n{traces:#?}");
    assert!(votes.iter().all(|&synced| synced), "a vote was granted before an fdatasync:\n{traces:#?}");
}

/// Writes `key-<i>` for i = 0, 1, … through `client()` until `stop`, one
/// at a time; returns the i of every acknowledged one.
fn write_until(stop: &AtomicBool, acked: &AtomicUsize, mut client: impl FnMut() -> Client) -> Vec<usize> {
    let mut client = client();
    let mut done = Vec::new();
    for i in 0.. {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        if let Ok(Reply::Put { .. }) = client.call(&put(&format!("key-{i}"), &format!("value-{i}"))) {
            done.push(i);
            acked.fetch_add(1, Ordering::SeqCst);
        }
    }
    done
}

/// Writes under load, cuts the power of `victims` while writes are in
/// flight, restarts them, and checks that every acknowledged write is there.
fn power_loss_under_load(cluster: &mut TestCluster, victims: &[usize], rounds: usize) {
    for round in 0..rounds {
        let leader = cluster.wait_for_leader();
        let (stop, acked) = (AtomicBool::new(false), AtomicUsize::new(0));
        let endpoint = cluster.endpoint(leader);
        let done = thread::scope(|s| {
            let writer = s.spawn(|| {
                let ctx = zmq::Context::new();
                write_until(&stop, &acked, || endpoint.client(&ctx, Duration::from_secs(2)))
            });
            wait_for("writes to be acknowledged", || (acked.load(Ordering::SeqCst) >= 200).then_some(()));
            for &id in victims {
                cluster.power_off(id);
            }
            stop.store(true, Ordering::SeqCst);
            writer.join().unwrap()
        });
        for &id in victims {
            cluster.start_node(id);
        }
        let leader = cluster.wait_for_leader();
        for i in done {
            let key = format!("key-{i}");
            assert_eq!(
                cluster.get_value(leader, &key),
                Some(Value::Str(format!("value-{i}"))),
                "round {round}: acknowledged write {key} lost to a power loss of {victims:?}"
            );
        }
    }
}

/// One node alone: what it acknowledged, it had synced, so a power loss
/// in the middle of the writes loses none of them.
#[test]
fn a_single_node_keeps_every_acknowledged_write_through_power_loss() {
    let mut cluster = TestCluster::configure(1, "").on_lazy_disks();
    cluster.start_node(0);
    power_loss_under_load(&mut cluster, &[0], 3);
}

/// Every node loses power at once: an acknowledged write was synced on a
/// majority, and the cluster that comes back has it.
#[test]
fn a_cluster_that_loses_power_at_once_keeps_every_acknowledged_write() {
    let mut cluster = TestCluster::configure(3, "").on_lazy_disks();
    (0..3).for_each(|id| cluster.start_node(id));
    power_loss_under_load(&mut cluster, &[0, 1, 2], 3);
}
