//! The client endpoint: one ROUTER socket that serves any number of REQ (or
//! DEALER) clients at once. The core loop polls it with the peer sockets
//! and hands its requests to the server itself, and the server's replies go
//! straight back on it: a request crosses no thread between the network
//! and the server (each crossing costs a wake-up, the node's largest expense).
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
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TryRecvError};
use log::{debug, info, warn};

use super::Shared;
use super::core_loop::ClientCall;
use super::log_reader::{LOG_REPLY_MAX_BYTES, SNAPSHOT_PIECE_BYTES};
use super::replies::{Forward, ReplyTo};
use super::server::not_leader;
use crate::net::security::{Caller, Domain, NodeSecurity, recv_with_user};
use crate::net::transport::bind_problem;
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
    /// Requests, and bytes of them, that may wait for the server; beyond, `busy`.
    pub max_queued: usize,
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

/// Requests ZeroMQ reads ahead from one client connection while the core
/// loop is busy (a follower's fsync, a snapshot installed); beyond, that
/// client waits on TCP. The core loop drains far more than this per round.
const REQUEST_HWM: i32 = 1_000;

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

/// Requests read per poll before replies get another turn.
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

/// How soon replies held in backlogs try to leave again: at first, and
/// after one did. Each try that moves nothing doubles the wait, up to
/// [`BACKLOG_RETRY_MAX`], so that a client that never reads does not keep
/// the core loop going round for nothing.
const BACKLOG_RETRY: Duration = Duration::from_millis(1);
const BACKLOG_RETRY_MAX: Duration = Duration::from_millis(64);

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
    forwarder: Option<Forwarder>,
    /// The last forwarding token handed out; unique for the process's life.
    last_token: u64,
    /// Requests read and checked, waiting for the server, oldest first.
    queue: VecDeque<ClientCall>,
    /// The sizes of the requests in `queue`, summed.
    queued_bytes: usize,
    /// How soon the backlogs try again (see [`BACKLOG_RETRY`]).
    backlog_retry: Duration,
    /// The node is stopping: checked requests get `shutting_down`.
    stopping: bool,
}

impl ClientEndpoint {
    /// Binds the client endpoint.
    pub fn bind(ctx: &zmq::Context, cfg: EndpointConfig) -> Result<ClientEndpoint, String> {
        let router = ctx.socket(zmq::ROUTER).map_err(|e| e.to_string())?;
        router.set_linger(0).map_err(|e| e.to_string())?;
        router.set_maxmsgsize(MAX_FRAME_BYTES).map_err(|e| e.to_string())?;
        router.set_sndhwm(reply_queue_hwm(cfg.max_request_bytes)).map_err(|e| e.to_string())?;
        // A full queue says EAGAIN instead of dropping the reply in silence.
        router.set_router_mandatory(true).map_err(|e| e.to_string())?;
        router.set_rcvhwm(REQUEST_HWM).map_err(|e| e.to_string())?;
        cfg.security.server(&router, Domain::Client).map_err(|e| e.to_string())?;
        router.bind(&cfg.client).map_err(|e| bind_problem("client", &cfg.client, &e))?;
        Ok(ClientEndpoint {
            ctx: ctx.clone(),
            cfg,
            router,
            backlogs: HashMap::new(),
            forwarder: None,
            last_token: 0,
            queue: VecDeque::new(),
            queued_bytes: 0,
            backlog_retry: BACKLOG_RETRY,
            stopping: false,
        })
    }

    /// The sockets to poll for input: the ROUTER, and the connection to
    /// the leader while requests are forwarded.
    pub fn sockets(&self) -> Vec<&zmq::Socket> {
        std::iter::once(&self.router).chain(self.forwarder.as_ref().map(|f| &f.dealer)).collect()
    }

    /// How soon to look again with no input: ZeroMQ tells of no room in one
    /// connection's queue, so while replies wait for some, soon.
    pub fn look_again_in(&self) -> Option<Duration> {
        (!self.backlogs.is_empty()).then_some(self.backlog_retry)
    }

    /// Takes what the sockets of [`ClientEndpoint::sockets`] that `ready`
    /// says are readable hold: requests, checked and queued for the server
    /// (or answered here), and the leader's replies to forwarded ones.
    /// A bounded batch of requests, so that replies get their turn.
    pub fn on_ready(&mut self, ready: &[bool], shared: &Shared) {
        if ready.get(1).copied().unwrap_or(false) {
            self.relay_leader_replies();
        }
        if ready.first().copied().unwrap_or(false) {
            for _ in 0..REQUEST_BATCH {
                let Ok((frames, user)) = recv_with_user(&self.router, zmq::DONTWAIT) else { break };
                self.on_request(frames, Caller::of(user.as_deref()), shared);
            }
        }
    }

    /// The oldest request waiting for the server.
    pub fn next_call(&mut self) -> Option<ClientCall> {
        let call = self.queue.pop_front()?;
        self.queued_bytes -= call.bytes;
        Some(call)
    }

    /// Requests waiting for the server.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Goes on with what time and the leader decide: forgets the connection
    /// to a leader that no longer is one, answers forwarded requests whose
    /// time is up, sends what the backlogs hold.
    pub fn tidy(&mut self, shared: &Shared) {
        if self.forwarder.as_ref().is_some_and(|f| shared.leader() != Some(f.leader)) {
            self.drop_forwarder();
        }
        self.expire_forwards();
        self.flush_backlogs();
    }

    /// On the way out, once the server gave its last replies: every request
    /// still waiting, and every one that arrives until the log reader has
    /// given its last replies (`disk_replies` closes: its work is bounded)
    /// and the backlogs have sent theirs (for up to 2 s), gets `shutting_down`.
    pub fn shut_down(mut self, disk_replies: &Receiver<(ReplyTo, Reply)>, shared: &Shared) {
        self.stopping = true;
        while let Some(call) = self.next_call() {
            self.refuse(call.reply_to, ErrorCode::ShuttingDown, "node is shutting down", None);
        }
        self.drop_forwarder();
        let mut reader_done = false;
        let mut deadline = None;
        while !reader_done || (!self.backlogs.is_empty() && deadline.is_none_or(|d| Instant::now() < d)) {
            loop {
                match disk_replies.try_recv() {
                    Ok((reply_to, reply)) => self.reply(reply_to, &reply),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        reader_done = true;
                        break;
                    }
                }
            }
            if reader_done && deadline.is_none() {
                deadline = Some(Instant::now() + Duration::from_millis(SHUTDOWN_LINGER_MS as u64));
            }
            if self.router.poll(zmq::POLLIN, BACKLOG_RETRY.as_millis() as i64).is_ok_and(|n| n > 0) {
                self.on_ready(&[true], shared);
            }
            self.flush_backlogs();
        }
        // Closing a socket with linger 0 would discard the replies just queued.
        if let Err(e) = self.router.set_linger(SHUTDOWN_LINGER_MS) {
            warn!("cannot let the last replies drain: {e}");
        }
    }

    /// Answers a request: counts it, and sends the reply, or keeps it in
    /// its connection's backlog while ZeroMQ's queue for it is full.
    pub fn reply(&mut self, reply_to: ReplyTo, reply: &Reply) {
        reply_to.record(reply.code());
        let mut frames = reply_to.route;
        frames.push(reply.encode());
        self.send_to_client(frames);
    }

    /// Sends on what the server forwards. One meant for a leader that is no
    /// longer the one the core loop last saw gets `no_leader` naming the new
    /// one, unsent: the connection follows the newest leader.
    pub fn forward(&mut self, Forward { leader, request, reply_to }: Forward, shared: &Shared) {
        match shared.leader() {
            Some(now) if now == leader => self.forward_to(leader, shared, reply_to, request),
            now => self.reply(reply_to, &not_leader(self.cfg.id, now)),
        }
    }

    /// Sends a reply, or keeps it in its connection's backlog while
    /// ZeroMQ's queue for the connection is full: replies leave in order,
    /// and at most [`MAX_QUEUED_REPLY_BYTES`] wait.
    fn send_to_client(&mut self, frames: Vec<Vec<u8>>) {
        let Some(id) = frames.first() else { return };
        let sent =
            if self.backlogs.contains_key(id) { Err(zmq::Error::EAGAIN) } else { try_send(&self.router, &frames) };
        match sent {
            Ok(()) => {}
            Err(zmq::Error::EAGAIN) => {
                let backlog = self.backlogs.entry(id.clone()).or_default();
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
        let (router, mut moved) = (&self.router, false);
        self.backlogs.retain(|_, backlog| {
            while let Some(frames) = backlog.replies.front() {
                match try_send(router, frames) {
                    Ok(()) => {
                        backlog.bytes -= frames.iter().map(Vec::len).sum::<usize>();
                        backlog.replies.pop_front();
                        moved = true;
                    }
                    Err(zmq::Error::EAGAIN) => return true,
                    Err(_) => return false,
                }
            }
            false
        });
        self.backlog_retry = if moved || self.backlogs.is_empty() {
            BACKLOG_RETRY
        } else {
            (self.backlog_retry * 2).min(BACKLOG_RETRY_MAX)
        };
    }

    fn refuse(&mut self, reply_to: ReplyTo, code: ErrorCode, message: impl Into<String>, leader: Option<NodeId>) {
        self.reply(reply_to, &Reply::error(code, message, leader));
    }

    fn on_request(&mut self, mut frames: Vec<zmq::Message>, caller: Caller, shared: &Shared) {
        // [routing frames..., empty delimiter, request]
        let Some(delimiter) = frames.iter().position(|f| f.is_empty()) else {
            debug!("dropping a request without an empty delimiter frame");
            return;
        };
        let body = frames.split_off(delimiter + 1);
        // Only a node forwards: a client's claim to be forwarded is ignored.
        let forwarder = matches!(caller, Caller::Node(_) | Caller::Anyone);
        // With room for the reply that will follow the route.
        let mut route = Vec::with_capacity(frames.len() + 1);
        route.extend(frames.iter().map(|f| f.to_vec()));
        let mut reply_to = ReplyTo::new(route, forwarder);
        let leader = shared.leader();
        let [request] = <[zmq::Message; 1]>::try_from(body).unwrap_or_else(|_| [zmq::Message::new()]);
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
        if self.stopping {
            return self.refuse(reply_to, ErrorCode::ShuttingDown, "node is shutting down", leader);
        }
        let decoded = match decode_request(&request) {
            Ok(decoded) => decoded,
            Err(Reply::Error { code, message, .. }) => return self.refuse(reply_to, code, message, leader),
            Err(reply) => return self.reply(reply_to, &reply),
        };
        reply_to.op = decoded.op();
        let call = ClientCall { request: decoded, reply_to, bytes: request.len() };
        self.enqueue(shared, call)
    }

    /// Queues a request for the server, or answers `busy` when the queue
    /// is full by count or by bytes: memory stays bounded under any load.
    fn enqueue(&mut self, shared: &Shared, call: ClientCall) {
        if self.queue.len() >= self.cfg.max_queued || self.queued_bytes + call.bytes > self.cfg.max_queued_bytes {
            let message = "too many requests queued; nothing was applied, retry later";
            return self.refuse(call.reply_to, ErrorCode::Busy, message, shared.leader());
        }
        self.queued_bytes += call.bytes;
        self.queue.push_back(call);
    }

    fn forward_to(&mut self, leader: NodeId, shared: &Shared, reply_to: ReplyTo, request: Vec<u8>) {
        if self.forwarder.as_ref().is_none_or(|f| f.leader != leader) {
            self.connect_forwarder(leader, shared);
        }
        let Some(forwarder) = self.forwarder.as_mut() else {
            let message = format!("cannot connect to leader {leader} to forward the request; nothing was applied");
            return self.refuse_forward(reply_to, ErrorCode::Busy, &message);
        };
        let bytes = request.len();
        if forwarder.waiting_bytes + bytes > MAX_FORWARDED_BYTES {
            let message = format!("too many bytes of requests forwarded to leader {leader}; nothing was applied");
            return self.refuse_forward(reply_to, ErrorCode::Busy, &message);
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
                self.refuse_forward(reply_to, ErrorCode::Busy, &message);
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
                self.refuse_forward(reply_to, ErrorCode::Timeout, message);
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
            self.refuse_forward(
                reply_to,
                ErrorCode::Timeout,
                "the leader did not answer in time; the request may or may not apply",
            );
        }
    }

    /// An error naming the leader requests are forwarded to.
    fn refuse_forward(&mut self, reply_to: ReplyTo, code: ErrorCode, message: &str) {
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
