//! Telling the operator that a peer's name does not resolve. ZeroMQ
//! resolves a DNS name on every connect and, when it does not resolve,
//! retries without a word, so a typo or a pod not scheduled yet would show
//! only as a peer that never answers.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TryRecvError};

/// Looks a peer's name up after its exchanges fail, at most every
/// [`NameCheck::EVERY`], and says why when it does not resolve.
pub(super) struct NameCheck {
    /// `HOST:PORT` when the endpoint names its host by DNS name; `None` for
    /// an IP address, which needs no lookup.
    name: Option<String>,
    /// The lookup under way. It runs on a thread of its own: a DNS server
    /// that does not answer holds it for seconds, and the link must go on
    /// noticing shutdown meanwhile.
    pending: Option<Receiver<Result<(), String>>>,
    /// No new lookup before this.
    next: Instant,
}

impl NameCheck {
    /// A name that stays unresolvable is reported this often.
    const EVERY: Duration = Duration::from_secs(30);

    pub(super) fn new(endpoint: &str) -> NameCheck {
        NameCheck { name: dns_name(endpoint), pending: None, next: Instant::now() }
    }

    /// After an exchange with the peer failed: starts a lookup if one is
    /// due, and returns why the name does not resolve once one has found
    /// that out.
    pub(super) fn after_failure(&mut self) -> Option<String> {
        let name = self.name.as_ref()?;
        if let Some(pending) = &self.pending {
            return match pending.try_recv() {
                Err(TryRecvError::Empty) => None,
                Ok(outcome) => {
                    self.pending = None;
                    outcome.err()
                }
                Err(TryRecvError::Disconnected) => {
                    self.pending = None;
                    None
                }
            };
        }
        if Instant::now() >= self.next {
            self.next = Instant::now() + Self::EVERY;
            let (done, outcome) = crossbeam_channel::bounded(1);
            let name = name.clone();
            // Without a thread there is no check, and nothing else is lost.
            let started = thread::Builder::new().name("raft-resolve".into()).spawn(move || {
                let _ = done.send(resolves(&name));
            });
            self.pending = started.ok().map(|_| outcome);
        }
        None
    }

    /// After an exchange succeeded: the next failure is looked into at once.
    pub(super) fn after_success(&mut self) {
        self.next = Instant::now();
    }
}

/// `HOST:PORT` of a `tcp://` endpoint whose host is a DNS name (ZeroMQ's
/// `tcp://SOURCE;HOST:PORT` form included), `None` for anything else.
fn dns_name(endpoint: &str) -> Option<String> {
    let address = endpoint.strip_prefix("tcp://")?.rsplit(';').next()?;
    let (host, _port) = address.rsplit_once(':')?;
    let literal = host.starts_with('[') || host == "*" || host.parse::<Ipv4Addr>().is_ok();
    (!literal && !host.is_empty()).then(|| address.to_string())
}

/// Whether `name` (`HOST:PORT`) resolves to an address a node's sockets can
/// use, which must be IPv4: they do not turn ZeroMQ's IPv6 on.
fn resolves(name: &str) -> Result<(), String> {
    let addresses: Vec<SocketAddr> = name.to_socket_addrs().map_err(|e: io::Error| e.to_string())?.collect();
    if addresses.iter().any(SocketAddr::is_ipv4) {
        Ok(())
    } else if addresses.is_empty() {
        Err("the name has no addresses".into())
    } else {
        Err("the name has IPv6 addresses only, and ZeroMQ's IPv6 is off".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_are_looked_up() {
        assert_eq!(dns_name("tcp://raft-0.raft:7000").as_deref(), Some("raft-0.raft:7000"));
        assert_eq!(dns_name("tcp://eth0;node1:7000").as_deref(), Some("node1:7000"));
        for literal in ["tcp://127.0.0.1:7000", "tcp://[::1]:7000", "tcp://*:7000", "ipc:///tmp/x", "tcp://:7"] {
            assert_eq!(dns_name(literal), None, "{literal}");
        }
    }

    #[test]
    fn a_name_that_does_not_resolve_is_reported_and_looked_up_again_later() {
        assert_eq!(resolves("localhost:7000"), Ok(()));
        let mut check = NameCheck::new("tcp://no-such-host.invalid:7000");
        assert_eq!(check.after_failure(), None, "the lookup has just started");
        let deadline = Instant::now() + Duration::from_secs(30);
        let problem = loop {
            if let Some(problem) = check.after_failure() {
                break problem;
            }
            assert!(Instant::now() < deadline, "the lookup never finished");
            thread::sleep(Duration::from_millis(10));
        };
        assert!(!problem.is_empty());
        assert_eq!(check.after_failure(), None, "not again before EVERY");
        assert!(check.pending.is_none());
        check.after_success();
        check.after_failure();
        assert!(check.pending.is_some(), "a new outage is looked into at once");

        let mut literal = NameCheck::new("tcp://127.0.0.1:7000");
        assert_eq!(literal.after_failure(), None);
        assert!(literal.pending.is_none(), "an address needs no lookup");
    }
}
