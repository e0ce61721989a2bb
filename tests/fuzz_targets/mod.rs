//! Fuzz targets: what untrusted bytes reach, each as a function that must
//! never panic on any input. The cargo-fuzz crate in `fuzz/` runs them under
//! libFuzzer for as long as you like; `tests/fuzz.rs` runs their checked-in
//! seed corpus and a fixed number of deterministic mutations in every test
//! run.

#![allow(dead_code)] // each user calls the targets it needs

use std::collections::BTreeMap;

use raft_zmq::http_server::RequestHead;
use raft_zmq::kv::KvStore;
use raft_zmq::raft::{
    Body, CoreConfig, Entry, HardState, LogStore, MemStore, Membership, Message, Payload, Raft, Role, SnapshotMeta,
};
use raft_zmq::storage::snapshot;
use raft_zmq::testing::network::Network;
use raft_zmq::wire::envelope::{Wire, bootstrap_fingerprint};
use raft_zmq::wire::protocol::{decode_request, encode_request};

/// A client request frame, as the client endpoint decodes it. What it
/// accepts reads back the same once encoded again, as a follower encodes
/// the requests it forwards to the leader.
pub fn client_request(data: &[u8]) {
    if let Ok(request) = decode_request(data) {
        assert_eq!(decode_request(&encode_request(&request)), Ok(request), "a forwarded request would change");
    }
}

/// A request head arriving at the HTTP server (the first byte says how big
/// the pieces it arrives in are): reading it never panics, its outcome does
/// not depend on how it was split, and a request let through is a GET or
/// HEAD whose path holds no query.
pub fn http_request_head(data: &[u8]) {
    let Some((&piece, data)) = data.split_first() else { return };
    let whole = RequestHead::default().push(data);
    let mut head = RequestHead::default();
    let in_pieces = data.chunks(usize::from(piece).max(1)).find_map(|piece| head.push(piece));
    assert_eq!(in_pieces, whole, "the outcome depends on how the head arrived");
    if let Some(Ok(request)) = whole {
        assert!(matches!(request.method.as_str(), "GET" | "HEAD") && !request.path.contains('?'), "{request:?}");
    }
}

/// A snapshot file, as a node reads one from its disk, from a backup or
/// from a leader: reading it and loading the state machine in it never
/// panic, and what is accepted reads back the same once written again.
pub fn snapshot_file(data: &[u8]) {
    let decoded = snapshot::decode(data.to_vec());
    // The snapshot the file's header names, when it is damaged elsewhere.
    let at = |from: usize| data.get(from..from + 8).map_or(0, |b| u64::from_be_bytes(b.try_into().expect("8")));
    let claimed =
        SnapshotMeta { index: at(b"raft-zmq snapshot 2\n".len()), term: at(b"raft-zmq snapshot 2\n".len() + 8) };
    let meta = decoded.as_ref().map_or(claimed, |file| file.meta);
    assert_eq!(
        received_in_pieces(data, meta),
        decoded.is_ok(),
        "a snapshot received in pieces is checked otherwise than one read whole: {decoded:?}"
    );
    let Ok(file) = decoded else { return };
    let again = snapshot::decode(snapshot::encode(file.meta, &file.membership, &file.data));
    assert_eq!(again.as_ref(), Ok(&file), "a snapshot file does not read back the same");
    let mut kv = KvStore::new();
    if kv.restore(&file.data).is_ok() {
        let mut copy = KvStore::new();
        copy.restore(&kv.snapshot()).expect("a state machine's own image loads");
        assert_eq!(copy, kv, "a state machine does not read back the same");
    }
}

/// Whether `data`, sent as snapshot `meta` in three pieces, is received:
/// checked as it comes in, without being read back whole.
fn received_in_pieces(data: &[u8], meta: SnapshotMeta) -> bool {
    let dir = std::env::temp_dir().join(format!("raft-zmq-fuzz-staging-{}", std::process::id()));
    let snapshots = snapshot::Snapshots::open(&dir).expect("a staging dir");
    let mut staging = snapshot::Staging::new(snapshots, 0);
    let piece = data.len().div_ceil(3).max(1);
    let mut outcome = Ok(Some(0));
    for (i, chunk) in data.chunks(piece).enumerate() {
        outcome = staging.piece((1, 1), meta, (i * piece) as u64, data.len() as u64, chunk);
    }
    drop(staging);
    let _ = std::fs::remove_dir_all(&dir);
    matches!(outcome, Ok(None))
}

/// A frame arriving on a node's raft endpoint, as a request and as a reply.
/// Whatever the wire layer accepts must be a message the core can take.
pub fn peer_frame(data: &[u8]) {
    let cluster =
        bootstrap_fingerprint(&[(0, "tcp://127.0.0.1:7000"), (1, "tcp://127.0.0.1:7001"), (2, "tcp://127.0.0.1:7002")]);
    let wire = Wire::new(0, cluster, 0, 1 << 26);
    let request = wire.open_request(data).map(|request| request.message);
    for message in [request, wire.open_reply(data, 1, cluster).map(|reply| reply.message)].into_iter().flatten() {
        assert!(message.validate().is_ok(), "the wire accepted an invalid message: {message:?}");
        let hard_state = HardState { term: 2, vote: None, commit: 1 };
        let mut net = Network::default();
        net.start(Raft::new(config(0), MemStore::new(members(), hard_state, &log(&[1, 2])), hard_state, 0));
        net.step(message);
    }
}

/// A 3-node cluster of the real core driven by `data`: ticks, deliveries,
/// losses, duplicates, reorders, proposals, crashes and log compactions
/// (so snapshots are sent), and, in hostile
/// mode (first byte odd), messages forged from the input. Honest runs must
/// keep Raft's safety properties; hostile runs must never panic nor leave a
/// node whose log could not be stored (terms decreasing, commit past the end).
pub fn core_sequence(data: &[u8]) {
    let Some((&mode, ops)) = data.split_first() else { return };
    let hostile = mode % 2 == 1;
    let mut sim = Sim::new();
    let mut bytes = ops.iter().copied();
    while let Some(op) = bytes.next() {
        let arg = bytes.next().unwrap_or(0);
        let node = u64::from(arg % 3);
        match op % 8 {
            0 | 1 => sim.tick(node, arg >= 0x80),
            2 => sim.deliver(usize::from(arg)),
            3 => sim.drop_message(usize::from(arg)),
            4 => sim.duplicate(usize::from(arg)),
            5 => sim.propose(node, arg),
            6 => sim.restart(node),
            _ if hostile => {
                let forged = forge(node, &mut bytes);
                sim.step(forged);
            }
            _ => sim.deliver(sim.net.queue.len().saturating_sub(1)),
        }
        sim.check(!hostile);
    }
}

/// Voters 0, 1 and 2.
fn members() -> Membership {
    Membership::of_voters(0..3, vec![])
}

fn config(id: u64) -> CoreConfig {
    CoreConfig {
        id,
        election_ticks: (4, 8),
        heartbeat_ticks: 1,
        max_append_bytes: 256,
        max_apply_bytes: 256,
        max_inflight_appends: 2,
        pre_vote: id != 2,
        check_quorum: id != 1,
        seed: id,
    }
}

fn log(terms: &[u64]) -> Vec<Entry> {
    terms.iter().enumerate().map(|(i, &term)| Entry { index: i as u64 + 1, term, payload: Payload::Noop }).collect()
}

/// A message from `to + 1` to `to` with fields taken from the input, small
/// numbers mostly so that they land near the real log.
fn forge(to: u64, bytes: &mut impl Iterator<Item = u8>) -> Message {
    let mut next = || bytes.next().unwrap_or(0);
    let number = |next: &mut dyn FnMut() -> u8| match next() {
        255 => u64::MAX,
        254 => u64::MAX / 2,
        n => u64::from(n % 16),
    };
    let from = (to + 1 + u64::from(next() % 2)) % 3;
    let term = number(&mut next);
    let body = match next() % 6 {
        0 => Body::RequestVote {
            last_log_index: number(&mut next),
            last_log_term: number(&mut next),
            pre_vote: next() % 2 == 0,
            transfer: next() % 2 == 0,
        },
        1 => Body::RequestVoteReply { granted: next() % 2 == 0, pre_vote: next() % 2 == 0 },
        2 => {
            let prev_log_index = number(&mut next);
            let count = u64::from(next() % 4);
            let entries = (0..count)
                .map(|i| Entry {
                    index: prev_log_index.wrapping_add(i + 1),
                    term: number(&mut next),
                    payload: Payload::Noop,
                })
                .collect();
            Body::AppendEntries {
                prev_log_index,
                prev_log_term: number(&mut next),
                entries,
                leader_commit: number(&mut next),
                read_seq: number(&mut next),
            }
        }
        3 => Body::AppendEntriesReply {
            success: next() % 2 == 0,
            prev_log_index: number(&mut next),
            match_index: number(&mut next),
            conflict_index: number(&mut next),
            conflict_term: (next() % 2 == 0).then(|| number(&mut next)),
            read_seq: number(&mut next),
        },
        4 => Body::TimeoutNow,
        _ => {
            // Any voters among 0..4, so forged snapshots may change who votes.
            let voters: Vec<u64> = (0..4).filter(|_| next() % 2 == 0).collect();
            Body::InstallSnapshot {
                snapshot: SnapshotMeta { index: number(&mut next), term: number(&mut next) },
                membership: Membership::of_voters(voters, vec![]),
            }
        }
    };
    Message { from, to, term, body }
}

/// A 3-node cluster on the shared test network, with the faults the input
/// asks for.
struct Sim {
    net: Network,
    leaders: BTreeMap<u64, u64>,
    /// Every entry any node applied, by index: all must agree.
    applied: BTreeMap<u64, Entry>,
    proposals: u64,
}

impl Sim {
    fn new() -> Sim {
        let mut net = Network::default();
        for id in 0..3 {
            let store = MemStore::new(members(), HardState::default(), &[]);
            net.start(Raft::new(config(id), store, HardState::default(), 0));
        }
        Sim { net, leaders: BTreeMap::new(), applied: BTreeMap::new(), proposals: 0 }
    }

    /// Bounds the work per input: a real network loses messages too.
    fn trim(&mut self) {
        while self.net.queue.len() > 64 {
            self.net.queue.pop_front();
        }
    }

    /// A tick, and with `compact`, a compaction of the log up to what the
    /// node applied, as the shell does after a snapshot.
    fn tick(&mut self, id: u64, compact: bool) {
        let raft = self.net.core_mut(id);
        raft.tick();
        if compact {
            let applied = raft.handed_to_apply();
            raft.store_mut().compact(applied);
        }
        self.net.process(id);
        self.trim();
    }

    fn step(&mut self, message: Message) {
        self.net.step(message);
        self.trim();
    }

    fn deliver(&mut self, at: usize) {
        if let Some(message) = self.net.take(at) {
            self.step(message);
        }
    }

    fn drop_message(&mut self, at: usize) {
        self.net.take(at);
    }

    fn duplicate(&mut self, at: usize) {
        if let Some(message) = self.net.queue.get(at % self.net.queue.len().max(1)).cloned() {
            self.net.queue.push_back(message);
        }
    }

    fn propose(&mut self, id: u64, arg: u8) {
        self.proposals += 1;
        let command = [self.proposals.to_be_bytes().as_slice(), &[arg]].concat();
        let _ = self.net.core_mut(id).propose(command);
        self.net.process(id);
        self.trim();
    }

    /// A crash keeps only what was persisted.
    fn restart(&mut self, id: u64) {
        let store = self.net.nodes.remove(&id).expect("member").into_store();
        let hard_state = store.hard_state;
        // The state machine restarts from the snapshot the log starts after.
        let applied = store.log_start().index;
        self.net.start(Raft::new(config(id), store, hard_state, applied));
        self.net.queue.retain(|m| m.from != id);
    }

    fn check(&mut self, honest: bool) {
        for (id, raft) in &self.net.nodes {
            let seen = &self.net.seen[id];
            assert!(raft.commit_index() <= raft.last_index(), "node {id}: commit past the last entry");
            let store = raft.store();
            let (first, last) = (store.log_start().index + 1, store.last_index());
            let disk = if first > last { vec![] } else { store.entries(first, last, usize::MAX) };
            let mut prev = store.log_start().term;
            for e in &disk {
                assert!(e.term >= prev, "node {id}: terms decrease on disk");
                prev = e.term;
            }
            if !honest {
                continue;
            }
            let soft = raft.soft_state();
            if soft.role == Role::Leader {
                let leader = *self.leaders.entry(soft.term).or_insert(*id);
                assert_eq!(leader, *id, "two leaders in term {}", soft.term);
            }
            for entry in &seen.applied {
                let agreed = self.applied.entry(entry.index).or_insert_with(|| entry.clone());
                assert_eq!(agreed, entry, "node {id} applied another entry at {}", entry.index);
            }
        }
    }
}
