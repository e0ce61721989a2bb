//! Helpers for this crate's tests and its integration tests. Not part of the
//! product; public only so that `tests/` can share them.

pub mod network;

use std::net::TcpListener;

use crate::raft::driver::DurableStore;
use crate::raft::{Entry, HardState, Index, Membership, Payload, SnapshotInfo, SnapshotMeta};

/// A port nothing listens on, never handed out before in this process.
///
/// Ports come from below the kernel's ephemeral range (32768+), so neither a
/// `bind(0)` elsewhere nor the source port of some outgoing connection can
/// take one between now and the node's own bind; each test binary starts at
/// its own pid-derived offset and counts up, so no two clusters share a port.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 10_000;
    const SPAN: u32 = 22_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(u32::MAX, std::process::id() * 397 % SPAN, Ordering::SeqCst, Ordering::SeqCst);
    loop {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// What every store behind the core must do alike: the in-memory reference
/// (`MemStore`), the node's sled store and the simulator's disk. Each runs
/// this suite (openraft's `testing/log/suite.rs` is the model), so a
/// behaviour the simulator relies on is one the real store has.
///
/// `store` starts with an empty log after its log start. `stage` makes a
/// snapshot's data available before it is persisted (the node's store
/// adopts a file the transport received); `reopen` is a restart: whatever
/// it returns must read the same.
pub fn log_store_conformance<S>(store: S, mut stage: impl FnMut(&mut S, &SnapshotInfo), mut reopen: impl FnMut(S) -> S)
where
    S: DurableStore,
    S::Error: std::fmt::Debug,
{
    let mut store = store;
    let start = store.log_start();
    let first = store.memberships();
    assert_eq!(store.last_index(), start.index, "a fresh store holds no entries");
    assert_eq!(first.len(), 1, "a fresh store: the membership at its log start only");
    let at = |i: u64| start.index + i;
    let command = |i: u64, term: u64| Entry { index: at(i), term, payload: Payload::Command(vec![i as u8; 10].into()) };
    let joined = Membership { voters: first[0].1.voters.iter().copied().chain([99]).collect(), ..first[0].1.clone() };
    let change = Entry { index: at(2), term: 1, payload: Payload::Membership(joined.clone()) };
    let written = [command(1, 1), change, command(3, 1), command(4, 2), command(5, 2)];
    let hard_state = HardState { term: 2, vote: Some(1), commit: at(3) };
    store.persist(None, Some(&hard_state), &written).expect("persist");

    let holds = |store: &S, entries: &[Entry], memberships: &[(Index, Membership)], what: &str| {
        let last = entries.last().map_or(store.log_start().index, |e| e.index);
        assert_eq!(store.last_index(), last, "{what}: last index");
        for e in entries {
            assert_eq!(store.term(e.index), e.term, "{what}: term of {}", e.index);
        }
        if let (Some(lo), Some(hi)) = (entries.first(), entries.last()) {
            assert_eq!(store.entries(lo.index, hi.index, usize::MAX), entries, "{what}: entries");
            assert_eq!(
                store.entries(lo.index, hi.index, 1),
                entries[..1],
                "{what}: at least one, however small the cap"
            );
        }
        assert_eq!(store.memberships(), memberships, "{what}: memberships");
    };
    let with_change = [first.clone(), vec![(at(2), joined)]].concat();
    holds(&store, &written, &with_change, "appended");
    store = reopen(store);
    holds(&store, &written, &with_change, "appended, after a restart");

    // A new leader's entries replace the log from the first of them on.
    let replaced = [&written[..3], &[command(4, 3)]].concat();
    store.persist(None, None, &replaced[3..]).expect("persist");
    holds(&store, &replaced, &with_change, "a suffix replaced");
    // Cutting off a membership entry forgets that membership.
    let cut = [command(1, 1), command(2, 3)];
    store.persist(None, None, &cut[1..]).expect("persist");
    holds(&store, &cut, &first, "a membership entry cut off");
    store = reopen(store);
    holds(&store, &cut, &first, "cut off, after a restart");

    // A snapshot from the leader: the log starts over after it, with its membership.
    let membership = Membership { voters: [1, 2, 3, 4].into(), ..first[0].1.clone() };
    let snapshot = SnapshotInfo { meta: SnapshotMeta { index: at(10), term: 4 }, membership: membership.clone() };
    stage(&mut store, &snapshot);
    store.persist(Some(&snapshot), None, &[]).expect("persist");
    assert_eq!(store.log_start(), snapshot.meta, "the log starts after the snapshot");
    holds(&store, &[], &[(at(10), membership.clone())], "a snapshot installed");
    let after = [Entry { index: at(11), term: 4, payload: Payload::Noop }];
    store.persist(None, None, &after).expect("persist");
    store = reopen(store);
    assert_eq!(store.log_start(), snapshot.meta, "the snapshot, after a restart");
    holds(&store, &after, &[(at(10), membership)], "entries after a snapshot, after a restart");
}
