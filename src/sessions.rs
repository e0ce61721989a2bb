//! The exactly-once session table (Raft thesis §6.3): for each client, the
//! last write applied and its reply, so a retry gets that reply back instead
//! of being executed again.
//!
//! It is part of the replicated state, so everything here is deterministic:
//! replicas that applied the same entries hold the same table. It is bounded
//! (CONTRACT.md): the [`MAX_SESSIONS`] most recently active clients are kept;
//! the least recently active one (by the log index of its last write) is
//! forgotten first. A forgotten client's writes must be refused rather than
//! applied a second time, so the ids of the last [`MAX_FORGOTTEN`] forgotten
//! clients are remembered as 64-bit hashes (8 bytes each instead of a session).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::protocol::Reply;
use crate::raft::Index;

/// Sessions kept: at least this many of the most recently active clients.
pub const MAX_SESSIONS: usize = 10_000;
/// Forgotten clients whose writes are still recognised and refused.
pub const MAX_FORGOTTEN: usize = 100_000;

/// What the table says about a write of (client_id, seq).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A seq this client has not used yet: execute it.
    New,
    /// The client's latest seq again: a retry, answered with the first reply.
    Retry(Reply),
    /// Older than the client's latest seq: that reply is gone.
    Superseded { latest: u64 },
    /// The client's session was forgotten: whether this write was applied
    /// before cannot be told, so it must not be.
    Forgotten,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Session {
    seq: u64,
    reply: Reply,
    /// Log index of the client's last applied write.
    last_active: Index,
}

/// Part of every snapshot, so it serializes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionTable {
    sessions: BTreeMap<String, Session>,
    /// `last_active` → client: the eviction order. Unique keys, since each
    /// log index applies one write.
    by_activity: BTreeMap<Index, String>,
    /// Hashes of forgotten clients' ids, oldest first, and the same as a set.
    forgotten: VecDeque<u64>,
    forgotten_set: BTreeSet<u64>,
}

impl SessionTable {
    pub fn check(&self, client_id: &str, seq: u64) -> Verdict {
        match self.sessions.get(client_id) {
            Some(session) if seq == session.seq => Verdict::Retry(session.reply.clone()),
            Some(session) if seq < session.seq => Verdict::Superseded { latest: session.seq },
            Some(_) => Verdict::New,
            None if self.forgotten_set.contains(&client_hash(client_id)) => Verdict::Forgotten,
            None => Verdict::New,
        }
    }

    /// Records that `client_id`'s write `seq` was applied at `index` with
    /// `reply`, forgetting the least recently active client if the table is full.
    pub fn record(&mut self, client_id: &str, seq: u64, reply: Reply, index: Index) {
        let session = Session { seq, reply, last_active: index };
        if let Some(old) = self.sessions.insert(client_id.to_owned(), session) {
            self.by_activity.remove(&old.last_active);
        }
        self.by_activity.insert(index, client_id.to_owned());
        if self.sessions.len() > MAX_SESSIONS {
            let (_, oldest) = self.by_activity.pop_first().expect("more sessions than zero");
            self.sessions.remove(&oldest);
            self.forget(client_hash(&oldest));
        }
    }

    fn forget(&mut self, hash: u64) {
        if self.forgotten_set.insert(hash) {
            self.forgotten.push_back(hash);
        }
        if self.forgotten.len() > MAX_FORGOTTEN {
            let expired = self.forgotten.pop_front().expect("more than zero");
            self.forgotten_set.remove(&expired);
        }
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }
}

/// FNV-1a 64: stable across builds and platforms, unlike `DefaultHasher`,
/// so every replica forgets the same hashes.
fn client_hash(client_id: &str) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    client_id.bytes().fold(OFFSET_BASIS, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(PRIME))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(index: Index) -> Reply {
        Reply::Put { index }
    }

    #[test]
    fn verdicts_follow_the_clients_latest_seq() {
        let mut table = SessionTable::default();
        assert_eq!(table.check("c", 3), Verdict::New);
        table.record("c", 3, put(10), 10);
        assert_eq!(table.check("c", 3), Verdict::Retry(put(10)));
        assert_eq!(table.check("c", 2), Verdict::Superseded { latest: 3 });
        assert_eq!(table.check("c", 9), Verdict::New);
        assert_eq!(table.check("d", 1), Verdict::New);
    }

    #[test]
    fn the_least_recently_active_client_is_forgotten_and_its_writes_refused() {
        let mut table = SessionTable::default();
        for i in 0..MAX_SESSIONS as Index {
            table.record(&format!("c{i}"), 1, put(i + 1), i + 1);
        }
        // c0 writes again, so c1 is now the least recently active.
        table.record("c0", 2, put(20_000), 20_000);
        table.record("new", 1, put(20_001), 20_001);
        assert_eq!(table.len(), MAX_SESSIONS);
        assert_eq!(table.check("c1", 1), Verdict::Forgotten);
        assert_eq!(table.check("c1", 2), Verdict::Forgotten, "any seq: it cannot be told apart from a retry");
        assert_eq!(table.check("c0", 2), Verdict::Retry(put(20_000)));
        assert_eq!(table.check("c2", 1), Verdict::Retry(put(3)));
    }

    #[test]
    fn only_the_newest_forgotten_clients_are_remembered() {
        let mut table = SessionTable::default();
        for hash in 0..MAX_FORGOTTEN as u64 + 5 {
            table.forget(hash);
        }
        assert_eq!((table.forgotten.len(), table.forgotten_set.len()), (MAX_FORGOTTEN, MAX_FORGOTTEN));
        assert!(!table.forgotten_set.contains(&4) && table.forgotten_set.contains(&5));
    }

    #[test]
    fn replicas_applying_the_same_writes_hold_the_same_table() {
        let (mut one, mut two) = (SessionTable::default(), SessionTable::default());
        for i in 0..(MAX_SESSIONS as Index + 500) {
            let client = format!("c{}", i % (MAX_SESSIONS as Index + 100));
            one.record(&client, i, put(i), i + 1);
            two.record(&client, i, put(i), i + 1);
        }
        assert_eq!(one, two);
        assert_eq!(one.len(), MAX_SESSIONS);
    }

    #[test]
    fn client_hash_is_pinned() {
        // Changing it would make replicas of different versions disagree.
        assert_eq!(client_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(client_hash("a"), 0xaf63_dc4c_8601_ec8c);
    }
}
