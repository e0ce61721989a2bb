//! A harness that runs real `raft-zmq` processes on 127.0.0.1.
//!
//! Every cluster gets free ports and its own temp dir; every process is
//! killed when the harness is dropped (even when a test panics); every wait
//! polls until a generous deadline instead of sleeping a fixed time.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use raft_zmq::kv::{Command as KvCommand, Value};
use raft_zmq::protocol::{Reply, Request, StatusInfo};
use raft_zmq::tools::client::Client;

/// Generous: CI machines are small and noisy.
pub const WAIT: Duration = Duration::from_secs(30);

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_raft-zmq")
}

/// Polls `f` until it returns Some, or panics after `WAIT` naming `what`.
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

pub struct Node {
    pub raft: String,
    pub client: String,
    pub process: Option<Child>,
}

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub nodes: Vec<Node>,
    ctx: zmq::Context,
}

pub fn put(key: &str, value: &str) -> Request {
    Request::Write {
        command: KvCommand::Put { key: Value::Str(key.into()), value: Value::Str(value.into()) },
        client_id: None,
        seq: None,
    }
}

pub fn get(key: &str) -> Request {
    Request::Get { key: Value::Str(key.into()) }
}

impl TestCluster {
    /// Writes a config for `n` nodes and starts them all.
    pub fn start(n: usize) -> TestCluster {
        let cluster = Self::configure(n, "");
        let mut cluster = cluster;
        for id in 0..n {
            cluster.start_node(id);
        }
        cluster
    }

    /// Writes the config only; `extra` is spliced into the JSON object.
    pub fn configure(n: usize, extra: &str) -> TestCluster {
        let dir = tempfile::tempdir().unwrap();
        let nodes: Vec<Node> = (0..n)
            .map(|_| Node {
                raft: format!("tcp://127.0.0.1:{}", free_port()),
                client: format!("tcp://127.0.0.1:{}", free_port()),
                process: None,
            })
            .collect();
        let members: Vec<String> = nodes
            .iter()
            .enumerate()
            .map(|(id, n)| format!(r#"{{"id": {id}, "raft": "{}", "client": "{}"}}"#, n.raft, n.client))
            .collect();
        let config_path = dir.path().join("config.json");
        fs::write(
            &config_path,
            format!(
                r#"{{"nodes": [{}], "election_timeout_ms": [300, 600], "heartbeat_ms": 50, "request_timeout_ms": 3000{extra}}}"#,
                members.join(", ")
            ),
        )
        .unwrap();
        TestCluster { dir, config_path, nodes, ctx: zmq::Context::new() }
    }

    pub fn start_node(&mut self, id: usize) {
        self.start_node_with(id, &[]);
    }

    /// Like [`TestCluster::start_node`], with extra command-line arguments.
    pub fn start_node_with(&mut self, id: usize, extra_args: &[String]) {
        assert!(self.nodes[id].process.is_none(), "node {id} already running");
        let log = fs::OpenOptions::new().create(true).append(true).open(self.output_path(id)).unwrap();
        let child = Command::new(binary())
            .args(["--node-id", &id.to_string(), "--config"])
            .arg(&self.config_path)
            .args(extra_args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.nodes[id].process = Some(child);
    }

    /// The node's own stdout/stderr, for post-mortems.
    pub fn output_path(&self, id: usize) -> PathBuf {
        self.dir.path().join(format!("node{id}.out"))
    }

    pub fn mirror_path(&self, id: usize) -> PathBuf {
        self.dir.path().join("logs").join(format!("{id}.txt"))
    }

    pub fn state_dir(&self, id: usize) -> PathBuf {
        self.dir.path().join("state").join(id.to_string())
    }

    pub fn signal(&self, id: usize, signal: i32) {
        let pid = self.nodes[id].process.as_ref().expect("running").id();
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        assert_eq!(unsafe { libc::kill(pid as libc::pid_t, signal) }, 0);
    }

    /// `kill -9`: a crash.
    pub fn kill(&mut self, id: usize) {
        if let Some(mut child) = self.nodes[id].process.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(&mut self, id: usize) -> std::process::ExitStatus {
        self.signal(id, libc::SIGTERM);
        let mut child = self.nodes[id].process.take().unwrap();
        wait_for("a clean exit", || child.try_wait().unwrap())
    }

    pub fn client(&self, id: usize) -> Client {
        Client::new(&self.ctx, &self.nodes[id].client, Duration::from_secs(5))
    }

    pub fn running(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|&id| self.nodes[id].process.is_some()).collect()
    }

    pub fn status(&self, id: usize) -> Option<StatusInfo> {
        let mut client = Client::new(&self.ctx, &self.nodes[id].client, Duration::from_millis(500));
        match client.call(&Request::Status) {
            Ok(Reply::Status(status)) => Some(status),
            _ => None,
        }
    }

    /// Waits until a running node reports itself leader and a majority of
    /// the running nodes agree on it; returns its id.
    pub fn wait_for_leader(&self) -> usize {
        wait_for("a leader", || {
            let statuses: Vec<StatusInfo> = self.running().into_iter().filter_map(|id| self.status(id)).collect();
            let leader = statuses.iter().find(|s| s.role == "leader")?;
            let agree = statuses.iter().filter(|s| s.leader == Some(leader.id) && s.term == leader.term).count();
            (agree > self.nodes.len() / 2).then_some(leader.id as usize)
        })
    }

    /// Retries `request` on node `id` until it gets a non-error reply.
    pub fn call_ok(&self, id: usize, request: &Request) -> Reply {
        let mut client = self.client(id);
        wait_for("a successful reply", || match client.call(request) {
            Ok(Reply::Error { .. }) | Err(_) => None,
            Ok(reply) => Some(reply),
        })
    }

    pub fn get_value(&self, id: usize, key: &str) -> Option<Value> {
        match self.call_ok(id, &get(key)) {
            Reply::Get { value } => value,
            other => panic!("unexpected reply {other:?}"),
        }
    }

    /// Waits until every running node has applied at least `index`.
    pub fn wait_applied(&self, index: u64) {
        for id in self.running() {
            wait_for(&format!("node {id} to apply {index}"), || {
                self.status(id).filter(|s| s.last_applied >= index).map(|_| ())
            });
        }
    }

    pub fn mirror(&self, id: usize) -> String {
        fs::read_to_string(self.mirror_path(id)).unwrap_or_default()
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for id in 0..self.nodes.len() {
            if self.nodes[id].process.as_ref().is_some() {
                // SIGCONT first: a SIGSTOPped process still dies from SIGKILL,
                // but be explicit for readers of `ps`.
                self.signal(id, libc::SIGCONT);
                self.kill(id);
            }
        }
        if std::thread::panicking() {
            for id in 0..self.nodes.len() {
                let out = fs::read_to_string(self.output_path(id)).unwrap_or_default();
                let tail: Vec<&str> = out.lines().rev().take(40).collect();
                eprintln!("--- node {id} output (last 40 lines) ---");
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

/// The mirror file's lines, for comparing replicas.
pub fn lines(text: &str) -> Vec<&str> {
    text.lines().collect()
}

pub fn read_path(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}
