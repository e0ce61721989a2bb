//! The exactly-once session table (Raft thesis §6.3): for each client, the
//! last write applied and what it did, so a retry is answered as the first
//! time instead of being executed again.
//!
//! It is part of the replicated state, so everything here is deterministic:
//! replicas that applied the same entries hold the same table. It is bounded
//! (CONTRACT.md): at most the [`MAX_SESSIONS`] most recently active clients,
//! holding at most [`MAX_SESSION_BYTES`] of outcomes (a failed `cas` carries
//! the current value, which a client can make large); past either bound the
//! least recently active client (by the log index of its last write) is
//! forgotten first. A forgotten client's writes must be refused rather than
//! applied a second time, so the ids of the last [`MAX_FORGOTTEN`] forgotten
//! clients are remembered as 64-bit hashes (8 bytes each instead of a session).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use super::Outcome;
use crate::raft::Index;

/// Sessions kept: at least this many of the most recently active clients.
pub const MAX_SESSIONS: usize = 10_000;
/// Forgotten clients whose writes are still recognised and refused.
pub const MAX_FORGOTTEN: usize = 100_000;
/// The sessions' replies and ids take at most about this many bytes.
pub const MAX_SESSION_BYTES: usize = 64 << 20;

/// What the table says about a write of (client_id, seq).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A seq this client has not used yet: execute it.
    New,
    /// The client's latest seq again: a retry, answered as the first time.
    Retry(Outcome),
    /// Older than the client's latest seq: that reply is gone.
    Superseded { latest: u64 },
    /// The client's session was forgotten: whether this write was applied
    /// before cannot be told, so it must not be.
    Forgotten,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Session {
    seq: u64,
    outcome: Outcome,
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
    /// What the sessions take, by [`session_bytes`]: not in snapshots,
    /// counted again on restore.
    #[serde(skip)]
    bytes: usize,
}

impl SessionTable {
    pub fn check(&self, client_id: &str, seq: u64) -> Verdict {
        match self.sessions.get(client_id) {
            Some(session) if seq == session.seq => Verdict::Retry(session.outcome.clone()),
            Some(session) if seq < session.seq => Verdict::Superseded { latest: session.seq },
            Some(_) => Verdict::New,
            None if self.forgotten_set.contains(&client_hash(client_id)) => Verdict::Forgotten,
            None => Verdict::New,
        }
    }

    /// Records that `client_id`'s write `seq` was applied at `index` with
    /// `outcome`, forgetting the least recently active client if the table is full.
    pub fn record(&mut self, client_id: &str, seq: u64, outcome: Outcome, index: Index) {
        let session = Session { seq, outcome, last_active: index };
        self.bytes += session_bytes(client_id, &session.outcome);
        if let Some(old) = self.sessions.insert(client_id.to_owned(), session) {
            self.by_activity.remove(&old.last_active);
            self.bytes -= session_bytes(client_id, &old.outcome);
        }
        self.by_activity.insert(index, client_id.to_owned());
        // The newest session stays, whatever its size.
        while self.sessions.len() > MAX_SESSIONS || (self.bytes > MAX_SESSION_BYTES && self.sessions.len() > 1) {
            let (_, oldest) = self.by_activity.pop_first().expect("more sessions than one");
            let session = self.sessions.remove(&oldest).expect("listed by activity");
            self.bytes -= session_bytes(&oldest, &session.outcome);
            self.forget(client_hash(&oldest));
        }
    }

    /// Counts the bytes again, after the table was read from a snapshot.
    pub fn recount(&mut self) {
        self.bytes = self.sessions.iter().map(|(client_id, session)| session_bytes(client_id, &session.outcome)).sum();
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

/// About what one session takes in memory: its id, its outcome's variable
/// part (a value or a reason) and a fixed overhead.
fn session_bytes(client_id: &str, outcome: &Outcome) -> usize {
    const OVERHEAD: usize = 128;
    let variable = match outcome {
        Outcome::Cas { value: Some(value), .. } => value.as_bytes().len(),
        Outcome::Refused { reason } => reason.len(),
        _ => 0,
    };
    OVERHEAD + client_id.len() + variable
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

    fn put(index: Index) -> Outcome {
        Outcome::Put { index }
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
    fn sessions_holding_large_replies_are_forgotten_past_the_byte_bound_oldest_first() {
        use crate::kv::Value;
        let mut table = SessionTable::default();
        let large = |index| Outcome::Cas { index, swapped: false, value: Some(Value::Bin(vec![7; 1 << 20])) };
        for i in 1..=100 {
            table.record(&format!("c{i}"), 1, large(i), i);
        }
        assert!(table.bytes <= MAX_SESSION_BYTES, "{} bytes", table.bytes);
        assert!(table.len() < 64, "{} sessions of 1 MiB each", table.len());
        assert_eq!(table.check("c1", 1), Verdict::Forgotten, "the oldest went first");
        assert!(matches!(table.check("c100", 1), Verdict::Retry(_)));
        let counted = table.bytes;
        let mut copy = table.clone();
        copy.bytes = 0;
        copy.recount();
        assert_eq!(copy.bytes, counted, "a restored table counts the same");
        // Small sessions replacing large ones give the bytes back.
        for i in 1..=100 {
            table.record(&format!("c{i}"), 2, put(1000 + i), 1000 + i);
        }
        assert_eq!(table.len(), 100);
        assert!(table.bytes < 100 * 256);
    }

    #[test]
    fn client_hash_is_pinned() {
        // Changing it would make replicas of different versions disagree.
        assert_eq!(client_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(client_hash("a"), 0xaf63_dc4c_8601_ec8c);
    }
}
