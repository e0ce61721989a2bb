//! The client endpoint: one ROUTER socket that serves any number of REQ (or
//! DEALER) clients at once.
//!
//! Malformed and oversized requests are answered here without bothering the
//! core. The server decides what a follower forwards to the leader; this
//! endpoint carries it out over a DEALER socket, each request under a token
//! of its own, so that the leader's reply finds its way back to the right
//! request even when one client has many in flight (the ZeroMQ broker
//! pattern). Every request gets exactly one reply: the leader's, or an
//! error when it cannot be forwarded, the leader changes, or no reply comes
//! in time.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TrySendError};
use log::{debug, info, warn};

use super::Shared;
use super::core_loop::ClientCall;
use super::log_reader::{LOG_REPLY_MAX_BYTES, SNAPSHOT_PIECE_BYTES};
use super::replies::{Forward, ReplyBacklog, ReplyTo, frame_bytes, is_wake_up};
use super::server::not_leader;
use crate::net::security::{Caller, Domain, NodeSecurity, recv_with_user};
use crate::net::transport::bind_problem;
use crate::net::wake::WakingSender;
use crate::raft::NodeId;
use crate::wire::protocol::{ErrorCode, Reply, decode_request, is_admin_request};

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
/// forwards at once; the core loop's own queue bound (`busy`) and
/// [`MAX_FORWARDED_BYTES`] are what limit memory. Replies to clients have a
/// bound of their own: [`reply_queue_hwm`].
const QUEUE_HWM: i32 = 100_000;

/// Bytes of replies a node holds queued for one connection whose client
/// does not read them (CONTRACT.md "Limits": 64 MiB), half in ZeroMQ's
/// queue for the connection and half in its [`Backlog`]; beyond, replies
/// to it are dropped. Small replies hardly ever queue at all: the kernel's
/// socket buffers take megabytes of them first.
const MAX_QUEUED_REPLY_BYTES: usize = 32 * 1024 * 1024;

/// Bytes of requests a follower may have forwarded to the leader and not
/// yet seen answered; beyond, `busy`.
const MAX_FORWARDED_BYTES: usize = 64 * 1024 * 1024;

/// How many replies ZeroMQ may queue per connection: as many of the largest
/// reply as fit in [`MAX_QUEUED_REPLY_BYTES`]. ZeroMQ counts messages, not
/// bytes, so the count is what bounds the bytes. The largest reply holds a
/// value (at most a request's size), a `log` page or a `snapshot_data` piece.
fn reply_queue_hwm(max_request_bytes: usize) -> i32 {
    let largest = max_request_bytes.max(LOG_REPLY_MAX_BYTES).max(SNAPSHOT_PIECE_BYTES) + 64 * 1024;
    i32::try_from((MAX_QUEUED_REPLY_BYTES / largest).max(1)).expect("at most 64 Mi")
}

/// Requests read per wake-up before replies get another turn.
const REQUEST_BATCH: usize = 1000;

/// How long replies still queued at shutdown may take to leave.
const SHUTDOWN_LINGER_MS: i32 = 2000;

/// The connection to the leader that forwarded requests travel on.
struct Forwarder {
    leader: NodeId,
    dealer: zmq::Socket,
    /// Forwarding token → the client's route, its reply deadline and the
    /// request's size.
    waiting: HashMap<u64, Forwarded>,
    /// The sizes of the requests in `waiting`, summed.
    waiting_bytes: usize,
}

struct Forwarded {
    reply_to: ReplyTo,
    deadline: Instant,
    bytes: usize,
}

impl Forwarder {
    fn take(&mut self, token: u64) -> Option<ReplyTo> {
        let forwarded = self.waiting.remove(&token)?;
        self.waiting_bytes -= forwarded.bytes;
        Some(forwarded.reply_to)
    }
}

/// How often replies held in backlogs try to leave again.
const BACKLOG_RETRY_MS: i64 = 1;

/// Replies to one connection that ZeroMQ's queue for it had no room for
/// (its client is not reading), oldest first.
#[derive(Default)]
struct Backlog {
    replies: VecDeque<Vec<Vec<u8>>>,
    bytes: usize,
}

pub struct ClientEndpoint {
    ctx: zmq::Context,
    cfg: EndpointConfig,
    router: zmq::Socket,
    /// By routing id: the connections whose queue is full.
    backlogs: HashMap<Vec<u8>, Backlog>,
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
        router.set_sndhwm(reply_queue_hwm(cfg.max_request_bytes)).map_err(|e| e.to_string())?;
        // A full queue says EAGAIN instead of dropping the reply in silence.
        router.set_router_mandatory(true).map_err(|e| e.to_string())?;
        router.set_rcvhwm(QUEUE_HWM).map_err(|e| e.to_string())?;
        cfg.security.server(&router, Domain::Client).map_err(|e| e.to_string())?;
        router.bind(&cfg.client).map_err(|e| bind_problem("client", &cfg.client, &e))?;
        let replies = ctx.socket(zmq::PULL).map_err(|e| e.to_string())?;
        replies.set_linger(0).map_err(|e| e.to_string())?;
        replies.bind(replies_endpoint).map_err(|e| e.to_string())?;
        let backlogs = HashMap::new();
        Ok(ClientEndpoint { ctx: ctx.clone(), cfg, router, backlogs, replies, forwarder: None, last_token: 0 })
    }

    /// Serves until the rest of the node has stopped (`replies_done`), so
    /// that every reply the core loop and the applier give on their way out
    /// still reaches its client. `core_queue` is the receiving end of
    /// `to_core`: whatever the core loop left in it is answered on the way out.
    /// `forwards`: what the server sends on to the leader. `backlog` counts
    /// the replies and forwards handed to it and not yet taken.
    pub fn run(
        mut self,
        shared: Arc<Shared>,
        to_core: WakingSender<ClientCall>,
        core_queue: Receiver<ClientCall>,
        forwards: Receiver<Forward>,
        backlog: ReplyBacklog,
    ) {
        while !shared.replies_done.load(Ordering::Acquire) {
            let (router_ready, replies_ready, dealer_ready) = match self.poll() {
                Ok(ready) => ready,
                Err(e) => {
                    warn!("client endpoint poll failed: {e}");
                    continue;
                }
            };
            if replies_ready {
                self.pass_replies_on(&backlog);
                self.forward_all(&forwards, &shared, &backlog);
            }
            if dealer_ready {
                self.relay_leader_replies();
            }
            // A bounded batch, so replies get their turn even under a flood.
            if router_ready {
                for _ in 0..REQUEST_BATCH {
                    let Ok((frames, user)) = recv_with_user(&self.router, zmq::DONTWAIT) else { break };
                    self.on_request(frames, Caller::of(user.as_deref()), &shared, &to_core);
                }
            }
            if self.forwarder.as_ref().is_some_and(|f| shared.leader() != Some(f.leader)) {
                self.drop_forwarder();
            }
            self.expire_forwards();
            self.flush_backlogs();
        }
        self.pass_replies_on(&backlog);
        for Forward { request, reply_to, .. } in forwards.try_iter() {
            backlog.taken(request.len());
            self.refuse(reply_to, ErrorCode::ShuttingDown, "node is shutting down", None);
        }
        // Queued after the core loop's last look; nothing adds to it now.
        for call in core_queue.try_iter() {
            shared.queued_bytes.fetch_sub(call.bytes, Ordering::AcqRel);
            self.refuse(call.reply_to, ErrorCode::ShuttingDown, "node is shutting down", None);
        }
        self.drop_forwarder();
        self.drain_backlogs(Instant::now() + Duration::from_millis(SHUTDOWN_LINGER_MS as u64));
        // Closing a socket with linger 0 would discard the replies just queued.
        if let Err(e) = self.router.set_linger(SHUTDOWN_LINGER_MS) {
            warn!("cannot let the last replies drain: {e}");
        }
    }

    fn pass_replies_on(&mut self, backlog: &ReplyBacklog) {
        while let Ok(frames) = self.replies.recv_multipart(zmq::DONTWAIT) {
            if !is_wake_up(&frames) {
                backlog.taken(frame_bytes(&frames));
                self.send_to_client(frames);
            }
        }
    }

    /// Sends on what the server forwards. One meant for a leader that is no
    /// longer the one the core loop last saw gets `no_leader` naming the new
    /// one, unsent: the connection follows the newest leader.
    fn forward_all(&mut self, forwards: &Receiver<Forward>, shared: &Shared, backlog: &ReplyBacklog) {
        for Forward { leader, request, reply_to } in forwards.try_iter() {
            backlog.taken(request.len());
            match shared.leader() {
                Some(now) if now == leader => self.forward(leader, shared, reply_to, request),
                now => self.answer(reply_to, &not_leader(self.cfg.id, now)),
            }
        }
    }

    fn poll(&self) -> zmq::Result<(bool, bool, bool)> {
        let mut items = vec![self.router.as_poll_item(zmq::POLLIN), self.replies.as_poll_item(zmq::POLLIN)];
        if let Some(f) = &self.forwarder {
            items.push(f.dealer.as_poll_item(zmq::POLLIN));
        }
        // ZeroMQ tells of no room in one connection's queue: while replies
        // wait for some, look again soon.
        let timeout = if self.backlogs.is_empty() { 50 } else { BACKLOG_RETRY_MS };
        zmq::poll(&mut items, timeout)?;
        Ok((items[0].is_readable(), items[1].is_readable(), items.get(2).is_some_and(|i| i.is_readable())))
    }

    /// Sends a reply, or keeps it in its connection's backlog while
    /// ZeroMQ's queue for the connection is full: replies leave in order,
    /// and at most [`MAX_QUEUED_REPLY_BYTES`] wait.
    fn send_to_client(&mut self, frames: Vec<Vec<u8>>) {
        let Some(id) = frames.first().cloned() else { return };
        let sent =
            if self.backlogs.contains_key(&id) { Err(zmq::Error::EAGAIN) } else { try_send(&self.router, &frames) };
        match sent {
            Ok(()) => {}
            Err(zmq::Error::EAGAIN) => {
                let backlog = self.backlogs.entry(id).or_default();
                let bytes: usize = frames.iter().map(Vec::len).sum();
                if backlog.bytes + bytes > MAX_QUEUED_REPLY_BYTES {
                    return debug!("a client that does not read its replies lost one");
                }
                backlog.bytes += bytes;
                backlog.replies.push_back(frames);
            }
            Err(e) => debug!("client went away before its reply: {e}"),
        }
    }

    /// Sends what the backlogs hold while their connections take it; forgets
    /// the backlog of a client that went away.
    fn flush_backlogs(&mut self) {
        let router = &self.router;
        self.backlogs.retain(|_, backlog| {
            while let Some(frames) = backlog.replies.front() {
                match try_send(router, frames) {
                    Ok(()) => {
                        backlog.bytes -= frames.iter().map(Vec::len).sum::<usize>();
                        backlog.replies.pop_front();
                    }
                    Err(zmq::Error::EAGAIN) => return true,
                    Err(_) => return false,
                }
            }
            false
        });
    }

    /// On the way out: the last replies (say, `timeout` for every request
    /// forwarded to a leader) may fill a connection's queue many times over;
    /// they leave as the client reads them, until `deadline`.
    fn drain_backlogs(&mut self, deadline: Instant) {
        self.flush_backlogs();
        while !self.backlogs.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(BACKLOG_RETRY_MS as u64));
            self.flush_backlogs();
        }
    }

    /// Answers directly on the ROUTER, never through the `Replier`: that
    /// queue is drained by this very thread, so blocking on it when full
    /// would wedge the node.
    fn answer(&mut self, reply_to: ReplyTo, reply: &Reply) {
        reply_to.record(reply.code());
        let mut frames = reply_to.route;
        frames.push(reply.encode());
        self.send_to_client(frames);
    }

    fn refuse(&mut self, reply_to: ReplyTo, code: ErrorCode, message: impl Into<String>, leader: Option<NodeId>) {
        self.answer(reply_to, &Reply::error(code, message, leader));
    }

    fn on_request(
        &mut self,
        mut frames: Vec<Vec<u8>>,
        caller: Caller,
        shared: &Shared,
        to_core: &WakingSender<ClientCall>,
    ) {
        // [routing frames..., empty delimiter, request]
        let Some(delimiter) = frames.iter().position(|f| f.is_empty()) else {
            debug!("dropping a request without an empty delimiter frame");
            return;
        };
        let body = frames.split_off(delimiter + 1);
        // Only a node forwards: a client's claim to be forwarded is ignored.
        let forwarder = matches!(caller, Caller::Node(_) | Caller::Anyone);
        let mut reply_to = ReplyTo::new(frames, forwarder);
        let leader = shared.leader();
        let [request] = <[Vec<u8>; 1]>::try_from(body).unwrap_or_default();
        // First, whatever else is wrong with it, on whichever node it arrives:
        // a node forwards only what its client may ask.
        if !self.cfg.security.may_administer(caller) && is_admin_request(&request) {
            let message = "this client's key may not run admin ops (admin_keys); nothing was applied";
            return self.refuse(reply_to, ErrorCode::Forbidden, message, leader);
        }
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
        let call = ClientCall { request: decoded, reply_to, bytes: request.len() };
        self.hand_to_core(to_core, shared, call)
    }

    /// Queues a request for the core loop, or answers `busy` when the queue
    /// is full by count or by bytes: memory stays bounded under any load.
    fn hand_to_core(&mut self, to_core: &WakingSender<ClientCall>, shared: &Shared, call: ClientCall) {
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
        let bytes = request.len();
        if forwarder.waiting_bytes + bytes > MAX_FORWARDED_BYTES {
            let message = format!("too many bytes of requests forwarded to leader {leader}; nothing was applied");
            return self.reply(reply_to, ErrorCode::Busy, &message);
        }
        self.last_token += 1;
        let mut frames = ReplyTo::forwarding_route(self.last_token);
        frames.push(request);
        match forwarder.dealer.send_multipart(frames, zmq::DONTWAIT) {
            Ok(()) => {
                let deadline = Instant::now() + self.cfg.forward_timeout;
                forwarder.waiting.insert(self.last_token, Forwarded { reply_to, deadline, bytes });
                forwarder.waiting_bytes += bytes;
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
            for (_, Forwarded { reply_to, .. }) in old.waiting {
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
        self.forwarder = Some(Forwarder { leader, dealer, waiting: HashMap::new(), waiting_bytes: 0 });
    }

    fn relay_leader_replies(&mut self) {
        let Some(forwarder) = self.forwarder.as_mut() else { return };
        let mut replies = Vec::new();
        // [token, empty delimiter, reply]
        while let Ok(mut frames) = forwarder.dealer.recv_multipart(zmq::DONTWAIT) {
            // A reply whose client already got `timeout` is dropped.
            let waiting = ReplyTo::forwarded_token(&frames).and_then(|token| forwarder.take(token));
            if let (Some(reply_to), Some(reply)) = (waiting, frames.pop()) {
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
            forwarder.waiting.iter().filter(|(_, f)| f.deadline <= now).map(|(&token, _)| token).collect();
        let expired: Vec<ReplyTo> = expired.into_iter().filter_map(|token| forwarder.take(token)).collect();
        for reply_to in expired {
            self.reply(
                reply_to,
                ErrorCode::Timeout,
                "the leader did not answer in time; the request may or may not apply",
            );
        }
    }

    /// An error naming the leader requests are forwarded to.
    fn reply(&mut self, reply_to: ReplyTo, code: ErrorCode, message: &str) {
        self.refuse(reply_to, code, message, self.forwarder.as_ref().map(|f| f.leader));
    }
}

/// Sends one multipart message on a ROUTER, or nothing of it (EAGAIN: the
/// connection's queue is full; a ROUTER decides on the routing id frame).
fn try_send(router: &zmq::Socket, frames: &[Vec<u8>]) -> zmq::Result<()> {
    let last = frames.len() - 1;
    for (i, frame) in frames.iter().enumerate() {
        let more = if i < last { zmq::SNDMORE } else { 0 };
        router.send(&frame[..], zmq::DONTWAIT | more)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_queued_for_one_connection_stay_within_64_mib_whatever_the_request_limit() {
        for max_request_bytes in [1, 1 << 20, 8 << 20, 64 << 20] {
            let hwm = reply_queue_hwm(max_request_bytes) as usize;
            let largest = max_request_bytes.max(LOG_REPLY_MAX_BYTES) + 64 * 1024;
            assert!(hwm >= 1 && (hwm == 1 || hwm * largest <= MAX_QUEUED_REPLY_BYTES), "{max_request_bytes}: {hwm}");
        }
        assert_eq!(reply_queue_hwm(1 << 20), 30, "the default config: thirty 1 MiB replies (and the backlog's 32 MiB)");
    }
}
