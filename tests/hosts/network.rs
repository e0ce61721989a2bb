//! The network between a cluster's nodes when each node is a host of its
//! own: a network namespace per node slot, joined to one bridge by a veth
//! pair, with its own address in a private /24 chosen per run. Nodes bind
//! their own address (ports 7000 and 7100 on every host, as on real
//! machines), and the test process reaches them from the bridge's address
//! in the same subnet. Nothing is routed anywhere else: the namespaces have
//! no default route, and the subnet is one no interface or route of the
//! machine overlaps.
//!
//! Faults, with iptables in the namespaces (chains `cut` and `loss`, so
//! each fault rewrites its own chain only) and `ip link`:
//! - [`Network::apply`] cuts directed links as the chaos test's proxies do:
//!   "A cannot reach B" drops every packet of the connections A opens to B
//!   (to B's ports, and back from them), where it arrives, so B's own
//!   connections to A still work, like a stateful firewall;
//! - [`Network::set_loss`] drops a share of every packet a node receives
//!   (`-m statistic --mode random`);
//! - [`Network::set_link`] takes a host's link down, for peers and clients.
//!
//! Names carry the test process's pid and a per-process count
//! (`rzh-PID-K-I` namespaces, `rzPID-K…` interfaces), so parallel runs never
//! clash; leftovers of a process that no longer runs are removed when the
//! next run starts, and [`Drop`] removes everything a run made, even when a
//! test panics.

use std::cell::Cell;
use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::common::Node;
use crate::delay::{COPY_MARK, Delayer, Shaping};

const RAFT_PORT: u16 = 7000;
const CLIENT_PORT: u16 = 7100;
/// The node in slot `i` has host address `.HOST_BASE + i`; the bridge has `.1`.
const HOST_BASE: u8 = 10;
/// Runs of this process so far: each gets names of its own.
static RUNS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// The delay and jitter of the links of networks this thread starts.
    static DELAY: Cell<(Duration, Duration)> = const { Cell::new((Duration::ZERO, Duration::ZERO)) };
}

/// Every link of the networks this thread starts from now on holds each
/// packet for `delay` ± `jitter` on its way out of a host (see [`Network::delay`]).
pub fn delay_links(delay: Duration, jitter: Duration) {
    DELAY.set((delay, jitter));
}

pub struct Network {
    hosts: Vec<Host>,
    bridge: String,
    /// One a host while links are delayed.
    delayers: Vec<Delayer>,
    /// What the links started with, and go back to.
    base: Shaping,
}

struct Host {
    netns: String,
    /// The bridge's end of its veth pair; the namespace's end is `eth0`.
    port: String,
    address: Ipv4Addr,
}

impl Network {
    /// iptables drops packets and `ip link` takes hosts away.
    pub const DROPS_PACKETS: bool = true;

    /// Why this machine cannot run nodes on hosts of their own, if it cannot:
    /// it needs root (CAP_NET_ADMIN), `ip` with netns support and iptables.
    pub fn unavailable() -> Option<String> {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Some("not root: network namespaces need CAP_NET_ADMIN".into());
        }
        if let Err(e) = run(&["iptables", "--version"]) {
            return Some(format!("no iptables ({e}); apt-get install iptables"));
        }
        let probe = format!("rzh-{}-probe", std::process::id());
        if let Err(e) = run(&["ip", "netns", "add", &probe]) {
            return Some(format!("`ip netns add` fails here: {e}"));
        }
        // Every kind of rule the faults load: a drop, a random drop, a queue.
        let rules: [&[&str]; 3] = [
            &["-A", "OUTPUT", "-o", "lo", "-p", "udp", "--dport", "9", "-j", "DROP"],
            &["-A", "OUTPUT", "-o", "lo", "-m", "statistic", "--mode", "random", "--probability", "0.01", "-j", "DROP"],
            &[
                "-A",
                "OUTPUT",
                "-o",
                "lo",
                "-p",
                "udp",
                "--dport",
                "9",
                "-j",
                "NFQUEUE",
                "--queue-num",
                "0",
                "--queue-bypass",
            ],
        ];
        let loaded = rules.iter().try_for_each(|rule| {
            let mut command = vec!["ip", "netns", "exec", probe.as_str(), "iptables"];
            command.extend_from_slice(rule);
            run(&command)
                .map(drop)
                .map_err(|e| format!("iptables {} fails in a network namespace here: {e}", rule.join(" ")))
        });
        let _ = run(&["ip", "netns", "del", &probe]);
        loaded.err()
    }

    /// A host for every node slot; moves each node there: it binds, and is
    /// reached at, its host's address.
    pub fn start(nodes: &mut [Node]) -> Network {
        remove_leftovers();
        let (pid, run_id) = (std::process::id(), RUNS.fetch_add(1, Ordering::Relaxed));
        let bridge = format!("rz{pid}-{run_id}b");
        let (delay, jitter) = DELAY.get();
        let base = Shaping { delay, jitter, duplicate_percent: 0 };
        let mut network = Network { hosts: Vec::new(), bridge: bridge.clone(), delayers: Vec::new(), base };
        // Chosen and claimed under a machine-wide lock, so that two runs
        // never pick the same subnet.
        let subnet = {
            let _lock = Lock::take("/tmp/raft-zmq-hosts.lock");
            let subnet = free_subnet(pid as usize + run_id);
            sh(&["ip", "link", "add", &bridge, "type", "bridge"]);
            sh(&["ip", "addr", "add", &format!("{}/24", host(subnet, 1)), "dev", &bridge]);
            subnet
        };
        sh(&["ip", "link", "set", &bridge, "up"]);
        for (i, node) in nodes.iter_mut().enumerate() {
            let netns = format!("rzh-{pid}-{run_id}-{i}");
            let port = format!("rz{pid}-{run_id}h{i}");
            let address = host(subnet, HOST_BASE + i as u8);
            // Pushed first: what exists is removed on drop, whatever fails next.
            network.hosts.push(Host { netns: netns.clone(), port: port.clone(), address });
            sh(&["ip", "netns", "add", &netns]);
            sh(&["ip", "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &netns]);
            sh(&["ip", "link", "set", &port, "master", &bridge]);
            sh(&["ip", "link", "set", &port, "up"]);
            sh(&["ip", "-n", &netns, "addr", "add", &format!("{address}/24"), "dev", "eth0"]);
            sh(&["ip", "-n", &netns, "link", "set", "eth0", "up"]);
            sh(&["ip", "-n", &netns, "link", "set", "lo", "up"]);
            // Its own chains, that faults rewrite: `cut` and `loss` on the
            // way in, `delay` on the way out.
            let chains = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
                          :cut - [0:0]\n:loss - [0:0]\n:delay - [0:0]\n-A INPUT -j loss\n-A INPUT -j cut\n\
                          -A OUTPUT -j delay\nCOMMIT\n";
            network.restore(false, vec![(i, chains.to_string())]);
            node.raft = format!("tcp://{address}:{RAFT_PORT}");
            node.client = format!("tcp://{address}:{CLIENT_PORT}");
            node.netns = Some(netns);
        }
        let hosts: Vec<String> = network.hosts.iter().map(|h| h.address.to_string()).collect();
        eprintln!("hosts: bridge {bridge} at {}/24, nodes at {}", host(subnet, 1), hosts.join(", "));
        if !delay.is_zero() {
            network.shape(base);
            eprintln!("hosts: every packet held {delay:?} +/- {jitter:?} on its way out (round trips {:?})", delay * 2);
        }
        network
    }

    /// Peers are reached at their own addresses: no routes to add.
    pub fn routes(&self, _from: usize) -> Vec<String> {
        Vec::new()
    }

    /// Cuts exactly the links for which `cut(from, to)` holds; heals the rest.
    /// Packets are dropped where they arrive, so a sender sees no error, as
    /// with a pulled cable: `to` drops what `from` sends on the connections
    /// `from` opened to it, and `from` drops what comes back on them.
    pub fn apply(&self, cut: impl Fn(usize, usize) -> bool) {
        let mut rules = vec![String::from("*filter\n:cut - [0:0]\n"); self.hosts.len()];
        for from in 0..self.hosts.len() {
            for to in (0..self.hosts.len()).filter(|&to| to != from && cut(from, to)) {
                let (sender, receiver) = (self.hosts[from].address, self.hosts[to].address);
                for port in [RAFT_PORT, CLIENT_PORT] {
                    rules[to] += &format!("-A cut -s {sender} -p tcp --dport {port} -j DROP\n");
                    rules[from] += &format!("-A cut -s {receiver} -p tcp --sport {port} -j DROP\n");
                }
            }
        }
        self.restore(true, rules.into_iter().map(|rules| rules + "COMMIT\n").enumerate().collect());
    }

    pub fn heal(&self) {
        self.apply(|_, _| false);
    }

    /// Every host drops `percent` % of the packets it receives (0: none).
    pub fn set_loss(&self, percent: u32) {
        let mut rules = String::from("*filter\n:loss - [0:0]\n");
        if percent > 0 {
            let p = percent as f64 / 100.0;
            rules += &format!("-A loss -i eth0 -m statistic --mode random --probability {p} -j DROP\n");
        }
        rules += "COMMIT\n";
        self.restore(true, (0..self.hosts.len()).map(|i| (i, rules.clone())).collect());
    }

    /// Every host shapes each packet it sends before it leaves (see
    /// `delay.rs`): held for the delay ± the jitter, so a round trip takes
    /// twice that, and a share sent twice. Nothing at all: no delayers.
    pub fn shape(&mut self, shaping: Shaping) {
        self.delayers.clear();
        let mut rules = String::from("*filter\n:delay - [0:0]\n");
        if shaping != Shaping::default() {
            for (i, host) in self.hosts.iter().enumerate() {
                let delayer = Delayer::start(&host.netns, 0, shaping, i as u64)
                    .unwrap_or_else(|e| panic!("a delayer in {}: {e}", host.netns));
                self.delayers.push(delayer);
            }
            rules += &format!("-A delay -m mark --mark {COPY_MARK} -j RETURN\n");
            rules += "-A delay -o eth0 -j NFQUEUE --queue-num 0 --queue-bypass\n";
        }
        rules += "COMMIT\n";
        self.restore(true, (0..self.hosts.len()).map(|i| (i, rules.clone())).collect());
    }

    /// Every link holds each packet for `delay` ± a fifth of it each way
    /// (a slow network for a while); `None`: back to the links' own delay.
    pub fn set_delay(&mut self, delay: Option<Duration>) {
        let (delay, jitter) = delay.map_or((self.base.delay, self.base.jitter), |delay| (delay, delay / 5));
        self.shape(Shaping { delay, jitter, ..self.base });
    }

    /// Every host sends `percent` % of its packets twice (0: none).
    pub fn set_duplication(&mut self, percent: u32) {
        self.shape(Shaping { duplicate_percent: percent, ..self.base });
    }

    /// Node `node`'s host link up or down (the namespace's end: the node
    /// keeps its address, and neither sends nor receives while down).
    pub fn set_link(&self, node: usize, up: bool) {
        let state = if up { "up" } else { "down" };
        sh(&["ip", "-n", &self.hosts[node].netns, "link", "set", "eth0", state]);
    }

    /// Loads rules into hosts' iptables (`noflush`: only the chains they
    /// declare are rewritten), into all at once, so that a fault strikes
    /// every host within a few milliseconds (one host after another, seven
    /// take over 100 ms, in which writes still commit).
    fn restore(&self, noflush: bool, rules: Vec<(usize, String)>) {
        let children: Vec<_> = rules
            .iter()
            .map(|(i, rules)| {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", &self.hosts[*i].netns, "iptables-restore"]);
                if noflush {
                    command.arg("--noflush");
                }
                let mut child =
                    command.stdin(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("iptables-restore runs");
                child.stdin.take().unwrap().write_all(rules.as_bytes()).unwrap();
                child
            })
            .collect();
        for ((i, rules), child) in rules.iter().zip(children) {
            let output = child.wait_with_output().unwrap();
            let (netns, stderr) = (&self.hosts[*i].netns, String::from_utf8_lossy(&output.stderr));
            assert!(output.status.success(), "iptables-restore in {netns} failed: {stderr}\nrules:\n{rules}");
        }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.delayers.clear();
        // Deleting a namespace takes its veth pair along once no process
        // holds it; the link is deleted first in case one still does.
        for host in &self.hosts {
            let _ = run(&["ip", "link", "del", &host.port]);
            let _ = run(&["ip", "netns", "del", &host.netns]);
        }
        let _ = run(&["ip", "link", "del", &self.bridge]);
    }
}

fn host(subnet: [u8; 3], last: u8) -> Ipv4Addr {
    Ipv4Addr::new(subnet[0], subnet[1], subnet[2], last)
}

/// A /24 in 10.213.0.0/16, starting from one that `seed` picks, that no
/// address or route of the machine overlaps.
fn free_subnet(seed: usize) -> [u8; 3] {
    let mut taken = String::new();
    for what in [&["ip", "-4", "-o", "addr", "show"][..], &["ip", "-4", "route", "show", "table", "all"][..]] {
        taken += &run(what).unwrap_or_else(|e| panic!("{what:?}: {e}"));
    }
    subnet_clear_of(&taken, seed).expect("a free /24 in 10.213.0.0/16")
}

/// The first /24 in 10.213.0.0/16 from the one `seed` picks that overlaps
/// none of the `a.b.c.d[/len]` in `taken` (the output of `ip addr` and
/// `ip route`), a default route aside.
pub fn subnet_clear_of(taken: &str, seed: usize) -> Option<[u8; 3]> {
    let prefixes: Vec<(u32, u32)> = taken
        .split_whitespace()
        .filter_map(|word| {
            let (address, len) = word.split_once('/').unwrap_or((word, "32"));
            let (address, len) = (address.parse::<Ipv4Addr>().ok()?, len.parse::<u32>().ok()?);
            (1..=32).contains(&len).then(|| {
                let mask = u32::MAX << (32 - len);
                (u32::from(address) & mask, mask)
            })
        })
        .collect();
    (0..256).map(|k| [10, 213, ((seed + k) % 256) as u8]).find(|&subnet| {
        let ours = u32::from(host(subnet, 0));
        // Two prefixes overlap when the shorter one's mask maps both to the same network.
        prefixes.iter().all(|&(network, mask)| {
            let mask = mask & 0xffff_ff00;
            ours & mask != network & mask
        })
    })
}

/// Removes the namespaces and interfaces of runs whose process has gone
/// (killed before it could clean up).
fn remove_leftovers() {
    let gone = |name: &str, prefix: &str| -> bool {
        let Some(pid) = name.strip_prefix(prefix).and_then(|rest| rest.split('-').next()) else { return false };
        pid.parse::<u32>().is_ok_and(|pid| !fs::exists(format!("/proc/{pid}")).unwrap_or(true))
    };
    for line in run(&["ip", "netns", "list"]).unwrap_or_default().lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if gone(name, "rzh-") {
            let _ = run(&["ip", "netns", "del", name]);
        }
    }
    for line in run(&["ip", "-o", "link", "show"]).unwrap_or_default().lines() {
        // "7: rz123-0h1@if2: <...": the name, without the peer after '@'.
        let name = line.split(": ").nth(1).unwrap_or("").split('@').next().unwrap_or("");
        if gone(name, "rz") {
            let _ = run(&["ip", "link", "del", name]);
        }
    }
}

/// Runs a command; its stdout, or why it failed.
fn run(args: &[&str]) -> Result<String, String> {
    let output = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!("`{}`: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim()))
    }
}

/// Runs a command that must succeed.
fn sh(args: &[&str]) {
    if let Err(e) = run(args) {
        panic!("{e}");
    }
}

/// An exclusive lock on a file (flock), released on drop.
struct Lock(fs::File);

impl Lock {
    fn take(path: &str) -> Lock {
        let file = fs::OpenOptions::new().create(true).truncate(false).write(true).open(path).unwrap();
        // SAFETY: flock(2) on a file descriptor we own.
        assert_eq!(unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) }, 0, "flock {path}");
        Lock(file)
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}
