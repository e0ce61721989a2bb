//! Durability, observed from the outside: a write is acknowledged only after
//! an fdatasync completed on the node's sled data file.
//!
//! The node runs normally; `strace` attaches to it and records the syscalls
//! that matter (socket reads and writes, fdatasync). The trace must show,
//! between the client's request arriving and the acknowledgement leaving, a
//! successful fdatasync — the storage layer's own fsync, not sled's
//! `sync_file_range`, which does not flush a disk's write-back cache.

mod common;

use std::fs;
use std::process::{Command, Stdio};

use common::*;
use raft_zmq::protocol::Reply;

#[test]
fn acknowledged_write_was_fdatasynced_first() {
    let cluster = TestCluster::start(1);
    cluster.wait_for_leader();
    cluster.call_ok(0, &put("warm-up", "1"));
    let pid = cluster.nodes[0].process.as_ref().unwrap().id();
    let trace_path = cluster.dir.path().join("strace.txt");
    let mut strace = Command::new("strace")
        .args(["-f", "-y", "-s", "256", "-e", "trace=fdatasync,sendto,recvfrom,write,read", "-o"])
        .arg(&trace_path)
        .args(["-p", &pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("strace must be installed (.ci/run installs it)");
    // Attached once our status requests show up in the trace.
    wait_for("strace to attach", || {
        cluster.status(0);
        fs::read_to_string(&trace_path).ok().filter(|t| t.contains("status")).map(|_| ())
    });
    let Reply::Put { .. } = cluster.call_ok(0, &put("durable-key", "durable-value")) else { panic!("put") };
    // SIGINT makes strace detach and flush; the node keeps running.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(strace.id() as libc::pid_t, libc::SIGINT) };
    wait_for("strace to exit", || strace.try_wait().unwrap());

    let trace = fs::read_to_string(&trace_path).unwrap();
    let lines: Vec<&str> = trace.lines().collect();
    let request = lines.iter().position(|l| l.contains("durable-key")).expect("request seen in trace");
    // The ack is the first msgpack map {"ok": true, "index": ...} sent after it.
    let ack = request
        + lines[request..]
            .iter()
            .position(|l| l.contains("sendto(") && l.contains(r#"\242ok\303\245index"#))
            .expect("acknowledgement seen in trace");
    let synced = lines[request..ack].iter().any(|l| l.contains("fdatasync") && l.trim_end().ends_with("= 0"));
    assert!(synced, "no completed fdatasync between request and acknowledgement:\n{}", lines[request..=ack].join("\n"));
    let db = cluster.state_dir(0).join("db");
    assert!(
        trace.lines().any(|l| l.contains("fdatasync(") && l.contains(&*db.to_string_lossy())),
        "the fdatasync is on sled's data file {}",
        db.display()
    );
}
