//! A [`TestCluster`] whose raft traffic runs through a [`Network`] of
//! proxies and whose state dirs are on lazyfs (so that a kill is a power
//! loss), with the few operations the nemesis and the checks need.

use crate::common::{Endpoint, TestCluster};
use crate::network::Network;

pub struct ChaosCluster {
    /// Declared first so it drops first: processes die before their proxies.
    pub nodes: TestCluster,
    pub network: Network,
}

impl ChaosCluster {
    /// `curve`: whether every endpoint, the workload's included, uses CURVE.
    pub fn start(n: usize, curve: bool) -> ChaosCluster {
        let nodes = if curve { TestCluster::configure_with_keys(n, false) } else { TestCluster::configure(n, "") };
        let nodes = nodes.on_lazy_disks();
        let network = Network::start(&nodes.nodes.iter().map(|node| node.raft.clone()).collect::<Vec<_>>());
        let mut cluster = ChaosCluster { nodes, network };
        for id in 0..n {
            cluster.restart(id);
        }
        cluster
    }

    pub fn size(&self) -> usize {
        self.nodes.nodes.len()
    }

    /// Starts node `id` (again), its peer traffic routed through the network.
    pub fn restart(&mut self, id: usize) {
        let routes = self.network.routes(id);
        self.nodes.start_node_with(id, &routes);
    }

    pub fn client_endpoints(&self) -> Vec<Endpoint> {
        self.nodes.endpoints()
    }
}
