//! A 3-node raft-zmq cluster on 127.0.0.1, with its default settings.

use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use raft_zmq::client::Client;
use raft_zmq::kv::{Command as KvCommand, Value};
use raft_zmq::wire::protocol::{Reply, Request, encode_request};

use crate::load::KvClient;
use crate::zmtp::ZmtpReq;
use crate::{Processes, System, free_port};

pub struct Cluster {
    nodes: Processes,
    /// The leader's client endpoint.
    leader: String,
    ctx: zmq::Context,
    client: ClientKind,
}

/// What the load's connections are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientKind {
    /// [`ZmtpReq`]: ZMTP spoken by hand over a blocking TCP socket.
    Zmtp,
    /// raft-zmq's own client, a libzmq REQ socket.
    Libzmq,
}

impl Cluster {
    /// `one_way`: the nodes reach each other through delay proxies.
    pub fn start(binary: &Path, dir: &Path, client: ClientKind, one_way: Option<Duration>) -> Cluster {
        std::fs::create_dir_all(dir).expect("a cluster dir");
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let nodes: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(id, (raft, client))| {
                format!(r#"{{"id": {id}, "raft": "tcp://127.0.0.1:{raft}", "client": "tcp://127.0.0.1:{client}"}}"#)
            })
            .collect();
        // How the others reach each node: `--peer`, through its delay proxy.
        let peers: Vec<Option<String>> = ports
            .iter()
            .enumerate()
            .map(|(id, &(raft, _))| {
                one_way.map(|delay| format!("{id}=tcp://127.0.0.1:{}", crate::delay::proxy(raft, delay)))
            })
            .collect();
        let config = dir.join("config.json");
        std::fs::write(&config, format!(r#"{{"nodes": [{}]}}"#, nodes.join(", "))).expect("config.json");
        let nodes = Processes(
            (0..3)
                .map(|id| {
                    let log = std::fs::File::create(dir.join(format!("node{id}.log"))).expect("a log file");
                    let through_proxies = peers.iter().enumerate().filter(|&(peer, _)| peer != id).flat_map(|(_, p)| p);
                    Command::new(binary)
                        .args(["--node-id", &id.to_string(), "--config"])
                        .arg(&config)
                        .args(through_proxies.flat_map(|peer| ["--peer", peer]))
                        .current_dir(dir)
                        .stdout(Stdio::null())
                        .stderr(log)
                        .spawn()
                        .unwrap_or_else(|e| panic!("cannot start {} (cargo build --release): {e}", binary.display()))
                })
                .collect(),
        );
        let ctx = zmq::Context::new();
        let clients: Vec<String> = ports.iter().map(|(_, client)| format!("tcp://127.0.0.1:{client}")).collect();
        let leader = wait_for_leader(&ctx, &clients);
        Cluster { nodes, leader, ctx, client }
    }
}

fn wait_for_leader(ctx: &zmq::Context, clients: &[String]) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        for endpoint in clients {
            let mut client = Client::new(ctx, endpoint, Duration::from_millis(500));
            if let Ok(Reply::Status(status)) = client.call(&Request::Status)
                && status.role == "leader"
                && status.cluster_id.is_some()
            {
                return endpoint.clone();
            }
        }
        thread::sleep(Duration::from_millis(200));
    }
    panic!("raft-zmq elected no leader within 60 s");
}

impl System for Cluster {
    fn name(&self) -> &'static str {
        "raft-zmq"
    }

    fn client(&self) -> Box<dyn KvClient> {
        let timeout = Duration::from_secs(10);
        match self.client {
            ClientKind::Zmtp => Box::new(ZmtpReq::connect(&self.leader, timeout).expect("a connection to the leader")),
            ClientKind::Libzmq => Box::new(Client::new(&self.ctx, &self.leader, timeout)),
        }
    }

    fn cpu_seconds(&self) -> f64 {
        self.nodes.cpu_seconds()
    }
}

/// A connection that answers a raft-zmq request, or not.
trait Ask: Send {
    fn ask(&mut self, request: &Request) -> Option<Reply>;
}

impl Ask for Client {
    fn ask(&mut self, request: &Request) -> Option<Reply> {
        self.call(request).ok()
    }
}

impl Ask for ZmtpReq {
    fn ask(&mut self, request: &Request) -> Option<Reply> {
        let frame = self.call(&encode_request(request)).ok()?;
        Reply::decode(&frame, request).ok()
    }
}

impl<C: Ask> KvClient for C {
    fn put(&mut self, key: &str, value: &str) -> bool {
        let command = KvCommand::Put { key: Value::Str(key.into()), value: Value::Str(value.into()) };
        matches!(self.ask(&Request::Write { command, client_id: None, seq: None }), Some(Reply::Put { .. }))
    }

    fn get(&mut self, key: &str) -> bool {
        matches!(self.ask(&Request::Get { key: Value::Str(key.into()) }), Some(Reply::Get { .. }))
    }
}
