//! Deterministic cluster simulation of the node's server and Raft core (see `sim/mod.rs`).
//!
//! - `cargo test --release --test simulation` runs a fixed range of seeds
//!   plus the fixed scenarios in `sim/scenarios.rs`;
//! - `SIM_SEED=n` replays one seed;
//! - `SIM_SOAK_SECS=n` runs fresh random seeds for that many seconds.
//!
//! Add `-- --nocapture` to see how many seeds ran and how fast.

mod sim;

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use sim::random_run::run_seed;

/// Seeds of the default run: about 2 minutes on an idle 2-core machine
/// (about a million simulated events per second).
const DEFAULT_SEEDS: u64 = 20_000;

#[test]
fn random_schedules() {
    let env = |name| std::env::var(name).ok().map(|v: String| v.parse::<u64>().expect("a number"));
    if let Some(seed) = env("SIM_SEED") {
        println!("seed {seed}: all checks passed; {}", run_seed(seed));
    } else if let Some(secs) = env("SIM_SOAK_SECS") {
        let first = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).expect("after 1970").as_nanos() as u64;
        let deadline = Instant::now() + Duration::from_secs(secs);
        run_in_parallel(first, u64::MAX, || Instant::now() < deadline);
    } else {
        run_in_parallel(0, DEFAULT_SEEDS, || true);
    }
}

/// Runs seeds `first..first + count` on every core while `go_on` holds, and
/// reports the throughput. The first failing seed stops all workers.
fn run_in_parallel(first: u64, count: u64, go_on: impl Fn() -> bool + Sync) {
    let started = Instant::now();
    let next = AtomicU64::new(0);
    let (seeds, events) = (AtomicU64::new(0), AtomicU64::new(0));
    let (installs, duplicates, heals) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let (changes, stops) = (AtomicU64::new(0), AtomicU64::new(0));
    let (swapped, not_swapped) = (AtomicU64::new(0), AtomicU64::new(0));
    let (deleted, sessionless, forwarded) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let failed = AtomicBool::new(false);
    let workers = thread::available_parallelism().map_or(2, |n| n.get());
    thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                while !failed.load(Ordering::Relaxed) && go_on() {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    match panic::catch_unwind(AssertUnwindSafe(|| run_seed(first.wrapping_add(i)))) {
                        Ok(summary) => {
                            events.fetch_add(summary.events, Ordering::Relaxed);
                            installs.fetch_add(summary.installs as u64, Ordering::Relaxed);
                            duplicates.fetch_add(summary.duplicates as u64, Ordering::Relaxed);
                            heals.fetch_add(summary.heals as u64, Ordering::Relaxed);
                            changes.fetch_add(summary.changes as u64, Ordering::Relaxed);
                            stops.fetch_add(summary.stops as u64, Ordering::Relaxed);
                            swapped.fetch_add(summary.swapped as u64, Ordering::Relaxed);
                            not_swapped.fetch_add(summary.not_swapped as u64, Ordering::Relaxed);
                            deleted.fetch_add(summary.deleted as u64, Ordering::Relaxed);
                            sessionless.fetch_add(summary.sessionless as u64, Ordering::Relaxed);
                            forwarded.fetch_add(summary.forwarded as u64, Ordering::Relaxed);
                            seeds.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(panic) => {
                            failed.store(true, Ordering::Relaxed);
                            panic::resume_unwind(panic);
                        }
                    }
                }
            });
        }
    });
    let secs = started.elapsed().as_secs_f64();
    let (seeds, events) = (seeds.into_inner(), events.into_inner());
    let (installs, duplicates, heals) = (installs.into_inner(), duplicates.into_inner(), heals.into_inner());
    let (changes, stops) = (changes.into_inner(), stops.into_inner());
    let (swapped, not_swapped) = (swapped.into_inner(), not_swapped.into_inner());
    let (deleted, sessionless, forwarded) = (deleted.into_inner(), sessionless.into_inner(), forwarded.into_inner());
    println!(
        "{seeds} seeds from {first} ({events} events, {installs} snapshots installed, {duplicates} duplicate \
         writes skipped, {heals} heals checked for liveness, {changes} membership changes, {stops} clean stops, \
         {swapped} cas swapped and {not_swapped} not, {deleted} deletes of a key present, {sessionless} session-less \
         writes acknowledged, {forwarded} operations forwarded by a follower and served) in {secs:.1}s on {workers} threads: {:.0} events/s",
        events as f64 / secs
    );
    // About one heal per 6 seeds.
    assert!(seeds < 1000 || heals > seeds / 12, "too few heals in the middle of chaos were checked for liveness");
    assert!(seeds < 1000 || installs > seeds / 10, "too few runs sent a snapshot to test InstallSnapshot");
    assert!(seeds < 1000 || duplicates > seeds / 10, "too few retries reached the log twice to test exactly-once");
    assert!(seeds < 1000 || changes > seeds, "too few membership changes were made");
    assert!(seeds < 1000 || stops > seeds / 2, "too few clean stops with writes in flight");
    // About 18, 33, 35 and 31 per seed.
    assert!(seeds < 1000 || swapped > seeds, "too few cas swapped");
    assert!(seeds < 1000 || not_swapped > seeds, "too few cas did not swap");
    assert!(seeds < 1000 || deleted > seeds, "too few deletes found their key");
    assert!(seeds < 1000 || sessionless > seeds, "too few session-less writes were acknowledged");
    assert!(seeds < 1000 || forwarded > seeds, "too few operations sent to a follower were forwarded and served");
}
