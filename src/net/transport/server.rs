//! The receiving half: the ROUTER socket peers' sockets connect to, driven
//! by the thread that polls the transport. Each reply the core gives a peer
//! goes back on the connection its requests came in on, answering the
//! oldest of them still unanswered.
//!
//! It also collects the pieces of a snapshot a leader streams (see
//! [`Chunk`]): each is written to the staging file and acknowledged here;
//! once the whole file is in, checked and durable, the InstallSnapshot goes
//! to the core, whose reply answers the last piece. Only a peer that may be
//! the leader of the core's current term may stage one (see [`Admission`]);
//! any other's pieces are dropped before a byte is written.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::Sender;
use log::{debug, info, warn};

use super::{Inbound, deliver};
use crate::metrics::METRICS;
use crate::net::security::{Caller, recv_with_user};
use crate::raft::{Body, Message, NodeId, Term};
use crate::storage::snapshot::Staging;
use crate::warnings::Warnings;
use crate::wire::envelope::{Chunk, PeerRequest, Reject, WINDOW, Wire};

/// Requests taken per poll.
const BATCH: usize = 64;

/// How long the last replies may take to leave once the transport stops.
const LAST_REPLIES_LINGER_MS: i32 = 100;

pub(super) struct Server {
    pub(super) router: zmq::Socket,
    pub(super) wire: Arc<Wire>,
    pub(super) inbound: Sender<Inbound>,
    pub(super) staging: Staging,
    pub(super) admission: Admission,
    /// Each peer sends on one connection at a time, a window of requests
    /// at most; the core answers them in order. A reply the core sends
    /// after the peer gave up and asked again on a new connection answers
    /// the newer request; Raft replies describe themselves (term,
    /// prev_log_index, match_index, read_seq), so that is harmless.
    pub(super) pending: HashMap<NodeId, Waiting>,
    pub(super) warnings: Warnings,
}

/// Who may send this node a snapshot, as far as the core's view goes: kept
/// up to date by `Transport::follow` and `Transport::set_peers`. The core
/// checks the InstallSnapshot again once the file is in; this only keeps
/// a peer that could not be the leader from making the node store anything.
#[derive(Default)]
pub(super) struct Admission {
    /// The core's current term and the leader it follows in it, if any.
    pub(super) term: Term,
    pub(super) leader: Option<NodeId>,
    /// The members this node talks to (under CURVE, the nodes whose keys
    /// it accepts). A joining node knows those its config names.
    pub(super) peers: HashSet<NodeId>,
}

impl Admission {
    /// Node `from`, sending in `term`, may be the leader: it is a member,
    /// and either its term is newer than the core's or it is the leader the
    /// core follows in it (or the core knows none yet: a leader probes a
    /// follower far behind with the snapshot itself, not an AppendEntries).
    fn admits(&self, from: NodeId, term: Term) -> Result<(), String> {
        if !self.peers.contains(&from) {
            return Err("not a member: refused".into());
        }
        match (term.cmp(&self.term), self.leader) {
            (std::cmp::Ordering::Greater, _) | (std::cmp::Ordering::Equal, None) => Ok(()),
            (std::cmp::Ordering::Equal, Some(leader)) if leader == from => Ok(()),
            (std::cmp::Ordering::Equal, Some(leader)) => {
                Err(format!("node {leader} is the leader of term {term}: refused"))
            }
            (std::cmp::Ordering::Less, _) => {
                Err(format!("term {term} is over (this node is in {}): refused", self.term))
            }
        }
    }
}

/// A peer's requests waiting for the core's answers: the route they came
/// in on (identity frames up to the empty delimiter), and the cluster each
/// named, which its answer names too, oldest first.
pub(super) struct Waiting {
    route: Vec<Vec<u8>>,
    clusters: VecDeque<u64>,
}

impl Waiting {
    /// Another request from the peer, on `route`. One on a new route means
    /// the peer gave up on the old connection (a REQ or DEALER socket is
    /// replaced after a failure): what it waited for there is forgotten.
    /// More than a window's worth means the core left some unanswered
    /// (say a request it ignored): the oldest go.
    fn push(&mut self, route: &[zmq::Message], cluster: u64) {
        if !self.route.iter().map(Vec::as_slice).eq(route.iter().map(|frame| &frame[..])) {
            self.route = route.iter().map(|frame| frame.to_vec()).collect();
            self.clusters.clear();
        }
        if self.clusters.len() == usize::from(WINDOW) {
            self.clusters.pop_front();
        }
        self.clusters.push_back(cluster);
    }
}

impl Server {
    /// Takes the requests that arrived, a bounded batch of them so that a
    /// flood of requests cannot hold back replies (reply latency is commit
    /// latency); the poll comes back at once for the rest.
    pub(super) fn on_readable(&mut self) {
        for _ in 0..BATCH {
            match recv_with_user(&self.router, zmq::DONTWAIT) {
                Ok((frames, user)) => self.accept(frames, Caller::of(user.as_deref())),
                Err(zmq::Error::EAGAIN) => break,
                Err(e) => {
                    self.warnings.warn("receive failed", format!("raft server receive failed: {e}"));
                    break;
                }
            }
        }
    }

    /// Lets the replies already sent drain for a moment once the transport
    /// stops: a peer waiting on one (a vote granted, an acknowledgement)
    /// would otherwise time out.
    pub(super) fn linger(&self) {
        if let Err(e) = self.router.set_linger(LAST_REPLIES_LINGER_MS) {
            debug!("cannot let the last replies drain: {e}");
        }
    }

    fn accept(&mut self, mut frames: Vec<zmq::Message>, sender: Caller) {
        // A peer arrives as [identity, empty delimiter, payload].
        let payload = frames.pop().unwrap_or_else(zmq::Message::new);
        if frames.len() < 2 || frames.last().is_some_and(|delimiter| !delimiter.is_empty()) {
            let shape = format!("request dropped: malformed multipart of {} frames", frames.len() + 1);
            self.warnings.warn("malformed multipart", shape);
            return;
        }
        let opened = self.wire.open_request(&payload);
        // With CURVE, a connection speaks for the node whose key made it:
        // checked before anything of the message, a snapshot piece
        // included, is taken.
        if let (Ok(PeerRequest { message, .. }), Caller::Node(node) | Caller::Removed(node)) = (&opened, sender)
            && message.from != node
        {
            METRICS.forged_messages.inc();
            let forged = format!("node {node}'s connection sent a message from node {}; dropped", message.from);
            return self.warnings.warn("forged sender", forged);
        }
        // A removed node is heard only asking for votes, which the core
        // answers by telling it it was removed; it stops then.
        if let (Ok(PeerRequest { message, .. }), Caller::Removed(node)) = (&opened, sender)
            && !matches!(message.body, Body::RequestVote { .. })
        {
            return self.warnings.warn("removed sender", format!("a message from removed node {node} dropped"));
        }
        match opened {
            Ok(PeerRequest { message, chunk: Some(Chunk::Data { offset, total, data }), cluster }) => {
                let from = message.from;
                match self.collect(&message, offset, total, &data) {
                    Ok(Some(next)) => self.acknowledge(frames, cluster, message, next),
                    Ok(None) => {
                        self.wait_for_the_core(from, &frames, cluster);
                        deliver(&self.inbound, Inbound::Message(message), &mut self.warnings);
                    }
                    Err(problem) => {
                        // No answer: the leader gives up on this transfer and tries again later.
                        self.warnings.warn("snapshot not received", format!("snapshot from node {from}: {problem}"));
                    }
                }
            }
            Ok(PeerRequest { message, cluster, .. }) => {
                self.wait_for_the_core(message.from, &frames, cluster);
                deliver(&self.inbound, Inbound::Message(message), &mut self.warnings);
            }
            Err(reject) => {
                METRICS.peer_rejects.with_label_values(&[reject.reason()]).inc();
                if matches!(reject, Reject::Cluster(_)) && self.wire.cluster() == 0 {
                    // Routine at a new cluster's start: a leader that knows
                    // the name reaches a member that has not learned it, and
                    // speaks the fingerprint once refused.
                    debug!("request dropped: {reject}; answered with the cluster this node speaks for");
                } else {
                    self.warnings.warn(reject.reason(), format!("request dropped: {reject}"));
                }
                // Said at once, so the sender need not wait out a timeout to
                // learn which cluster this node speaks for.
                if let Reject::Cluster(_) = reject {
                    frames.push(self.wire.refusal().into());
                    if let Err(e) = self.router.send_multipart(frames, zmq::DONTWAIT) {
                        debug!("refusal not sent: {e}");
                    }
                }
            }
        }
    }

    /// Adds a piece to the snapshot being received, if the message's
    /// sender may be the leader (checked before anything is written).
    /// Returns how much of it is held when more is to
    /// come, or `None` once the whole file is in, intact and durable.
    fn collect(&mut self, message: &Message, offset: u64, total: u64, data: &[u8]) -> Result<Option<u64>, String> {
        let Body::InstallSnapshot { snapshot, .. } = message.body else { unreachable!("the wire checked") };
        let (from, term) = (message.from, message.term);
        self.expire_staging();
        self.admission.admits(from, term)?;
        let held = self.staging.piece((from, term), snapshot, offset, total, data)?;
        if held.is_none() {
            info!("node {from}'s snapshot {}/{} received ({total} bytes)", snapshot.index, snapshot.term);
        }
        Ok(held)
    }

    /// Drops a staging that was abandoned or whose sender can no longer
    /// be the leader.
    pub(super) fn expire_staging(&mut self) {
        let admission = &self.admission;
        if let Some(from) = self.staging.expire(Instant::now(), |from, term| admission.admits(from, term).is_ok()) {
            self.warnings
                .warn("snapshot abandoned", format!("snapshot from node {from} abandoned; staging file removed"));
        }
    }

    /// Answers a piece with how much of the snapshot is held.
    fn acknowledge(&self, mut frames: Vec<zmq::Message>, cluster: u64, request: Message, next: u64) {
        let answer = Message { from: request.to, to: request.from, ..request };
        match self.wire.seal_as(cluster, &answer, Some(&Chunk::Ack { next })) {
            Ok(frame) => {
                frames.push(frame.into());
                if let Err(e) = self.router.send_multipart(frames, zmq::DONTWAIT) {
                    warn!("snapshot acknowledgement not sent: {e}");
                }
            }
            Err(reject) => warn!("snapshot acknowledgement not sent: {reject}"),
        }
    }

    /// The core is to answer `from`'s request, which came on `route`.
    fn wait_for_the_core(&mut self, from: NodeId, route: &[zmq::Message], cluster: u64) {
        let waiting =
            self.pending.entry(from).or_insert_with(|| Waiting { route: Vec::new(), clusters: VecDeque::new() });
        waiting.push(route, cluster);
    }

    pub(super) fn send_reply(&mut self, reply: Message) {
        let to = reply.to;
        let Some(waiting) = self.pending.get_mut(&to) else {
            debug!("reply to node {to} dropped: no request of its is pending");
            return;
        };
        let cluster = waiting.clusters.pop_front().expect("emptied entries go");
        let sealed = self.wire.seal_as(cluster, &reply, None);
        let route = match waiting.clusters.is_empty() {
            true => self.pending.remove(&to).expect("looked up above").route,
            false => waiting.route.clone(),
        };
        let payload = match sealed {
            Ok(payload) => payload,
            Err(reject) => return warn!("reply to node {to} not sent: {reject}"),
        };
        let frames = route.into_iter().map(zmq::Message::from).chain([zmq::Message::from(payload)]);
        // ROUTER never blocks: it drops frames for a vanished or saturated peer,
        // which then times out and retries.
        if let Err(e) = self.router.send_multipart(frames, zmq::DONTWAIT) {
            warn!("reply to node {to} not sent: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_is_admitted_from_a_member_that_may_lead_the_current_term_or_a_newer_one() {
        let mut admission = Admission { term: 5, leader: None, peers: HashSet::from([1, 2]) };
        assert!(admission.admits(1, 5).is_ok(), "no leader known yet: the snapshot is the leader's probe");
        assert!(admission.admits(7, 5).unwrap_err().contains("not a member"));
        assert!(admission.admits(7, 6).unwrap_err().contains("not a member"), "whatever term it claims");
        assert!(admission.admits(1, 4).unwrap_err().contains("term 4 is over"));
        admission.leader = Some(2);
        assert!(admission.admits(2, 5).is_ok());
        assert!(admission.admits(1, 5).unwrap_err().contains("node 2 is the leader of term 5"));
        assert!(admission.admits(1, 6).is_ok(), "a newer term: the core decides");
    }
}
