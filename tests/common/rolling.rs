//! Rolling changes under load: nodes stopped and started again one at a
//! time (a restart, an upgrade) while a client writes, and the checks that
//! nothing acknowledged was lost and the leader changed little.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use raft_zmq::kv::Value;
use raft_zmq::wire::protocol::{Reply, Request};

use super::{TestCluster, put, wait_for};

/// Writes that go on while nodes are replaced: a new key each, through
/// every node in turn. Acknowledged ones must all be there at the end.
pub struct Load {
    stop: Arc<AtomicBool>,
    acknowledged: Arc<Mutex<BTreeMap<String, String>>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(cluster: &TestCluster) -> Load {
        let (stop, acknowledged) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(BTreeMap::new())));
        let endpoints = cluster.endpoints();
        let thread = {
            let (stop, acknowledged) = (Arc::clone(&stop), Arc::clone(&acknowledged));
            thread::spawn(move || {
                let ctx = zmq::Context::new();
                let mut clients: Vec<_> = endpoints.iter().map(|e| e.client(&ctx, Duration::from_secs(2))).collect();
                let n = clients.len();
                for i in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let (key, value) = (format!("u{i}"), format!("v{i}"));
                    if let Ok(Reply::Put { .. }) = clients[i % n].call(&put(&key, &value)) {
                        acknowledged.lock().unwrap().insert(key, value);
                    }
                }
            })
        };
        Load { stop, acknowledged, thread: Some(thread) }
    }

    pub fn acknowledged(&self) -> usize {
        self.acknowledged.lock().unwrap().len()
    }

    /// Stops the writes; returns the acknowledged ones.
    pub fn finish(mut self) -> BTreeMap<String, String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        std::mem::take(&mut *self.acknowledged.lock().unwrap())
    }
}

/// The leaders the cluster had, in order, as its nodes report them.
#[derive(Default)]
pub struct Leaders(pub Vec<(u64, u64)>);

impl Leaders {
    /// Records the leader a majority of the running nodes follow, if any.
    pub fn observe(&mut self, cluster: &TestCluster) -> Option<usize> {
        let statuses: Vec<_> = cluster.running().into_iter().filter_map(|id| cluster.status(id)).collect();
        let leader = statuses.iter().find(|s| s.role == "leader")?;
        let agree = statuses.iter().filter(|s| s.leader == Some(leader.id) && s.term == leader.term).count();
        if agree <= cluster.nodes.len() / 2 {
            return None;
        }
        if self.0.last().is_none_or(|&(_, id)| id != leader.id) {
            self.0.push((leader.term, leader.id));
        }
        Some(leader.id as usize)
    }

    pub fn wait(&mut self, cluster: &TestCluster) -> usize {
        wait_for("a leader a majority follows", || self.observe(cluster))
    }

    pub fn changes(&self) -> usize {
        self.0.len().saturating_sub(1)
    }
}

/// Stops each node in turn with SIGTERM (followers first; a leader hands
/// over as it stops) and starts it again after `swap(cluster, id)`, waiting
/// each time for a leader and for `writes` more acknowledged writes.
pub fn one_node_at_a_time(
    cluster: &mut TestCluster,
    leaders: &mut Leaders,
    load: &Load,
    writes: usize,
    mut swap: impl FnMut(&mut TestCluster, usize),
) {
    let leader = leaders.wait(cluster);
    let order: Vec<usize> = (0..cluster.nodes.len()).filter(|&id| id != leader).chain([leader]).collect();
    for id in order {
        let before = load.acknowledged();
        assert_eq!(cluster.terminate(id).code(), Some(0), "node {id} stops cleanly");
        swap(cluster, id);
        cluster.start_node(id);
        leaders.wait(cluster);
        wait_for(&format!("writes after node {id} came back"), || {
            leaders.observe(cluster);
            (load.acknowledged() >= before + writes).then_some(())
        });
    }
}

/// Stops the load and checks its outcome: every acknowledged write can be
/// read back, and every replica's log is the same. Returns how many writes
/// were acknowledged.
pub fn check(cluster: &TestCluster, leaders: &mut Leaders, load: Load) -> usize {
    let acknowledged = load.finish();
    let leader = leaders.wait(cluster);
    let last = match cluster.call_ok(leader, &Request::Status) {
        Reply::Status(status) => status.commit_index,
        other => panic!("unexpected {other:?}"),
    };
    cluster.wait_applied(last);
    for (key, value) in &acknowledged {
        assert_eq!(cluster.get_value(leader, key), Some(Value::Str(value.clone())), "acknowledged {key} lost");
    }
    let mirrors: Vec<String> = cluster.running().into_iter().map(|id| cluster.mirror(id)).collect();
    assert!(mirrors.iter().all(|m| m == &mirrors[0]), "the replicas' logs differ");
    acknowledged.len()
}
