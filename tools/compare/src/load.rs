//! The closed-loop load generator both systems get: `clients` threads, each
//! with its own connection and one request in flight, until the time is up.

use std::fmt;
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::System;

/// Keys the load spreads over.
const KEYS: u64 = 1000;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Op {
    Put,
    /// A linearizable read.
    Get,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Put => "put",
            Op::Get => "linearizable get",
        })
    }
}

/// One connection to a system's leader.
pub trait KvClient: Send {
    /// Whether the write was acknowledged.
    fn put(&mut self, key: &str, value: &str) -> bool;
    /// Whether the read was answered.
    fn get(&mut self, key: &str) -> bool;
}

pub struct Stats {
    pub ok: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub latencies: Histogram<u64>,
    pub cpu_seconds: f64,
}

impl Stats {
    pub fn per_second(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    fn ms(&self, quantile: f64) -> f64 {
        self.latencies.value_at_quantile(quantile) as f64 / 1000.0
    }

    fn cpu_per_op_us(&self) -> f64 {
        self.cpu_seconds * 1e6 / self.ok.max(1) as f64
    }

    /// A table cell: throughput, p50 and p99, CPU per operation.
    pub fn cell(&self) -> String {
        format!(
            "{:.0}/s, p50 {:.2} ms, p99 {:.1} ms, {:.0} us CPU/op",
            self.per_second(),
            self.ms(0.5),
            self.ms(0.99),
            self.cpu_per_op_us()
        )
    }

    pub fn line(&self, op: Op, clients: usize) -> String {
        format!("{op} @{clients}: {} ({} errors)", self.cell(), self.errors)
    }
}

/// Writes every key once before a read run, so that reads find values.
pub fn prepare(system: &dyn System, op: Op, value_size: usize) {
    if op == Op::Get {
        let mut client = system.client();
        let value = "v".repeat(value_size);
        for key in 0..KEYS {
            client.put(&format!("k{key}"), &value);
        }
    }
}

pub fn run(system: &dyn System, op: Op, clients: usize, value_size: usize, duration: Duration) -> Stats {
    let started = Instant::now();
    let deadline = started + duration;
    let workers: Vec<_> = (0..clients)
        .map(|i| {
            let mut client = system.client();
            let value = "v".repeat(value_size);
            thread::spawn(move || {
                let mut latencies = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
                let (mut ok, mut errors) = (0, 0);
                let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (i as u64 + 1);
                while Instant::now() < deadline {
                    // xorshift: cheap and good enough to spread keys.
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let key = format!("k{}", rng % KEYS);
                    let sent = Instant::now();
                    let answered = match op {
                        Op::Put => client.put(&key, &value),
                        Op::Get => client.get(&key),
                    };
                    if answered {
                        ok += 1;
                        let _ = latencies.record(sent.elapsed().as_micros().max(1) as u64);
                    } else {
                        errors += 1;
                    }
                }
                (ok, errors, latencies)
            })
        })
        .collect();
    let mut stats = Stats {
        ok: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latencies: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
        cpu_seconds: 0.0,
    };
    for worker in workers {
        let (ok, errors, latencies) = worker.join().expect("a load thread");
        stats.ok += ok;
        stats.errors += errors;
        stats.latencies.add(latencies).expect("same bounds");
    }
    stats.elapsed = started.elapsed();
    stats
}
