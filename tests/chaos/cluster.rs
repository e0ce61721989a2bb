//! A [`TestCluster`] whose raft traffic runs through a [`Network`] (of
//! proxies in the chaos test, of network namespaces in the multi-host
//! test) and whose state dirs are on lazyfs (so that a kill is a power
//! loss), with the few operations the nemesis and the checks need.
//!
//! A node's slot is its id. Slots beyond the first members are spares: a
//! node that joins later takes the next one (ids are never reused), with its
//! disk and its links ready from the start.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use raft_zmq::wire::protocol::{ErrorCode, Reply, Request};

use crate::common::{Endpoint, TestCluster, wait_for};
use crate::network::Network;

/// Snapshots and log compaction every 2,000 entries, so that a run takes
/// several, under power losses, and a node that joins late catches up by
/// snapshot.
const SNAPSHOTS: &str = r#", "snapshot_entries": 2000"#;

pub struct ChaosCluster {
    /// Declared first so it drops first: processes die before their
    /// proxies or their hosts.
    pub nodes: TestCluster,
    pub network: Network,
    /// The config each node that joined was started with (it lists the node
    /// itself), and restarts with.
    joined: BTreeMap<usize, PathBuf>,
    /// The members now, in the order they joined.
    pub members: Vec<usize>,
    /// The same, for the workload's clients to follow.
    pub published: Arc<Mutex<Vec<usize>>>,
    /// Slots not used yet.
    spares: Vec<usize>,
}

impl ChaosCluster {
    /// `n` members and `spares` slots for nodes that join later. `curve`:
    /// whether every endpoint, the workload's included, uses CURVE.
    pub fn start(n: usize, spares: usize, curve: bool) -> ChaosCluster {
        let mut nodes = if curve {
            TestCluster::configure_with_keys(n + spares, false)
        } else {
            TestCluster::configure(n + spares, "")
        };
        // It may move the nodes to hosts of their own, before any config names them.
        let network = Network::start(&mut nodes.nodes);
        // The config's nodes are the first members only.
        nodes.write_config_of(&nodes.config_path.clone(), 0..n, SNAPSHOTS);
        let nodes = nodes.on_lazy_disks();
        let spares = (n..n + spares).collect();
        let members: Vec<usize> = (0..n).collect();
        let published = Arc::new(Mutex::new(members.clone()));
        let mut cluster = ChaosCluster { nodes, network, joined: BTreeMap::new(), members, published, spares };
        for id in 0..n {
            cluster.restart(id);
        }
        cluster
    }

    /// Starts node `id` (again), its peer traffic routed through the network.
    /// One that joined restarts as it started, with `--join` (which changes
    /// nothing once it has state) and its own config.
    pub fn restart(&mut self, id: usize) {
        let mut args = self.network.routes(id);
        let config = match self.joined.get(&id) {
            Some(config) => {
                args.push("--join".into());
                config.clone()
            }
            None => self.nodes.config_path.clone(),
        };
        self.nodes.start_node_from(id, &config, &args);
    }

    /// Waits until a member reports itself leader and a majority of the
    /// members agree on it; returns its id.
    pub fn wait_for_leader(&self) -> usize {
        wait_for("a leader", || {
            let statuses: Vec<_> = self.members.iter().filter_map(|&id| self.nodes.status(id)).collect();
            let leader = statuses.iter().find(|s| s.role == "leader")?;
            let agree = statuses.iter().filter(|s| s.leader == Some(leader.id) && s.term == leader.term).count();
            (agree > self.members.len() / 2).then_some(leader.id as usize)
        })
    }

    /// Every slot's client endpoint, by id.
    pub fn client_endpoints(&self) -> Vec<Endpoint> {
        self.nodes.endpoints()
    }

    /// The slot the next node to join would take.
    pub fn spare(&self) -> Option<usize> {
        self.spares.first().copied()
    }

    /// Removes member `id` through the leader and waits until it has
    /// stopped by itself, as a removed node does.
    pub fn remove(&mut self, id: usize) {
        self.change(&Request::RemoveNode { id: id as u64 }, "is not a member");
        let mut process = self.nodes.nodes[id].process.take().expect("a member runs");
        wait_for("the removed node to stop by itself", || process.try_wait().unwrap());
        self.members.retain(|&m| m != id);
        *self.published.lock().unwrap() = self.members.clone();
    }

    /// Starts the next spare with `--join` and adds it through the leader
    /// (to be promoted once caught up); returns its id.
    pub fn join(&mut self) -> usize {
        let id = self.spares.remove(0);
        let config = self.nodes.dir.path().join(format!("join-{id}.json"));
        self.nodes.write_config_of(&config, self.members.iter().copied().chain([id]), SNAPSHOTS);
        self.joined.insert(id, config);
        self.restart(id);
        let member = self.nodes.member(id);
        self.change(&Request::AddNode { member, voter: true }, "already a member");
        // Caught up and promoted under the load, before the next fault.
        wait_for("the new node to be promoted to voter", || {
            let leader = self.wait_for_leader();
            self.nodes.status(leader).filter(|s| s.members.contains(&(id as u64))).map(|_| ())
        });
        self.members.push(id);
        *self.published.lock().unwrap() = self.members.clone();
        id
    }

    /// Sends a membership change to the leader until it is taken; a retry of
    /// one that was taken after all is refused with `done_already`.
    fn change(&self, request: &Request, done_already: &str) {
        wait_for("a membership change to be taken", || {
            let leader = self.wait_for_leader();
            match self.nodes.client(leader).call(request) {
                Ok(Reply::Membership { .. }) => Some(()),
                Ok(Reply::Error { code: ErrorCode::BadRequest, message, .. }) if message.contains(done_already) => {
                    Some(())
                }
                Ok(Reply::Error { code: ErrorCode::BadRequest, message, .. }) => panic!("{request:?}: {message}"),
                _ => None,
            }
        })
    }
}
