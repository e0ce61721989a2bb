//! Probes: clients aimed at a leader that the nemesis has cut off, so that a
//! deposed leader's mistakes reach the checker.
//!
//! A stale read or a lost write is only observable when an operation is
//! invoked after a conflicting one completed, and is then served by the
//! wrong side of the cut. Random clients seldom line that up within the
//! moments a deposed leader still believes it leads; a probe does it on
//! purpose, on a key of its own so that no other client's write can explain
//! the anomaly away. While the leader is paused or isolated:
//!
//! - the stale-read probe writes a fresh value through the other nodes, then
//!   reads the key through the old leader, which must not answer from its own
//!   state without confirming its leadership (ReadIndex). A read sent to a
//!   paused leader waits until it wakes, still believing it leads;
//! - the lost-write probe writes a fresh value through the old leader, then
//!   reads the key through the other nodes, which must see it if the old
//!   leader acknowledged it: a write is only committed once a majority holds it.
//!
//! A new leader is the third place for a mistake: until it has committed an
//! entry of its own term it does not know the commit index, and must not
//! serve reads. Whenever a fault takes the leader away (killed, paused or
//! isolated), the new-leader probe writes a fresh value through the leader
//! just before the fault, then floods the other nodes with reads from
//! several sessions, so that some reach the new leader in its first
//! milliseconds.
//!
//! All record their operations in the history like any client; a read that
//! fails is retried until one is answered, as only answered reads are checked.

use std::thread;
use std::time::{Duration, Instant};

use crate::common::Endpoint;
use crate::nemesis::Fault;
use crate::register::Input;
use crate::workload::{BACKOFF, History, RETRY_WINDOW, Session};

/// Sessions reading at once for the new-leader probe, and for how long.
const FLOOD_READERS: usize = 4;
const FLOOD: Duration = Duration::from_millis(1500);

#[derive(Clone, Copy, Debug)]
enum Kind {
    /// Writes through one side of the cut around a cut-off leader, reads through the other.
    AcrossTheCut(Cut),
    NewLeaderRead,
}

#[derive(Clone, Copy, Debug)]
enum Cut {
    StaleRead,
    LostWrite,
}

pub struct Probe {
    kind: Kind,
    session: Session,
    /// Extra sessions of the new-leader probe's flood.
    flood: Vec<Session>,
    pub history: History,
}

impl Probe {
    /// One probe of each kind, able to reach every slot and connected to
    /// the `members`, with client ids from `first_id` on; also returns the
    /// first id left unused.
    pub fn each_kind(
        first_id: usize,
        endpoints: &[Endpoint],
        members: &[usize],
        seed: u64,
        t0: Instant,
    ) -> (Vec<Probe>, usize) {
        let mut next_id = first_id;
        let mut session = || {
            let mut session = Session::new(next_id, endpoints, seed, t0);
            next_id += 1;
            session.connect(members);
            session
        };
        let probes = [Kind::AcrossTheCut(Cut::StaleRead), Kind::AcrossTheCut(Cut::LostWrite), Kind::NewLeaderRead]
            .into_iter()
            .map(|kind| {
                let flood_size = if matches!(kind, Kind::NewLeaderRead) { FLOOD_READERS } else { 0 };
                Probe {
                    kind,
                    session: session(),
                    flood: (0..flood_size).map(|_| session()).collect(),
                    history: History::default(),
                }
            })
            .collect();
        (probes, next_id)
    }

    fn key(&self) -> &'static str {
        match self.kind {
            Kind::AcrossTheCut(Cut::StaleRead) => "stale-read-probe",
            Kind::AcrossTheCut(Cut::LostWrite) => "lost-write-probe",
            Kind::NewLeaderRead => "new-leader-probe",
        }
    }

    /// Just before `fault` strikes the leader: the new-leader probe's write.
    pub fn before(&mut self, fault: &Fault, leader: usize) {
        if matches!(self.kind, Kind::NewLeaderRead) && fault.removes_live_leader() {
            let key = self.key();
            let value = self.session.fresh_value();
            let write = self.session.perform(&[leader], key, Input::Put(value));
            self.history.record(key, write);
        }
    }

    /// While `fault` lasts, if it is one this probe aims at; `members` were
    /// the members when it struck.
    pub fn during(&mut self, fault: &Fault, leader: usize, members: &[usize]) {
        match self.kind {
            Kind::AcrossTheCut(cut) => {
                if let Some(cut_off) = fault.cuts_off() {
                    self.across_the_cut(cut, cut_off, members);
                }
            }
            Kind::NewLeaderRead if fault.removes_live_leader() => self.flood(leader, members),
            Kind::NewLeaderRead => {}
        }
    }

    /// Reads from every flood session at once through the nodes other than
    /// the old `leader`, for [`FLOOD`].
    fn flood(&mut self, leader: usize, members: &[usize]) {
        let key = self.key();
        let others: Vec<usize> = members.iter().copied().filter(|&id| id != leader).collect();
        let until = Instant::now() + FLOOD;
        let histories: Vec<History> = thread::scope(|s| {
            let readers: Vec<_> = self
                .flood
                .iter_mut()
                .map(|session| {
                    let others = &others;
                    s.spawn(move || {
                        let mut history = History::default();
                        while Instant::now() < until {
                            history.record(key, session.perform(others, key, Input::Get));
                        }
                        history
                    })
                })
                .collect();
            readers.into_iter().map(|r| r.join().expect("a flood reader panicked")).collect()
        });
        histories.into_iter().for_each(|h| self.history.merge(h));
    }

    /// Writes through one side of the cut around `leader`, then reads
    /// through the other.
    fn across_the_cut(&mut self, cut: Cut, leader: usize, members: &[usize]) {
        let others: Vec<usize> = members.iter().copied().filter(|&id| id != leader).collect();
        let (write_via, read_via) = match cut {
            Cut::StaleRead => (others, vec![leader]),
            Cut::LostWrite => (vec![leader], others),
        };
        let key = self.key();
        let value = self.session.fresh_value();
        let write = self.session.perform(&write_via, key, Input::Put(value));
        self.history.record(key, write);
        let deadline = Instant::now() + RETRY_WINDOW;
        loop {
            let read = self.session.perform(&read_via, key, Input::Get);
            let answered = read.is_some();
            self.history.record(key, read);
            if answered || Instant::now() >= deadline {
                return;
            }
            thread::sleep(BACKOFF);
        }
    }
}
