//! One running raft-zmq node: the threads around the pure core.
//!
//! ```text
//!  peers ──ROUTER/REQ──▶ transport ─┐                      ┌─▶ transport (to peers)
//!  clients ──ROUTER──▶ client endpoint ─▶ core loop (Raft + sled) ─▶ applier (KV + logs/<id>.txt)
//!        ◀──────────────── replies (inproc PUSH/PULL) ◀──────────────┘
//! ```
//!
//! Threads are joined by crossbeam channels; the core loop is the only owner
//! of the Raft state and of storage.

mod client_endpoint;
mod core_loop;
mod disk;
mod http;
mod log_reader;
mod replies;
pub mod server;
mod store;
mod writers;

use std::error::Error;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{bounded, unbounded};
use log::{info, warn};

use crate::config::{Config, Member};
use crate::kv::KvStore;
use crate::lock;
use crate::net::security::NodeSecurity;
use crate::net::transport::{Transport, TransportConfig};
use crate::net::wake::WakingSender;
use crate::raft::{self, HardState, LogStore, Membership, NodeId, Raft, SnapshotMeta};
use crate::storage::Storage;
use crate::storage::mirror::{Mirror, MirrorError, Rotation};
use crate::storage::snapshot::{self, SnapshotFile, Snapshots};
use crate::wire::protocol::StatusInfo;
pub use log_reader::LOG_REPLY_MAX_BYTES;

use client_endpoint::{ClientEndpoint, EndpointConfig};
use core_loop::{CoreLoop, Inputs, Outputs};
use disk::DiskAlarm;
use http::{HttpConfig, HttpServer};
use server::{Server, ServerConfig};
use store::NodeStore;

/// State other threads read without asking the core loop.
pub struct Shared {
    leader: Mutex<Option<NodeId>>,
    last_applied: AtomicU64,
    /// Index of the newest snapshot of the state machine (0: none).
    snapshot_index: AtomicU64,
    /// Every member's endpoints, as the membership in force says.
    members: Mutex<Vec<Member>>,
    /// The `status` reply as of the core loop's last tick (`None` before
    /// the first), for the HTTP endpoint.
    status: Mutex<Option<StatusInfo>>,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            leader: Mutex::new(None),
            last_applied: AtomicU64::new(0),
            snapshot_index: AtomicU64::new(0),
            members: Mutex::new(Vec::new()),
            status: Mutex::new(None),
        }
    }

    fn leader(&self) -> Option<NodeId> {
        *lock(&self.leader)
    }

    fn set_leader(&self, leader: Option<NodeId>) {
        *lock(&self.leader) = leader;
    }

    fn member(&self, id: NodeId) -> Option<Member> {
        lock(&self.members).iter().find(|m| m.id == id).cloned()
    }
}

/// Makes a panic in any thread end the whole process at once. A node whose
/// applier or transport thread died would otherwise keep voting and
/// acknowledging half-alive; restarting from the state dir is always safe.
/// (The release profile aborts on panic too; this also covers builds that
/// unwind, and logs the panic first.)
pub fn abort_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::abort();
    }));
}

/// Peer messages queued for the core loop; more are dropped (Raft tolerates
/// loss, and each peer has a request or two in flight anyway).
const PEER_QUEUE_LEN: usize = 1024;
/// Client requests queued for the core loop, by count and by bytes; more get `busy`.
const CLIENT_QUEUE_LEN: usize = 10_000;
const CLIENT_QUEUE_BYTES: usize = 64 << 20;

/// Membership key in the state dir: once recorded, it wins over the file.
const MEMBERSHIP_META: &str = "membership";
/// The cluster's name once this node knows it, carried in every envelope
/// (see `transport::Wire`).
const CLUSTER_META: &str = "cluster_id";

/// How a node starts (see the `--join` and `--force-new-cluster` flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    Normal,
    /// Without state: wait to be added to a running cluster instead of
    /// starting a new one. With state: as `Normal`.
    Join,
    /// Alone, with its data, as a one-node cluster (the majority is lost).
    ForceNewCluster,
}

/// Runs node `id` until SIGINT/SIGTERM, or until it applies its own removal.
/// `routes` (from `--peer`) reach some peers at another endpoint than their
/// `raft` one; see `peer_endpoints`.
pub fn run(config: &Config, id: NodeId, routes: &[(NodeId, String)], start: Start) -> Result<(), Box<dyn Error>> {
    // Before the state dir is touched: a node without its key must not start.
    let security = Arc::new(NodeSecurity::load(config, id)?);
    let (mut storage, mut recovered) = Storage::open(&config.node_state_dir(id))?;
    let joining = start == Start::Join && storage.memberships().iter().all(|(_, m)| m.voters.is_empty());
    let members = if joining { config.nodes.clone() } else { settle_membership(&mut storage, config)? };
    // The endpoints the log's membership carries win over any file, unless
    // it leaves this node out (a removal it may not have applied yet, or
    // that a new leader may cut off): then it starts as before and learns.
    let logged = crate::wire::members::members_of(&storage.memberships().pop().expect("never empty").1);
    let members = if logged.iter().any(|m| m.id == id) { logged } else { members };
    if storage.memberships()[0].1.removed.contains(&id) {
        info!("node {id}: removed from the cluster (its state dir says so); not starting");
        return Ok(());
    }
    let (cluster, fingerprint) = settle_cluster(&storage, recovered.hard_state.commit)?;
    if joining {
        info!("node {id}: joining: waiting to be added to a running cluster (add_node)");
    }
    security.learn(&members);
    security.check_members(&members)?;
    let me =
        members.iter().find(|m| m.id == id).ok_or_else(|| format!("node {id} is not in the recorded membership"))?;
    let rotation = Rotation { every: config.snapshot_entries, keep: config.log_mirror_files };
    let mut mirror = Mirror::open(&config.node_log_path(id))?.with_rotation(rotation);
    let snapshots = Snapshots::open(&snapshot::dir_in(&config.node_state_dir(id)))?;
    let (kv, last_snapshot) = restore_state_machine(&snapshots, &mut storage)?;
    // A power loss may have cost the mirror lines the snapshot covers.
    mirror.append_snapshot(last_snapshot.index, last_snapshot.term).map_err(|e: MirrorError| e.to_string())?;
    if start == Start::ForceNewCluster {
        force_new_cluster(&mut storage, &mut recovered.hard_state, config, id)?;
    }
    let last_index = storage.last_index();
    if mirror.last_index() > last_index {
        // Applied entries are durable first, so the state dir lost data.
        return Err(format!(
            "{} shows entries up to {} applied but the state dir holds only {last_index}: state was lost. \
             To rebuild this node from its peers, move both away",
            config.node_log_path(id).display(),
            mirror.last_index()
        )
        .into());
    }
    if recovered.hard_state.term > raft::message::MAX_TERM {
        // Only a forged or buggy message before peer messages were validated
        // could have put it there; no peer would accept this node's messages.
        return Err(format!(
            "the state dir holds term {}, above the maximum {}: it was corrupted by a forged message; \
             rebuild this node from its peers (move state/{id}/ and its logs/{id}.txt away)",
            recovered.hard_state.term,
            raft::message::MAX_TERM
        )
        .into());
    }
    // Entries in the mirror were applied, hence committed; the persisted
    // commit index may lag behind them (it is written lazily).
    let hard_state = HardState { commit: recovered.hard_state.commit.max(mirror.last_index()), ..recovered.hard_state };
    info!(
        "node {id}: starting with term {}, vote {:?}, log entries {}..={last_index}, commit {}",
        hard_state.term,
        hard_state.vote,
        storage.log_start().index + 1,
        hard_state.commit
    );
    let core_config = core_config(config, id);
    let reply_timeout = peer_reply_timeout(config);
    let disk = DiskAlarm::new(&config.node_state_dir(id), config.disk_reserve_bytes);
    let store = NodeStore {
        storage,
        disk,
        snapshots: snapshots.clone(),
        newest: last_snapshot,
        margin: compaction_margin(config.snapshot_entries),
    };
    let duplicates = store.storage.duplicate_marks();
    let raft = Raft::new(core_config, store, hard_state, last_snapshot.index);

    let ctx = zmq::Context::new();
    // Declared before the sockets' owners so that it is dropped after them:
    // with no ZAP handler bound, libzmq would let any CURVE key in.
    let _authenticator = security.authenticate(&ctx)?;
    let (peer_tx, peer_rx) = bounded(PEER_QUEUE_LEN);
    let peers = peer_endpoints(&members, id, routes)?;
    // Advertised endpoints come from the membership, what to bind instead
    // from this node's own entry in the file.
    let listen = config.listen_of(id);
    let raft_bind = listen.raft.unwrap_or_else(|| me.raft.clone());
    let client_bind = listen.client.unwrap_or_else(|| me.client.clone());
    let transport = Transport::start(
        &ctx,
        TransportConfig {
            id,
            cluster,
            fingerprint,
            bind: raft_bind.clone(),
            peers,
            reply_timeout,
            max_message_bytes: (config.max_request_bytes as i64) * 2 + (16 << 20),
            security: Arc::clone(&security),
            snapshots: snapshots.clone(),
            disk_reserve: config.disk_reserve_bytes,
            appends_in_flight: config.max_appends_in_flight,
        },
        peer_tx,
    )?;

    let clients = ClientEndpoint::bind(
        &ctx,
        EndpointConfig {
            id,
            client: client_bind.clone(),
            max_request_bytes: config.max_request_bytes,
            forward_timeout: Duration::from_millis(config.request_timeout_ms + 1000),
            max_queued: CLIENT_QUEUE_LEN,
            max_queued_bytes: CLIENT_QUEUE_BYTES,
            security: security.clone(),
        },
    )?;
    let shared = Arc::new(Shared::new());
    *lock(&shared.members) = members.clone();
    let http = match config.http.get(&id) {
        Some(listen) => {
            let http = HttpConfig {
                listen: listen.clone(),
                state_dir: config.node_state_dir(id),
                leader_silence: Duration::from_millis(config.election_timeout_ms.1),
                security: security.clone(),
                hide_data: config.curve.as_ref().is_some_and(|curve| curve.client_keys.is_some()),
            };
            let server = HttpServer::start(&ctx, http, shared.clone())?;
            info!("node {id}: serving metrics, health and the web view on http://{listen}/");
            Some(server)
        }
        None => None,
    };

    // Whatever other threads queue for the core loop wakes it from its poll.
    let waker = transport.waker();
    let (stop_tx, stop_rx) = bounded(1);
    let stop_tx = WakingSender::new(stop_tx, waker.clone());
    let (mirror_tx, mirror_rx) = unbounded();
    let mirror = thread::Builder::new().name("mirror".into()).spawn(move || writers::mirror(mirror, mirror_rx))?;
    let (jobs_tx, jobs_rx) = unbounded();
    let (taken_tx, taken_rx) = unbounded();
    let taken_tx = WakingSender::new(taken_tx, waker.clone());
    let snapshotter = {
        let snapshots = snapshots.clone();
        thread::Builder::new()
            .name("snapshots".into())
            .spawn(move || writers::snapshots(snapshots, jobs_rx, taken_tx))?
    };
    let (sync_tx, sync_rx) = unbounded();
    let (synced_tx, synced_rx) = unbounded();
    let synced_tx = WakingSender::new(synced_tx, waker.clone());
    let log_syncer = {
        let (syncer, answers) = (raft.store().storage.syncer(), transport.answers());
        thread::Builder::new()
            .name("log-sync".into())
            .spawn(move || writers::log_syncer(|| syncer.sync(), sync_rx, synced_tx, |reply| answers.send(reply)))?
    };
    let (log_tx, log_rx) = bounded(log_reader::QUEUE_LEN);
    let (disk_replies_tx, disk_replies) = unbounded();
    let disk_replies_tx = WakingSender::new(disk_replies_tx, waker.clone());
    let log_reader = {
        let (view, shared) = (raft.store().storage.log_view(), shared.clone());
        thread::Builder::new()
            .name("log-reader".into())
            .spawn(move || log_reader::run(view, snapshots, shared, disk_replies_tx, log_rx))?
    };

    ctrlc::set_handler(move || {
        let _ = stop_tx.try_send(());
    })?;
    info!(
        "node {id}: serving peers on {} and clients on {}",
        bound_as(&raft_bind, &me.raft),
        bound_as(&client_bind, &me.client)
    );

    let server_config = ServerConfig {
        id,
        request_timeout: Duration::from_millis(config.request_timeout_ms),
        // The core gives up after the minimum election timeout; the rest is
        // time to hear from the new leader.
        handover_timeout: Duration::from_millis(config.election_timeout_ms.1),
        snapshot_entries: config.snapshot_entries,
        curve: security.is_curve(),
        new_cluster_name: server::random_cluster_name(),
        sync_later: true,
    };
    let server = Server::new(server_config, raft, kv, last_snapshot, cluster, fingerprint);
    let out = Outputs {
        transport,
        clients,
        mirror: mirror_tx,
        snapshots: jobs_tx,
        log_reader: log_tx,
        syncer: sync_tx,
        duplicates,
        shared: shared.clone(),
        security: security.clone(),
        routes: routes.to_vec(),
    };
    let core = CoreLoop { server, out, started: std::time::Instant::now() };
    core.run(Inputs {
        tick: Duration::from_millis(tick_ms(config)),
        peers: peer_rx,
        disk_replies,
        snapshots: taken_rx,
        synced: synced_rx,
        stop: stop_rx,
    });
    let _ = log_syncer.join();
    let _ = mirror.join();
    let _ = snapshotter.join();
    let _ = log_reader.join();
    drop(http);
    info!("node {id}: stopped");
    Ok(())
}

/// An endpoint as the start-up line names it: with the one peers and clients
/// are told, when that is another.
fn bound_as(bound: &str, advertised: &str) -> String {
    if bound == advertised { bound.to_string() } else { format!("{bound} (advertised as {advertised})") }
}

/// Entries a node keeps before its newest snapshot when it compacts its log:
/// a follower that far behind catches up from the log, one further behind
/// gets the snapshot. Half the snapshot interval, at most 5,000 (etcd's
/// number), so the log holds at most 1.5 intervals of entries.
fn compaction_margin(snapshot_entries: u64) -> u64 {
    (snapshot_entries / 2).min(5_000)
}

/// The state machine as of the newest snapshot (empty at index 0 if none).
/// A snapshot the log does not hold (a crash came between adopting one from
/// the leader and starting the log over after it) starts the log over now,
/// with the membership the snapshot file holds: the log's entries from
/// before it are covered by it, and its memberships may be older.
fn restore_state_machine(
    snapshots: &Snapshots,
    storage: &mut Storage,
) -> Result<(KvStore, SnapshotMeta), Box<dyn Error>> {
    let mut kv = KvStore::new();
    let Some(SnapshotFile { meta, membership, data }) = snapshots.latest()? else {
        return Ok((kv, SnapshotMeta::default()));
    };
    kv.restore(&data).map_err(|e| format!("snapshot {}/{}: {e}", meta.index, meta.term))?;
    let start = storage.log_start();
    if meta.index < start.index {
        return Err(format!(
            "the log was compacted up to {} but the newest snapshot is at {}: it cannot be restored",
            start.index, meta.index
        )
        .into());
    }
    let held = if meta.index == start.index { Some(start.term) } else { None };
    let held = held.or_else(|| (meta.index <= storage.last_index()).then(|| storage.term(meta.index)));
    if held != Some(meta.term) {
        warn!("the log does not hold snapshot {}/{}; starting the log over after it", meta.index, meta.term);
        storage.install_snapshot(meta, &membership)?;
        storage.sync()?;
    }
    info!("restored the state machine from snapshot {}/{} ({} keys)", meta.index, meta.term, kv.len());
    Ok((kv, meta))
}

/// The membership recorded in the state dir, recording the config's on
/// first start (CONTRACT.md: once a node has state, its record wins). The
/// core's copy goes into the log's store; a state dir from before it was
/// kept there gets it from the record.
fn settle_membership(storage: &mut Storage, config: &Config) -> Result<Vec<Member>, Box<dyn Error>> {
    let members = match storage.read_meta(MEMBERSHIP_META)? {
        Some(bytes) => {
            let recorded: Vec<Member> = serde_json::from_slice(&bytes)
                .map_err(|e| format!("recorded membership in the state dir is unreadable: {e}"))?;
            if recorded != config.nodes {
                warn!(
                    "{}: nodes differ from the membership recorded in the state dir; using the recorded one",
                    config.path.display()
                );
            }
            recorded
        }
        None => {
            storage.write_meta(MEMBERSHIP_META, &serde_json::to_vec(&config.nodes)?)?;
            config.nodes.clone()
        }
    };
    storage.bootstrap_membership(&crate::wire::members::first_membership(&members))?;
    Ok(members)
}

/// Makes this node the only voter, with a membership entry appended to its
/// log (as etcd's `--force-new-cluster` does): it elects itself, commits
/// everything its log holds, and every other member is removed, so that one
/// coming back with its old state is told to stop.
fn force_new_cluster(
    storage: &mut Storage,
    hard_state: &mut HardState,
    config: &Config,
    id: NodeId,
) -> Result<(), Box<dyn Error>> {
    let current = storage.memberships().pop().expect("never empty").1;
    let me = config.require_member(id)?.clone();
    let mut removed = current.removed.clone();
    removed.extend(current.ids().filter(|&other| other != id));
    let (cluster, fingerprint) = (current.cluster, current.fingerprint);
    let membership = Membership {
        removed,
        cluster,
        fingerprint,
        ..Membership::of_voters([id], crate::wire::members::context_of(&[me]))
    };
    let index = storage.last_index() + 1;
    let term = hard_state.term.max(storage.log_start().term);
    let entry = raft::Entry { index, term, payload: raft::Payload::Membership(membership) };
    *hard_state = HardState { term, vote: None, ..*hard_state };
    storage.write(Some(hard_state), &[entry])?;
    storage.sync()?;
    warn!(
        "node {id}: FORCED A NEW CLUSTER of this node alone (entry {index}); members {:?} were removed. \
         Writes acknowledged by the lost majority and not held here are gone. Add nodes with add_node.",
        current.ids().filter(|&other| other != id).collect::<Vec<_>>()
    );
    Ok(())
}

/// The cluster's identity: its name as the state dir records it, once this
/// node has learned it (0 before), and the fingerprint the first membership
/// carries (0 for a node still waiting to join). State from before clusters
/// were named recorded the fingerprint as the cluster's id: such a cluster
/// speaks for it until its leader names it.
fn settle_cluster(storage: &Storage, commit: u64) -> Result<(u64, u64), Box<dyn Error>> {
    let cluster = match storage.read_meta(CLUSTER_META)? {
        Some(bytes) => {
            let bytes: [u8; 8] = bytes.try_into().map_err(|_| "the recorded cluster id is unreadable")?;
            u64::from_be_bytes(bytes)
        }
        None => 0,
    };
    let memberships = storage.memberships();
    let logged = memberships.iter().rev().find(|(index, _)| *index <= commit).map_or(0, |(_, m)| m.cluster);
    if cluster != 0 && logged != 0 && logged != cluster {
        return Err(format!(
            "the state dir is inconsistent: it records cluster {cluster:#018x}, its log names {logged:#018x}"
        )
        .into());
    }
    let fingerprint = memberships.iter().map(|(_, m)| m.fingerprint).find(|&f| f != 0).unwrap_or(0);
    let unnamed = memberships.iter().all(|(_, m)| m.cluster == 0);
    Ok(match (cluster, fingerprint) {
        (recorded, 0) if recorded != 0 && unnamed => (0, recorded),
        identity => identity,
    })
}

pub(crate) fn record_cluster(storage: &mut Storage, cluster: u64) -> Result<(), crate::storage::StorageError> {
    storage.write_meta(CLUSTER_META, &cluster.to_be_bytes())
}

/// Where this node connects to reach each other member: its `raft` endpoint,
/// unless a route names another one (a proxy or tunnel in between). Routes
/// change only where this node connects; the membership, and with it the
/// cluster id every envelope carries, stays the one all nodes share. A route
/// to a node that is not a member (yet) is used once it is added.
fn peer_endpoints(
    members: &[Member],
    me: NodeId,
    routes: &[(NodeId, String)],
) -> Result<Vec<(NodeId, String)>, String> {
    if routes.iter().any(|(id, _)| *id == me) {
        return Err(format!("--peer {me}: a route to this node itself"));
    }
    Ok(members
        .iter()
        .filter(|m| m.id != me)
        .map(|m| {
            let route = routes.iter().rev().find(|(id, _)| *id == m.id);
            (m.id, route.map_or(&m.raft, |(_, endpoint)| endpoint).clone())
        })
        .collect())
}

/// The largest tick (at most 10 ms) that divides every configured interval,
/// so tick counts express the timeouts exactly.
/// How long the transport waits for a peer's reply before it drops the
/// connection and reports the peer unreachable: twice the longest election
/// timeout. A healthy peer can be slow to answer: TCP resends a lost packet
/// after 200 ms or more, a fresh connection takes about four round trips
/// before its first reply, a follower may be writing a large append. Giving
/// up sooner throws that work away and starts a new connection, which on a
/// slow or lossy link times out in turn (seen with the old half of the
/// shortest election timeout, 150 ms: over 40 ms round trips no connection
/// ever answered in time). A dead peer only delays messages to itself, and
/// Raft's own timers (CheckQuorum, elections) do not wait for this one.
fn peer_reply_timeout(config: &Config) -> Duration {
    Duration::from_millis(config.election_timeout_ms.1 * 2)
}

fn tick_ms(config: &Config) -> u64 {
    fn gcd(a: u64, b: u64) -> u64 {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    let (min, max) = config.election_timeout_ms;
    let g = gcd(gcd(config.heartbeat_ms, min), max);
    (1..=10).rev().find(|&d| g.is_multiple_of(d)).unwrap_or(1)
}

fn core_config(config: &Config, id: NodeId) -> raft::CoreConfig {
    let tick = tick_ms(config);
    let (min, max) = config.election_timeout_ms;
    let seed = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64) ^ id;
    raft::CoreConfig {
        id,
        election_ticks: (min / tick, max / tick),
        heartbeat_ticks: config.heartbeat_ms / tick,
        max_append_bytes: 1 << 20,
        max_apply_bytes: 16 << 20,
        max_inflight_appends: config.max_appends_in_flight,
        pre_vote: true,
        check_quorum: true,
        seed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_with(heartbeat_ms: u64, election_timeout_ms: (u64, u64)) -> Config {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"nodes":[{"id":0,"raft":"tcp://127.0.0.1:1","client":"tcp://127.0.0.1:2"}]}"#)
            .unwrap();
        Config { heartbeat_ms, election_timeout_ms, ..Config::load(&path).unwrap() }
    }

    fn member(id: NodeId) -> Member {
        Member {
            public_key: None,
            id,
            raft: format!("tcp://127.0.0.1:700{id}"),
            client: format!("tcp://127.0.0.1:710{id}"),
        }
    }

    #[test]
    fn a_new_cluster_speaks_for_its_fingerprint_and_older_state_for_the_id_it_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let first = crate::wire::members::first_membership(&[member(0), member(1)]);
        assert_ne!(first.fingerprint, 0);

        let (mut fresh, _) = Storage::open(&dir.path().join("fresh")).unwrap();
        assert_eq!(settle_cluster(&fresh, 0).unwrap(), (0, 0), "joining: nothing to speak for yet");
        fresh.bootstrap_membership(&first).unwrap();
        assert_eq!(settle_cluster(&fresh, 0).unwrap(), (0, first.fingerprint));
        record_cluster(&mut fresh, 0xabc).unwrap();
        assert_eq!(settle_cluster(&fresh, 0).unwrap(), (0xabc, first.fingerprint));

        // Before names: the first membership had no fingerprint, and the
        // state dir recorded the endpoint hash as the cluster's id.
        let (mut old, _) = Storage::open(&dir.path().join("old")).unwrap();
        old.bootstrap_membership(&Membership { fingerprint: 0, ..first.clone() }).unwrap();
        record_cluster(&mut old, first.fingerprint).unwrap();
        assert_eq!(settle_cluster(&old, 0).unwrap(), (0, first.fingerprint), "unnamed until its leader names it");

        let (mut inconsistent, _) = Storage::open(&dir.path().join("inconsistent")).unwrap();
        inconsistent.bootstrap_membership(&Membership { cluster: 0xdef, ..first }).unwrap();
        record_cluster(&mut inconsistent, 0xabc).unwrap();
        assert!(settle_cluster(&inconsistent, 0).unwrap_err().to_string().contains("inconsistent"));
    }

    #[test]
    fn routes_redirect_only_the_named_peers() {
        let members = [member(0), member(1), member(2)];
        let routes = [(2, "tcp://127.0.0.1:9002".to_string())];
        assert_eq!(
            peer_endpoints(&members, 0, &routes).unwrap(),
            [(1, "tcp://127.0.0.1:7001".to_string()), (2, "tcp://127.0.0.1:9002".to_string())]
        );
        assert_eq!(peer_endpoints(&members, 1, &[]).unwrap().len(), 2);
        assert!(peer_endpoints(&members, 0, &[(0, "tcp://127.0.0.1:9000".into())]).is_err(), "a route to itself");
        let later = peer_endpoints(&members, 0, &[(7, "tcp://127.0.0.1:9007".into())]).unwrap();
        assert!(later.iter().all(|(id, _)| *id != 7), "a node that may join later: not a peer yet");
    }

    #[test]
    fn a_panic_in_any_thread_aborts_the_process() {
        const CHILD: &str = "RAFT_ZMQ_TEST_PANIC_CHILD";
        if std::env::var_os(CHILD).is_some() {
            abort_on_panic();
            let _ = thread::spawn(|| panic!("a thread dies")).join();
            std::process::exit(0); // only reached if the process lived on
        }
        let test = "node::tests::a_panic_in_any_thread_aborts_the_process";
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("a thread dies"), "the panic is reported first");
    }

    #[test]
    fn every_node_id_can_be_the_leader() {
        let shared = Shared::new();
        assert_eq!(shared.leader(), None);
        for id in [0, 7, u64::MAX] {
            shared.set_leader(Some(id));
            assert_eq!(shared.leader(), Some(id));
        }
        shared.set_leader(None);
        assert_eq!(shared.leader(), None);
    }

    #[test]
    fn tick_divides_every_interval() {
        assert_eq!(tick_ms(&config_with(50, (300, 600))), 10);
        assert_eq!(tick_ms(&config_with(25, (150, 300))), 5);
        assert_eq!(tick_ms(&config_with(55, (56, 90))), 1);
        let cfg = core_config(&config_with(55, (56, 90)), 0);
        assert_eq!((cfg.heartbeat_ticks, cfg.election_ticks), (55, (56, 90)));
    }

    #[test]
    fn a_snapshot_the_log_does_not_hold_starts_the_log_over_after_it_with_its_membership() {
        use crate::raft::{Entry, Payload};
        let dir = tempfile::tempdir().unwrap();
        let (mut storage, _) = Storage::open(&dir.path().join("db")).unwrap();
        let three = Membership::of_voters([0, 1, 2], Vec::new());
        let four = Membership::of_voters([0, 1, 2, 3], Vec::new());
        let payload = |index| if index == 5 { Payload::Membership(three.clone()) } else { Payload::Noop };
        let entries: Vec<Entry> = (1..=10).map(|index| Entry { index, term: 1, payload: payload(index) }).collect();
        storage.write(None, &entries).unwrap();
        let snapshots = Snapshots::open(&dir.path().join("snapshots")).unwrap();
        let (mut kv, empty) = restore_state_machine(&snapshots, &mut storage).unwrap();
        assert_eq!((empty, kv.len()), (SnapshotMeta::default(), 0), "no snapshot, nothing changes");
        // Installed from a leader, made durable, then a crash before the log was reset.
        let put = crate::kv::Command::Put {
            key: crate::kv::Value::Str("k".into()),
            value: crate::kv::Value::Str("v".into()),
        };
        let logged = crate::kv::LoggedCommand { command: put, client_id: None, seq: None };
        kv.apply(1, &Payload::Command(logged.encode().into()));
        // The leader added node 3 after the log's last membership.
        let ahead = SnapshotMeta { index: 20, term: 2 };
        snapshots.save(ahead, &four, &kv.snapshot()).unwrap();
        let (restored, meta) = restore_state_machine(&snapshots, &mut storage).unwrap();
        assert_eq!((meta, restored.len()), (ahead, 1));
        assert_eq!((storage.log_start(), storage.last_index()), (ahead, 20), "the log starts over after it");
        assert_eq!(storage.memberships(), [(20, four.clone())], "the snapshot's membership, not the log's older one");
        // One the log holds (same index and term) leaves the log alone.
        storage.write(None, &[Entry { index: 21, term: 2, payload: Payload::Noop }]).unwrap();
        let held = SnapshotMeta { index: 21, term: 2 };
        snapshots.save(held, &four, &kv.snapshot()).unwrap();
        restore_state_machine(&snapshots, &mut storage).unwrap();
        assert_eq!((storage.log_start(), storage.last_index()), (ahead, 21));
    }
}
