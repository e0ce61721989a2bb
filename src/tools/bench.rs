//! `raft-zmq bench`: N concurrent clients issue acknowledged puts (or
//! linearizable gets) against a running cluster for a fixed time; prints
//! throughput and latency percentiles from an HDR histogram.

use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::client::{ClientKeys, CurveArgs};
use crate::client::Client;
use crate::config::{Config, Member};
use crate::kv::{Command, Value};
use crate::wire::protocol::{Reply, Request};

/// What the clients send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Op {
    Put,
    /// Linearizable gets of keys written once before the clock starts.
    Get,
}

impl Op {
    fn plural(self) -> &'static str {
        match self {
            Op::Put => "puts",
            Op::Get => "gets",
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// What each client sends.
    #[arg(long, value_enum, default_value_t = Op::Put)]
    pub op: Op,
    /// Concurrent clients, each with its own connection and one request in flight.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Number of distinct keys written or read.
    #[arg(long, default_value_t = 1000)]
    pub keys: u64,
    /// Size of each value in bytes.
    #[arg(long, default_value_t = 64)]
    pub value_size: usize,
    /// Client endpoint to send to (default: the current leader's).
    #[arg(long)]
    pub endpoint: Option<String>,
    #[command(flatten)]
    pub curve: CurveArgs,
}

struct ClientResult {
    latencies: Histogram<u64>,
    errors: u64,
}

pub fn run(config: &Config, args: &BenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    let ctx = zmq::Context::new();
    let keys = args.curve.load(config.curve.is_some())?;
    let endpoint = match &args.endpoint {
        Some(endpoint) => endpoint.clone(),
        None => find_leader(&ctx, config, &keys, Duration::from_secs(15))?.client.clone(),
    };
    // The node behind the endpoint, for its public key.
    let node = config.nodes.iter().find(|m| m.client == endpoint);
    let curve = keys.towards(node.and_then(|m| config.node_key(m.id)));
    println!(
        "bench: {} clients, {} {}, {:.1}s, {} keys, {}-byte values, against {endpoint}",
        args.clients,
        args.op.plural(),
        if args.op == Op::Get { "(linearizable)" } else { "(acknowledged)" },
        args.duration,
        args.keys,
        args.value_size
    );
    if args.op == Op::Get {
        let mut client = Client::new(&ctx, &endpoint, Duration::from_secs(5)).with_curve(curve.clone());
        let value = Value::Str("v".repeat(args.value_size));
        for key in 0..args.keys.max(1) {
            let command = Command::Put { key: Value::Str(format!("k{key}")), value: value.clone() };
            match client.call(&Request::Write { command, client_id: None, seq: None }) {
                Ok(Reply::Put { .. }) => {}
                other => return Err(format!("cannot write key k{key} to read later: {other:?}").into()),
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs_f64(args.duration);
    let started = Instant::now();
    let workers: Vec<_> = (0..args.clients)
        .map(|i| {
            let client = Client::new(&ctx, &endpoint, Duration::from_secs(5)).with_curve(curve.clone());
            let (op, keys, value_size) = (args.op, args.keys.max(1), args.value_size);
            thread::spawn(move || run_client(client, op, i as u64, keys, value_size, deadline))
        })
        .collect();
    let mut latencies = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut errors = 0;
    for worker in workers {
        let result = worker.join().map_err(|_| "a bench client panicked")?;
        latencies.add(&result.latencies)?;
        errors += result.errors;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ms = |q: f64| latencies.value_at_quantile(q) as f64 / 1000.0;
    let ops = args.op.plural();
    println!(
        "ok {} {ops}, {errors} errors in {elapsed:.2}s: {:.0} {ops}/s",
        latencies.len(),
        latencies.len() as f64 / elapsed
    );
    println!(
        "latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(0.999),
        latencies.max() as f64 / 1000.0
    );
    Ok(())
}

fn run_client(mut client: Client, op: Op, id: u64, keys: u64, value_size: usize, deadline: Instant) -> ClientResult {
    let mut latencies = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    let mut errors = 0;
    let mut rng = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let value: String = std::iter::repeat_n('v', value_size).collect();
    while Instant::now() < deadline {
        // xorshift64: cheap, and each client gets its own key sequence.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let key = Value::Str(format!("k{}", rng % keys));
        let request = match op {
            Op::Put => Request::Write {
                command: Command::Put { key, value: Value::Str(value.clone()) },
                client_id: None,
                seq: None,
            },
            Op::Get => Request::Get { key },
        };
        let start = Instant::now();
        match client.call(&request) {
            Ok(Reply::Put { .. } | Reply::Get { value: Some(_) }) => {
                latencies.saturating_record(start.elapsed().as_micros() as u64);
            }
            _ => errors += 1,
        }
    }
    ClientResult { latencies, errors }
}

/// Asks every node for its status until one reports itself leader.
fn find_leader<'a>(
    ctx: &zmq::Context,
    config: &'a Config,
    keys: &ClientKeys,
    wait: Duration,
) -> Result<&'a Member, String> {
    let deadline = Instant::now() + wait;
    let client = |m: &Member| {
        Client::new(ctx, &m.client, Duration::from_millis(500)).with_curve(keys.towards(config.node_key(m.id)))
    };
    let mut clients: Vec<(&Member, Client)> = config.nodes.iter().map(|m| (m, client(m))).collect();
    while Instant::now() < deadline {
        for (member, client) in &mut clients {
            if let Ok(Reply::Status(status)) = client.call(&Request::Status)
                && status.role == "leader"
            {
                return Ok(member);
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
    Err(format!("no leader found within {wait:?}"))
}
