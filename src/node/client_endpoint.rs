//! The client endpoint: one ROUTER socket that serves any number of REQ (or
//! DEALER) clients at once.
//!
//! Malformed and oversized requests are answered here without bothering the
//! core. Writes and reads on a follower are forwarded to the leader over a
//! DEALER socket, each under a token of its own, so that the leader's reply
//! finds its way back to the right request even when one client has many in
//! flight (the ZeroMQ broker pattern). Every request gets exactly one reply:
//! the leader's, or an error when it cannot be forwarded, the leader
//! changes, or no reply comes in time.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use log::{debug, info, warn};

use super::Shared;
use super::core_loop::ClientCall;
use super::replies::ReplyTo;
use super::server::not_leader;
use crate::protocol::{ErrorCode, Reply, Request, decode_request};
use crate::raft::NodeId;
use crate::security::{Domain, NodeSecurity};

/// Frames above this are dropped by ZeroMQ itself; up to it, an oversized
/// request gets a `too_large` reply (CONTRACT.md).
const MAX_FRAME_BYTES: i64 = 64 * 1024 * 1024 + 64 * 1024;

pub struct EndpointConfig {
    pub id: NodeId,
    /// This node's client endpoint, to bind.
    pub client: String,
    pub max_request_bytes: usize,
    /// How long a forwarded request may wait for the leader's reply.
    pub forward_timeout: Duration,
    /// Bytes of requests that may wait for the core loop; beyond, `busy`.
    pub max_queued_bytes: usize,
    /// Plaintext, or CURVE for clients and for forwarding to the leader.
    pub security: Arc<NodeSecurity>,
}

/// Messages a socket queues per peer before it drops (ROUTER) or refuses
/// (DEALER) more. ZeroMQ's default of 1,000 is less than one busy follower
/// forwards at once, and a ROUTER drops replies beyond it without a word;
/// the core loop's own queue bound (`busy`) is what limits memory.
const QUEUE_HWM: i32 = 100_000;

/// Requests read per wake-up before replies get another turn.
const REQUEST_BATCH: usize = 1000;

/// How long replies still queued at shutdown may take to leave.
const SHUTDOWN_LINGER_MS: i32 = 2000;

/// The connection to the leader that forwarded requests travel on.
struct Forwarder {
    leader: NodeId,
    dealer: zmq::Socket,
    /// Forwarding token → the client's route and its reply deadline.
    waiting: HashMap<u64, (ReplyTo, Instant)>,
}

pub struct ClientEndpoint {
    ctx: zmq::Context,
    cfg: EndpointConfig,
    router: zmq::Socket,
    replies: zmq::Socket,
    forwarder: Option<Forwarder>,
    /// The last forwarding token handed out; unique for the process's life.
    last_token: u64,
}

impl ClientEndpoint {
    /// Binds the client endpoint and the inproc socket replies arrive on.
    pub fn bind(ctx: &zmq::Context, cfg: EndpointConfig, replies_endpoint: &str) -> Result<ClientEndpoint, String> {
        let router = ctx.socket(zmq::ROUTER).map_err(|e| e.to_string())?;
        router.set_linger(0).map_err(|e| e.to_string())?;
        router.set_maxmsgsize(MAX_FRAME_BYTES).map_err(|e| e.to_string())?;
        router.set_sndhwm(QUEUE_HWM).map_err(|e| e.to_string())?;
        router.set_rcvhwm(QUEUE_HWM).map_err(|e| e.to_string())?;
        cfg.security.server(&router, Domain::Client).map_err(|e| e.to_string())?;
        router.bind(&cfg.client).map_err(|e| format!("cannot bind client endpoint {}: {e}", cfg.client))?;
        let replies = ctx.socket(zmq::PULL).map_err(|e| e.to_string())?;
        replies.set_linger(0).map_err(|e| e.to_string())?;
        replies.bind(replies_endpoint).map_err(|e| e.to_string())?;
        Ok(ClientEndpoint { ctx: ctx.clone(), cfg, router, replies, forwarder: None, last_token: 0 })
    }

    /// Serves until the rest of the node has stopped (`replies_done`), so
    /// that every reply the core loop and the applier give on their way out
    /// still reaches its client. `core_queue` is the receiving end of
    /// `to_core`: whatever the core loop left in it is answered on the way out.
    pub fn run(mut self, shared: Arc<Shared>, to_core: Sender<ClientCall>, core_queue: Receiver<ClientCall>) {
        while !shared.replies_done.load(Ordering::Acquire) {
            let (router_ready, replies_ready, dealer_ready) = match self.poll() {
                Ok(ready) => ready,
                Err(e) => {
                    warn!("client endpoint poll failed: {e}");
                    continue;
                }
            };
            if replies_ready {
                while let Ok(frames) = self.replies.recv_multipart(zmq::DONTWAIT) {
                    self.send_to_client(frames);
                }
            }
            if dealer_ready {
                self.relay_leader_replies();
            }
            // A bounded batch, so replies get their turn even under a flood.
            if router_ready {
                for _ in 0..REQUEST_BATCH {
                    let Ok(frames) = self.router.recv_multipart(zmq::DONTWAIT) else { break };
                    self.on_request(frames, &shared, &to_core);
                }
            }
            if self.forwarder.as_ref().is_some_and(|f| shared.leader() != Some(f.leader)) {
                self.drop_forwarder();
            }
            self.expire_forwards();
        }
        while let Ok(frames) = self.replies.recv_multipart(zmq::DONTWAIT) {
            self.send_to_client(frames);
        }
        // Queued after the core loop's last look; nothing adds to it now.
        for call in core_queue.try_iter() {
            shared.queued_bytes.fetch_sub(call.bytes, Ordering::AcqRel);
            self.refuse(call.reply_to, ErrorCode::ShuttingDown, "node is shutting down", None);
        }
        self.drop_forwarder();
        // Closing a socket with linger 0 would discard the replies just queued.
        if let Err(e) = self.router.set_linger(SHUTDOWN_LINGER_MS) {
            warn!("cannot let the last replies drain: {e}");
        }
    }

    fn poll(&self) -> zmq::Result<(bool, bool, bool)> {
        let mut items = vec![self.router.as_poll_item(zmq::POLLIN), self.replies.as_poll_item(zmq::POLLIN)];
        if let Some(f) = &self.forwarder {
            items.push(f.dealer.as_poll_item(zmq::POLLIN));
        }
        zmq::poll(&mut items, 50)?;
        Ok((items[0].is_readable(), items[1].is_readable(), items.get(2).is_some_and(|i| i.is_readable())))
    }

    fn send_to_client(&self, frames: Vec<Vec<u8>>) {
        if let Err(e) = self.router.send_multipart(frames, zmq::DONTWAIT) {
            debug!("client went away before its reply: {e}");
        }
    }

    /// Answers directly on the ROUTER, never through the `Replier`: that
    /// queue is drained by this very thread, so blocking on it when full
    /// would wedge the node.
    fn answer(&self, reply_to: ReplyTo, reply: &Reply) {
        reply_to.record(reply.code());
        let mut frames = reply_to.route;
        frames.push(reply.encode());
        self.send_to_client(frames);
    }

    fn refuse(&self, reply_to: ReplyTo, code: ErrorCode, message: impl Into<String>, leader: Option<NodeId>) {
        self.answer(reply_to, &Reply::error(code, message, leader));
    }

    fn on_request(&mut self, mut frames: Vec<Vec<u8>>, shared: &Shared, to_core: &Sender<ClientCall>) {
        // [routing frames..., empty delimiter, request]
        let Some(delimiter) = frames.iter().position(|f| f.is_empty()) else {
            debug!("dropping a request without an empty delimiter frame");
            return;
        };
        let body = frames.split_off(delimiter + 1);
        let mut reply_to = ReplyTo::new(frames);
        let leader = shared.leader();
        let [request] = <[Vec<u8>; 1]>::try_from(body).unwrap_or_default();
        if request.is_empty() {
            return self.refuse(
                reply_to,
                ErrorCode::BadRequest,
                "expected exactly one non-empty request frame",
                leader,
            );
        }
        if request.len() > self.cfg.max_request_bytes {
            let message =
                format!("request is {} bytes; max_request_bytes is {}", request.len(), self.cfg.max_request_bytes);
            return self.refuse(reply_to, ErrorCode::TooLarge, message, leader);
        }
        if shared.stopping.load(Ordering::Acquire) {
            return self.refuse(reply_to, ErrorCode::ShuttingDown, "node is shutting down", leader);
        }
        let decoded = match decode_request(&request) {
            Ok(decoded) => decoded,
            Err(Reply::Error { code, message, .. }) => return self.refuse(reply_to, code, message, leader),
            Err(reply) => return self.answer(reply_to, &reply),
        };
        reply_to.op = decoded.op();
        let local = matches!(
            decoded,
            Request::Status | Request::Members | Request::Log { .. } | Request::Snapshot | Request::SnapshotData { .. }
        );
        match leader {
            leader if local || leader == Some(self.cfg.id) => {
                let call = ClientCall { request: decoded, reply_to, bytes: request.len() };
                self.to_core(to_core, shared, call)
            }
            Some(leader) if !reply_to.is_forwarded() => self.forward(leader, shared, reply_to, request),
            leader => self.answer(reply_to, &not_leader(self.cfg.id, leader)),
        }
    }

    /// Queues a request for the core loop, or answers `busy` when the queue
    /// is full by count or by bytes: memory stays bounded under any load.
    fn to_core(&self, to_core: &Sender<ClientCall>, shared: &Shared, call: ClientCall) {
        let queued = shared.queued_bytes.fetch_add(call.bytes, Ordering::AcqRel);
        let refused = if queued + call.bytes > self.cfg.max_queued_bytes {
            Some((call, ErrorCode::Busy, "too many requests queued; nothing was applied, retry later"))
        } else {
            match to_core.try_send(call) {
                Ok(()) => None,
                Err(TrySendError::Full(call)) => {
                    Some((call, ErrorCode::Busy, "too many requests queued; nothing was applied, retry later"))
                }
                Err(TrySendError::Disconnected(call)) => Some((call, ErrorCode::ShuttingDown, "node is shutting down")),
            }
        };
        if let Some((call, code, message)) = refused {
            shared.queued_bytes.fetch_sub(call.bytes, Ordering::AcqRel);
            self.refuse(call.reply_to, code, message, shared.leader());
        }
    }

    fn forward(&mut self, leader: NodeId, shared: &Shared, reply_to: ReplyTo, request: Vec<u8>) {
        if self.forwarder.as_ref().is_none_or(|f| f.leader != leader) {
            self.connect_forwarder(leader, shared);
        }
        let Some(forwarder) = self.forwarder.as_mut() else {
            let message = format!("cannot connect to leader {leader} to forward the request; nothing was applied");
            return self.reply(reply_to, ErrorCode::Busy, &message);
        };
        self.last_token += 1;
        let mut frames = ReplyTo::forwarding_route(self.last_token);
        frames.push(request);
        match forwarder.dealer.send_multipart(frames, zmq::DONTWAIT) {
            Ok(()) => {
                let deadline = Instant::now() + self.cfg.forward_timeout;
                forwarder.waiting.insert(self.last_token, (reply_to, deadline));
            }
            Err(e) => {
                // EAGAIN: the queue towards the leader is full.
                debug!("cannot forward a request to leader {leader}: {e}");
                let message = format!("cannot forward the request to leader {leader} ({e}); nothing was applied");
                self.reply(reply_to, ErrorCode::Busy, &message);
            }
        }
    }

    /// Forgets the connection to a leader that is no longer leader. Requests
    /// in flight to it may or may not have been applied: their clients hear
    /// `timeout` now rather than when their deadline passes.
    fn drop_forwarder(&mut self) {
        if let Some(old) = self.forwarder.take() {
            for (_, (reply_to, _)) in old.waiting {
                let message = "leader changed while the request was forwarded; it may or may not apply";
                self.reply(reply_to, ErrorCode::Timeout, message);
            }
        }
    }

    fn connect_forwarder(&mut self, leader: NodeId, shared: &Shared) {
        self.drop_forwarder();
        let Some(member) = shared.member(leader) else { return };
        let dealer = match self.ctx.socket(zmq::DEALER).and_then(|s| {
            s.set_linger(0)?;
            s.set_maxmsgsize(MAX_FRAME_BYTES)?;
            s.set_sndhwm(QUEUE_HWM)?;
            s.set_rcvhwm(QUEUE_HWM)?;
            self.cfg.security.client(&s, leader)?;
            s.connect(&member.client)?;
            Ok(s)
        }) {
            Ok(dealer) => dealer,
            Err(e) => {
                warn!("cannot connect to leader {leader} at {}: {e}", member.client);
                return;
            }
        };
        info!("node {}: forwarding client requests to leader {leader} at {}", self.cfg.id, member.client);
        self.forwarder = Some(Forwarder { leader, dealer, waiting: HashMap::new() });
    }

    fn relay_leader_replies(&mut self) {
        let Some(forwarder) = self.forwarder.as_mut() else { return };
        let mut replies = Vec::new();
        // [token, empty delimiter, reply]
        while let Ok(mut frames) = forwarder.dealer.recv_multipart(zmq::DONTWAIT) {
            // A reply whose client already got `timeout` is dropped.
            let waiting = ReplyTo::forwarded_token(&frames).and_then(|token| forwarder.waiting.remove(&token));
            if let (Some((reply_to, _)), Some(reply)) = (waiting, frames.pop()) {
                reply_to.record(Reply::code_of(&reply));
                let mut route = reply_to.route;
                route.push(reply);
                replies.push(route);
            }
        }
        for frames in replies {
            self.send_to_client(frames);
        }
    }

    fn expire_forwards(&mut self) {
        let Some(forwarder) = self.forwarder.as_mut() else { return };
        let now = Instant::now();
        let expired: Vec<u64> =
            forwarder.waiting.iter().filter(|(_, (_, deadline))| *deadline <= now).map(|(&token, _)| token).collect();
        let expired: Vec<ReplyTo> =
            expired.iter().filter_map(|k| forwarder.waiting.remove(k)).map(|(reply_to, _)| reply_to).collect();
        for reply_to in expired {
            self.reply(
                reply_to,
                ErrorCode::Timeout,
                "the leader did not answer in time; the request may or may not apply",
            );
        }
    }

    /// An error naming the leader requests are forwarded to.
    fn reply(&self, reply_to: ReplyTo, code: ErrorCode, message: &str) {
        self.refuse(reply_to, code, message, self.forwarder.as_ref().map(|f| f.leader));
    }
}
