//! The `raft-zmq` command: run one node, or use one of the tools.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::Duration;

use clap::{Parser, Subcommand};
use raft_zmq::config::Config;
use raft_zmq::keys::CurveIdentity;
use raft_zmq::net::security::ClientCurve;
use raft_zmq::node;
use raft_zmq::storage::{self, mirror, snapshot};
use raft_zmq::tools::status::{self, Target};
use raft_zmq::tools::{backup, bench, client, cluster, health, shell};
use raft_zmq::wire::envelope;

#[derive(Parser)]
#[command(
    name = "raft-zmq",
    version = version_text(),
    about = "A crash-safe Raft node serving a replicated key-value store over ZeroMQ",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    /// Which node of the config to run.
    #[arg(long, required = true)]
    node_id: Option<u64>,
    /// Reach peer ID at ENDPOINT instead of its `raft` endpoint in the config,
    /// e.g. through a proxy or tunnel. Repeatable; ID may be a node that is
    /// added later. Membership still comes from the config.
    #[arg(long = "peer", value_name = "ID=ENDPOINT", value_parser = parse_route)]
    peer: Vec<(u64, String)>,
    /// Join a running cluster: with no state yet, wait to be added (see
    /// `add_node`) instead of starting a new cluster from the config's
    /// nodes. With state, it changes nothing.
    #[arg(long)]
    join: bool,
    /// After losing a majority for good: restart this node alone, with its
    /// data, as a one-node cluster that others can then be added to. Every
    /// other member is removed (they stop if they come back). Unsafe: writes
    /// acknowledged by the lost majority but not held here are gone.
    #[arg(long, conflicts_with = "join")]
    force_new_cluster: bool,
    /// The cluster's config file.
    #[arg(long, global = true, default_value = "config.json")]
    config: PathBuf,
    /// Log lines as text for people, or as one JSON object per line (time,
    /// level, node, term, target, event) for log shippers.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    tool: Option<Tool>,
}

/// What `--version` prints after the name: the release, then the version of
/// every format this build shares with other nodes or leaves on disk.
fn version_text() -> &'static str {
    static TEXT: OnceLock<String> = OnceLock::new();
    TEXT.get_or_init(|| {
        format!(
            "{}\npeer protocol: {}\nstate dir format: {}\nsnapshot format: {}\nmirror format: {}",
            env!("CARGO_PKG_VERSION"),
            envelope::PROTOCOL_VERSION,
            storage::STATE_FORMAT_VERSION,
            snapshot::SNAPSHOT_FORMAT_VERSION,
            mirror::MIRROR_FORMAT_VERSION,
        )
    })
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Tool {
    /// Start every node of the config as a separate process; Ctrl-C stops them.
    Cluster,
    /// Send one request to a node and print its reply as JSON; with no
    /// command, open an interactive shell (it reads commands from standard
    /// input when that is not a terminal).
    #[command(alias = "shell")]
    Client {
        /// Node to ask (default: the first in the config).
        #[arg(long)]
        node: Option<u64>,
        /// Client endpoint to ask, instead of a node of the config.
        #[arg(long, conflicts_with = "node")]
        endpoint: Option<String>,
        /// Give up after this long without a reply.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        /// Session id for exactly-once writes (with --seq).
        #[arg(long, requires = "seq")]
        client_id: Option<String>,
        /// Sequence number of this write within the session.
        #[arg(long, requires = "client_id")]
        seq: Option<u64>,
        /// Shell: print each reply as one line of JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        curve: client::CurveArgs,
        #[command(subcommand)]
        op: Option<client::Op>,
    },
    /// Ask every node for its status at once and print one row per node
    /// (exit status 1 when some node did not answer).
    Status {
        /// Client endpoints to ask (comma-separated), instead of the config's nodes.
        #[arg(long, value_name = "LIST")]
        endpoints: Option<String>,
        /// Output format.
        #[arg(short = 'w', long = "write-out", value_enum, default_value = "table")]
        write_out: status::Format,
        /// Give up on a node after this long without a reply.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        #[command(flatten)]
        curve: client::CurveArgs,
    },
    /// Ask a node's HTTP endpoint for /health and print its answer: exit
    /// status 0 when healthy (200), 1 otherwise. For container health checks
    /// without curl.
    Health {
        /// The node's `http` address.
        #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:7200")]
        http: String,
        /// Give up after this long.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// Measure acknowledged-put throughput and latency against a running cluster.
    Bench(bench::BenchArgs),
    /// Write a new CURVE key pair, NAME.key (secret, mode 0600) and NAME.pub,
    /// and print the public key.
    Keygen {
        /// Where the two files go, e.g. keys/0 for keys/0.key and keys/0.pub.
        name: PathBuf,
    },
    /// Back up the replicated state, or build a new cluster's nodes from a backup.
    #[command(subcommand)]
    Snapshot(SnapshotTool),
    /// List, add, remove or promote members (the client ops `members`,
    /// `add_node`, `remove_node`, `promote_node`); prints the reply as JSON.
    Member {
        /// Node to ask (default: the first in the config).
        #[arg(long)]
        node: Option<u64>,
        #[command(flatten)]
        curve: client::CurveArgs,
        #[command(subcommand)]
        op: MemberOp,
    },
    /// Hand leadership to node --to (default: the most up-to-date voter) and
    /// wait until it leads; prints the reply as JSON.
    TransferLeader {
        #[arg(long)]
        to: Option<u64>,
        /// Node to ask (default: the first in the config).
        #[arg(long)]
        node: Option<u64>,
        #[command(flatten)]
        curve: client::CurveArgs,
    },
}

#[derive(Subcommand)]
enum MemberOp {
    /// Every member: id, endpoints, voter or learner, and (from the leader)
    /// match index and last contact.
    List,
    /// Add node ID, advertised at RAFT and CLIENT (DNS names allowed);
    /// promoted to voter once caught up unless --learner. Start it with
    /// `--join` and a config that lists it (with its raft_listen /
    /// client_listen, if it binds other endpoints).
    Add(client::NewMember),
    /// Remove node ID; it stops by itself, and its id is never reused.
    Remove { id: u64 },
    /// Make learner ID (added with --learner) a voter, once it has caught up.
    Promote { id: u64 },
}

#[derive(Subcommand)]
enum SnapshotTool {
    /// Have a node snapshot its state now and copy the snapshot (KV data and
    /// sessions, checksummed) to FILE.
    Save {
        file: PathBuf,
        /// Node to ask (default: the first in the config).
        #[arg(long)]
        node: Option<u64>,
        /// Give up after this long without a reply.
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
        #[command(flatten)]
        curve: client::CurveArgs,
    },
    /// Create node N's state dir for a new cluster (the config's nodes) from
    /// FILE; run it for every node, then start them.
    Restore {
        file: PathBuf,
        #[arg(long)]
        node_id: u64,
    },
}

fn main() -> ExitCode {
    node::abort_on_panic();
    let cli = Cli::parse();
    let quiet =
        matches!(cli.tool, Some(Tool::Client { .. } | Tool::Bench(_) | Tool::Status { .. } | Tool::Health { .. }));
    init_logging(if quiet { "warn" } else { "info" }, cli.log_format, cli.node_id);

    if let Some(Tool::Keygen { name }) = &cli.tool {
        return match CurveIdentity::write_new(name) {
            Ok(identity) => {
                println!("{}", identity.public());
                ExitCode::SUCCESS
            }
            Err(e) => fail(1, &e),
        };
    }
    if let Some(Tool::Health { http, timeout_ms }) = &cli.tool {
        return match health::ask(http, Duration::from_millis(*timeout_ms)) {
            Ok(answer) => {
                println!("{}", answer.body);
                if answer.code == 200 { ExitCode::SUCCESS } else { ExitCode::from(1) }
            }
            Err(e) => fail(1, &e),
        };
    }
    // A client given an endpoint, or a status of given endpoints, needs no config file.
    if let Some(Tool::Client { endpoint: Some(endpoint), timeout_ms, client_id, seq, curve, op, json, .. }) = cli.tool {
        let keys = match curve.load(false) {
            Ok(keys) => keys,
            Err(e) => return fail(2, &e),
        };
        let timeout = Duration::from_millis(timeout_ms);
        return match op {
            Some(op) => run_client(&endpoint, keys.towards(None), timeout, op.into_request(client_id, seq)),
            None => {
                let sh = shell::Shell::new(
                    vec![Target::at(endpoint)],
                    0,
                    Box::new(move |_| keys.towards(None)),
                    timeout,
                    json,
                );
                run_shell(sh.with_session(client_id, seq))
            }
        };
    }
    if let Some(Tool::Status { endpoints: Some(list), write_out, timeout_ms, curve }) = &cli.tool {
        let keys = match curve.load(false) {
            Ok(keys) => keys,
            Err(e) => return fail(2, &e),
        };
        let curve = status::curve_for(None, keys);
        return run_status(status::targets_from_list(list), &curve, *timeout_ms, *write_out);
    }
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(e) => return fail(2, &e),
    };
    let result = match cli.tool {
        None => {
            let id = cli.node_id.expect("clap requires --node-id without a subcommand");
            if let Err(e) = config.require_member(id) {
                return fail(2, &e);
            }
            let start = if cli.force_new_cluster {
                node::Start::ForceNewCluster
            } else if cli.join {
                node::Start::Join
            } else {
                node::Start::Normal
            };
            node::run(&config, id, &cli.peer, start).map_err(|e| format!("node {id}: {e}"))
        }
        Some(Tool::Cluster) => cluster::run(&cli.config, &config).map_err(|e| e.to_string()),
        Some(Tool::Bench(args)) => bench::run(&config, &args).map_err(|e| e.to_string()),
        Some(Tool::Client { node, timeout_ms, client_id, seq, curve, op: Some(op), .. }) => {
            let (member, curve) = match node_target(&config, node, &curve) {
                Ok(target) => target,
                Err(code) => return code,
            };
            let request = op.into_request(client_id, seq);
            return run_client(&member.client, curve, Duration::from_millis(timeout_ms), request);
        }
        Some(Tool::Client { node, timeout_ms, client_id, seq, curve, op: None, json, .. }) => {
            let first = match node.map(|id| config.require_member(id)).transpose() {
                Ok(member) => member.map_or(0, |m| config.nodes.iter().position(|n| n.id == m.id).expect("listed")),
                Err(e) => return fail(2, &e),
            };
            let keys = match curve.load(config.curve.is_some()) {
                Ok(keys) => keys,
                Err(e) => return fail(2, &e),
            };
            let curve = Box::new(status::curve_for(Some(&config), keys));
            let timeout = Duration::from_millis(timeout_ms);
            let sh = shell::Shell::new(status::targets_of(&config), first, curve, timeout, json);
            return run_shell(sh.with_session(client_id, seq));
        }
        Some(Tool::Status { write_out, timeout_ms, curve, .. }) => {
            let keys = match curve.load(config.curve.is_some()) {
                Ok(keys) => keys,
                Err(e) => return fail(2, &e),
            };
            let curve = status::curve_for(Some(&config), keys);
            return run_status(status::targets_of(&config), &curve, timeout_ms, write_out);
        }
        Some(Tool::Keygen { .. } | Tool::Health { .. }) => unreachable!("handled before the config is read"),
        Some(tool @ (Tool::Member { .. } | Tool::TransferLeader { .. })) => {
            let (node, curve, op) = match tool {
                Tool::Member { node, curve, op: MemberOp::List } => (node, curve, client::Op::Members),
                Tool::Member { node, curve, op: MemberOp::Add(new) } => (node, curve, client::Op::AddNode(new)),
                Tool::Member { node, curve, op: MemberOp::Remove { id } } => {
                    (node, curve, client::Op::RemoveNode { id })
                }
                Tool::Member { node, curve, op: MemberOp::Promote { id } } => {
                    (node, curve, client::Op::PromoteNode { id })
                }
                Tool::TransferLeader { to, node, curve } => (node, curve, client::Op::TransferLeader { to }),
                _ => unreachable!("matched above"),
            };
            let (member, curve) = match node_target(&config, node, &curve) {
                Ok(target) => target,
                Err(code) => return code,
            };
            // Membership changes and transfers wait for an election at worst.
            return run_client(&member.client, curve, Duration::from_secs(10), op.into_request(None, None));
        }
        Some(Tool::Snapshot(SnapshotTool::Save { file, node, timeout_ms, curve })) => {
            let (member, curve) = match node_target(&config, node, &curve) {
                Ok(target) => target,
                Err(code) => return code,
            };
            let mut client =
                raft_zmq::client::Client::new(&zmq::Context::new(), &member.client, Duration::from_millis(timeout_ms))
                    .with_curve(curve);
            backup::save(&mut client, &file).map(|s| {
                println!(
                    "saved node {}'s snapshot at index {} (term {}, {} keys, {} bytes) to {}",
                    member.id,
                    s.snapshot.index,
                    s.snapshot.term,
                    s.keys,
                    s.bytes,
                    file.display()
                )
            })
        }
        Some(Tool::Snapshot(SnapshotTool::Restore { file, node_id })) => {
            backup::restore(&config, node_id, &file).map(|s| {
                println!(
                    "node {node_id}: state dir {} created from the snapshot at index {} (term {}, {} keys); \
                 start it with raft-zmq --node-id {node_id}",
                    config.node_state_dir(node_id).display(),
                    s.snapshot.index,
                    s.snapshot.term,
                    s.keys
                )
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(1, &e),
    }
}

/// env_logger at `RUST_LOG` (default `default_level`), as text or JSON lines.
fn init_logging(default_level: &str, format: LogFormat, node: Option<u64>) {
    let mut builder = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level));
    if format == LogFormat::Json {
        builder.format(move |out, record| {
            use std::io::Write;
            let mut fields = JsonFields(serde_json::Map::new());
            let _ = record.key_values().visit(&mut fields);
            let line = serde_json::json!({
                "time": out.timestamp_millis().to_string(),
                "level": record.level().as_str(),
                "node": node,
                "term": raft_zmq::metrics::METRICS.term.get(),
                "target": record.target(),
                "event": record.args().to_string(),
                "fields": fields.0,
            });
            writeln!(out, "{line}")
        });
    }
    builder.init();
}

/// A log record's structured fields (`info!(term = 3, granted; "...")`) as
/// JSON: numbers and booleans as such, anything else as its text.
struct JsonFields(serde_json::Map<String, serde_json::Value>);

impl<'kvs> log::kv::VisitSource<'kvs> for JsonFields {
    fn visit_pair(&mut self, key: log::kv::Key<'kvs>, value: log::kv::Value<'kvs>) -> Result<(), log::kv::Error> {
        let json = match (value.to_u64(), value.to_bool(), value.to_string()) {
            (Some(n), _, _) => n.into(),
            (_, Some(b), _) => b.into(),
            // An absent `Option` (a leader nobody knows).
            (_, _, text) if text == "None" => serde_json::Value::Null,
            (_, _, text) => text.into(),
        };
        self.0.insert(key.to_string(), json);
        Ok(())
    }
}

fn parse_route(route: &str) -> Result<(u64, String), String> {
    let (id, endpoint) = route.split_once('=').ok_or("expected ID=ENDPOINT")?;
    let id = id.parse().map_err(|e| format!("bad node id {id:?}: {e}"))?;
    Ok((id, endpoint.to_string()))
}

/// Prints the reply as JSON; exit status 0 for `ok: true`, 1 for an error
/// reply, 3 when no reply came.
fn run_client(
    endpoint: &str,
    curve: Option<ClientCurve>,
    timeout: Duration,
    request: raft_zmq::wire::protocol::Request,
) -> ExitCode {
    let mut client = raft_zmq::client::Client::new(&zmq::Context::new(), endpoint, timeout).with_curve(curve);
    match client.call_raw(&raft_zmq::wire::protocol::encode_request(&request)) {
        Ok(frame) => {
            println!("{}", client::reply_to_json(&frame));
            match raft_zmq::wire::protocol::Reply::decode(&frame, &request) {
                Ok(raft_zmq::wire::protocol::Reply::Error { .. }) | Err(_) => ExitCode::from(1),
                Ok(_) => ExitCode::SUCCESS,
            }
        }
        Err(e) => fail(3, &format!("{endpoint}: {e}")),
    }
}

fn run_shell(shell: shell::Shell) -> ExitCode {
    match shell.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(1, &e),
    }
}

/// Prints the status of every node; exit status 1 when one did not answer.
fn run_status(targets: Vec<Target>, curve: &status::CurveFor, timeout_ms: u64, format: status::Format) -> ExitCode {
    let rows = status::ask_all(targets, curve, Duration::from_millis(timeout_ms));
    print!("{}", status::render(&rows, format));
    if rows.iter().all(|row| row.status.is_ok()) { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

/// Node `node` of the config (default: the first) and CURVE towards it; a
/// bad node id or key is reported, exit status 2.
fn node_target<'a>(
    config: &'a Config,
    node: Option<u64>,
    curve: &client::CurveArgs,
) -> Result<(&'a raft_zmq::config::Member, Option<ClientCurve>), ExitCode> {
    let member = match node.map(|id| config.require_member(id)).transpose() {
        Ok(member) => member.unwrap_or(&config.nodes[0]),
        Err(e) => return Err(fail(2, &e)),
    };
    match curve.load(config.curve.is_some()) {
        Ok(keys) => Ok((member, keys.towards(config.node_key(member.id)))),
        Err(e) => Err(fail(2, &e)),
    }
}

fn fail(code: u8, error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("raft-zmq: {error}");
    ExitCode::from(code)
}
