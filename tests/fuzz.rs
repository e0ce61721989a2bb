//! The fuzz targets' short, deterministic run: every input of the checked-in
//! corpus (`fuzz/corpus/<target>/`), then a fixed number of mutations of
//! them from a fixed seed. `fuzz/README.md` says how to fuzz for longer.

mod fuzz_targets;

use std::fs;
use std::path::{Path, PathBuf};

use raft_zmq::kv::{Command, KvStore, LoggedCommand, Value};
use raft_zmq::raft::{Body, Entry, Membership, Message, Payload, SnapshotMeta};
use raft_zmq::storage::snapshot;
use raft_zmq::wire::envelope::{Wire, bootstrap_fingerprint};
use raft_zmq::wire::protocol::{Request, encode_request};

/// Mutated inputs per target on top of the corpus.
const MUTATIONS: usize = 20_000;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join("corpus").join(target)
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    let inputs: Vec<Vec<u8>> = files.iter().map(|f| fs::read(f).unwrap()).collect();
    assert!(!inputs.is_empty(), "{} is empty", dir.display());
    inputs
}

/// xorshift64*: the mutations are the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Flips, overwrites with boundary bytes, inserts, deletes and splices, a
/// few at a time, like a fuzzer's havoc stage.
fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(out.len() + 1);
        let byte = at.min(out.len().saturating_sub(1));
        match rng.below(6) {
            0 if !out.is_empty() => out[byte] ^= 1 << rng.below(8),
            1 if !out.is_empty() => out[byte] = [0, 0x7f, 0x80, 0xc0, 0xff][rng.below(5)],
            2 => out.insert(at, rng.next() as u8),
            3 if at < out.len() => {
                let end = (at + 1 + rng.below(8)).min(out.len());
                out.drain(at..end);
            }
            4 => {
                let from = rng.below(other.len());
                let end = (from + rng.below(32)).min(other.len());
                out.splice(at..at, other[from..end].iter().copied());
            }
            _ => out.truncate(at),
        }
    }
    out
}

fn run(target: &str, fuzz: fn(&[u8])) {
    let inputs = corpus(target);
    for input in &inputs {
        fuzz(input);
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..MUTATIONS {
        let input = &inputs[rng.below(inputs.len())];
        let other = &inputs[rng.below(inputs.len())];
        fuzz(&mutate(&mut rng, input, other));
    }
}

#[test]
fn client_request_decoding_never_panics() {
    run("client_request", fuzz_targets::client_request);
}

#[test]
fn peer_frame_decoding_never_panics_nor_lets_an_invalid_message_through() {
    run("peer_frame", fuzz_targets::peer_frame);
}

#[test]
fn http_request_heads_are_read_alike_however_split_and_never_panic() {
    run("http_request_head", fuzz_targets::http_request_head);
}

#[test]
fn snapshot_files_are_read_and_loaded_without_panicking_and_read_back_the_same() {
    run("snapshot_file", fuzz_targets::snapshot_file);
}

#[test]
fn the_core_keeps_raft_safe_under_any_schedule_and_never_panics_on_forged_messages() {
    run("core_sequence", fuzz_targets::core_sequence);
}

/// Writes the seed corpus: a valid example of everything each target
/// parses. `cargo test --release --test fuzz -- --ignored` rewrites it.
#[test]
#[ignore]
fn write_seed_corpus() {
    let s = |text: &str| Value::Str(text.into());
    let requests = [
        Request::Write { command: Command::Put { key: s("k"), value: s("v") }, client_id: None, seq: None },
        Request::Write {
            command: Command::Put { key: Value::Bin(vec![0, 255]), value: Value::Bin(vec![1; 40]) },
            client_id: Some("c".into()),
            seq: Some(7),
        },
        Request::Write { command: Command::Delete { key: s("k") }, client_id: None, seq: None },
        Request::Write {
            command: Command::Cas { key: s("k"), expect: None, value: s("v") },
            client_id: Some("c".into()),
            seq: Some(1),
        },
        Request::Write { command: Command::Propose { command: "x".into() }, client_id: None, seq: None },
        Request::Get { key: s("k") },
        Request::Status,
        Request::Log { from: 3, limit: 10 },
    ];
    write_seeds("client_request", requests.iter().map(encode_request));

    let cluster =
        bootstrap_fingerprint(&[(0, "tcp://127.0.0.1:7000"), (1, "tcp://127.0.0.1:7001"), (2, "tcp://127.0.0.1:7002")]);
    let wire = Wire::new(1, cluster, 0, 1 << 26);
    let entry = |index, term| Entry { index, term, payload: Payload::Command(vec![index as u8; 3].into()) };
    let bodies = [
        Body::RequestVote { last_log_index: 2, last_log_term: 2, pre_vote: true, transfer: false },
        Body::RequestVoteReply { granted: true, pre_vote: false },
        Body::AppendEntries {
            prev_log_index: 2,
            prev_log_term: 2,
            entries: vec![entry(3, 3), entry(4, 3)],
            leader_commit: 2,
            read_seq: 1,
        },
        Body::AppendEntriesReply {
            success: false,
            prev_log_index: 2,
            match_index: 0,
            conflict_index: 2,
            conflict_term: Some(1),
            read_seq: 1,
        },
        Body::TimeoutNow,
    ];
    let frames = bodies.into_iter().map(|body| wire.seal(&Message { from: 1, to: 0, term: 3, body }).unwrap());
    write_seeds("peer_frame", frames);

    // Rounds of: tick every node, deliver what is queued, propose at every
    // node; with a crash, losses and duplicates; and with forged messages.
    let round = |extra: &[u8]| {
        let mut ops = vec![0, 0, 0, 1, 0, 2];
        ops.extend(std::iter::repeat_n([2, 0], 8).flatten());
        ops.extend([5, 0, 5, 1, 5, 2]);
        ops.extend_from_slice(extra);
        ops
    };
    let schedule = |mode: u8, extra: &[u8]| {
        let mut ops = vec![mode];
        (0..40).for_each(|_| ops.extend(round(extra)));
        ops
    };
    let forged_append = [7, 1, 0, 3, 2, 2, 2, 3, 3, 1, 1];
    let schedules = [
        schedule(0, &[]),
        schedule(2, &[3, 1, 4, 2]),
        schedule(4, &[6, 1]),
        schedule(1, &forged_append),
        schedule(3, &[7, 2, 1, 255, 0, 9, 9, 1, 1]),
    ];
    write_seeds("core_sequence", schedules.into_iter());

    // The first byte: the size of the pieces the rest arrives in.
    let heads: [&[u8]; 6] = [
        b"\x01GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x07GET /cluster?log=5 HTTP/1.1\r\nHost: 127.0.0.1:7200\r\nAccept: */*\r\n\r\n",
        b"\x03HEAD /health HTTP/1.0\n\n",
        b"\x40POST /metrics HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi",
        b"\x02GET /\xff HTTP/1.1\r\n\r\n",
        b"\x05GET / SPDY/3\r\n\r\n",
    ];
    write_seeds("http_request_head", heads.into_iter().map(<[u8]>::to_vec));

    // Snapshot files: empty, and a state machine with keys of both kinds and
    // sessions (a put, and a failed cas holding the current value).
    let meta = SnapshotMeta { index: 9, term: 2 };
    let members = Membership::of_voters([0, 1, 2], br#"[{"id":0}]"#.to_vec());
    let mut kv = KvStore::new();
    let session = |command, index: u64| LoggedCommand { command, client_id: Some("c".into()), seq: Some(index) };
    let writes = [
        Command::Put { key: s("k"), value: Value::Bin(vec![0, 255]) },
        Command::Cas { key: s("k"), expect: None, value: s("v") },
    ];
    for (i, command) in writes.into_iter().enumerate() {
        kv.apply(i as u64 + 1, &Payload::Command(session(command, i as u64 + 1).encode().into()));
    }
    let files = [
        snapshot::encode(meta, &Membership::default(), &KvStore::new().snapshot()),
        snapshot::encode(meta, &members, &kv.snapshot()),
    ];
    write_seeds("snapshot_file", files.into_iter());
}

fn write_seeds(target: &str, seeds: impl Iterator<Item = Vec<u8>>) {
    let dir = corpus_dir(target);
    fs::create_dir_all(&dir).unwrap();
    for (i, seed) in seeds.enumerate() {
        fs::write(dir.join(format!("seed-{i:02}")), seed).unwrap();
    }
}
