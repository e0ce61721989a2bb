//! A harness that runs real `raft-zmq` processes on 127.0.0.1.
//!
//! Every cluster gets free ports and its own temp dir; every process is
//! killed when the harness is dropped (even when a test panics); every wait
//! polls until a generous deadline instead of sleeping a fixed time.

#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod lazyfs;
pub mod rolling;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use raft_zmq::client::Client;
use raft_zmq::keys::{CurveIdentity, PublicKey};
use raft_zmq::kv::{Command as KvCommand, Value};
use raft_zmq::net::security::ClientCurve;
pub use raft_zmq::testing::free_port;
use raft_zmq::wire::protocol::{Reply, Request, StatusInfo};

use lazyfs::LazyDisk;

/// Generous: CI machines are small and noisy.
pub const WAIT: Duration = Duration::from_secs(30);

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
    /// Its `public_key` in the config, when the cluster has keys.
    pub public_key: Option<PublicKey>,
    /// Its `http` address (HOST:PORT), when it serves HTTP.
    pub http: Option<String>,
    /// What it binds instead of `raft` / `client`, when the config says.
    pub raft_listen: Option<String>,
    pub client_listen: Option<String>,
    /// The network namespace it runs in (`ip netns exec`), when it has a
    /// host of its own.
    pub netns: Option<String>,
    /// The raft-zmq it runs when not this build's (an older release).
    pub binary: Option<PathBuf>,
    pub process: Option<Child>,
}

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub nodes: Vec<Node>,
    /// The key pair the harness's clients use when the cluster has keys
    /// (`keys/client.key`).
    pub client_key: Option<CurveIdentity>,
    /// Each node's state dir on a [`LazyDisk`], when the test cuts power.
    disks: Vec<LazyDisk>,
    ctx: zmq::Context,
}

/// How a test client reaches one node: an address (its client endpoint, or
/// a proxy in front of it) and, when the cluster has keys, CURVE towards it.
#[derive(Clone)]
pub struct Endpoint {
    pub address: String,
    pub curve: Option<ClientCurve>,
}

impl Endpoint {
    pub fn client(&self, ctx: &zmq::Context, timeout: Duration) -> Client {
        Client::new(ctx, &self.address, timeout).with_curve(self.curve.clone())
    }
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
        Self::configure(n, "").start_all()
    }

    /// Like [`TestCluster::start`], with CURVE; see [`TestCluster::configure_with_keys`].
    pub fn start_with_keys(n: usize, client_keys: bool) -> TestCluster {
        Self::configure_with_keys(n, client_keys).start_all()
    }

    /// Like [`TestCluster::configure`], each node also serving HTTP.
    pub fn configure_with_http(n: usize) -> TestCluster {
        let mut cluster = Self::new(n);
        for node in &mut cluster.nodes {
            node.http = Some(format!("127.0.0.1:{}", free_port()));
        }
        cluster.write_config("");
        cluster
    }

    pub fn start_all(mut self) -> TestCluster {
        for id in 0..self.nodes.len() {
            self.start_node(id);
        }
        self
    }

    /// Writes the config of `n` nodes on free ports, each changed by `edit`
    /// (given its id) first.
    pub fn configure_nodes(n: usize, mut edit: impl FnMut(usize, &mut Node)) -> TestCluster {
        let mut cluster = Self::new(n);
        for (id, node) in cluster.nodes.iter_mut().enumerate() {
            edit(id, node);
        }
        cluster.write_config("");
        cluster
    }

    /// Writes the config only; `extra` is spliced into the JSON object.
    pub fn configure(n: usize, extra: &str) -> TestCluster {
        let cluster = Self::new(n);
        cluster.write_config(extra);
        cluster
    }

    /// Like [`TestCluster::configure`], with CURVE: a key pair for every
    /// node in `keys/`, and `keys/client` for the harness's own clients.
    /// `client_keys`: whether the config lets in only that client (and the
    /// nodes) rather than any CURVE client.
    pub fn configure_with_keys(n: usize, client_keys: bool) -> TestCluster {
        let mut cluster = Self::new(n);
        let keys = cluster.dir.path().join("keys");
        for (id, node) in cluster.nodes.iter_mut().enumerate() {
            node.public_key = Some(CurveIdentity::write_new(&keys.join(id.to_string())).unwrap().public());
        }
        let client = CurveIdentity::write_new(&keys.join("client")).unwrap();
        let extra = if client_keys { format!(r#", "client_keys": ["{}"]"#, client.public()) } else { String::new() };
        cluster.client_key = Some(client);
        cluster.write_config(&extra);
        cluster
    }

    /// `n` nodes on free ports in a fresh temp dir; no config yet.
    fn new(n: usize) -> TestCluster {
        let dir = tempfile::tempdir().unwrap();
        let nodes: Vec<Node> = (0..n)
            .map(|_| Node {
                raft: format!("tcp://127.0.0.1:{}", free_port()),
                client: format!("tcp://127.0.0.1:{}", free_port()),
                public_key: None,
                http: None,
                raft_listen: None,
                client_listen: None,
                netns: None,
                binary: None,
                process: None,
            })
            .collect();
        let config_path = dir.path().join("config.json");
        TestCluster { dir, config_path, nodes, client_key: None, disks: Vec::new(), ctx: zmq::Context::new() }
    }

    fn write_config(&self, extra: &str) {
        self.write_config_of(&self.config_path, 0..self.nodes.len(), extra);
    }

    /// Writes a config at `path` whose `nodes` are those of `ids` only (a
    /// new cluster's, or a joining node's, which lists itself and a member).
    pub fn write_config_of(&self, path: &Path, ids: impl IntoIterator<Item = usize>, extra: &str) {
        let ids: Vec<usize> = ids.into_iter().collect();
        let members: Vec<String> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(id, _)| ids.contains(id))
            .map(|(id, n)| {
                let key = n.public_key.map_or(String::new(), |key| format!(r#", "public_key": "{key}""#));
                let optional = |key: &str, value: &Option<String>| {
                    value.as_ref().map_or(String::new(), |value| format!(r#", "{key}": "{value}""#))
                };
                let http = optional("http", &n.http);
                let listen = optional("raft_listen", &n.raft_listen) + &optional("client_listen", &n.client_listen);
                format!(r#"{{"id": {id}, "raft": "{}", "client": "{}"{key}{http}{listen}}}"#, n.raft, n.client)
            })
            .collect();
        fs::write(
            path,
            format!(
                r#"{{"nodes": [{}], "election_timeout_ms": [300, 600], "heartbeat_ms": 50, "request_timeout_ms": 3000{extra}}}"#,
                members.join(", ")
            ),
        )
        .unwrap();
    }

    pub fn start_node(&mut self, id: usize) {
        self.start_node_with(id, &[]);
    }

    /// Like [`TestCluster::start_node`], with extra command-line arguments.
    pub fn start_node_with(&mut self, id: usize, extra_args: &[String]) {
        let config = self.config_path.clone();
        self.start_node_from(id, &config, extra_args);
    }

    /// Starts node `id` with the config at `config` and `extra_args`.
    pub fn start_node_from(&mut self, id: usize, config: &Path, extra_args: &[String]) {
        self.spawn(id, config, extra_args, None);
    }

    /// Starts node `id`, which aborts at the crash point named `point`
    /// (see `raft_zmq::crash_point`).
    pub fn start_node_crashing_at(&mut self, id: usize, point: &str) {
        let config = self.config_path.clone();
        self.spawn(id, &config, &[], Some(point));
    }

    /// Waits for node `id` to exit on its own; returns its status.
    pub fn wait_exit(&mut self, id: usize) -> std::process::ExitStatus {
        let mut child = self.nodes[id].process.take().expect("running");
        wait_for("the node to exit", || child.try_wait().unwrap())
    }

    fn spawn(&mut self, id: usize, config: &Path, extra_args: &[String], crash_at: Option<&str>) {
        assert!(self.nodes[id].process.is_none(), "node {id} already running");
        let log = fs::OpenOptions::new().create(true).append(true).open(self.output_path(id)).unwrap();
        let program = self.nodes[id].binary.clone().unwrap_or_else(|| PathBuf::from(binary()));
        // `ip netns exec` execs the binary: the child's pid is the node's.
        let mut command = match &self.nodes[id].netns {
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns]).arg(&program);
                // A node on a host of its own dies with the thread that
                // started it, so a test killed before it could clean up
                // leaves no node holding a namespace.
                // SAFETY: prctl(2) is async-signal-safe and touches no memory.
                unsafe {
                    std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                        Ok(())
                    });
                }
                command
            }
            None => Command::new(&program),
        };
        if let Some(point) = crash_at {
            command.env(raft_zmq::crash_point::VARIABLE, point);
        }
        let child = command
            .args(["--node-id", &id.to_string(), "--config"])
            .arg(config)
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

    /// Puts every node's state dir on a [`LazyDisk`] (before any starts),
    /// so that [`TestCluster::power_off`] can lose what they did not sync.
    pub fn on_lazy_disks(mut self) -> TestCluster {
        assert!(self.running().is_empty(), "mount the disks before starting nodes");
        self.disks = (0..self.nodes.len())
            .map(|id| {
                let root = self.dir.path();
                LazyDisk::mount(
                    root.join("disks").join(id.to_string()),
                    self.state_dir(id),
                    root.join(format!("lazyfs{id}.out")),
                )
            })
            .collect();
        self
    }

    /// A power loss: `kill -9`, and every write the node did not fsync is
    /// gone. Needs [`TestCluster::on_lazy_disks`].
    pub fn power_off(&mut self, id: usize) {
        assert!(!self.disks.is_empty(), "power_off needs on_lazy_disks");
        self.kill(id);
        self.disks[id].power_loss();
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

    /// A raw socket of `kind` connected to `endpoint`: linger 0 and 5 s
    /// send/receive timeouts, so a test never blocks on it.
    pub fn socket(&self, kind: zmq::SocketType, endpoint: &str) -> zmq::Socket {
        let socket = self.ctx.socket(kind).unwrap();
        socket.set_linger(0).unwrap();
        socket.set_rcvtimeo(5_000).unwrap();
        socket.set_sndtimeo(5_000).unwrap();
        socket.connect(endpoint).unwrap();
        socket
    }

    /// Runs node `id` of this cluster's config in the foreground until it
    /// exits; see [`run_to_exit`].
    pub fn run_node_to_exit(&self, id: usize) -> Exited {
        run_to_exit([
            OsStr::new("--node-id"),
            OsStr::new(&id.to_string()),
            OsStr::new("--config"),
            self.config_path.as_os_str(),
        ])
    }

    /// CURVE from the harness's client towards node `id`, when the cluster has keys.
    pub fn curve(&self, id: usize) -> Option<ClientCurve> {
        Some(ClientCurve { identity: self.client_key.clone()?, server: self.nodes[id].public_key? })
    }

    pub fn endpoint(&self, id: usize) -> Endpoint {
        Endpoint { address: self.nodes[id].client.clone(), curve: self.curve(id) }
    }

    pub fn endpoints(&self) -> Vec<Endpoint> {
        (0..self.nodes.len()).map(|id| self.endpoint(id)).collect()
    }

    pub fn client(&self, id: usize) -> Client {
        self.endpoint(id).client(&self.ctx, Duration::from_secs(5))
    }

    /// Node `id` as `add_node` names it.
    pub fn member(&self, id: usize) -> raft_zmq::config::Member {
        let node = &self.nodes[id];
        let public_key = node.public_key.map(|key| key.to_string());
        raft_zmq::config::Member { id: id as u64, raft: node.raft.clone(), client: node.client.clone(), public_key }
    }

    pub fn running(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|&id| self.nodes[id].process.is_some()).collect()
    }

    pub fn status(&self, id: usize) -> Option<StatusInfo> {
        let mut client = self.endpoint(id).client(&self.ctx, Duration::from_millis(500));
        match client.call(&Request::Status) {
            Ok(Reply::Status(status)) => Some(*status),
            _ => None,
        }
    }

    /// Waits until a running node reports itself leader and a majority of
    /// the running nodes agree on it; returns its id.
    /// Waits for a leader that a majority follows and whose cluster's name
    /// every running node knows. A node that has not learned the name
    /// cannot vote for a named candidate (docs/design.md "Cluster
    /// identity"), so a test that stops the leader before then may leave
    /// two nodes that cannot elect one.
    pub fn wait_for_leader(&self) -> usize {
        wait_for("a leader whose cluster's name every running node knows", || {
            let statuses: Vec<StatusInfo> = self.running().into_iter().filter_map(|id| self.status(id)).collect();
            let leader = statuses.iter().find(|s| s.role == "leader")?;
            let agree = statuses.iter().filter(|s| s.leader == Some(leader.id) && s.term == leader.term).count();
            let named = leader.cluster_id.is_some()
                && statuses.len() == self.running().len()
                && statuses.iter().all(|s| s.cluster_id == leader.cluster_id);
            (agree > self.nodes.len() / 2 && named).then_some(leader.id as usize)
        })
    }

    /// Asks until node `id` leads (a leadership transfer to it).
    pub fn make_leader(&self, id: usize) {
        wait_for("a transfer of leadership", || {
            let reply = self.client(id).call(&Request::TransferLeader { to: Some(id as u64) });
            matches!(reply, Ok(Reply::TransferLeader { leader }) if leader == id as u64).then_some(())
        });
    }

    /// The cluster's name as node `id` knows it, once it does (the first
    /// leader names a new cluster just after its election).
    pub fn wait_for_name(&self, id: usize) -> u64 {
        wait_for("the cluster's name", || {
            let name = self.status(id)?.cluster_id?;
            Some(u64::from_str_radix(&name, 16).expect("16 hex digits"))
        })
    }

    /// Retries `request` on node `id` until it gets a non-error reply.
    /// Asks node `id` until it answers without an error; on timeout the
    /// panic says what the last try got.
    pub fn call_ok(&self, id: usize, request: &Request) -> Reply {
        let mut client = self.client(id);
        let mut last = None;
        let answered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_for("a successful reply", || match client.call(request) {
                Ok(Reply::Error { code, message, leader }) => {
                    last = Some(format!("{code}: {message} (leader {leader:?})"));
                    None
                }
                Err(e) => {
                    last = Some(format!("{e}"));
                    None
                }
                Ok(reply) => Some(reply),
            })
        }));
        answered.unwrap_or_else(|_| panic!("node {id} never answered {} well; the last try got {last:?}", request.op()))
    }

    pub fn get_value(&self, id: usize, key: &str) -> Option<Value> {
        match self.call_ok(id, &get(key)) {
            Reply::Get { value } => value,
            other => panic!("unexpected reply {other:?}"),
        }
    }

    /// Waits until every running node has applied at least `index`.
    /// Waits until every running node applied `index` and wrote it to its
    /// mirror (which happens a moment after the apply, off the core loop).
    pub fn wait_applied(&self, index: u64) {
        for id in self.running() {
            wait_for(&format!("node {id} to apply {index}"), || {
                self.status(id).filter(|s| s.last_applied >= index).map(|_| ())
            });
            wait_for(&format!("node {id} to mirror {index}"), || (self.mirror_entries(id).1 >= index).then_some(()));
        }
    }

    pub fn mirror(&self, id: usize) -> String {
        fs::read_to_string(self.mirror_path(id)).unwrap_or_default()
    }

    /// The entry lines of node `id`'s whole mirror, rotated files included,
    /// by index (`# snapshot` lines say where numbering continues and are
    /// not entries), and the last index it covers, snapshot lines included.
    pub fn mirror_entries(&self, id: usize) -> (BTreeMap<u64, String>, u64) {
        let path = self.mirror_path(id);
        let rotated = (1..).map(|n| PathBuf::from(format!("{}.{n}", path.display()))).take_while(|p| p.exists());
        let files: Vec<PathBuf> = rotated.collect::<Vec<_>>().into_iter().rev().chain([path]).collect();
        let (mut entries, mut last) = (BTreeMap::new(), 0);
        for file in files {
            let text = fs::read_to_string(&file).unwrap_or_default();
            // A line still being written is not there yet.
            let complete = &text[..text.rfind('\n').map_or(0, |end| end + 1)];
            for line in complete.lines() {
                let snapshot = line.strip_prefix("# snapshot ");
                last = snapshot.unwrap_or(line).split(", ").next().unwrap().parse().expect("an index");
                if snapshot.is_none() {
                    entries.insert(last, line.to_string());
                }
            }
        }
        (entries, last)
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
        // Unmounted before the temp dir goes.
        self.disks.clear();
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

/// `GET path` from an HTTP server at `address` (HOST:PORT): the status code
/// and the body, or `None` when it cannot be reached or does not answer.
pub fn http_get(address: &str, path: &str) -> Option<(u16, String)> {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// The mirror file's lines, for comparing replicas.
pub fn lines(text: &str) -> Vec<&str> {
    text.lines().collect()
}

pub fn read_path(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

/// A child process that is killed and reaped when dropped, even on panic.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How a process that was expected to stop by itself ended.
pub struct Exited {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the binary with `args` (and `RUST_LOG=info`) and waits for it to
/// exit on its own; panics (and kills it) if it is still running after
/// `WAIT`. Its stdout and stderr are captured in unnamed temp files, so a
/// chatty process cannot block on a full pipe.
pub fn run_to_exit<I, S>(args: I) -> Exited
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_to_exit_with_input(args, None)
}

/// Like [`run_to_exit`], with `input` (if any) as its standard input, which
/// then is a file, not a terminal.
pub fn run_to_exit_with_input<I, S>(args: I, input: Option<&str>) -> Exited
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let (mut stdout, mut stderr) = (tempfile::tempfile().unwrap(), tempfile::tempfile().unwrap());
    let stdin = match input {
        Some(text) => {
            let mut file = tempfile::tempfile().unwrap();
            std::io::Write::write_all(&mut file, text.as_bytes()).unwrap();
            file.rewind().unwrap();
            Stdio::from(file)
        }
        None => Stdio::null(),
    };
    let child = Command::new(binary())
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(stdin)
        .stdout(stdout.try_clone().unwrap())
        .stderr(stderr.try_clone().unwrap())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let read = |file: &mut fs::File| {
        let mut text = String::new();
        file.rewind().unwrap();
        file.read_to_string(&mut text).unwrap();
        text
    };
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            return Exited { status, stdout: read(&mut stdout), stderr: read(&mut stderr) };
        }
        if Instant::now() >= deadline {
            panic!("still running after {WAIT:?}; stderr so far:\n{}", read(&mut stderr));
        }
        thread::sleep(Duration::from_millis(20));
    }
}
