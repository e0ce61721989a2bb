//! One randomized run per seed: the seed picks the cluster (3 or 5 nodes,
//! PreVote and CheckQuorum on or off), the network's quality and the fault
//! rate; then clients and faults run for a while, everything heals, and the
//! cluster must recover.

use super::cluster::{Clients, Cluster, Params, Summary};
use super::network::NetProfile;
use super::rng::Rng;
use super::schedule::{MS, Time};
use super::storage::Disk;

/// Virtual time under faults per run.
const CHAOS: Time = 5_000 * MS;
/// From the final heal to a write acknowledged and applied everywhere: a
/// generous number of election timeouts (100..200ms), since split votes
/// and nodes rejoining with higher terms can cost several.
pub const LIVENESS_BOUND: Time = 5_000 * MS;

/// Simulates `seed`; returns what happened, or panics with a violation.
pub fn run_seed(seed: u64) -> Summary {
    let mut rng = Rng::new(seed);
    let params = Params {
        nodes: rng.pick(&[3, 5]),
        pre_vote: rng.chance(0.5),
        check_quorum: rng.chance(0.5),
        max_append_bytes: rng.pick(&[1, 1024, 1 << 20]),
        net: NetProfile::random(&mut rng),
        torn_crash: rng.pick(&[0.0, 0.002, 0.01]),
        fault_gap: (100 * MS, rng.pick(&[400 * MS, 1_500 * MS])),
        compaction: rng.pick(&[0.0, 0.005, 0.05]),
        churn: rng.chance(0.5),
    };
    let disks = vec![Disk::bootstrap(params.nodes); params.nodes as usize];
    let rerun = format!("SIM_SEED={seed} cargo test --release --test simulation");
    let mut cluster = Cluster::new(rng, params, disks, rerun);
    cluster.set_clients(Clients::Leaders);
    cluster.start_chaos(CHAOS);
    cluster.run_for(CHAOS);
    cluster.heal_all();
    cluster.await_liveness(LIVENESS_BOUND);
    cluster.summary()
}
