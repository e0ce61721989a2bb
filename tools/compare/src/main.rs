//! `raft-zmq-compare`: etcd and raft-zmq side by side on this machine (issue
//! #24). It starts a 3-member etcd cluster (Debian's `etcd-server`) and a
//! 3-node raft-zmq cluster, one after the other, each in a temp dir with
//! fsync on, and drives both with the same closed-loop load generator:
//! every client has one request in flight, to the leader, on keys `k0..k999`.
//! It prints one table: throughput, latency percentiles, and the CPU the
//! three server processes used per operation.
//!
//! ```sh
//! cargo build --release && cargo run --release -p raft-zmq-compare
//! cargo run --release -p raft-zmq-compare -- --clients 1,64 --duration 5
//! ```
//!
//! etcd is spoken to over its JSON gateway (`/v3/kv/put`, `/v3/kv/range`,
//! linearizable by default), by hand: neither this tool nor the node needs
//! an etcd client library. raft-zmq is spoken to in ZMTP by hand too (see
//! `zmtp.rs`), so that neither load pays for a client library's threads.

mod delay;
mod etcd;
mod load;
mod raft_zmq_cluster;
mod zmtp;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use load::{Op, Stats};

#[derive(Parser, Debug)]
#[command(about = "Runs etcd and raft-zmq side by side and drives both with the same load")]
struct Args {
    /// Client counts to run puts with, comma-separated.
    #[arg(long, default_value = "1,16,64", value_delimiter = ',')]
    clients: Vec<usize>,
    /// Clients for the linearizable-get run (0: none).
    #[arg(long, default_value_t = 64)]
    get_clients: usize,
    /// Seconds per run.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Bytes per value.
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// The raft-zmq binary.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/release/raft-zmq"))]
    raft_zmq: PathBuf,
    /// The etcd binary (Debian: `apt-get install etcd-server`).
    #[arg(long, default_value = "etcd")]
    etcd: PathBuf,
    /// How the load speaks to raft-zmq: ZMTP by hand over plain TCP, as it
    /// speaks HTTP to etcd; or through libzmq, as raft-zmq's own tools do
    /// (figures before 2026-12-08 were taken so).
    #[arg(long, value_enum, default_value_t = raft_zmq_cluster::ClientKind::Zmtp)]
    raft_zmq_client: raft_zmq_cluster::ClientKind,
    /// The round trip between members, in milliseconds: each member's peer
    /// port is reached through a proxy that holds each way for half of it
    /// (0: straight over loopback).
    #[arg(long, default_value_t = 0.0)]
    rtt_ms: f64,
}

/// One system under test, started.
trait System {
    fn name(&self) -> &'static str;
    /// A new connection to the leader.
    fn client(&self) -> Box<dyn load::KvClient>;
    /// CPU seconds the server processes used so far.
    fn cpu_seconds(&self) -> f64;
}

fn main() {
    let mut args = Args::parse();
    // The nodes run in a directory of their own.
    args.raft_zmq = args
        .raft_zmq
        .canonicalize()
        .unwrap_or_else(|e| panic!("no raft-zmq at {} (cargo build --release): {e}", args.raft_zmq.display()));
    let runs: Vec<(Op, usize)> = args
        .clients
        .iter()
        .map(|&n| (Op::Put, n))
        .chain((args.get_clients > 0).then_some((Op::Get, args.get_clients)))
        .collect();
    let duration = Duration::from_secs_f64(args.duration);
    println!("{}", machine());
    let apart = match args.rtt_ms {
        0.0 => "on loopback".to_string(),
        rtt => format!("{rtt} ms apart (a delaying proxy in front of each member's peer port)"),
    };
    println!(
        "3 nodes each, {apart}, fsync on, {}-byte values, keys k0..k999, {:.0} s a run, closed loop to the leader\n",
        args.value_size, args.duration
    );
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut results: Vec<Vec<Stats>> = Vec::new();
    let one_way = (args.rtt_ms > 0.0).then(|| Duration::from_secs_f64(args.rtt_ms / 2000.0));
    let systems: [&dyn Fn() -> Box<dyn System>; 2] =
        [&|| Box::new(etcd::Cluster::start(&args.etcd, &dir.path().join("etcd"), one_way)), &|| {
            let dir = dir.path().join("raft-zmq");
            Box::new(raft_zmq_cluster::Cluster::start(&args.raft_zmq, &dir, args.raft_zmq_client, one_way))
        }];
    for start in systems {
        let system = start();
        let stats = runs
            .iter()
            .map(|&(op, clients)| {
                load::prepare(&*system, op, args.value_size);
                let cpu = system.cpu_seconds();
                let mut stats = load::run(&*system, op, clients, args.value_size, duration);
                stats.cpu_seconds = system.cpu_seconds() - cpu;
                eprintln!("{}: {}", system.name(), stats.line(op, clients));
                stats
            })
            .collect();
        results.push(stats);
    }
    println!("| load | etcd | raft-zmq | ratio |");
    println!("|---|---|---|---|");
    for (i, &(op, clients)) in runs.iter().enumerate() {
        let (etcd, ours) = (&results[0][i], &results[1][i]);
        let ratio = if etcd.per_second() > 0.0 { ours.per_second() / etcd.per_second() } else { f64::NAN };
        println!("| {op} @{clients} | {} | {} | {ratio:.2}x |", etcd.cell(), ours.cell());
    }
}

/// The machine the figures come from.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map_or("?", |m| m.trim_start_matches([' ', '\t', ':']));
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("machine: {cores} cores, {model}, Linux {}", kernel.trim())
}

/// A port nothing listens on (raft-zmq's test helper).
fn free_port() -> u16 {
    raft_zmq::testing::free_port()
}

/// A cluster's server processes, killed when dropped.
pub struct Processes(pub Vec<std::process::Child>);

impl Processes {
    /// CPU seconds (user + system) they used so far.
    pub fn cpu_seconds(&self) -> f64 {
        self.0.iter().map(|p| cpu_seconds_of(p.id())).sum()
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for process in &mut self.0 {
            let _ = process.kill();
            let _ = process.wait();
        }
    }
}

/// CPU seconds (user + system) process `pid` and its threads used so far.
fn cpu_seconds_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces), from field 3 on.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf(3) reads a constant.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / per_second
}
