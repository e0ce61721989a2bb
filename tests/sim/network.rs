//! The network between the nodes: every message is independently delayed,
//! lost or duplicated (random delays also reorder), and directed links can
//! be cut by partitions.

use std::collections::BTreeSet;

use raft_zmq::raft::NodeId;

use super::rng::Rng;
use super::schedule::{MS, Time};

#[derive(Clone, Copy, Debug)]
pub struct NetProfile {
    pub loss: f64,
    pub duplicate: f64,
    /// Usual one-way delay range.
    pub delay: (Time, Time),
    /// Chance of a much longer delay: stale messages arriving terms later.
    pub straggle: f64,
    pub straggle_delay: (Time, Time),
}

impl NetProfile {
    /// A healthy LAN: what the network returns to once every fault healed.
    pub const CALM: NetProfile =
        NetProfile { loss: 0.0, duplicate: 0.0, delay: (MS / 2, 5 * MS), straggle: 0.0, straggle_delay: (0, 0) };

    pub fn random(rng: &mut Rng) -> NetProfile {
        NetProfile {
            loss: rng.pick(&[0.0, 0.01, 0.05, 0.2]),
            duplicate: rng.pick(&[0.0, 0.01, 0.03]),
            delay: (MS / 2, rng.pick(&[2 * MS, 10 * MS, 30 * MS])),
            straggle: rng.pick(&[0.0, 0.01, 0.05]),
            straggle_delay: (50 * MS, 500 * MS),
        }
    }
}

pub struct Network {
    pub profile: NetProfile,
    cut: BTreeSet<(NodeId, NodeId)>,
}

impl Network {
    pub fn new(profile: NetProfile) -> Network {
        Network { profile, cut: BTreeSet::new() }
    }

    /// No link is cut.
    pub fn is_whole(&self) -> bool {
        self.cut.is_empty()
    }

    pub fn is_cut(&self, from: NodeId, to: NodeId) -> bool {
        self.cut.contains(&(from, to))
    }

    pub fn set_cut(&mut self, cut: BTreeSet<(NodeId, NodeId)>) {
        self.cut = cut;
    }

    /// The delays of the copies of one message that will arrive: none if it
    /// is lost, two if it is duplicated.
    pub fn delays(&self, rng: &mut Rng) -> Vec<Time> {
        if rng.chance(self.profile.loss) {
            return Vec::new();
        }
        let copies = if rng.chance(self.profile.duplicate) { 2 } else { 1 };
        (0..copies)
            .map(|_| {
                let (lo, hi) =
                    if rng.chance(self.profile.straggle) { self.profile.straggle_delay } else { self.profile.delay };
                rng.range(lo, hi)
            })
            .collect()
    }
}
