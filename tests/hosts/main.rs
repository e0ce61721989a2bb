//! The chaos test (`tests/chaos/`) with every node on a host of its own
//! (docs/testing.md "Multi-host testing"): a network namespace per node,
//! with its own address on a bridge, instead of 127.0.0.1 and proxies (see
//! `network.rs`). Nodes run as `ip netns exec HOST raft-zmq ...`, bind
//! their host's address and advertise it; the test's clients reach them
//! over the bridge.
//!
//! The same workload, probes, nemesis and checks run (`run.rs`: every key's
//! history linearizable, final reads included, so no acknowledged write is
//! lost; replicas converge; failovers bounded), with real partitions
//! (iptables in the namespaces: leader isolated, minority split off, one
//! way), power loss (`kill -9` over lazyfs) of one node or all, SIGSTOP,
//! members replaced, and two faults that only a network of hosts has: a
//! host whose link goes down (for clients too) and comes back, and 1–5 %
//! packet loss on every link. The 5-node cluster's links delay every packet
//! 2.5 ms +/- 0.5 ms each way (5 ms round trips): this kernel has no
//! `netem`, so the test holds packets itself (`delay.rs`, through NFQUEUE).
//!
//! Without root, iptables or `ip netns`, it prints one line saying why and
//! passes (skipped); `RAFT_ZMQ_REQUIRE_HOSTS=1` makes that a failure.
//! `HOSTS_SECS=n` sets the load's duration per cluster (default 20),
//! `HOSTS_SEED=n` replays a run's random choices, `CHAOS_CURVE` as in the
//! chaos test.

#[path = "../common/mod.rs"]
mod common;

#[path = "../chaos/cluster.rs"]
mod cluster;
mod delay;
#[path = "../chaos/linearizability.rs"]
mod linearizability;
#[path = "../chaos/nemesis.rs"]
mod nemesis;
mod network;
#[path = "../chaos/probe.rs"]
mod probe;
#[path = "../chaos/register.rs"]
mod register;
#[path = "../chaos/run.rs"]
mod run;
#[path = "../chaos/workload.rs"]
mod workload;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use common::rolling::{self, Leaders, Load};
use network::Network;

/// Load per cluster by default: both clusters run at once, within about a
/// minute on two cores.
const SECS: u64 = 20;

/// Taken for writing by a test whose timing the two chaos clusters would
/// distort: their nodes and checkers starve the delayer threads of CPU on
/// two cores, and a 20 ms delay then grows to hundreds.
static ALONE: std::sync::RwLock<()> = std::sync::RwLock::new(());

#[test]
fn three_hosts() {
    if available() {
        let _shared = ALONE.read();
        run::chaos("hosts", 3, run::curve(true), SECS);
    }
}

/// Over links with 5 ms round trips: 2.5 ms +/- 0.5 ms each way.
#[test]
fn five_hosts_5ms_apart() {
    if available() {
        network::delay_links(Duration::from_micros(2500), Duration::from_micros(500));
        let _shared = ALONE.read();
        run::chaos("hosts", 5, run::curve(false), SECS);
    }
}

/// Over links with 40 ms round trips that lose 5 % of their packets
/// (#25: a cluster there was leaderless for most of 10 s), with the
/// election timeouts the timing table gives for such links (ten round
/// trips at least). TCP resends a lost packet after 200 ms or more, so a
/// request may take that long: the cluster must keep its leader meanwhile,
/// and go on acknowledging writes. No nemesis: the link is the only fault,
/// and no other cluster runs meanwhile.
#[test]
fn three_hosts_40ms_apart_losing_5_percent_keep_their_leader() {
    if !available() {
        return;
    }
    let _alone = ALONE.write();
    let (network, cluster) =
        three_nodes_delayed(Duration::from_millis(20), Duration::from_millis(2), TIMEOUTS_FOR_40_MS);
    cluster.wait_for_leader();
    network.set_loss(5);
    let secs = run::env_u64("HOSTS_SECS").unwrap_or(SECS);
    let (started, stop) = (Instant::now(), Duration::from_secs(secs));
    let writer = {
        let endpoints = cluster.endpoints();
        thread::spawn(move || {
            let ctx = zmq::Context::new();
            let mut clients: Vec<_> = endpoints.iter().map(|e| e.client(&ctx, Duration::from_secs(2))).collect();
            let (mut acknowledged, mut failed) = (0, 0);
            for i in 0.. {
                if started.elapsed() >= stop {
                    break;
                }
                let n = clients.len();
                let reply = clients[i % n].call(&common::put(&format!("k{}", i % 16), &i.to_string()));
                match reply {
                    Ok(raft_zmq::wire::protocol::Reply::Put { .. }) => acknowledged += 1,
                    _ => failed += 1,
                }
            }
            (acknowledged, failed)
        })
    };
    // Every half second: the newest term any node reports, and whether a
    // majority follows one leader in it.
    let (mut terms, mut led, mut samples) = (Vec::new(), 0, 0);
    while started.elapsed() < stop {
        let statuses: Vec<_> = (0..3).filter_map(|id| cluster.status(id)).collect();
        let newest = statuses.iter().map(|s| s.term).max().unwrap_or(0);
        let followed = statuses.iter().filter(|s| s.term == newest && s.leader.is_some()).count();
        terms.push(newest);
        (samples, led) = (samples + 1, led + (followed >= 2) as u32);
        thread::sleep(Duration::from_millis(500));
    }
    let (acknowledged, failed) = writer.join().unwrap();
    let elections = terms.last().unwrap() - terms.first().unwrap();
    eprintln!(
        "40 ms round trips, 5 % loss, {secs} s: {acknowledged} writes acknowledged ({failed} not), \
         {elections} new terms, a leader in {led} of {samples} samples"
    );
    // Generous bounds: the failure they catch is an election every second
    // or two and a cluster without a leader most of the time.
    assert!(elections <= 3, "the cluster kept electing: {terms:?}");
    assert!(led * 10 >= samples * 8, "a leader in only {led} of {samples} samples");
}

/// A rolling restart under load across hosts 5 ms apart: every node in
/// turn stopped with SIGTERM (the leader last, handing over as it stops) and
/// started again; no acknowledged write lost, the logs identical, one leader
/// change (the leader's hand-over) and no more than one per node.
#[test]
fn a_rolling_restart_of_three_hosts_under_load_loses_nothing() {
    if !available() {
        return;
    }
    let (_network, mut cluster) = three_nodes_delayed(Duration::from_micros(2500), Duration::from_micros(500), None);
    let mut leaders = Leaders::default();
    leaders.wait(&cluster);
    let load = Load::start(&cluster);
    rolling::one_node_at_a_time(&mut cluster, &mut leaders, &load, 50, |_, _| {});
    let acknowledged = rolling::check(&cluster, &mut leaders, load);
    eprintln!(
        "rolling restart over 5 ms round trips: {acknowledged} writes acknowledged, none lost; leaders {:?}",
        leaders.0
    );
    assert!(leaders.changes() <= 3, "more than one leader change per node restarted: {:?}", leaders.0);
}

/// The election timeouts docs/running.md's timing table gives for 40 ms
/// round trips: at least ten of them.
const TIMEOUTS_FOR_40_MS: Option<&str> = Some("[500, 1000]");

/// Three nodes on hosts of their own whose links hold every packet for
/// `delay` ± `jitter` each way, started, with `election_timeout_ms` when
/// given. The network comes first, so that bound in that order, the nodes
/// are killed before their hosts go.
fn three_nodes_delayed(
    delay: Duration,
    jitter: Duration,
    election_timeout_ms: Option<&str>,
) -> (Network, common::TestCluster) {
    network::delay_links(delay, jitter);
    let mut cluster = common::TestCluster::configure(3, "");
    let network = Network::start(&mut cluster.nodes);
    let config = cluster.config_path.clone();
    cluster.write_config_of(&config, 0..3, "");
    if let Some(timeouts) = election_timeout_ms {
        let text = common::read_path(&config)
            .replace(r#""election_timeout_ms": [300, 600]"#, &format!(r#""election_timeout_ms": {timeouts}"#));
        assert!(text.contains(timeouts), "the harness's config changed: {text}");
        std::fs::write(&config, text).unwrap();
    }
    for id in 0..3 {
        cluster.start_node(id);
    }
    (network, cluster)
}

/// Two hosts on a bridge, with nodes configured (not started), where the
/// machine can make them.
fn two_hosts() -> Option<(Network, common::TestCluster)> {
    available().then(|| {
        let mut cluster = common::TestCluster::configure(2, "");
        (Network::start(&mut cluster.nodes), cluster)
    })
}

/// A delayed link holds every packet for the delay on its way out of a
/// host, so that a round trip between two hosts takes twice the delay; and
/// without delay, as before.
#[test]
fn delayed_links_hold_every_packet_for_the_delay() {
    let Some((mut network, cluster)) = two_hosts() else { return };
    let plain = median_round_trip(&cluster.nodes);
    network.shape(delay::Shaping {
        delay: Duration::from_millis(5),
        jitter: Duration::from_millis(1),
        ..Default::default()
    });
    let delayed = median_round_trip(&cluster.nodes);
    network.shape(delay::Shaping::default());
    let undelayed = median_round_trip(&cluster.nodes);
    eprintln!("round trips: {plain:?}, with 5 ms +/- 1 ms each way {delayed:?}, without again {undelayed:?}");
    assert!(plain < Duration::from_millis(5), "{plain:?}");
    assert!(delayed >= Duration::from_millis(8) && delayed < Duration::from_millis(40), "{delayed:?}");
    assert!(undelayed < Duration::from_millis(5), "{undelayed:?}");
}

/// A duplicating link delivers a share of the packets twice: UDP shows it
/// (TCP drops the copies it gets, which is what the nodes see).
#[test]
fn duplicating_links_deliver_a_share_of_packets_twice() {
    let Some((mut network, cluster)) = two_hosts() else { return };
    let sent = 200;
    network.set_duplication(50);
    let doubled = datagrams_through(&cluster.nodes, sent);
    network.set_duplication(0);
    let once = datagrams_through(&cluster.nodes, sent);
    eprintln!("{sent} datagrams sent: {doubled} received with 50 % duplication, {once} without");
    assert!(doubled > sent + sent / 4 && doubled < sent + sent * 3 / 4, "{doubled}");
    assert_eq!(once, sent);
}

/// How many of `count` UDP datagrams sent from node 1's host to node 0's
/// arrive.
fn datagrams_through(nodes: &[common::Node], count: usize) -> usize {
    let address = nodes[0].raft.trim_start_matches("tcp://").to_string();
    let (server, client) = (nodes[0].netns.clone().unwrap(), nodes[1].netns.clone().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    let receiver = {
        let address = address.clone();
        thread::spawn(move || {
            delay::enter(&server).unwrap();
            let socket = std::net::UdpSocket::bind(&address).unwrap();
            socket.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
            tx.send(()).unwrap();
            let mut buffer = [0u8; 64];
            std::iter::from_fn(|| socket.recv(&mut buffer).ok()).count()
        })
    };
    rx.recv().unwrap();
    thread::spawn(move || {
        delay::enter(&client).unwrap();
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        for i in 0..count {
            socket.send_to(&(i as u32).to_be_bytes(), &address).unwrap();
            thread::sleep(Duration::from_micros(200));
        }
    })
    .join()
    .unwrap();
    receiver.join().unwrap()
}

/// The median of 21 one-byte round trips over TCP from node 1's host to
/// node 0's (its raft address).
fn median_round_trip(nodes: &[common::Node]) -> Duration {
    let address = nodes[0].raft.trim_start_matches("tcp://").to_string();
    let (server, client) = (nodes[0].netns.clone().unwrap(), nodes[1].netns.clone().unwrap());
    let listening = {
        let address = address.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let echo = thread::spawn(move || {
            delay::enter(&server).unwrap();
            let listener = TcpListener::bind(&address).unwrap();
            tx.send(()).unwrap();
            let (mut stream, _) = listener.accept().unwrap();
            let mut byte = [0u8];
            while stream.read_exact(&mut byte).is_ok() {
                stream.write_all(&byte).unwrap();
            }
        });
        rx.recv().unwrap();
        echo
    };
    let mut times = thread::spawn(move || {
        delay::enter(&client).unwrap();
        let mut stream = TcpStream::connect(&address).unwrap();
        stream.set_nodelay(true).unwrap();
        (0..21)
            .map(|_| {
                let (start, mut byte) = (Instant::now(), [1u8]);
                stream.write_all(&byte).unwrap();
                stream.read_exact(&mut byte).unwrap();
                start.elapsed()
            })
            .collect::<Vec<_>>()
    })
    .join()
    .unwrap();
    listening.join().unwrap();
    times.sort();
    times[times.len() / 2]
}

/// The subnet a run takes overlaps nothing the machine has: neither an
/// address, nor a route, however long or short its prefix.
#[test]
fn a_run_takes_a_subnet_nothing_else_uses() {
    let machine = "inet 192.0.2.2/24 brd 192.0.2.255\ndefault via 192.0.2.1 dev eth0\n";
    assert_eq!(network::subnet_clear_of(machine, 5), Some([10, 213, 5]));
    let taken = format!("{machine}10.213.5.0/24 dev rz1-0b\n10.213.6.7 dev x\n10.213.7.128/25 dev y");
    assert_eq!(network::subnet_clear_of(&taken, 5), Some([10, 213, 8]));
    assert_eq!(network::subnet_clear_of(&format!("{machine}10.213.0.0/16 dev z"), 5), None);
    assert_eq!(network::subnet_clear_of("10.0.0.0/8 dev z", 5), None);
    assert_eq!(network::subnet_clear_of("10.213.255.0/24 dev z", 255), Some([10, 213, 0]));
}

/// Whether this machine can give nodes hosts of their own. If not, the
/// first test to ask says why, in one line that the test harness does not
/// capture.
fn available() -> bool {
    static WHY_NOT: OnceLock<Option<String>> = OnceLock::new();
    let mut asked = false;
    let why_not = WHY_NOT.get_or_init(|| {
        asked = true;
        Network::unavailable()
    });
    let Some(why) = why_not else { return true };
    if std::env::var_os("RAFT_ZMQ_REQUIRE_HOSTS").is_some_and(|v| v != "0") {
        panic!("RAFT_ZMQ_REQUIRE_HOSTS is set, but the multi-host test cannot run: {why}");
    }
    if asked {
        let _ = writeln!(std::io::stderr(), "hosts: skipped, {why}");
    }
    false
}
