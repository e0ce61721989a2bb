//! The sending half: one thread and one REQ socket per peer, so a slow or
//! dead peer only ever delays messages to itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use log::{debug, info};

use super::envelope::{Reject, Wire};
use super::{Inbound, STOP_CHECK, Warnings, deliver};
use crate::raft::{Message, NodeId};
use crate::security::NodeSecurity;

/// A REQ socket to `peer` at `endpoint`. It never needs a send or receive
/// timeout: sends are DONTWAIT (connect creates the outgoing pipe at once, so
/// one request always fits) and replies are awaited with `poll`.
pub(super) fn connect(
    ctx: &zmq::Context,
    endpoint: &str,
    max_message_bytes: i64,
    security: &NodeSecurity,
    peer: NodeId,
) -> zmq::Result<zmq::Socket> {
    let socket = ctx.socket(zmq::REQ)?;
    socket.set_linger(0)?;
    socket.set_maxmsgsize(max_message_bytes)?;
    security.client(&socket, peer)?;
    socket.connect(endpoint)?;
    Ok(socket)
}

pub(super) struct Link {
    pub(super) peer: NodeId,
    pub(super) endpoint: String,
    pub(super) ctx: zmq::Context,
    /// `None` after a failed exchange: a REQ socket whose reply never came
    /// is stuck, and its queue may hold stale requests, so it is replaced.
    pub(super) socket: Option<zmq::Socket>,
    pub(super) queue: Receiver<Message>,
    pub(super) wire: Arc<Wire>,
    pub(super) inbound: Sender<Inbound>,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) reply_timeout: Duration,
    pub(super) max_message_bytes: i64,
    pub(super) security: Arc<NodeSecurity>,
}

enum Failure {
    Stopped,
    Timeout,
    Zmq(zmq::Error),
    Rejected(Reject),
}

impl From<zmq::Error> for Failure {
    fn from(e: zmq::Error) -> Failure {
        Failure::Zmq(e)
    }
}

impl From<Reject> for Failure {
    fn from(r: Reject) -> Failure {
        Failure::Rejected(r)
    }
}

impl Link {
    /// Runs until the transport drops the queue's sender (shutdown).
    pub(super) fn run(mut self) {
        let mut warnings = Warnings::default();
        let mut reachable = true;
        while let Ok(oldest) = self.queue.recv() {
            // Heartbeats and votes pile up while the peer is down. Only the
            // newest reflects this node's state; older ones are stale and
            // Raft tolerates their loss.
            let message = self.queue.try_iter().last().unwrap_or(oldest);
            let outcome = match self.exchange(message) {
                Ok(reply) => {
                    if !reachable {
                        info!("peer {} reachable again", self.peer);
                        reachable = true;
                    }
                    Inbound::Message(reply)
                }
                Err(failure) => {
                    match failure {
                        Failure::Stopped => return,
                        Failure::Timeout => {}
                        Failure::Zmq(e) => warnings.warn("peer socket error", format!("peer {}: {e}", self.peer)),
                        Failure::Rejected(r) => {
                            let detail = format!("exchange with peer {} failed: {r}", self.peer);
                            warnings.warn(r.reason(), detail)
                        }
                    }
                    if reachable {
                        info!("peer {} unreachable at {}", self.peer, self.endpoint);
                        reachable = false;
                    }
                    Inbound::Unreachable(self.peer)
                }
            };
            deliver(&self.inbound, outcome, &mut warnings);
        }
    }

    /// One request, one reply. On any failure the socket is dropped here and
    /// a fresh one is connected for the next request.
    fn exchange(&mut self, message: Message) -> Result<Message, Failure> {
        let request = self.wire.seal(message)?;
        let socket = match self.socket.take() {
            Some(socket) => socket,
            None => connect(&self.ctx, &self.endpoint, self.max_message_bytes, &self.security, self.peer)?,
        };
        socket.send(request, zmq::DONTWAIT)?;
        self.await_reply(&socket)?;
        let reply = socket.recv_bytes(zmq::DONTWAIT)?;
        let reply = self.wire.open_reply(&reply, self.peer)?;
        self.socket = Some(socket);
        Ok(reply)
    }

    /// Waits up to `reply_timeout`, in slices so that shutdown is prompt.
    fn await_reply(&self, socket: &zmq::Socket) -> Result<(), Failure> {
        let deadline = Instant::now() + self.reply_timeout;
        loop {
            if self.stop.load(Ordering::Acquire) {
                return Err(Failure::Stopped);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                debug!("no reply from peer {} within {:?}", self.peer, self.reply_timeout);
                return Err(Failure::Timeout);
            }
            let slice_ms = left.min(STOP_CHECK).as_millis().max(1) as i64;
            match socket.poll(zmq::POLLIN, slice_ms) {
                Ok(0) | Err(zmq::Error::EINTR) => {}
                Ok(_) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }
}
