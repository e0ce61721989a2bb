//! The safety properties of Raft (paper Figure 3) and of the client
//! contract, checked incrementally as the run produces facts, so checking
//! after every step costs a few map lookups rather than a scan of all logs.
//!
//! Linearizability of the key-value history, per key: every write takes
//! effect at exactly one log index, so replaying the committed log on a
//! model register per key (`WriteResult::of`) gives the value each key held
//! after every index. An acknowledged write must have taken effect at
//! the index its reply names, with the result the model gives there (a
//! cas's `swapped` and current value, a delete's `existed`); a write must
//! take effect after every index already acknowledged or read on its key
//! when it was invoked; a read must return what the key held at some index
//! from the newest one acknowledged or read before its invocation up to the
//! last committed one at its completion. Each op is then placed at the
//! lowest such index, which later ops must not precede.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use raft_zmq::raft::{Entry, Index, NodeId, Payload, SnapshotMeta, Term};
use raft_zmq::wire::protocol::ErrorCode;

use super::history::OpId;
use super::register::{Held, Key, Write, WriteResult};
use super::schedule::Time;

#[derive(Debug)]
pub struct Violation {
    pub rule: &'static str,
    pub detail: String,
}

pub type Check = Result<(), Violation>;

fn violated(rule: &'static str, detail: String) -> Check {
    Err(Violation { rule, detail })
}

/// An entry some node applied, hence committed.
struct Committed {
    term: Term,
    payload: Payload,
    /// Lowest current term of any node when it applied the entry. The entry
    /// was committed in a term no higher, so every leader of a later term
    /// must hold it.
    seen_in_term: Term,
}

#[derive(Default)]
pub struct Checker {
    /// Election safety: the leader of every term, over the whole run.
    leaders: BTreeMap<Term, NodeId>,
    /// Log matching, by induction: an (index, term) pair names one payload
    /// and one predecessor term for the whole run, hence one whole prefix.
    entries: HashMap<(Index, Term), (Payload, Term)>,
    /// State machine safety: what was applied at each index (`[i - 1]`).
    committed: Vec<Committed>,
    /// The voters of the newest committed membership entry.
    voters: Option<BTreeSet<NodeId>>,
    /// Last index each node applied in its current life.
    applied: BTreeMap<NodeId, Index>,
    /// Exactly once: the index where each write (by value) first applied,
    /// and when.
    first_applied: HashMap<OpId, (Index, Time)>,
    /// Every attempt at each write (by value: the write and its retries),
    /// with the time it was sent.
    attempts: HashMap<OpId, Vec<(OpId, Time)>>,
    /// Attempts answered with a code that promises nothing was applied.
    refused: HashSet<OpId>,
    /// Durability: the term of every write a client was told succeeded.
    acked: BTreeMap<Index, Term>,
    /// Linearizability, per key: (completion time, index where the op was
    /// placed) of acknowledged writes and served reads, in completion
    /// order, with the running maximum of the index.
    observed: BTreeMap<Key, Vec<(Time, Index, Index)>>,
    /// The model registers, replayed from the committed log up to `modelled`.
    registers: HashMap<Key, Register>,
    modelled: Index,
    /// What each write that took effect did there, by the model's rules.
    effects: HashMap<OpId, (Index, WriteResult)>,
}

/// One key's model: what it held after each index that changed it.
struct Register {
    /// (index, what the key holds from there on), from `(0, None)`.
    changes: Vec<(Index, Held)>,
    /// Where in `changes` each value was stored.
    stored: HashMap<OpId, usize>,
}

impl Default for Register {
    fn default() -> Register {
        Register { changes: vec![(0, None)], stored: HashMap::new() }
    }
}

impl Register {
    /// The lowest index from `lo` up to `hi` after which the key held
    /// `held`: a value from where it was stored (once) until the next
    /// change; nothing from any change that emptied the key (or from 0).
    fn lowest_holding(&self, held: Held, lo: Index, hi: Index) -> Option<Index> {
        let mut at = match held {
            Some(value) => *self.stored.get(&value)?,
            None => self.changes.partition_point(|&(index, _)| index <= lo) - 1,
        };
        while let Some(&(start, holds)) = self.changes.get(at).filter(|&&(start, _)| start <= hi) {
            let end = self.changes.get(at + 1).map_or(Index::MAX, |&(index, _)| index);
            if holds == held && end > lo {
                return Some(start.max(lo));
            }
            if held.is_some() {
                return None;
            }
            at += 1;
        }
        None
    }
}

impl Checker {
    /// `log` is the node's durable log after `start`, which its snapshot covers.
    pub fn became_leader(&mut self, node: NodeId, term: Term, start: SnapshotMeta, log: &[Entry]) -> Check {
        if let Some(&other) = self.leaders.get(&term).filter(|&&other| other != node) {
            return violated("election safety", format!("nodes {other} and {node} both led term {term}"));
        }
        self.leaders.insert(term, node);
        // Entries before the snapshot are held by Log Matching if its last one is.
        let from = start.index.saturating_sub(1) as usize;
        for (i, c) in self.committed.iter().enumerate().skip(from).filter(|(_, c)| c.seen_in_term < term) {
            let index = i as Index + 1;
            let held = if index == start.index {
                Some(start.term)
            } else {
                log.get((index - start.index - 1) as usize).map(|e| e.term)
            };
            if held != Some(c.term) {
                return violated(
                    "leader completeness",
                    format!(
                        "node {node} leads term {term} but holds term {held:?} at index {} where term {} was committed",
                        i + 1,
                        c.term
                    ),
                );
            }
        }
        Ok(())
    }

    pub fn leader_terms(&self) -> usize {
        self.leaders.len()
    }

    /// `log` is a node's durable log after `start`, of which `from..` was
    /// just written.
    pub fn persisted(&mut self, node: NodeId, start: SnapshotMeta, log: &[Entry], from: Index) -> Check {
        let offset = |index: Index| (index - start.index - 1) as usize;
        for e in &log[offset(from)..] {
            let prev_term = if e.index == start.index + 1 { start.term } else { log[offset(e.index) - 1].term };
            let (payload, prev) =
                self.entries.entry((e.index, e.term)).or_insert_with(|| (e.payload.clone(), prev_term));
            if *payload != e.payload || *prev != prev_term {
                return violated(
                    "log matching",
                    format!(
                        "node {node} stores {e:?} after term {prev_term}; another log had {payload:?} after term {prev} there"
                    ),
                );
            }
        }
        Ok(())
    }

    pub fn applied(&mut self, node: NodeId, node_term: Term, e: &Entry) -> Check {
        let last = self.applied.entry(node).or_default();
        if e.index != *last + 1 {
            return violated("state machine safety", format!("node {node} applied index {} after {}", e.index, last));
        }
        *last = e.index;
        if let Some(&term) = self.acked.get(&e.index).filter(|&&t| t != e.term) {
            return violated(
                "durability",
                format!("node {node} applied {e:?} over the acknowledged write of term {term}"),
            );
        }
        match self.committed.get_mut(e.index as usize - 1) {
            None => {
                self.committed.push(Committed { term: e.term, payload: e.payload.clone(), seen_in_term: node_term });
                if let Payload::Membership(membership) = &e.payload {
                    self.membership_committed(e.index, &membership.voters)?;
                }
            }
            Some(c) if c.term != e.term || c.payload != e.payload => {
                return violated(
                    "state machine safety",
                    format!("node {node} applied {e:?}; another node applied {:?} of term {}", c.payload, c.term),
                );
            }
            Some(c) => c.seen_in_term = c.seen_in_term.min(node_term),
        }
        Ok(())
    }

    /// One change at a time: successive memberships differ by one voter at
    /// most, so a majority of the old voters and one of the new always
    /// share a voter (thesis §4.1), and no two leaders can arise in a term.
    fn membership_committed(&mut self, index: Index, voters: &BTreeSet<NodeId>) -> Check {
        if let Some(previous) = self.voters.replace(voters.clone())
            && previous.symmetric_difference(voters).count() > 1
        {
            return violated(
                "single-server changes",
                format!("membership entry {index} has voters {voters:?} after {previous:?}: more than one changed"),
            );
        }
        Ok(())
    }

    /// Exactly-once: a write (a session's seq) takes effect at one index only,
    /// on every node, however often retries put it in the log; an entry is
    /// skipped as a duplicate (`"dup": true`) exactly when its write took
    /// effect at an earlier index. A session-less write is sent again only
    /// after an answer that promises nothing applied, so it too takes effect
    /// once at most.
    pub fn executed(
        &mut self,
        node: NodeId,
        index: Index,
        (value, write): (OpId, Write),
        duplicate: bool,
        now: Time,
    ) -> Check {
        let (first, _) = *self.first_applied.entry(value).or_insert((index, now));
        if !duplicate && first != index {
            return violated(
                "exactly once",
                format!("node {node} applied write {value} at {index}; it was applied at {first} before"),
            );
        }
        if duplicate && first >= index {
            return violated(
                "exactly once",
                format!(
                    "node {node} skipped entry {index} as a duplicate of write {value}, which never took effect before"
                ),
            );
        }
        self.not_applied_unless_possible(value)?;
        if index > self.modelled {
            self.modelled = index;
            if !duplicate {
                return self.take_effect(index, value, write);
            }
        }
        Ok(())
    }

    /// Write `value` takes effect at `index`, the first time any node
    /// applies that index: on the model, and after everything on its key
    /// that completed before the write was invoked.
    fn take_effect(&mut self, index: Index, value: OpId, write: Write) -> Check {
        let invoked = self.attempts[&value][0].1;
        let newest = self.newest_before(write.key, invoked);
        if newest >= index {
            return violated(
                "linearizability",
                format!(
                    "write {value} {write:?} invoked at {invoked}us took effect at {index}, but index {newest} \
                     of {:?} was acknowledged or read before it was invoked",
                    write.key
                ),
            );
        }
        let register = self.registers.entry(write.key).or_default();
        let mut held = register.changes.last().expect("from (0, None)").1;
        let effect = WriteResult::of(write.action, &mut held, value);
        if Some(held) != register.changes.last().map(|&(_, h)| h) {
            if held == Some(value) {
                register.stored.insert(value, register.changes.len());
            }
            register.changes.push((index, held));
        }
        self.effects.insert(value, (index, effect));
        Ok(())
    }

    /// The newest index placed on `key` by an op completed before `at`.
    fn newest_before(&self, key: Key, at: Time) -> Index {
        let history = self.observed.get(&key).map_or(&[][..], Vec::as_slice);
        let before = history.partition_point(|&(completed, _, _)| completed < at);
        before.checked_sub(1).map_or(0, |i| history[i].2)
    }

    /// The index where write `value` took effect, once some node applied it.
    pub fn first_applied(&self, value: OpId) -> Option<Index> {
        self.first_applied.get(&value).map(|&(index, _)| index)
    }

    /// A client sent write `value` (for the first time, or again as
    /// `attempt`, a retry in the same session).
    pub fn write_sent(&mut self, value: OpId, attempt: OpId, now: Time) {
        self.attempts.entry(value).or_default().push((attempt, now));
    }

    /// An attempt at write `value` failed with `code`. `no_leader`,
    /// `shutting_down`, `busy`, `forbidden`, `bad_request` and `too_large`
    /// promise that the attempt applied nothing; `timeout` that it may have.
    pub fn write_failed(&mut self, value: OpId, attempt: OpId, code: ErrorCode) -> Check {
        if code != ErrorCode::Timeout {
            self.refused.insert(attempt);
        }
        self.not_applied_unless_possible(value)
    }

    /// A write that took effect must owe it to an attempt sent before, and
    /// not told that it applied nothing.
    fn not_applied_unless_possible(&self, value: OpId) -> Check {
        let Some(&(index, at)) = self.first_applied.get(&value) else { return Ok(()) };
        let attempts = self.attempts.get(&value).map_or(&[][..], Vec::as_slice);
        let sent_before = || attempts.iter().filter(|&&(_, sent)| sent <= at);
        if sent_before().all(|(attempt, _)| self.refused.contains(attempt)) {
            let refused: Vec<OpId> = sent_before().map(|&(attempt, _)| attempt).collect();
            return violated(
                "no phantom writes",
                format!(
                    "write {value} took effect at {index}, but its attempts {refused:?} were all told nothing applied"
                ),
            );
        }
        Ok(())
    }

    /// A node's state machine started over from `snapshot`, which must hold
    /// what was committed: its last entry is one that was applied.
    pub fn restored(&mut self, node: NodeId, snapshot: SnapshotMeta) -> Check {
        self.applied.insert(node, snapshot.index);
        match self.committed.get(snapshot.index as usize - 1) {
            Some(c) if c.term != snapshot.term => violated(
                "state machine safety",
                format!("node {node} installed snapshot {snapshot:?}; term {} was committed there", c.term),
            ),
            None => violated("state machine safety", format!("node {node} installed {snapshot:?}, past any commit")),
            Some(_) => Ok(()),
        }
    }

    /// A node lost its state machine and will re-apply from index 1.
    pub fn restarted(&mut self, node: NodeId) {
        self.applied.remove(&node);
    }

    /// A client was told its write `value` of `key` was applied at `index`
    /// (by the node that answered, which applied it: its term is known) and
    /// did `effect` there. A retry, too, must hear where the write first
    /// took effect and what it did.
    pub fn write_acked(&mut self, key: Key, value: OpId, index: Index, effect: WriteResult, now: Time) -> Check {
        if self.first_applied(value) != Some(index) {
            return violated(
                "exactly once",
                format!("write {value} was acknowledged at {index}; it took effect at {:?}", self.first_applied(value)),
            );
        }
        let model = self.effects.get(&value).map(|&(_, effect)| effect);
        if model != Some(effect) {
            return violated(
                "linearizability",
                format!(
                    "write {value} of {key:?} was answered {effect:?} at {index}; the log applied in order \
                     gives {model:?} there"
                ),
            );
        }
        let term = self.committed[index as usize - 1].term;
        self.acked.insert(index, term);
        self.observe(key, now, index);
        Ok(())
    }

    /// A read invoked at `invoked` and served `now` must return what `key`
    /// held at some index between the newest one acknowledged or read
    /// before `invoked` and the last one committed.
    pub fn read_served(&mut self, key: Key, invoked: Time, now: Time, held: Held) -> Check {
        let newest = self.newest_before(key, invoked);
        let committed = self.committed.len() as Index;
        let register = self.registers.entry(key).or_default();
        let Some(index) = register.lowest_holding(held, newest, committed) else {
            let stored = held.and_then(|value| register.stored.get(&value)).map(|&at| register.changes[at]);
            return violated(
                "linearizability",
                format!(
                    "read of {key:?} invoked at {invoked}us returned {held:?} (stored at {stored:?}), which {key:?} \
                     held at no index from {newest} (acknowledged or read before) to {committed} (committed)"
                ),
            );
        };
        self.observe(key, now, index);
        Ok(())
    }

    fn observe(&mut self, key: Key, now: Time, index: Index) {
        let history = self.observed.entry(key).or_default();
        let newest = history.last().map_or(index, |&(_, _, newest)| newest.max(index));
        history.push((now, index, newest));
    }
}
