//! Concurrent clients doing random get/put/delete/cas on a few keys through
//! random nodes, recording each operation's invocation, completion and
//! outcome.
//!
//! Every written value is unique, so a read names the write it saw. A write
//! carries a session (client id, seq) and is retried with it on `timeout` or
//! no reply until it gets a definite answer, or until [`RETRY_WINDOW`] runs
//! out and it is recorded as unknown. The cluster applies a session's write
//! at most once, so a retried write is one operation from its first
//! invocation to its final reply.
//!
//! A read is tried once and waits [`READ_TIMEOUT`], longer than any pause
//! plus the node's own request timeout: a read queued at a paused node is
//! then answered when the node wakes, which is when a deposed leader might
//! answer from stale state. A read is either answered or failed, never
//! unknown, so waiting costs no checking power.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use raft_zmq::client::{CallError, Client};
use raft_zmq::kv::{Command, Value};
use raft_zmq::wire::protocol::{ErrorCode, Reply, Request};

use crate::common::Endpoint;

use crate::linearizability::{Op, Outcome};
use crate::nemesis::LONGEST_PAUSE;
use crate::register::{Input, Output};

/// How long one attempt of a write waits for its reply.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a read waits for its reply: longer than the longest pause plus
/// the nodes' 3 s `request_timeout`.
const READ_TIMEOUT: Duration = Duration::from_secs(6);
const _: () = assert!(READ_TIMEOUT.as_millis() > LONGEST_PAUSE.as_millis() + 3000);
/// How long a write is retried before its outcome is left unknown.
pub const RETRY_WINDOW: Duration = Duration::from_secs(10);
/// Pause between retries, so a leaderless cluster is not hammered.
pub const BACKOFF: Duration = Duration::from_millis(50);

/// Every recorded operation, by key; definite failures only counted.
#[derive(Default)]
pub struct History {
    pub by_key: BTreeMap<String, Vec<Op>>,
    pub failed: usize,
}

impl History {
    pub fn record(&mut self, key: &str, op: Option<Op>) {
        match op {
            Some(op) => self.by_key.entry(key.to_string()).or_default().push(op),
            None => self.failed += 1,
        }
    }

    pub fn merge(&mut self, other: History) {
        self.failed += other.failed;
        for (key, ops) in other.by_key {
            self.by_key.entry(key).or_default().extend(ops);
        }
    }

    pub fn ops(&self) -> impl Iterator<Item = &Op> {
        self.by_key.values().flatten()
    }
}

/// One client: REQ sockets to every node (one for reads, one for writes,
/// as they wait differently long) and a session for its writes.
pub struct Session {
    id: usize,
    readers: Vec<Client>,
    writers: Vec<Client>,
    rng: fastrand::Rng,
    seq: u64,
    values: u64,
    t0: Instant,
}

impl Session {
    /// Client `id` of the run with `seed`; its random choices are its own.
    pub fn new(id: usize, endpoints: &[Endpoint], seed: u64, t0: Instant) -> Session {
        let ctx = zmq::Context::new();
        let clients = |timeout| endpoints.iter().map(|e| e.client(&ctx, timeout)).collect();
        let (readers, writers) = (clients(READ_TIMEOUT), clients(ATTEMPT_TIMEOUT));
        let rng = fastrand::Rng::with_seed(seed ^ (id as u64 + 1));
        Session { id, readers, writers, rng, seq: 0, values: 0, t0 }
    }

    /// Connects to every node and waits for an answer, as a client that has
    /// worked for a while has. A request to a node paused later then waits in
    /// its socket buffers and is read as soon as it wakes, rather than after a
    /// fresh connection's handshake, by which time it may have heard of its
    /// successor.
    /// Only `nodes` (those running): a spare slot would answer nothing.
    pub fn connect(&mut self, nodes: &[usize]) {
        for &id in nodes {
            let _ = self.readers[id].call(&Request::Status);
            let _ = self.writers[id].call(&Request::Status);
        }
    }

    /// A value no client has written before.
    pub fn fresh_value(&mut self) -> String {
        self.values += 1;
        format!("{}-{}", self.id, self.values)
    }

    fn now(&self) -> u64 {
        self.t0.elapsed().as_micros() as u64
    }

    /// Runs `input` on `key` through nodes picked at random from `via`: the
    /// recorded op, or `None` when it definitely did not take effect (a
    /// failed read, or a write refused without being appended).
    pub fn perform(&mut self, via: &[usize], key: &str, input: Input) -> Option<Op> {
        let invoked = self.now();
        let outcome = if input.is_write() { self.write(via, key, &input)? } else { self.read(via, key)? };
        Some(Op { client: self.id, input, invoked, outcome })
    }

    fn read(&mut self, via: &[usize], key: &str) -> Option<Outcome> {
        let request = Request::Get { key: Value::Str(key.into()) };
        let node = via[self.rng.usize(..via.len())];
        let output = output(self.readers[node].call(&request)).ok()?;
        Some(Outcome::Returned { at: self.now(), output })
    }

    fn write(&mut self, via: &[usize], key: &str, input: &Input) -> Option<Outcome> {
        self.seq += 1;
        let request = Request::Write {
            command: command(key, input),
            client_id: Some(format!("chaos-{}", self.id)),
            seq: Some(self.seq),
        };
        let deadline = Instant::now() + RETRY_WINDOW;
        let mut maybe_applied = false;
        loop {
            let node = via[self.rng.usize(..via.len())];
            match output(self.writers[node].call(&request)) {
                Ok(output) => return Some(Outcome::Returned { at: self.now(), output }),
                Err(Attempt::NotApplied) => {}
                Err(Attempt::MaybeApplied) => maybe_applied = true,
            }
            if Instant::now() >= deadline {
                return maybe_applied.then_some(Outcome::Unknown);
            }
            thread::sleep(BACKOFF);
        }
    }
}

/// Why an attempt got no usable answer.
enum Attempt {
    /// `no_leader`, `bad_request`, `too_large`, `busy`: nothing was appended.
    NotApplied,
    /// `timeout`, `shutting_down`, no reply, or a socket error: it may apply, now or later.
    MaybeApplied,
}

fn output(reply: Result<Reply, CallError>) -> Result<Output, Attempt> {
    let text = |value: Option<Value>| match value {
        Some(Value::Str(s)) => Some(s),
        Some(Value::Bin(b)) => panic!("a bin value came back for a str write: {b:?}"),
        None => None,
    };
    match reply {
        Ok(Reply::Get { value }) => Ok(Output::Get(text(value))),
        Ok(Reply::Put { .. }) => Ok(Output::Put),
        Ok(Reply::Delete { existed, .. }) => Ok(Output::Delete { existed }),
        Ok(Reply::Cas { swapped, value, .. }) => Ok(Output::Cas { swapped, current: text(value) }),
        Ok(Reply::Error {
            code: ErrorCode::NoLeader | ErrorCode::BadRequest | ErrorCode::TooLarge | ErrorCode::Busy,
            ..
        }) => Err(Attempt::NotApplied),
        Ok(Reply::Error { code: ErrorCode::Timeout | ErrorCode::ShuttingDown, .. })
        | Err(CallError::NoReply | CallError::Zmq(_)) => Err(Attempt::MaybeApplied),
        Ok(other) => panic!("reply of the wrong kind: {other:?}"),
        Err(CallError::BadReply(e)) => panic!("undecodable reply: {e}"),
    }
}

fn command(key: &str, input: &Input) -> Command {
    let key = Value::Str(key.into());
    let value = |v: &String| Value::Str(v.clone());
    match input {
        Input::Put(v) => Command::Put { key, value: value(v) },
        Input::Delete => Command::Delete { key },
        Input::Cas { expect, new } => Command::Cas { key, expect: expect.as_ref().map(value), value: value(new) },
        Input::Get => unreachable!("a get is not a command"),
    }
}

/// The client threads; dropping this stops them without waiting.
pub struct Workload {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<History>>,
}

impl Workload {
    /// `endpoints`: every slot's; `members`: the ones to use, kept current
    /// as members come and go.
    pub fn start(
        endpoints: &[Endpoint],
        members: Arc<Mutex<Vec<usize>>>,
        clients: usize,
        keys: usize,
        seed: u64,
        t0: Instant,
    ) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..clients)
            .map(|id| {
                let session = Session::new(id, endpoints, seed, t0);
                let (stop, members) = (stop.clone(), members.clone());
                thread::spawn(move || client(session, keys, &members, &stop))
            })
            .collect();
        Workload { stop, threads }
    }

    /// Stops the clients and merges their histories.
    pub fn finish(mut self) -> History {
        self.stop.store(true, Ordering::Release);
        let mut history = History::default();
        for thread in self.threads.drain(..) {
            history.merge(thread.join().expect("a client thread panicked"));
        }
        history
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// One client's loop: a random op on a random key, until stopped. A cas
/// expects the value this client last saw, which is often still current.
fn client(mut session: Session, keys: usize, members: &Mutex<Vec<usize>>, stop: &AtomicBool) -> History {
    let mut history = History::default();
    let mut last_seen: HashMap<String, Option<String>> = HashMap::new();
    while !stop.load(Ordering::Acquire) {
        let all = members.lock().unwrap().clone();
        let key = format!("k{}", session.rng.usize(..keys));
        let value = session.fresh_value();
        let input = match session.rng.usize(..10) {
            0..=3 => Input::Get,
            4..=6 => Input::Put(value),
            7..=8 => Input::Cas { expect: last_seen.get(&key).cloned().flatten(), new: value },
            _ => Input::Delete,
        };
        let op = session.perform(&all, &key, input);
        if let Some(Op { input, outcome: Outcome::Returned { output, .. }, .. }) = &op {
            let seen = match (input, output) {
                (_, Output::Get(v)) => v.clone(),
                (Input::Put(v), _) | (Input::Cas { new: v, .. }, Output::Cas { swapped: true, .. }) => Some(v.clone()),
                (_, Output::Cas { current, .. }) => current.clone(),
                _ => None,
            };
            last_seen.insert(key.clone(), seen);
        }
        history.record(&key, op);
    }
    history
}
