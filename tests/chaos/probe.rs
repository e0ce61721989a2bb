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
//! Both record their operations in the history like any client; a read that
//! fails is retried until one is answered, as only answered reads are checked.

use std::thread;
use std::time::Instant;

use crate::common::Endpoint;
use crate::register::Input;
use crate::workload::{BACKOFF, History, RETRY_WINDOW, Session};

#[derive(Clone, Copy, Debug)]
enum Kind {
    StaleRead,
    LostWrite,
}

pub struct Probe {
    kind: Kind,
    session: Session,
    pub history: History,
}

impl Probe {
    /// One probe of each kind, with client ids from `first_id` on, connected
    /// to every node.
    pub fn each_kind(first_id: usize, endpoints: &[Endpoint], seed: u64, t0: Instant) -> Vec<Probe> {
        let probe = |(kind, id)| {
            let mut session = Session::new(id, endpoints, seed, t0);
            session.connect();
            Probe { kind, session, history: History::default() }
        };
        [Kind::StaleRead, Kind::LostWrite].into_iter().zip(first_id..).map(probe).collect()
    }

    fn key(&self) -> &'static str {
        match self.kind {
            Kind::StaleRead => "stale-read-probe",
            Kind::LostWrite => "lost-write-probe",
        }
    }

    /// Writes through one side of the cut around `leader`, then reads
    /// through the other.
    pub fn run(&mut self, leader: usize) {
        let others: Vec<usize> = self.session.all_nodes().into_iter().filter(|&id| id != leader).collect();
        let (write_via, read_via) = match self.kind {
            Kind::StaleRead => (others, vec![leader]),
            Kind::LostWrite => (vec![leader], others),
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
