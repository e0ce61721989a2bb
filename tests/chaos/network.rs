//! The network between a cluster's nodes: one [`Proxy`] per directed link,
//! so that any set of links can be cut.
//!
//! Node A reaches peer B through the proxy of link (A, B): A starts with
//! `--peer B=<that proxy>`, while the shared config keeps B's real raft
//! endpoint (and with it the cluster id). Link (A, B) carries A's requests to
//! B and B's replies to A; B's own requests to A travel on link (B, A).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::common::Node;
use crate::proxy::Proxy;

pub struct Network {
    links: BTreeMap<(usize, usize), Proxy>,
}

impl Network {
    /// Proxies cut whole connections, never single packets, and cannot
    /// take a node's client traffic away: no loss, no host going away.
    pub const DROPS_PACKETS: bool = false;

    /// A proxy for every ordered pair of `nodes` (whose raft endpoints are
    /// `tcp://ip:port`); the nodes stay where they are.
    pub fn start(nodes: &mut [Node]) -> Network {
        let addr = |endpoint: &str| -> SocketAddr { endpoint.trim_start_matches("tcp://").parse().unwrap() };
        let n = nodes.len();
        let links = (0..n)
            .flat_map(|from| (0..n).filter(move |&to| to != from).map(move |to| (from, to)))
            .map(|(from, to)| ((from, to), Proxy::start(addr(&nodes[to].raft))))
            .collect();
        Network { links }
    }

    /// The arguments that route node `from`'s peer connections through its links.
    pub fn routes(&self, from: usize) -> Vec<String> {
        self.links
            .iter()
            .filter(|((source, _), _)| *source == from)
            .flat_map(|((_, to), proxy)| ["--peer".to_string(), format!("{to}={}", proxy.endpoint())])
            .collect()
    }

    /// Cuts exactly the links for which `cut(from, to)` holds; heals the rest.
    pub fn apply(&self, cut: impl Fn(usize, usize) -> bool) {
        for (&(from, to), proxy) in &self.links {
            proxy.set_cut(cut(from, to));
        }
    }

    pub fn heal(&self) {
        self.apply(|_, _| false);
    }

    pub fn set_loss(&self, _percent: u32) {
        unreachable!("proxies do not drop packets (DROPS_PACKETS)")
    }

    pub fn set_delay(&mut self, _delay: Option<std::time::Duration>) {
        unreachable!("proxies do not delay packets (DROPS_PACKETS)")
    }

    pub fn set_duplication(&mut self, _percent: u32) {
        unreachable!("proxies do not duplicate packets (DROPS_PACKETS)")
    }

    pub fn set_link(&self, _node: usize, _up: bool) {
        unreachable!("proxies do not take hosts away (DROPS_PACKETS)")
    }
}
