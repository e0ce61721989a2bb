//! A linearizability checker for one register's history: the Wing & Gong
//! search with Lowe's memoization, the algorithm of Knossos and Porcupine.
//!
//! The search walks the history's call and return events in time order. At a
//! call it tries to linearize that operation next (apply it to the model and
//! check its output); at a return whose operation is not yet linearized it
//! backtracks. A (set of linearized operations, model state) pair already
//! explored is never explored again, which keeps histories with a handful of
//! concurrent clients cheap.
//!
//! Histories are checked key by key: linearizability is compositional, so
//! the whole store is linearizable exactly when every key is.

use std::collections::HashSet;
use std::fmt;

use crate::register::{Input, Output, State};

/// One operation as a client saw it. Times are microseconds since the run
/// started, from one monotonic clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    pub client: usize,
    pub input: Input,
    pub invoked: u64,
    pub outcome: Outcome,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The cluster answered `output`; the operation took effect exactly once
    /// between `invoked` and `at`.
    Returned { at: u64, output: Output },
    /// A write whose reply never came or was `timeout`: it took effect at
    /// most once, at any point after `invoked`. It is checked as returning
    /// at +infinity with any output; placed last, it is as good as omitted.
    Unknown,
}

impl Op {
    fn returned_at(&self) -> u64 {
        match self.outcome {
            Outcome::Returned { at, .. } => at,
            Outcome::Unknown => u64::MAX,
        }
    }

    /// The value its answer reports the register holding.
    fn observed(&self) -> Option<&String> {
        match &self.outcome {
            Outcome::Returned { output, .. } => self.input.observed(output),
            Outcome::Unknown => None,
        }
    }

    /// The state after linearizing this op in `state`, if its output fits.
    fn step(&self, state: &State) -> Option<State> {
        let (next, output) = self.input.apply(state);
        match &self.outcome {
            Outcome::Returned { output: seen, .. } if *seen != output => None,
            _ => Some(next),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    Violation,
    /// The search gave up after its step budget.
    Inconclusive,
}

/// Search steps one check may take; far more than any CI history needs.
pub const STEP_BUDGET: u64 = 50_000_000;

/// Whether `history`, one register's operations starting from an absent
/// value, is linearizable.
pub fn check(history: &[Op]) -> Verdict {
    let mut events = Events::new(history);
    let mut state: State = None;
    let mut linearized = Bits::new(history.len());
    let mut explored: HashSet<(Bits, State)> = HashSet::new();
    // The call events lifted out of the list, with the state before each.
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut entry = events.first();
    for _ in 0..STEP_BUDGET {
        let Some(event) = entry else { return Verdict::Linearizable };
        let op = events.op(event);
        if events.is_call(event) {
            if let Some(next) = history[op].step(&state) {
                let mut with_op = linearized.clone();
                with_op.set(op, true);
                if explored.insert((with_op.clone(), next.clone())) {
                    stack.push((event, std::mem::replace(&mut state, next)));
                    linearized = with_op;
                    events.lift(event);
                    entry = events.first();
                    continue;
                }
            }
            entry = events.next(event);
        } else {
            // `op` returned before being linearized: undo the latest choice.
            let Some((call, before)) = stack.pop() else { return Verdict::Violation };
            state = before;
            linearized.set(events.op(call), false);
            events.unlift(call);
            entry = events.next(call);
        }
    }
    Verdict::Inconclusive
}

/// The history as it stood at time `t`: operations invoked later are gone;
/// writes still in flight become unknown; reads still in flight are gone
/// (they change nothing). A prefix of a linearizable history is
/// linearizable, so the earliest failing prefix ends at the violation.
fn prefix(history: &[Op], t: u64) -> Vec<Op> {
    history
        .iter()
        .filter(|op| op.invoked <= t && (op.returned_at() <= t || op.input.is_write()))
        .map(|op| {
            let outcome = if op.returned_at() <= t { op.outcome.clone() } else { Outcome::Unknown };
            Op { outcome, ..op.clone() }
        })
        .collect()
}

/// `ops` without the ops that report a value none of the rest writes,
/// repeatedly: values are unique, so without the write it saw, a read fails
/// for a reason the full history does not have.
fn without_orphans(mut ops: Vec<Op>) -> Vec<Op> {
    loop {
        let written: HashSet<String> = ops.iter().filter_map(|op| op.input.written().cloned()).collect();
        let before = ops.len();
        ops.retain(|op| op.observed().is_none_or(|value| written.contains(value)));
        if ops.len() == before {
            return ops;
        }
    }
}

/// A small sub-history of a non-linearizable `history` that still fails:
/// first the earliest failing prefix (binary search over return times),
/// then operations dropped, in halves down to one at a time (with the reads
/// of what they wrote), while the rest still fails. At most `budget` checker
/// runs.
pub fn shrink(history: &[Op], budget: usize) -> Vec<Op> {
    let fails = |ops: &[Op]| check(ops) == Verdict::Violation;
    let mut times: Vec<u64> = history.iter().map(Op::returned_at).filter(|&t| t != u64::MAX).collect();
    times.sort_unstable();
    times.dedup();
    let mut runs = 0;
    let (mut lo, mut hi) = (0, times.len());
    while lo < hi && runs < budget {
        let mid = (lo + hi) / 2;
        runs += 1;
        if fails(&prefix(history, times[mid])) { hi = mid } else { lo = mid + 1 }
    }
    let mut ops = match times.get(hi) {
        Some(&t) if fails(&prefix(history, t)) => prefix(history, t),
        _ => history.to_vec(),
    };
    let mut chunk = ops.len() / 2;
    while chunk > 0 && runs < budget {
        let mut start = 0;
        while start < ops.len() && runs < budget {
            let rest = without_orphans(
                ops[..start].iter().chain(ops[(start + chunk).min(ops.len())..].iter()).cloned().collect(),
            );
            runs += 1;
            if fails(&rest) { ops = rest } else { start += chunk }
        }
        chunk /= 2;
    }
    ops
}

/// The call and return events in time order, as a doubly linked list from
/// which a linearized operation's two events are lifted and put back.
struct Events {
    /// (time, is_return, op); a call sorts before a return at the same
    /// instant, so touching operations count as concurrent.
    events: Vec<(u64, bool, usize)>,
    /// Index of each op's return event.
    return_of: Vec<usize>,
    /// Links; index `events.len()` is the list head.
    next: Vec<Option<usize>>,
    prev: Vec<usize>,
}

impl Events {
    fn new(history: &[Op]) -> Events {
        let mut events: Vec<(u64, bool, usize)> = history
            .iter()
            .enumerate()
            .flat_map(|(i, op)| [(op.invoked, false, i), (op.returned_at(), true, i)])
            .collect();
        events.sort_unstable();
        let n = events.len();
        let mut return_of = vec![0; history.len()];
        for (e, &(_, is_return, op)) in events.iter().enumerate() {
            if is_return {
                return_of[op] = e;
            }
        }
        let next =
            (0..=n).map(|e| if e == n { (n > 0).then_some(0) } else { Some(e + 1).filter(|&x| x < n) }).collect();
        let prev = (0..=n).map(|e| if e == 0 { n } else { e - 1 }).collect();
        Events { events, return_of, next, prev }
    }

    fn head(&self) -> usize {
        self.events.len()
    }

    fn first(&self) -> Option<usize> {
        self.next[self.head()]
    }

    fn next(&self, event: usize) -> Option<usize> {
        self.next[event]
    }

    fn op(&self, event: usize) -> usize {
        self.events[event].2
    }

    fn is_call(&self, event: usize) -> bool {
        !self.events[event].1
    }

    /// Removes a call and its return from the list.
    fn lift(&mut self, call: usize) {
        let ret = self.return_of[self.op(call)];
        self.unlink(call);
        self.unlink(ret);
    }

    /// Undoes the matching [`Events::lift`] (lifts are undone in reverse).
    fn unlift(&mut self, call: usize) {
        let ret = self.return_of[self.op(call)];
        self.relink(ret);
        self.relink(call);
    }

    fn unlink(&mut self, e: usize) {
        self.next[self.prev[e]] = self.next[e];
        if let Some(n) = self.next[e] {
            self.prev[n] = self.prev[e];
        }
    }

    fn relink(&mut self, e: usize) {
        self.next[self.prev[e]] = Some(e);
        if let Some(n) = self.next[e] {
            self.prev[n] = e;
        }
    }
}

/// A fixed-size bit set, hashable for the memo.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Bits {
        Bits(vec![0; n.div_ceil(64)])
    }

    fn set(&mut self, i: usize, on: bool) {
        let mask = 1 << (i % 64);
        if on { self.0[i / 64] |= mask } else { self.0[i / 64] &= !mask }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = |us: u64| us as f64 / 1e6;
        write!(f, "{:9.3}s ", secs(self.invoked))?;
        match &self.outcome {
            Outcome::Returned { at, output } => {
                write!(f, "→ {:9.3}s  client {:2}  {:?} => {:?}", secs(*at), self.client, self.input, output)
            }
            Outcome::Unknown => write!(f, "→ ?           client {:2}  {:?} => unknown", self.client, self.input),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: usize, input: Input, invoked: u64, at: u64, output: Output) -> Op {
        Op { client, input, invoked, outcome: Outcome::Returned { at, output } }
    }
    fn unknown(client: usize, input: Input, invoked: u64) -> Op {
        Op { client, input, invoked, outcome: Outcome::Unknown }
    }
    fn put(v: &str) -> Input {
        Input::Put(v.into())
    }
    fn get(v: Option<&str>) -> Output {
        Output::Get(v.map(String::from))
    }
    fn cas(expect: Option<&str>, new: &str) -> Input {
        Input::Cas { expect: expect.map(String::from), new: new.into() }
    }
    fn swapped(yes: bool, current: Option<&str>) -> Output {
        Output::Cas { swapped: yes, current: current.map(String::from) }
    }

    #[test]
    fn sequential_history_of_every_op_is_linearizable() {
        let h = [
            op(0, Input::Get, 0, 1, get(None)),
            op(0, put("a"), 2, 3, Output::Put),
            op(1, cas(Some("a"), "b"), 4, 5, swapped(true, None)),
            op(1, cas(Some("a"), "c"), 6, 7, swapped(false, Some("b"))),
            op(0, Input::Delete, 8, 9, Output::Delete { existed: true }),
            op(0, Input::Delete, 10, 11, Output::Delete { existed: false }),
            op(1, cas(None, "d"), 12, 13, swapped(true, None)),
            op(0, Input::Get, 14, 15, get(Some("d"))),
        ];
        assert_eq!(check(&h), Verdict::Linearizable);
        assert_eq!(check(&[]), Verdict::Linearizable);
    }

    #[test]
    fn stale_read_after_an_acknowledged_write_is_caught() {
        let h = [
            op(0, put("1"), 0, 10, Output::Put),
            op(0, put("2"), 20, 30, Output::Put),
            op(1, Input::Get, 40, 50, get(Some("1"))),
        ];
        assert_eq!(check(&h), Verdict::Violation);
    }

    #[test]
    fn lost_acknowledged_write_is_caught() {
        let h = [op(0, put("x"), 0, 10, Output::Put), op(1, Input::Get, 20, 30, get(None))];
        assert_eq!(check(&h), Verdict::Violation);
    }

    #[test]
    fn cas_anomalies_are_caught() {
        let both_swap_from_absent =
            [op(0, cas(None, "a"), 0, 10, swapped(true, None)), op(1, cas(None, "b"), 20, 30, swapped(true, None))];
        assert_eq!(check(&both_swap_from_absent), Verdict::Violation);
        let wrong_current =
            [op(0, put("a"), 0, 10, Output::Put), op(1, cas(Some("z"), "b"), 20, 30, swapped(false, Some("q")))];
        assert_eq!(check(&wrong_current), Verdict::Violation);
        let refused_although_it_matched =
            [op(0, put("a"), 0, 10, Output::Put), op(1, cas(Some("a"), "b"), 20, 30, swapped(false, Some("a")))];
        assert_eq!(check(&refused_although_it_matched), Verdict::Violation);
    }

    #[test]
    fn unknown_write_may_apply_late_or_never() {
        let applied_late =
            [unknown(0, put("a"), 0), op(1, Input::Get, 10, 20, get(None)), op(1, Input::Get, 30, 40, get(Some("a")))];
        assert_eq!(check(&applied_late), Verdict::Linearizable);
        let never = [unknown(0, put("a"), 0), op(1, Input::Get, 100, 110, get(None))];
        assert_eq!(check(&never), Verdict::Linearizable);
        let before_its_invocation = [op(1, Input::Get, 0, 10, get(Some("a"))), unknown(0, put("a"), 20)];
        assert_eq!(check(&before_its_invocation), Verdict::Violation);
        let twice = [
            unknown(0, put("a"), 0),
            op(1, Input::Get, 10, 20, get(Some("a"))),
            op(1, put("b"), 30, 40, Output::Put),
            op(1, Input::Get, 50, 60, get(Some("a"))),
        ];
        assert_eq!(check(&twice), Verdict::Violation, "an unknown write takes effect at most once");
    }

    #[test]
    fn concurrent_writes_may_take_effect_out_of_invocation_order() {
        let mut h = vec![
            op(0, put("a"), 0, 100, Output::Put),
            op(1, put("b"), 10, 50, Output::Put),
            op(2, Input::Get, 60, 70, get(Some("b"))),
            op(2, Input::Get, 80, 90, get(Some("a"))),
        ];
        assert_eq!(check(&h), Verdict::Linearizable, "b, read b, a, read a");
        h.push(op(2, Input::Get, 110, 120, get(Some("b"))));
        assert_eq!(check(&h), Verdict::Violation, "a was the last write");
    }

    #[test]
    fn shrink_keeps_just_the_anomaly() {
        let mut h: Vec<Op> = (0..200u64)
            .flat_map(|i| {
                let v = i.to_string();
                [
                    op(0, put(&v), i * 100, i * 100 + 40, Output::Put),
                    op(1, Input::Get, i * 100 + 20, i * 100 + 60, get(Some(&v))),
                ]
            })
            .collect();
        assert_eq!(check(&h), Verdict::Linearizable);
        h.push(op(2, Input::Get, 10_000, 10_010, get(Some("7"))));
        let small = shrink(&h, 1000);
        assert_eq!(check(&small), Verdict::Violation);
        assert!(small.len() <= 3, "{small:#?}");
        assert!(small.contains(h.last().unwrap()));
        assert!(small.iter().any(|op| op.input == put("7")), "the stale read's write stays: {small:#?}");
    }
}
