//! `raft-zmq client` with no command: an interactive shell against the
//! cluster (CONTRACT.md "Command-line tools").
//!
//! On a terminal it has line editing, history and completion of commands.
//! Otherwise it reads one command per line from standard input and prints
//! one result per command, with no prompt or banner, so that scripts and
//! tests can drive it; `--json` prints each reply as one JSON object.
//!
//! Writes carry a session (client id and sequence number) and are retried
//! with the same number after `no_leader`, `busy`, `shutting_down` or
//! `timeout`, so a retried write applies once. A node that does not answer
//! is replaced by another member.

use std::io::{BufRead, IsTerminal};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use serde_json::{Value as Json, json};

use super::client::{Op, reply_to_json};
use super::status::{self, CurveFor, Target, leader_of};
use crate::client::{CallError, Client};
use crate::raft::NodeId;
use crate::wire::protocol::{ErrorCode, Reply, Request, encode_request};

/// How long one command keeps retrying retryable errors.
const RETRY_FOR: Duration = Duration::from_secs(15);
const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// One line of the shell, parsed with the same grammar as the command line.
#[derive(Parser)]
#[command(name = "", no_binary_name = true, disable_help_flag = true)]
struct Line {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Op(Op),
    /// Who leads, in which term, and how long ago each node last heard from it.
    Leader,
    /// Make node N (default: the most up-to-date follower) the leader now.
    Elect { node: Option<u64> },
    /// Talk to node N from now on.
    Use { node: u64 },
    /// Leave the shell (also: quit, Ctrl-D).
    #[command(alias = "quit")]
    Exit,
}

/// The commands' names, for completion and `help --json`.
fn command_names() -> Vec<String> {
    use clap::CommandFactory;
    let names = Line::command().get_subcommands().map(|c| c.get_name().to_string()).collect::<Vec<_>>();
    names.into_iter().chain(["help".to_string()]).collect()
}

/// The nodes the shell knows: from the config, and from `members` replies.
pub struct Shell {
    ctx: zmq::Context,
    /// (id if known, client endpoint).
    nodes: Vec<Target>,
    current: usize,
    curve: Box<CurveFor>,
    timeout: Duration,
    json: bool,
    client_id: String,
    seq: u64,
}

impl Shell {
    /// `nodes`: the nodes it may talk to, `first` the one it starts with.
    pub fn new(nodes: Vec<Target>, first: usize, curve: Box<CurveFor>, timeout: Duration, json: bool) -> Shell {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let client_id = format!("shell-{}-{nanos:x}", std::process::id());
        Shell { ctx: zmq::Context::new(), nodes, current: first, curve, timeout, json, client_id, seq: 0 }
    }

    /// Writes use session `client_id`, numbered from `first_seq` on, instead
    /// of a new session of their own.
    pub fn with_session(self, client_id: Option<String>, first_seq: Option<u64>) -> Shell {
        match client_id {
            Some(client_id) => Shell { client_id, seq: first_seq.unwrap_or(1).saturating_sub(1), ..self },
            None => self,
        }
    }

    /// Runs until `exit` or the end of input; exit status 0.
    pub fn run(mut self) -> Result<(), String> {
        if std::io::stdin().is_terminal() {
            self.interactive()
        } else {
            let mut input = std::io::stdin().lock();
            let mut line = Vec::new();
            loop {
                line.clear();
                match input.read_until(b'\n', &mut line) {
                    Ok(0) => return Ok(()),
                    // A line that is not UTF-8 still gets its one result.
                    Ok(_) if !self.execute(&String::from_utf8_lossy(&line)) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(format!("cannot read standard input: {e}")),
                }
            }
        }
    }

    fn interactive(&mut self) -> Result<(), String> {
        use rustyline::error::ReadlineError;
        let mut editor = rustyline::Editor::<Completion, rustyline::history::DefaultHistory>::new()
            .map_err(|e| format!("cannot open the terminal: {e}"))?;
        editor.set_helper(Some(Completion));
        let history = std::env::var_os("HOME").map(|home| std::path::Path::new(&home).join(".raft_zmq_history"));
        if let Some(path) = &history {
            let _ = editor.load_history(path);
        }
        println!("raft-zmq shell: talking to {}. Type help for the commands, exit or Ctrl-D to leave.", self.here());
        loop {
            match editor.readline(&format!("raft-zmq {}> ", self.here())) {
                Ok(line) => {
                    let _ = editor.add_history_entry(line.as_str());
                    if !self.execute(&line) {
                        break;
                    }
                }
                // Ctrl-C drops the line being typed, as in a shell.
                Err(ReadlineError::Interrupted) => continue,
                Err(ReadlineError::Eof) => break,
                Err(e) => return Err(format!("cannot read the terminal: {e}")),
            }
        }
        if let Some(path) = &history {
            let _ = editor.save_history(path);
        }
        Ok(())
    }

    fn here(&self) -> String {
        let node = &self.nodes[self.current];
        node.id.map_or_else(|| node.endpoint.clone(), |id| format!("node {id}"))
    }

    /// Runs one line; false once the shell should stop.
    pub fn execute(&mut self, line: &str) -> bool {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return true;
        }
        let Some(words) = shlex::split(line) else {
            self.print_error("bad_request", "unbalanced quotes");
            return true;
        };
        if words.first().is_some_and(|w| w == "help") {
            self.help();
            return true;
        }
        // Commands are spelled as the protocol's ops (add_node) or as the
        // command line's (add-node).
        let command_word = words[0].replace('_', "-");
        let command = match Line::try_parse_from([command_word].into_iter().chain(words[1..].iter().cloned())) {
            Ok(parsed) => parsed.command,
            Err(e) => {
                let text = e.to_string();
                let first = text.lines().next().unwrap_or("cannot parse the command");
                self.print_error("bad_request", first.trim_start_matches("error: "));
                return true;
            }
        };
        match command {
            Command::Exit => return false,
            Command::Op(op) => {
                let write = matches!(op, Op::Put { .. } | Op::Delete { .. } | Op::Cas { .. } | Op::Propose { .. });
                let session = write.then(|| {
                    self.seq += 1;
                    (Some(self.client_id.clone()), Some(self.seq))
                });
                let (client_id, seq) = session.unwrap_or((None, None));
                self.call(&op.into_request(client_id, seq));
            }
            Command::Leader => self.leader(),
            Command::Elect { node } => self.call(&Request::TransferLeader { to: node }),
            Command::Use { node } => self.use_node(node),
        }
        true
    }

    /// Sends `request`, retrying what is safe to retry, and prints the reply.
    /// Errors that say nothing was applied are always retried; a request
    /// that may have applied (no reply, `timeout`) is sent again only when
    /// that cannot apply it twice: a read, or a write with its session.
    fn call(&mut self, request: &Request) {
        let frame = encode_request(request);
        let resendable = match request {
            Request::Write { seq, .. } => seq.is_some(),
            Request::Get { .. } | Request::Status | Request::Log { .. } | Request::Members => true,
            _ => false,
        };
        let started = Instant::now();
        let mut tried_elsewhere = 0;
        loop {
            let endpoint = self.nodes[self.current].endpoint.clone();
            let mut client =
                Client::new(&self.ctx, &endpoint, self.timeout).with_curve((self.curve)(&self.nodes[self.current]));
            let reply = match client.call_raw(&frame) {
                Ok(reply) => reply,
                Err(CallError::NoReply)
                    if resendable && tried_elsewhere + 1 < self.nodes.len() && started.elapsed() < RETRY_FOR =>
                {
                    tried_elsewhere += 1;
                    let was = self.here();
                    self.current = (self.current + 1) % self.nodes.len();
                    eprintln!("({was} does not answer; trying {})", self.here());
                    continue;
                }
                Err(e) => return self.print_error("unreachable", &format!("{endpoint}: {e}")),
            };
            match Reply::decode(&reply, request) {
                Ok(Reply::Error { code, leader, .. })
                    if (nothing_applied(code) || resendable && code == ErrorCode::Timeout)
                        && started.elapsed() < RETRY_FOR =>
                {
                    if let Some(at) = leader.and_then(|id| self.nodes.iter().position(|n| n.id == Some(id))) {
                        self.current = at;
                    }
                    eprintln!("({}; retrying in {} ms)", code.as_str(), RETRY_PAUSE.as_millis());
                    std::thread::sleep(RETRY_PAUSE);
                }
                Ok(decoded) => {
                    self.learn_members(&decoded);
                    let text = if self.json { reply_to_json(&reply) } else { human(&decoded) };
                    return println!("{text}");
                }
                Err(e) => return self.print_error("bad_reply", &e),
            }
        }
    }

    /// Nodes added at run time become reachable with `use`.
    fn learn_members(&mut self, reply: &Reply) {
        let Reply::Members { members } = reply else { return };
        for m in members {
            if !self.nodes.iter().any(|n| n.id == Some(m.id) || n.endpoint == m.client) {
                self.nodes.push(Target::member(m));
            }
        }
    }

    fn leader(&mut self) {
        let rows = status::ask_all(self.nodes.clone(), &*self.curve, self.timeout);
        for row in &rows {
            if let (Ok(s), None) = (&row.status, row.target.id)
                && let Some(node) = self.nodes.iter_mut().find(|n| n.endpoint == row.target.endpoint)
            {
                node.id = Some(s.id);
            }
        }
        if self.json {
            let nodes: Vec<Json> = rows
                .iter()
                .map(|row| match &row.status {
                    Ok(s) => json!({"id": s.id, "role": s.role, "term": s.term, "leader": s.leader,
                                    "leader_contact_ms": s.leader_contact_ms}),
                    Err(e) => json!({"id": row.target.id, "error": e}),
                })
                .collect();
            let leader = leader_of(&rows);
            println!(
                "{}",
                json!({"ok": true, "leader": leader.map(|s| s.id), "term": leader.map(|s| s.term), "nodes": nodes})
            );
            return;
        }
        match leader_of(&rows) {
            Some(s) => println!("leader: node {} in term {}", s.id, s.term),
            None => println!("leader: none known (election in progress?)"),
        }
        for row in &rows {
            match &row.status {
                Ok(s) if s.role == "leader" => println!("  node {}: leader", s.id),
                Ok(s) => {
                    let heard = s.leader_contact_ms.map_or("never heard from a leader".to_string(), |ms| {
                        format!("heard from leader {} {ms} ms ago", s.leader.map_or("?".into(), |l| l.to_string()))
                    });
                    println!("  node {}: {} in term {}, {heard}", s.id, s.role, s.term);
                }
                Err(e) => println!(
                    "  node {}: unreachable ({e})",
                    row.target.id.map_or_else(|| row.target.endpoint.clone(), |id| id.to_string())
                ),
            }
        }
    }

    fn use_node(&mut self, id: NodeId) {
        match self.nodes.iter().position(|n| n.id == Some(id)) {
            Some(at) => {
                self.current = at;
                if self.json {
                    println!("{}", json!({"ok": true, "node": id, "endpoint": self.nodes[at].endpoint}));
                } else {
                    println!("talking to node {id} at {}", self.nodes[at].endpoint);
                }
            }
            None => self.print_error("bad_request", &format!("node {id} is not known (try members first)")),
        }
    }

    fn help(&self) {
        if self.json {
            return println!("{}", json!({"ok": true, "commands": command_names()}));
        }
        println!(
            "\
get KEY                        read KEY (linearizable)
put KEY VALUE                  set KEY (quote values with spaces: put k \"a b\")
delete KEY                     remove KEY
cas KEY VALUE [--expect OLD]   set KEY to VALUE if it is OLD (without --expect: if absent)
propose COMMAND                append an opaque command to the log
status                         this node's role, term, leader and indexes
log [--from N] [--limit N]     committed entries (also: show_log)
members                        the members, voter or learner
leader                         who leads, and when each node last heard from it
elect [N]                      make node N (default: the best follower) the leader now
use N                          talk to node N from now on
snapshot                       have this node snapshot its state now
add_node ID RAFT CLIENT [--learner], remove_node ID, promote_node ID, transfer_leader [--to N]
help, exit"
        );
    }

    fn print_error(&self, code: &str, message: &str) {
        if self.json {
            println!("{}", json!({"ok": false, "error": code, "message": message, "leader": null}));
        } else {
            println!("error {code}: {message}");
        }
    }
}

/// Errors that say the request was not applied, so it may be sent again.
fn nothing_applied(code: ErrorCode) -> bool {
    matches!(code, ErrorCode::NoLeader | ErrorCode::Busy | ErrorCode::ShuttingDown)
}

/// A reply as a person reads it.
fn human(reply: &Reply) -> String {
    use crate::kv::Value;
    let value = |v: &Option<Value>| match v {
        None => "(nil)".to_string(),
        Some(Value::Str(s)) => s.clone(),
        Some(Value::Bin(b)) => format!("(bin) {}", b.iter().map(|x| format!("{x:02x}")).collect::<String>()),
    };
    match reply {
        Reply::Put { index } | Reply::Propose { index } => format!("OK (index {index})"),
        Reply::Delete { index, existed: true } => format!("deleted (index {index})"),
        Reply::Delete { index, existed: false } => format!("not found, nothing deleted (index {index})"),
        Reply::Cas { index, swapped: true, .. } => format!("swapped (index {index})"),
        Reply::Cas { index, swapped: false, value: current } => {
            format!("not swapped (index {index}); current value: {}", value(current))
        }
        Reply::Get { value: v } => value(v),
        Reply::Status(s) => format!(
            "node {} is {} in term {} (leader: {}, vote: {})\n  commit {}, applied {}, log {}..={}, snapshot {}\n  voters {:?}, learners {:?}{}",
            s.id,
            s.role,
            s.term,
            s.leader.map_or("none".into(), |l| l.to_string()),
            s.vote.map_or("none".into(), |v| v.to_string()),
            s.commit_index,
            s.last_applied,
            s.first_log_index,
            s.last_log_index,
            s.snapshot_index,
            s.members,
            s.learners,
            if s.alarms.is_empty() { String::new() } else { format!("\n  alarms: {}", s.alarms.join(", ")) }
        ),
        Reply::Log { entries } if entries.is_empty() => "(no entries)".to_string(),
        Reply::Log { entries } => entries
            .iter()
            .map(|e| format!("{:>6}  term {:<4} {}", e.index, e.term, e.command))
            .collect::<Vec<_>>()
            .join("\n"),
        Reply::Members { members } => members
            .iter()
            .map(|m| {
                let progress = match (m.match_index, m.last_contact_ms) {
                    (Some(matched), Some(ms)) => format!(", match {matched}, heard {ms} ms ago"),
                    (Some(matched), None) => format!(", match {matched}"),
                    _ => String::new(),
                };
                format!("node {} ({}): raft {}, client {}{progress}", m.id, m.role, m.raft, m.client)
            })
            .collect::<Vec<_>>()
            .join("\n"),
        Reply::Snapshot { index } => format!("snapshot taken at index {index}"),
        Reply::Membership { index } => format!("membership changed (entry {index})"),
        Reply::TransferLeader { leader } => format!("node {leader} leads"),
        Reply::SnapshotData { index, total, .. } => format!("snapshot {index} ({total} bytes)"),
        Reply::Error { code, message, .. } => format!("error {}: {message}", code.as_str()),
    }
}

/// Completes the command word.
struct Completion;

impl rustyline::completion::Completer for Completion {
    type Candidate = String;

    fn complete(&self, line: &str, pos: usize, _: &rustyline::Context<'_>) -> rustyline::Result<(usize, Vec<String>)> {
        let typed = &line[..pos];
        if typed.contains(' ') {
            return Ok((pos, Vec::new()));
        }
        Ok((0, command_names().into_iter().filter(|c| c.starts_with(typed)).map(|c| format!("{c} ")).collect()))
    }
}

impl rustyline::hint::Hinter for Completion {
    type Hint = String;
}
impl rustyline::highlight::Highlighter for Completion {}
impl rustyline::validate::Validator for Completion {}
impl rustyline::Helper for Completion {}
