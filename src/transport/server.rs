//! The receiving half: one thread owning the ROUTER socket peers' REQ
//! sockets connect to. ROUTER lets replies leave in whatever order the core
//! produces them, addressed by the route each request came in on.
//!
//! It also collects the pieces of a snapshot a leader streams (see
//! [`Chunk`]): each is written to the staging file and acknowledged here;
//! once the whole file is in, checked and durable, the InstallSnapshot goes
//! to the core, whose reply answers the last piece.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::{Receiver, Sender};
use log::{debug, error, info, warn};

use super::envelope::{Chunk, Reject, Request, Wire};
use super::{Inbound, STOP_CHECK, deliver};
use crate::metrics::METRICS;
use crate::raft::{Body, Message, NodeId, SnapshotMeta};
use crate::security::{Caller, recv_with_user};
use crate::snapshot::Snapshots;
use crate::warnings::Warnings;

/// Requests handled per wake-up before replies get another turn, so that a
/// flood of requests cannot hold back replies (reply latency is commit latency).
const BATCH: usize = 64;

/// How long the last replies may take to leave once the transport stops.
const LAST_REPLIES_LINGER_MS: i32 = 100;

pub(super) struct Server {
    pub(super) router: zmq::Socket,
    /// Woken by `Transport::send` after queueing a reply, and on shutdown.
    pub(super) wake: zmq::Socket,
    pub(super) replies: Receiver<Message>,
    pub(super) wire: Arc<Wire>,
    pub(super) inbound: Sender<Inbound>,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) snapshots: Snapshots,
}

/// A peer's request waiting for the core's answer: the route it came in on
/// (identity frames up to the empty delimiter), and the cluster it named,
/// which the answer names too.
struct Waiting {
    route: Vec<Vec<u8>>,
    cluster: u64,
}

/// A snapshot being received from one peer.
struct Incoming {
    snapshot: SnapshotMeta,
    total: u64,
    received: u64,
    file: File,
}

impl Server {
    pub(super) fn run(self) {
        // Each peer has a single REQ socket, so it has at most one request
        // outstanding: its latest one. A reply the core sends after the peer gave up and
        // asked again answers the newer request; Raft replies describe
        // themselves (term, match_index, read_seq), so that is harmless.
        let mut pending: HashMap<NodeId, Waiting> = HashMap::new();
        let mut incoming: HashMap<NodeId, Incoming> = HashMap::new();
        let mut warnings = Warnings::default();
        let poll_ms = STOP_CHECK.as_millis() as i64;
        while !self.stop.load(Ordering::Acquire) {
            let mut items = [self.router.as_poll_item(zmq::POLLIN), self.wake.as_poll_item(zmq::POLLIN)];
            match zmq::poll(&mut items, poll_ms) {
                Ok(_) | Err(zmq::Error::EINTR) => {}
                Err(e) => {
                    error!("raft server poll failed, no longer receiving: {e}");
                    return;
                }
            }
            // Drain wake-ups before replies: a reply queued after this point
            // leaves a wake-up behind, so the next poll returns at once.
            while self.wake.recv_bytes(zmq::DONTWAIT).is_ok() {}
            for reply in self.replies.try_iter() {
                self.send_reply(&mut pending, reply);
            }
            for _ in 0..BATCH {
                match recv_with_user(&self.router, zmq::DONTWAIT) {
                    Ok((frames, user)) => {
                        let sender = Caller::of(user.as_deref());
                        self.accept(&mut pending, &mut incoming, &mut warnings, frames, sender)
                    }
                    Err(zmq::Error::EAGAIN) => break,
                    Err(e) => {
                        warnings.warn("receive failed", format!("raft server receive failed: {e}"));
                        break;
                    }
                }
            }
        }
        // Replies the core gave before stopping still leave (a vote granted,
        // an acknowledgement): a peer waiting on one would otherwise time out.
        for reply in self.replies.try_iter() {
            self.send_reply(&mut pending, reply);
        }
        if let Err(e) = self.router.set_linger(LAST_REPLIES_LINGER_MS) {
            debug!("cannot let the last replies drain: {e}");
        }
    }

    fn accept(
        &self,
        pending: &mut HashMap<NodeId, Waiting>,
        incoming: &mut HashMap<NodeId, Incoming>,
        warnings: &mut Warnings,
        mut frames: Vec<Vec<u8>>,
        sender: Caller,
    ) {
        // A REQ peer arrives as [identity, empty delimiter, payload].
        let payload = frames.pop().unwrap_or_default();
        if frames.len() < 2 || frames.last().is_some_and(|delimiter| !delimiter.is_empty()) {
            let shape = format!("request dropped: malformed multipart of {} frames", frames.len() + 1);
            warnings.warn("malformed multipart", shape);
            return;
        }
        let opened = self.wire.open_request(&payload);
        // With CURVE, a connection speaks for the node whose key made it:
        // checked before anything of the message, a snapshot piece
        // included, is taken.
        if let (Ok(Request { message, .. }), Caller::Node(node) | Caller::Removed(node)) = (&opened, sender)
            && message.from != node
        {
            METRICS.forged_messages.inc();
            let forged = format!("node {node}'s connection sent a message from node {}; dropped", message.from);
            return warnings.warn("forged sender", forged);
        }
        // A removed node is heard only asking for votes, which the core
        // answers by telling it it was removed; it stops then.
        if let (Ok(Request { message, .. }), Caller::Removed(node)) = (&opened, sender)
            && !matches!(message.body, Body::RequestVote { .. })
        {
            return warnings.warn("removed sender", format!("a message from removed node {node} dropped"));
        }
        match opened {
            Ok(Request { message, chunk: Some(Chunk::Data { offset, total, data }), cluster }) => {
                let from = message.from;
                match self.collect(incoming, &message, offset, total, &data) {
                    Ok(Some(next)) => self.acknowledge(frames, cluster, message, next),
                    Ok(None) => {
                        pending.insert(from, Waiting { route: frames, cluster });
                        deliver(&self.inbound, Inbound::Message(message), warnings);
                    }
                    Err(problem) => {
                        // No answer: the leader gives up on this transfer and tries again later.
                        incoming.remove(&from);
                        warnings.warn("snapshot not received", format!("snapshot from node {from}: {problem}"));
                    }
                }
            }
            Ok(Request { message, cluster, .. }) => {
                pending.insert(message.from, Waiting { route: frames, cluster });
                deliver(&self.inbound, Inbound::Message(message), warnings);
            }
            Err(reject) => {
                warnings.warn(reject.reason(), format!("request dropped: {reject}"));
                // Said at once, so the sender need not wait out a timeout to
                // learn which cluster this node speaks for.
                if let Reject::Cluster(_) = reject {
                    frames.push(self.wire.refusal());
                    if let Err(e) = self.router.send_multipart(frames, zmq::DONTWAIT) {
                        debug!("refusal not sent: {e}");
                    }
                }
            }
        }
    }

    /// Adds a piece to the snapshot being received from the message's
    /// sender. Returns how much of it is held when more is to come (a piece
    /// out of order is not written: the answer tells the sender where to go
    /// on), or `None` once the whole file is in, intact and durable.
    fn collect(
        &self,
        incoming: &mut HashMap<NodeId, Incoming>,
        message: &Message,
        offset: u64,
        total: u64,
        data: &[u8],
    ) -> Result<Option<u64>, String> {
        let Body::InstallSnapshot { snapshot, .. } = message.body else { unreachable!("the wire checked") };
        let from = message.from;
        let path = self.snapshots.incoming(from);
        let fresh = incoming.get(&from).is_none_or(|i| i.snapshot != snapshot || i.total != total);
        if fresh {
            if offset != 0 {
                return Ok(Some(0));
            }
            let file = File::create(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
            incoming.insert(from, Incoming { snapshot, total, received: 0, file });
        }
        let state = incoming.get_mut(&from).expect("inserted above");
        if offset != state.received {
            return Ok(Some(state.received));
        }
        state.file.write_all(data).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        state.received += data.len() as u64;
        if state.received < total {
            return Ok(Some(state.received));
        }
        incoming.remove(&from);
        if let Err(e) = self.snapshots.receive(&path, snapshot) {
            // Answered with "nothing held", so the sender gives up at once.
            warn!("snapshot from node {from} refused: {e}");
            return Ok(Some(0));
        }
        info!("node {from}'s snapshot {}/{} received ({total} bytes)", snapshot.index, snapshot.term);
        Ok(None)
    }

    /// Answers a piece with how much of the snapshot is held.
    fn acknowledge(&self, mut frames: Vec<Vec<u8>>, cluster: u64, request: Message, next: u64) {
        let answer = Message { from: request.to, to: request.from, ..request };
        match self.wire.seal_as(cluster, &answer, Some(&Chunk::Ack { next })) {
            Ok(frame) => {
                frames.push(frame);
                if let Err(e) = self.router.send_multipart(frames, zmq::DONTWAIT) {
                    warn!("snapshot acknowledgement not sent: {e}");
                }
            }
            Err(reject) => warn!("snapshot acknowledgement not sent: {reject}"),
        }
    }

    fn send_reply(&self, pending: &mut HashMap<NodeId, Waiting>, reply: Message) {
        let to = reply.to;
        let Some(Waiting { route: mut frames, cluster }) = pending.remove(&to) else {
            debug!("reply to node {to} dropped: no request of its is pending");
            return;
        };
        match self.wire.seal_as(cluster, &reply, None) {
            Ok(payload) => frames.push(payload),
            Err(reject) => return warn!("reply to node {to} not sent: {reject}"),
        }
        // ROUTER never blocks: it drops frames for a vanished or saturated peer,
        // which then times out and retries.
        if let Err(e) = self.router.send_multipart(frames, zmq::DONTWAIT) {
            warn!("reply to node {to} not sent: {e}");
        }
    }
}
