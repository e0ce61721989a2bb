//! The server driven by hand: a lone voter that leads at once, or node 1 of
//! three voters whose peers never answer, so that its writes stay pending.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

use super::*;
use crate::kv::Command;
use crate::raft::{CoreConfig, Entry, HardState, LogStore, LogWrite, MemStore};

/// `MemStore` with snapshot files and a disk that is never full.
#[derive(Default)]
struct TestStore {
    log: MemStore,
    snapshots: BTreeMap<SnapshotMeta, Vec<u8>>,
    saved: Vec<SnapshotMeta>,
    /// Cluster names recorded in the state dir, in order.
    recorded: Vec<u64>,
    /// The disk is short of space (the alarm is raised and a hand-over due).
    full: bool,
    /// Syncs done in the Ready cycle.
    syncs: usize,
}

impl LogStore for TestStore {
    fn log_start(&self) -> SnapshotMeta {
        self.log.log_start()
    }
    fn last_index(&self) -> Index {
        self.log.last_index()
    }
    fn term(&self, index: Index) -> Term {
        self.log.term(index)
    }
    fn entries(&self, lo: Index, hi: Index, max_bytes: usize) -> Vec<Entry> {
        self.log.entries(lo, hi, max_bytes)
    }
    fn memberships(&self) -> Vec<(Index, Membership)> {
        self.log.memberships()
    }
}

impl driver::DurableStore for TestStore {
    type Error = Infallible;
    fn write(&mut self, s: Option<&SnapshotInfo>, hs: Option<&HardState>, e: &[Entry]) -> Result<(), Infallible> {
        self.log.write(s, hs, e)
    }
    fn sync(&mut self) -> Result<(), Infallible> {
        self.syncs += 1;
        Ok(())
    }
}

impl NodeStorage for TestStore {
    fn reserve(&mut self, _: u64) -> Result<(), String> {
        Ok(())
    }
    fn low_on_space(&self) -> bool {
        self.full
    }
    fn check_space(&mut self) -> bool {
        self.full
    }
    fn handed_over(&mut self) {}
    fn disk_status(&self) -> (Vec<String>, u64) {
        (Vec::new(), 0)
    }
    fn snapshot_saved(&mut self, snapshot: SnapshotMeta) -> Result<(), Infallible> {
        self.saved.push(snapshot);
        Ok(())
    }
    fn load_snapshot(&self, snapshot: SnapshotMeta) -> Result<Vec<u8>, String> {
        self.snapshots.get(&snapshot).cloned().ok_or_else(|| "no such snapshot".into())
    }
    fn record_cluster(&mut self, cluster: u64) -> Result<(), Infallible> {
        self.recorded.push(cluster);
        Ok(())
    }
}

type TestServer = Server<TestStore, u32>;

const TIMEOUT: Duration = Duration::from_secs(5);

fn server(voters: u64) -> TestServer {
    server_with(voters, false, false)
}

/// With `curve`, every member has a public key (node `n`'s bytes are all
/// `n`); with `sync_later`, the log's syncs are the runtime's (`Effect::Sync`).
fn server_with(voters: u64, curve: bool, sync_later: bool) -> TestServer {
    server_named(voters, curve, sync_later, 7)
}

/// `named`: the cluster's name as the state dir records it (0: a new
/// cluster, which its first leader names).
fn server_named(voters: u64, curve: bool, sync_later: bool, named: u64) -> TestServer {
    server_identity(voters, curve, sync_later, (named, 7, 0))
}

/// `identity`: the cluster's name as the state dir records it, the
/// fingerprint the node knows (0: a joined node, which learns it), and the
/// fingerprint its first membership carries.
fn server_identity(voters: u64, curve: bool, sync_later: bool, identity: (u64, u64, u64)) -> TestServer {
    let (named, fingerprint, membership_fingerprint) = identity;
    let cfg = CoreConfig {
        id: 1,
        election_ticks: (10, 20),
        heartbeat_ticks: 2,
        max_append_bytes: 1 << 20,
        max_apply_bytes: 1 << 20,
        max_inflight_appends: 2,
        pre_vote: false,
        check_quorum: false,
        seed: 1,
    };
    let keyed = |id| Member { public_key: curve.then(|| key(id)), ..member(id) };
    let members: Vec<Member> = (1..=voters).map(keyed).collect();
    let membership =
        Membership { fingerprint: membership_fingerprint, ..Membership::of_voters(1..=voters, context_of(&members)) };
    let log = MemStore::new(membership, HardState::default(), &[]);
    let raft = Raft::new(cfg, TestStore { log, ..TestStore::default() }, HardState::default(), 0);
    let server_cfg = ServerConfig {
        id: 1,
        request_timeout: TIMEOUT,
        handover_timeout: TIMEOUT,
        snapshot_entries: 1000,
        curve,
        new_cluster_name: 7,
        sync_later,
    };
    Server::new(server_cfg, raft, KvStore::new(), SnapshotMeta::default(), named, fingerprint)
}

/// Runs the Ready cycle; every effect.
fn all_effects(server: &mut TestServer) -> Vec<Effect<u32>> {
    server.process(&mut drop).unwrap();
    server.take_effects()
}

/// Runs the Ready cycle; what was sent, and the replies given, by handle.
fn process(server: &mut TestServer) -> (Vec<Message>, Vec<(u32, Reply)>) {
    let mut sent = Vec::new();
    server.process(&mut |msg| sent.push(msg)).unwrap();
    let replies = server
        .take_effects()
        .into_iter()
        .filter_map(|effect| match effect {
            Effect::Reply(handle, reply) => Some((handle, reply)),
            _ => None,
        })
        .collect();
    (sent, replies)
}

/// A lone voter, leading, its no-op applied.
fn lone_leader() -> TestServer {
    let mut s = server(1);
    elect(&mut s);
    s
}

/// Node 1 of `voters`, leading (node 2 voted for it), its peers silent.
fn leader_of(voters: u64) -> TestServer {
    let mut s = server(voters);
    elect(&mut s);
    s
}

fn elect(s: &mut TestServer) {
    for tick in 1..100 {
        s.tick(Duration::from_millis(tick)).unwrap();
        let (sent, _) = process(s);
        if s.raft.soft_state().role == Role::Leader {
            return;
        }
        if let Some(ask) = sent.first() {
            let vote = Body::RequestVoteReply { granted: true, pre_vote: false };
            s.peer(Message { from: 2, to: 1, term: ask.term, body: vote }, Duration::from_millis(tick));
        }
    }
    panic!("no leader");
}

fn member(id: NodeId) -> Member {
    let (raft, client) = (format!("tcp://127.0.0.1:{}", 7000 + id), format!("tcp://127.0.0.1:{}", 7100 + id));
    Member { id, raft, client, public_key: None }
}

fn put(key: &str, session: Option<(&str, u64)>) -> Request {
    Request::Write {
        command: Command::Put { key: Value::Str(key.into()), value: Value::Str("v".into()) },
        client_id: session.map(|(c, _)| c.to_owned()),
        seq: session.map(|(_, s)| s),
    }
}

fn now() -> Time {
    Duration::from_secs(1)
}

fn code(reply: &Reply) -> &'static str {
    reply.code()
}

#[test]
fn a_write_is_answered_once_its_entry_applies_and_a_retry_gets_the_first_reply_without_a_new_entry() {
    let mut s = lone_leader();
    s.client(put("k", Some(("c", 1))), 10, now());
    let (_, replies) = process(&mut s);
    let [(10, Reply::Put { index })] = replies[..] else { panic!("{replies:?}") };
    let last = s.raft.last_index();
    s.client(put("k", Some(("c", 1))), 11, now());
    assert_eq!(process(&mut s).1, [(11, Reply::Put { index })]);
    assert_eq!(s.raft.last_index(), last, "a decided retry is not appended again");
    s.client(put("k", Some(("c", 0))), 12, now());
    assert_eq!(code(&process(&mut s).1[0].1), "bad_request", "a superseded seq");
}

#[test]
fn a_retry_of_a_pending_write_waits_on_its_entry_and_a_stop_answers_both_with_timeout() {
    let mut s = leader_of(3);
    s.client(put("k", Some(("c", 1))), 10, now());
    s.client(put("j", None), 11, now());
    assert!(process(&mut s).1.is_empty(), "nothing commits without a peer");
    let last = s.raft.last_index();
    s.client(put("k", Some(("c", 1))), 12, now());
    assert!(process(&mut s).1.is_empty());
    assert_eq!(s.raft.last_index(), last, "a pending retry is not appended again");
    s.shut_down().unwrap();
    let replies = process(&mut s).1;
    let mut answered: Vec<(u32, &str)> = replies.iter().map(|(h, r)| (*h, code(r))).collect();
    answered.sort();
    // Each may already be in the log: never shutting_down, which promises nothing applied.
    assert_eq!(answered, [(10, "timeout"), (11, "timeout"), (12, "timeout")]);
}

#[test]
fn a_leader_that_steps_down_answers_its_pending_writes_with_timeout_and_forwards_new_ones() {
    let mut s = leader_of(3);
    s.client(put("k", None), 10, now());
    assert!(process(&mut s).1.is_empty());
    let term = s.raft.soft_state().term + 1;
    let heartbeat =
        Body::AppendEntries { prev_log_index: 0, prev_log_term: 0, entries: vec![], leader_commit: 0, read_seq: 0 };
    s.peer(Message { from: 2, to: 1, term, body: heartbeat }, now());
    let replies = process(&mut s).1;
    assert_eq!(replies.iter().map(|(h, r)| (*h, code(r))).collect::<Vec<_>>(), [(10, "timeout")]);
    s.client(put("k", None), 11, now());
    let effects = s.take_effects();
    let [Effect::Forward { leader: 2, handle: 11, .. }] = &effects[..] else { panic!("not forwarded") };
}

/// Node 1 of three, following node 2 (or, with `leader` false, no one yet).
fn follower(leader: bool) -> TestServer {
    let mut s = server(3);
    let heartbeat =
        Body::AppendEntries { prev_log_index: 0, prev_log_term: 0, entries: vec![], leader_commit: 0, read_seq: 0 };
    if leader {
        s.peer(Message { from: 2, to: 1, term: 1, body: heartbeat }, now());
    }
    process(&mut s);
    assert_eq!(s.raft.soft_state().leader, leader.then_some(2));
    s
}

#[test]
fn a_follower_forwards_what_needs_the_leader_and_answers_the_rest_itself() {
    let mut s = follower(true);
    let get = Request::Get { key: Value::Str("k".into()) };
    let needs_leader =
        [put("k", Some(("c", 1))), get, Request::TransferLeader { to: None }, Request::RemoveNode { id: 3 }];
    for (handle, request) in (10..).zip(needs_leader) {
        s.client(request.clone(), handle, now());
        let effects = s.take_effects();
        let [Effect::Forward { leader: 2, request: sent, handle: h }] = &effects[..] else { panic!("{request:?}") };
        assert_eq!((sent, *h), (&request, handle));
    }
    for (handle, request) in
        [(14, Request::AddNode { member: member(4), voter: true }), (15, Request::PromoteNode { id: 3 })]
    {
        s.client(request, handle, now());
        let effects = s.take_effects();
        assert!(matches!(effects[..], [Effect::Forward { leader: 2, handle: h, .. }] if h == handle), "{handle}");
    }
    s.client(Request::Status, 20, now());
    s.client(Request::Members, 21, now());
    let answered: Vec<(u32, &str)> = process(&mut s).1.iter().map(|(h, r)| (*h, code(r))).collect();
    assert_eq!(answered, [(20, "ok"), (21, "ok")], "answered where asked");
    s.client(Request::Log { from: 1, limit: 10 }, 22, now());
    s.client(Request::SnapshotData { index: None, offset: 0 }, 23, now());
    s.client(Request::Snapshot, 24, now());
    let effects = s.take_effects();
    assert!(!effects.iter().any(|e| matches!(e, Effect::Forward { .. })), "the log and snapshots are this node's own");
    assert!(matches!(effects[..2], [Effect::ReadLog { handle: 22, .. }, Effect::ReadSnapshotFile { handle: 23, .. }]));
}

#[test]
fn a_leader_handing_over_answers_writes_itself_and_forwards_nothing() {
    let mut s = leader_of(3);
    s.client(Request::TransferLeader { to: Some(2) }, 10, now());
    s.client(put("k", None), 11, now());
    let effects = s.take_effects();
    assert!(!effects.iter().any(|e| matches!(e, Effect::Forward { .. })));
    let replies: Vec<(u32, &str)> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Reply(h, r) => Some((*h, code(r))),
            _ => None,
        })
        .collect();
    assert_eq!(replies, [(11, "no_leader")], "nothing applied, no leader named while it hands over");
}

#[test]
fn a_forwarded_request_is_never_forwarded_again_and_without_a_leader_nothing_is() {
    let mut s = follower(true);
    s.forwarded(put("k", None), 10, now());
    let replies = process(&mut s).1;
    let [(10, Reply::Error { code: ErrorCode::NoLeader, leader: Some(2), .. })] = &replies[..] else {
        panic!("{replies:?}")
    };
    let mut s = follower(false);
    s.client(put("k", None), 11, now());
    let replies = process(&mut s).1;
    let [(11, Reply::Error { code: ErrorCode::NoLeader, leader: None, .. })] = &replies[..] else {
        panic!("{replies:?}")
    };
    let mut s = lone_leader();
    s.forwarded(put("k", None), 12, now());
    let replies = process(&mut s).1;
    assert!(matches!(replies[..], [(12, Reply::Put { .. })]), "the leader serves what it is forwarded: {replies:?}");
}

#[test]
fn waiters_past_their_deadline_hear_timeout_and_the_entry_stays_pending_for_a_retry() {
    let mut s = leader_of(3);
    s.client(put("k", Some(("c", 1))), 10, now());
    process(&mut s);
    s.tick(now() + TIMEOUT).unwrap();
    let replies = process(&mut s).1;
    assert_eq!(replies.iter().map(|(h, r)| (*h, code(r))).collect::<Vec<_>>(), [(10, "timeout")]);
    let last = s.raft.last_index();
    s.client(put("k", Some(("c", 1))), 11, now() + TIMEOUT);
    process(&mut s);
    assert_eq!(s.raft.last_index(), last, "the retry waits on the entry still in flight");
}

#[test]
fn too_many_writes_in_flight_get_busy_and_nothing_is_appended() {
    let mut s = leader_of(3);
    for handle in 0..MAX_UNAPPLIED_ENTRIES as u32 {
        s.client(put("k", None), handle, now());
    }
    process(&mut s);
    let last = s.raft.last_index();
    s.client(put("k", None), u32::MAX, now());
    let replies = process(&mut s).1;
    assert_eq!(replies.iter().map(|(h, r)| (*h, code(r))).collect::<Vec<_>>(), [(u32::MAX, "busy")]);
    assert_eq!(s.raft.last_index(), last);
}

#[test]
fn a_read_is_served_once_leadership_is_confirmed_and_the_state_machine_reached_its_index() {
    let mut s = lone_leader();
    s.client(put("k", None), 10, now());
    process(&mut s);
    s.client(Request::Get { key: Value::Str("k".into()) }, 11, now());
    let replies = process(&mut s).1;
    assert_eq!(replies, [(11, Reply::Get { value: Some(Value::Str("v".into())) })]);
}

#[test]
fn the_snapshot_op_is_answered_once_the_image_is_on_disk() {
    let mut s = lone_leader();
    s.client(put("k", None), 10, now());
    process(&mut s);
    s.client(Request::Snapshot, 11, now());
    let effects = s.take_effects();
    let [Effect::SaveSnapshot(job)] = &effects[..] else { panic!("one snapshot to write") };
    let SnapshotJob { meta, membership, image } = &**job;
    assert_eq!((meta.index, image.len()), (s.applied().index, 1));
    assert_eq!(membership, s.raft.membership(), "the membership in force there");
    s.snapshot_saved(*meta).unwrap();
    assert_eq!(process(&mut s).1, [(11, Reply::Snapshot { index: meta.index })]);
    assert_eq!(s.raft.store().saved, [*meta], "the store may compact behind it");
    s.client(Request::Snapshot, 12, now());
    assert_eq!(process(&mut s).1, [(12, Reply::Snapshot { index: meta.index })], "nothing new applied");
}

#[test]
fn the_leaders_own_row_in_members_has_its_last_index_and_no_silence() {
    let s = leader_of(3);
    let infos = s.members();
    let rows: Vec<(NodeId, Option<u64>, Option<u64>)> =
        infos.iter().map(|i| (i.id, i.match_index, i.last_contact_ms)).collect();
    assert_eq!(rows[0], (1, Some(s.raft.last_index()), Some(0)), "like the others: its match index, heard now");
    assert_eq!(rows[2], (3, Some(0), None), "never heard from");
}

/// Node 2 acknowledges everything the leader has, so that its entries commit.
fn acknowledge(s: &mut TestServer) {
    acknowledge_from(s, 2);
    process(s);
}

fn acknowledge_from(s: &mut TestServer, peer: NodeId) {
    let (term, last) = (s.raft.soft_state().term, s.raft.last_index());
    let ack = Body::AppendEntriesReply {
        success: true,
        prev_log_index: last - 1,
        match_index: last,
        conflict_index: 0,
        conflict_term: None,
        read_seq: 0,
    };
    s.peer(Message { from: peer, to: 1, term, body: ack }, now());
}

/// Asynchronous storage writes: the leader's followers alone may commit its
/// entry, but nothing is applied or answered before its own copy is durable.
#[test]
fn a_write_whose_sync_is_left_to_later_is_answered_only_after_it() {
    let mut s = server_with(3, false, true);
    elect(&mut s);
    // The no-op's sync (`process` drops the effect).
    let (last, term) = (s.raft.last_index(), s.raft.soft_state().term);
    s.synced(0, Some(LogWrite { index: last, term, cuts: 0 }));
    acknowledge(&mut s);
    s.client(put("k", None), 10, now());
    s.process(&mut drop).unwrap();
    let effects = s.take_effects();
    let [Effect::Sync { seq, written: Some(LogWrite { index, .. }), .. }] = effects[..] else {
        panic!("one sync, {} effects", effects.len())
    };
    assert_eq!(index, s.raft.last_index());
    acknowledge_from(&mut s, 2);
    acknowledge_from(&mut s, 3);
    assert!(process(&mut s).1.is_empty(), "not answered");
    assert_eq!(s.raft.commit_index(), index, "committed by the followers alone");
    assert_eq!(s.applied().index, index - 1, "not applied before this node's copy is durable");
    let Effect::Sync { written, .. } = &effects[0] else { unreachable!() };
    s.synced(seq, *written);
    assert_eq!(process(&mut s).1, [(10, Reply::Put { index })]);
}

#[test]
fn a_removal_proposes_the_members_without_the_removed_one() {
    let mut s = leader_of(3);
    acknowledge(&mut s);
    s.client(Request::RemoveNode { id: 3 }, 10, now());
    process(&mut s);
    let membership = s.raft.membership();
    assert_eq!(membership.voters, [1, 2].into(), "in force once appended");
    let endpoints: Vec<NodeId> = members_of(membership).iter().map(|m| m.id).collect();
    assert_eq!(endpoints, [1, 2], "the members' endpoints and keys follow the voters");
}

#[test]
fn a_peer_reported_unreachable_is_sent_to_again_at_once() {
    let mut s = leader_of(3);
    s.client(put("k", None), 10, now());
    let to_3 = |sent: &[Message]| sent.iter().filter(|m| m.to == 3).count();
    process(&mut s);
    assert_eq!(to_3(&process(&mut s).0), 0, "one append in flight, unanswered");
    s.peer_unreachable(3);
    assert_eq!(to_3(&process(&mut s).0), 1, "sent again without waiting out the in-flight timeout");
}

#[test]
fn a_failed_snapshot_answers_its_waiters_with_the_last_one_and_the_next_is_tried_again() {
    let mut s = lone_leader();
    s.client(put("k", None), 10, now());
    process(&mut s);
    s.client(Request::Snapshot, 11, now());
    assert!(matches!(s.take_effects()[..], [Effect::SaveSnapshot(_)]));
    s.snapshot_failed();
    assert_eq!(process(&mut s).1, [(11, Reply::Snapshot { index: 0 })], "the last snapshot taken: none");
    s.client(Request::Snapshot, 12, now());
    assert!(matches!(s.take_effects()[..], [Effect::SaveSnapshot(_)]), "no snapshot is being written any more");
}

#[test]
fn a_stopping_leader_hands_over_to_a_caught_up_follower_before_it_may_stop() {
    let mut s = leader_of(3);
    acknowledge(&mut s);
    assert!(!s.may_stop(now()), "not stopping");
    s.begin_stop(now());
    let (sent, _) = process(&mut s);
    assert!(sent.iter().any(|m| m.to == 2 && m.body == Body::TimeoutNow), "{sent:?}");
    assert!(!s.may_stop(now()), "the hand-over is under way");
    assert!(s.may_stop(now() + TIMEOUT), "out of time: it stops anyway");
    let term = s.raft.soft_state().term + 1;
    let heartbeat =
        Body::AppendEntries { prev_log_index: 0, prev_log_term: 0, entries: vec![], leader_commit: 0, read_seq: 0 };
    s.peer(Message { from: 2, to: 1, term, body: heartbeat }, now());
    process(&mut s);
    assert!(s.may_stop(now()), "node 2 leads");
}

#[test]
fn a_stopping_leader_whose_hand_over_fails_stops_without_waiting_out_its_time() {
    let mut s = leader_of(3);
    acknowledge(&mut s);
    s.begin_stop(now());
    process(&mut s);
    // Node 2 never takes over: the core abandons the transfer after an
    // election timeout (10 to 20 ticks), long before the hand-over deadline.
    for tick in 1..=30 {
        s.tick(now() + Duration::from_millis(tick)).unwrap();
        process(&mut s);
    }
    assert_eq!(s.raft.soft_state().role, Role::Leader);
    assert!(s.may_stop(now() + Duration::from_millis(30)), "the transfer failed: no reason to wait");
}

/// What the runtime reads off the server for the client endpoint, the
/// metrics and the log reader.
#[test]
fn the_leader_the_state_machine_and_the_last_snapshot_are_what_the_runtime_reads() {
    let mut s = lone_leader();
    assert_eq!(s.leader(), Some(1));
    s.client(put("k", None), 10, now());
    process(&mut s);
    assert_eq!(s.kv().get(&Value::Str("k".into())), Some(&Value::Str("v".into())));
    assert_eq!(s.last_snapshot(), SnapshotMeta::default());
    s.client(Request::Snapshot, 11, now());
    s.take_effects();
    s.snapshot_saved(s.applied()).unwrap();
    assert_eq!(s.last_snapshot(), s.applied());
}

#[test]
fn a_member_saying_this_node_was_removed_makes_it_stop() {
    let mut s = server(3);
    assert!(!s.removed());
    s.peer(Message { from: 2, to: 1, term: 1, body: Body::Removed }, now());
    process(&mut s);
    assert!(s.removed(), "told by a member, before any entry says so");
}

#[test]
fn reads_in_flight_together_are_each_answered() {
    let mut s = lone_leader();
    s.client(put("k", None), 10, now());
    process(&mut s);
    let get = || Request::Get { key: Value::Str("k".into()) };
    s.client(get(), 11, now());
    s.client(get(), 12, now());
    let mut answered: Vec<u32> = process(&mut s).1.into_iter().map(|(handle, _)| handle).collect();
    answered.sort();
    assert_eq!(answered, [11, 12], "each read has a round of its own");
}

/// Node `id`'s public key, as a config holds it.
fn key(id: NodeId) -> String {
    crate::keys::PublicKey::from_bytes([id as u8; 32]).to_string()
}

/// Node 1 of three, leading with an entry of its term committed.
fn committed_leader(curve: bool) -> TestServer {
    let mut s = server_with(3, curve, false);
    elect(&mut s);
    acknowledge(&mut s);
    s
}

#[test]
fn an_added_node_joins_as_a_learner_with_its_endpoints() {
    let mut s = committed_leader(false);
    s.client(Request::AddNode { member: member(4), voter: true }, 10, now());
    let told: Vec<Vec<Member>> = all_effects(&mut s)
        .into_iter()
        .filter_map(|e| if let Effect::Members(m) = e { Some(m) } else { None })
        .collect();
    let membership = s.raft.membership();
    assert!(membership.learners.contains(&4) && membership.promote.contains(&4), "{membership:?}");
    assert_eq!(members_of(membership).iter().map(|m| m.id).collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert_eq!(told, [members_of(membership)], "the runtime is told, to connect to node 4 at its endpoints");
}

/// A follower syncs what it appends in the Ready cycle and acknowledges it
/// at once: it has nothing to go on with meanwhile (its leader has one
/// AppendEntries out to it), so a thread of its own would only add two
/// hand-offs. Only a leader leaves its syncs to the runtime.
#[test]
fn a_follower_syncs_in_the_ready_cycle_and_acknowledges_at_once() {
    let mut s = server_with(3, false, true);
    let append = |prev: Index, entries: Vec<Entry>| Message {
        from: 2,
        to: 1,
        term: 1,
        body: Body::AppendEntries {
            prev_log_index: prev,
            prev_log_term: prev.min(1),
            entries,
            leader_commit: 0,
            read_seq: 0,
        },
    };
    // Acknowledgements sent, syncs done here, syncs left to the runtime.
    let step = |s: &mut TestServer, m: Message| {
        let synced = s.raft.store().syncs;
        s.peer(m, now());
        let mut sent = Vec::new();
        s.process(&mut |msg| sent.push(msg)).unwrap();
        let later = s.take_effects().iter().filter(|e| matches!(e, Effect::Sync { .. })).count();
        (sent.len(), s.raft.store().syncs - synced, later)
    };
    assert_eq!(step(&mut s, append(0, vec![])), (1, 1, 0), "the new term");
    let entry = Entry { index: 1, term: 1, payload: Payload::Noop };
    assert_eq!(step(&mut s, append(0, vec![entry])), (1, 1, 0), "synced, then acknowledged");
    assert_eq!(step(&mut s, append(1, vec![])), (1, 0, 0), "nothing to sync");
}

/// As etcd: a learner is promoted only once it holds everything committed.
#[test]
fn a_learner_is_promoted_only_once_it_holds_every_committed_entry() {
    let mut s = committed_leader(false);
    s.client(Request::AddNode { member: member(4), voter: false }, 10, now());
    process(&mut s);
    acknowledge(&mut s);
    assert!(s.raft.committed_membership().learners.contains(&4));
    s.client(Request::PromoteNode { id: 4 }, 11, now());
    let (_, replies) = process(&mut s);
    assert_eq!(code(&replies[0].1), "busy", "learner 4 holds nothing yet: {replies:?}");
    acknowledge_from(&mut s, 4);
    process(&mut s);
    assert_eq!(s.raft.progress(4).map(|pr| pr.matched), Some(s.raft.commit_index()), "exactly caught up");
    s.client(Request::PromoteNode { id: 4 }, 12, now());
    assert!(process(&mut s).1.is_empty(), "proposed, answered once it applies");
    assert!(s.raft.membership().voters.contains(&4));
    acknowledge(&mut s);
    acknowledge_from(&mut s, 4);
    let (_, replies) = process(&mut s);
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!((replies[0].0, code(&replies[0].1)), (12, "ok"));
}

/// A member added before a new cluster's name commits would speak for the
/// fingerprint: the leader asks to retry until it knows the name committed,
/// which it does in the step that commits it (no tick needed).
#[test]
fn a_new_cluster_takes_no_member_before_its_name_commits() {
    let mut s = server_named(3, false, false, 0);
    elect(&mut s);
    acknowledge(&mut s); // the leader's no-op: now it may propose the name
    s.tick(now()).unwrap();
    process(&mut s);
    assert_ne!(s.raft.membership().cluster, 0, "the name is proposed");
    s.client(Request::AddNode { member: member(4), voter: true }, 10, now());
    let (_, replies) = process(&mut s);
    let [(10, Reply::Error { code: ErrorCode::Busy, message, .. })] = &replies[..] else { panic!("{replies:?}") };
    assert!(message.contains("has not committed its name"), "{message}");
    acknowledge(&mut s);
    s.client(Request::AddNode { member: member(4), voter: true }, 11, now());
    let (_, replies) = process(&mut s);
    assert!(replies.is_empty(), "proposed once the name committed: {replies:?}");
    assert!(s.raft.membership().learners.contains(&4));
}

#[test]
fn a_key_speaks_for_one_node_and_curve_is_all_or_nothing() {
    let mut s = committed_leader(true);
    let with_key = |id, key| Member { public_key: key, ..member(id) };
    s.client(Request::AddNode { member: with_key(4, Some(key(2))), voter: true }, 10, now());
    s.client(Request::AddNode { member: with_key(4, None), voter: true }, 11, now());
    let replies = process(&mut s).1;
    let codes: Vec<(u32, &str)> = replies.iter().map(|(h, r)| (*h, code(r))).collect();
    assert_eq!(codes, [(10, "bad_request"), (11, "bad_request")], "{replies:?}");
    s.client(Request::AddNode { member: with_key(4, Some(key(4))), voter: true }, 12, now());
    process(&mut s);
    assert!(s.raft.membership().learners.contains(&4), "a key of its own is welcome");
    let mut plain = committed_leader(false);
    plain.client(Request::AddNode { member: with_key(4, Some(key(4))), voter: true }, 13, now());
    assert_eq!(code(&process(&mut plain).1[0].1), "bad_request", "no keys in a cluster without CURVE");
}

#[test]
fn a_committed_removal_is_told_to_the_runtime_once() {
    let mut s = committed_leader(false);
    s.client(Request::RemoveNode { id: 3 }, 10, now());
    process(&mut s);
    let revoked = |effects: Vec<Effect<u32>>| -> Vec<Vec<NodeId>> {
        effects.into_iter().filter_map(|e| if let Effect::Revoked(ids) = e { Some(ids) } else { None }).collect()
    };
    assert!(revoked(all_effects(&mut s)).is_empty(), "in force, not committed");
    acknowledge_from(&mut s, 2);
    assert_eq!(revoked(all_effects(&mut s)), [vec![3]], "in the step that commits it");
    s.tick(now()).unwrap();
    process(&mut s);
    assert!(revoked(all_effects(&mut s)).is_empty(), "once");
}

/// The (name, fingerprint) of each `Identity` effect of one Ready cycle.
fn identities(s: &mut TestServer) -> Vec<(u64, u64)> {
    let identity =
        |e| if let Effect::Identity { named, fingerprint, .. } = e { Some((named, fingerprint)) } else { None };
    all_effects(s).into_iter().filter_map(identity).collect()
}

#[test]
fn a_committed_name_is_recorded_once_and_announced_with_the_fingerprint_known() {
    let mut s = server_identity(3, false, false, (0, 7, 9));
    elect(&mut s);
    acknowledge(&mut s);
    s.tick(now()).unwrap();
    process(&mut s); // the name proposed
    acknowledge_from(&mut s, 2);
    let identities = identities(&mut s);
    assert_eq!(identities.last(), Some(&(7, 7)), "named in the committing step, the own fingerprint kept");
    assert_eq!(s.raft.store().recorded, [7]);
    s.tick(now()).unwrap();
    process(&mut s);
    all_effects(&mut s);
    assert_eq!(s.raft.store().recorded, [7], "recorded once");
}

#[test]
fn a_joined_node_learns_the_fingerprint_from_the_membership_once_it_knows_the_name() {
    let mut s = server_identity(3, false, false, (5, 0, 9));
    let identities = identities(&mut s);
    assert_eq!(identities, [(5, 9)]);
    assert!(s.raft.store().recorded.is_empty(), "the name was recorded already");
}

#[test]
fn a_leader_short_of_space_hands_leadership_to_a_caught_up_follower() {
    let mut s = committed_leader(false);
    acknowledge_from(&mut s, 3);
    process(&mut s);
    s.raft.store_mut().full = true;
    s.tick(now()).unwrap();
    let (sent, _) = process(&mut s);
    assert!(s.raft.transfer_target().is_some(), "handing over");
    assert!(sent.iter().any(|m| matches!(m.body, Body::TimeoutNow)), "{sent:?}");
}

#[test]
fn a_transfer_to_the_leader_itself_is_answered_at_once_and_one_to_another_once_it_leads() {
    let mut s = lone_leader();
    s.client(Request::TransferLeader { to: None }, 10, now());
    assert_eq!(process(&mut s).1, [(10, Reply::TransferLeader { leader: 1 })]);
    let mut s = committed_leader(false);
    s.client(Request::TransferLeader { to: Some(2) }, 11, now());
    assert!(process(&mut s).1.is_empty(), "answered once node 2 leads, not before");
    assert_eq!(s.raft.transfer_target(), Some(2));
    s.tick(now() + Duration::from_secs(3600)).unwrap();
    let replies = process(&mut s).1;
    let [(11, Reply::Error { code: ErrorCode::Timeout, message, .. })] = &replies[..] else { panic!("{replies:?}") };
    assert!(message.contains("did not take over leadership in time"), "{message}");
}

#[test]
fn a_leader_that_knows_the_clusters_name_never_names_it_again() {
    let mut s = committed_leader(false);
    let last = s.raft.last_index();
    s.tick(now()).unwrap();
    process(&mut s);
    assert_eq!((s.raft.membership().cluster, s.raft.last_index()), (0, last), "nothing proposed");
}

#[test]
fn status_tells_the_role_the_log_and_how_long_ago_the_leader_was_heard_from() {
    let s = committed_leader(false);
    let status = s.status();
    assert_eq!((status.role.as_str(), status.leader, status.members), ("leader", Some(1), vec![1, 2, 3]));
    assert_eq!((status.first_log_index, status.last_log_index), (1, s.raft.last_index()));
    assert_eq!(status.leader_contact_ms, Some(0), "a leader's: the majority that keeps it leading, heard just now");
    let mut f = follower(true);
    f.tick(now() + Duration::from_millis(40)).unwrap();
    let status = f.status();
    assert_eq!((status.role.as_str(), status.leader), ("follower", Some(2)));
    assert_eq!(status.leader_contact_ms, Some(40), "a follower's: its leader");
    assert_eq!(follower(false).status().leader_contact_ms, None);
}

/// A write or a membership change whose index another leader's entry took
/// is answered `timeout` once leadership changes (the step down comes
/// first in the Ready), never with the outcome of the entry that took its
/// place.
#[test]
fn a_proposal_whose_index_another_leader_took_never_gets_that_entrys_outcome() {
    let mut s = committed_leader(false);
    s.client(put("k", None), 10, now());
    process(&mut s);
    s.client(Request::AddNode { member: member(4), voter: true }, 11, now());
    process(&mut s);
    let (first, last) = (s.raft.last_index() - 1, s.raft.last_index());
    let theirs = crate::kv::LoggedCommand {
        command: Command::Delete { key: Value::Str("k".into()) },
        client_id: None,
        seq: None,
    };
    let entries = vec![
        Entry { index: first, term: 2, payload: Payload::Command(theirs.encode().into()) },
        Entry { index: last, term: 2, payload: Payload::Membership(s.raft.membership().clone()) },
    ];
    let takeover =
        Body::AppendEntries { prev_log_index: first - 1, prev_log_term: 1, entries, leader_commit: last, read_seq: 0 };
    s.peer(Message { from: 2, to: 1, term: 2, body: takeover }, now());
    let replies = process(&mut s).1;
    let codes: Vec<(u32, &str)> = replies.iter().map(|(h, r)| (*h, code(r))).collect();
    assert_eq!(codes, [(10, "timeout"), (11, "timeout")], "{replies:?}");
    assert_eq!(s.app.applied.index, last, "their entries applied");
}

#[test]
fn a_leadership_counts_once_per_leader_and_term_and_a_campaign_once_per_term() {
    let mut turnover = Turnover::default();
    let soft = |role, term, leader| SoftState { role, term, leader };
    let seen: Vec<(bool, bool)> = [
        soft(Role::Follower, 1, Some(2)),
        soft(Role::Follower, 1, None),
        soft(Role::Follower, 1, Some(2)),
        soft(Role::Candidate, 2, None),
        soft(Role::Leader, 2, Some(1)),
        soft(Role::Candidate, 3, None),
        soft(Role::Follower, 3, Some(3)),
        soft(Role::Candidate, 2, None),
    ]
    .iter()
    .map(|s| turnover.observe(s))
    .collect();
    let expected = [
        (true, false),
        (false, false),
        (false, false),
        (false, true),
        (true, false),
        (false, true),
        (true, false),
        (false, false),
    ];
    assert_eq!(seen, expected);
}

#[test]
fn a_snapshot_is_taken_every_snapshot_entries_applied() {
    let mut s = lone_leader();
    s.app.cfg.snapshot_entries = 3;
    let mut taken = Vec::new();
    for seq in 0..10 {
        s.client(put("k", None), seq, now());
        for effect in all_effects(&mut s) {
            if let Effect::SaveSnapshot(job) = effect {
                taken.push(job.meta.index);
                s.snapshot_saved(job.meta).unwrap();
            }
        }
    }
    assert!(taken.len() >= 3, "{taken:?}");
    assert!(taken.windows(2).all(|w| w[1] - w[0] == 3), "every 3 entries: {taken:?}");
}

#[test]
fn a_process_error_shows_its_cause() {
    let storage: ProcessError<String> = ProcessError::Storage("disk gone".into());
    assert_eq!(storage.to_string(), "disk gone");
    assert_eq!(ProcessError::<String>::StateMachine("bad snapshot".into()).to_string(), "bad snapshot");
}

#[test]
fn a_transfer_is_answered_when_its_target_leads_not_when_another_node_does() {
    let mut s = committed_leader(false);
    s.client(Request::TransferLeader { to: Some(2) }, 11, now());
    process(&mut s);
    let heartbeat = |from, term| Message {
        from,
        to: 1,
        term,
        body: Body::AppendEntries {
            prev_log_index: 0,
            prev_log_term: 0,
            entries: vec![],
            leader_commit: 0,
            read_seq: 0,
        },
    };
    s.peer(heartbeat(3, 2), now());
    assert!(process(&mut s).1.is_empty(), "node 3 leads: not what was asked");
    s.peer(heartbeat(2, 3), now());
    assert_eq!(process(&mut s).1, [(11, Reply::TransferLeader { leader: 2 })]);
}

#[test]
fn a_snapshot_from_the_leader_is_restored_and_counts_as_the_last_one() {
    let mut s = follower(true);
    let mut kv = crate::kv::KvStore::new();
    let command = crate::kv::LoggedCommand {
        command: Command::Delete { key: Value::Str("k".into()) },
        client_id: None,
        seq: None,
    };
    kv.apply(1, &Payload::Command(command.encode().into()));
    let meta = SnapshotMeta { index: 50, term: 1 };
    s.raft.store_mut().snapshots.insert(meta, kv.image().encode());
    let membership = s.raft.membership().clone();
    s.peer(Message { from: 2, to: 1, term: 1, body: Body::InstallSnapshot { snapshot: meta, membership } }, now());
    let restored: Vec<SnapshotMeta> = all_effects(&mut s)
        .into_iter()
        .filter_map(|e| if let Effect::Restored(m) = e { Some(m) } else { None })
        .collect();
    assert_eq!(restored, [meta]);
    let status = s.status();
    assert_eq!((status.last_applied, status.snapshot_index), (50, 50));
}

#[test]
fn a_read_the_leader_could_not_confirm_is_answered_no_leader_at_once() {
    let mut s = committed_leader(false);
    s.client(Request::Get { key: Value::Str("k".into()) }, 10, now());
    assert!(process(&mut s).1.is_empty(), "waiting for a majority to confirm");
    let heartbeat =
        Body::AppendEntries { prev_log_index: 0, prev_log_term: 0, entries: vec![], leader_commit: 0, read_seq: 0 };
    s.peer(Message { from: 2, to: 1, term: 2, body: heartbeat }, now());
    let replies = process(&mut s).1;
    let [(10, Reply::Error { code: ErrorCode::NoLeader, leader: Some(2), .. })] = &replies[..] else {
        panic!("{replies:?}")
    };
}

#[test]
fn new_cluster_names_are_never_zero_and_differ() {
    let names: std::collections::BTreeSet<u64> = (0..100).map(|_| random_cluster_name()).collect();
    assert_eq!(names.len(), 100, "each bootstrap names a new cluster");
    assert!(!names.contains(&0), "0 means no name");
}
