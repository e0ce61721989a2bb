//! Getting a reply back to the client that asked.
//!
//! ZeroMQ sockets are not thread-safe, so only the client endpoint thread
//! touches the ROUTER socket. Other threads (the core loop, the applier) hand
//! replies to it over an inproc PUSH/PULL pair, which also wakes its poll
//! immediately: a reply's latency is the client's latency.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::Sender;
use log::error;

use crate::lock;
use crate::metrics::{METRICS, seconds_since};
use crate::raft::NodeId;
use crate::wire::protocol::Reply;

/// The ROUTER routing frames of one request: the client's identity, any
/// frames its socket adds (a REQ_CORRELATE request id), a forwarding tag when
/// a follower forwarded it, and the empty delimiter. Sending them back with
/// the reply routes it to the right client.
#[derive(Debug)]
pub struct ReplyTo {
    pub route: Vec<Vec<u8>>,
    /// The request's op (its metrics label; "unknown" before it decoded).
    pub op: &'static str,
    /// When it arrived, for the latency metric.
    pub arrived: Instant,
    /// A follower forwarded it to us.
    forwarded: bool,
}

/// Starts the frame a follower puts in front of a request it forwards to the
/// leader; a per-request token follows. The leader never forwards such a
/// request again, so two nodes with stale views of the leader cannot bounce
/// it between them.
const FORWARD_TAG: &[u8] = b"raft-zmq/forwarded/";

impl ReplyTo {
    /// The route a request came in on; `from_node`: whether it came on a
    /// connection that may forward (a node's key, or no CURVE at all).
    pub fn new(route: Vec<Vec<u8>>, from_node: bool) -> ReplyTo {
        let forwarded = from_node && route.get(1).is_some_and(|frame| frame.starts_with(FORWARD_TAG));
        ReplyTo { route, op: "unknown", arrived: Instant::now(), forwarded }
    }

    /// Counts the request as answered with `code` ("ok" or an error code).
    /// A follower forwarded a request it counts itself, end to end, so the
    /// leader leaves it out: summed over nodes, each request counts once.
    pub fn record(&self, code: &str) {
        if !self.is_forwarded() {
            METRICS.client_requests.with_label_values(&[self.op, code]).inc();
            METRICS.client_seconds.with_label_values(&[self.op]).observe(seconds_since(self.arrived));
        }
    }

    /// Whether a follower forwarded this request to us.
    pub fn is_forwarded(&self) -> bool {
        self.forwarded
    }

    /// The frames a follower sends in front of request number `token` it forwards.
    pub fn forwarding_route(token: u64) -> Vec<Vec<u8>> {
        vec![[FORWARD_TAG, &token.to_be_bytes()[..]].concat(), Vec::new()]
    }

    /// The token of a forwarded request's reply as it comes back to the
    /// follower that sent it (the frames of [`ReplyTo::forwarding_route`]).
    pub fn forwarded_token(frames: &[Vec<u8>]) -> Option<u64> {
        let token = frames.first()?.strip_prefix(FORWARD_TAG)?;
        Some(u64::from_be_bytes(token.try_into().ok()?))
    }
}

/// A request the server sends on to the leader (`Effect::Forward`), on its
/// way to the client endpoint, which owns the connection to the leader.
pub struct Forward {
    pub leader: NodeId,
    pub request: Vec<u8>,
    pub reply_to: ReplyTo,
}

/// Cloneable handle that sends replies, and requests to forward, to the
/// client endpoint thread.
#[derive(Clone)]
pub struct Replier {
    push: Arc<Mutex<zmq::Socket>>,
    backlog: ReplyBacklog,
    forwards: Sender<Forward>,
}

/// Bytes of replies handed to the client endpoint and not yet taken by it.
/// The core loop takes no new client requests while they exceed
/// [`ReplyBacklog::LIMIT`]: a client asking for large values faster than
/// the endpoint thread passes them on would otherwise pile up replies
/// without bound (on a busy machine, hundreds of MiB of them).
#[derive(Clone, Default)]
pub struct ReplyBacklog(Arc<AtomicUsize>);

impl ReplyBacklog {
    pub const LIMIT: usize = 64 << 20;

    pub fn full(&self) -> bool {
        self.0.load(Ordering::Acquire) > Self::LIMIT
    }

    /// The endpoint took a reply of `bytes` off the queue.
    pub fn taken(&self, bytes: usize) {
        self.0.fetch_sub(bytes, Ordering::AcqRel);
    }
}

impl Replier {
    pub const ENDPOINT_PREFIX: &'static str = "inproc://raft-zmq-replies";

    /// Connects to the PULL socket the client endpoint bound at `endpoint`;
    /// requests to forward go to it through `forwards`.
    pub fn connect(ctx: &zmq::Context, endpoint: &str, forwards: Sender<Forward>) -> zmq::Result<Replier> {
        let push = ctx.socket(zmq::PUSH)?;
        push.set_linger(0)?;
        // Back-pressure rather than unbounded memory if the endpoint lags.
        push.set_sndhwm(100_000)?;
        push.connect(endpoint)?;
        Ok(Replier { push: Arc::new(Mutex::new(push)), backlog: ReplyBacklog::default(), forwards })
    }

    pub fn backlog(&self) -> &ReplyBacklog {
        &self.backlog
    }

    pub fn send(&self, to: ReplyTo, reply: &Reply) {
        to.record(reply.code());
        let mut frames = to.route;
        frames.push(reply.encode());
        let bytes = frame_bytes(&frames);
        self.backlog.0.fetch_add(bytes, Ordering::AcqRel);
        let push = lock(&self.push);
        if let Err(e) = push.send_multipart(frames, 0) {
            self.backlog.taken(bytes);
            error!("cannot hand a reply to the client endpoint: {e}");
        }
    }
}

impl Replier {
    /// Hands `forward` to the client endpoint and wakes it with an empty
    /// message, which no reply is (a reply starts with its route). Counted
    /// in the backlog like a reply until the endpoint takes it.
    pub fn forward(&self, forward: Forward) {
        let bytes = forward.request.len();
        self.backlog.0.fetch_add(bytes, Ordering::AcqRel);
        if self.forwards.send(forward).is_err() {
            self.backlog.taken(bytes);
            return error!("cannot hand a request to forward to the client endpoint: it has stopped");
        }
        if let Err(e) = lock(&self.push).send(Vec::new(), 0) {
            error!("cannot wake the client endpoint: {e}");
        }
    }
}

/// Whether frames from the replies socket are only [`Replier::forward`]'s wake-up.
pub fn is_wake_up(frames: &[Vec<u8>]) -> bool {
    frames.iter().all(Vec::is_empty)
}

/// What a reply's frames weigh in the backlog.
pub fn frame_bytes(frames: &[Vec<u8>]) -> usize {
    frames.iter().map(Vec::len).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_requests_are_told_apart_from_correlated_req_clients() {
        let direct = ReplyTo::new(vec![b"client".to_vec(), vec![]], true);
        // A REQ socket with ZMQ_REQ_CORRELATE adds a 4-byte request id.
        let correlated = ReplyTo::new(vec![b"client".to_vec(), vec![0, 0, 0, 7], vec![]], true);
        let mut route = vec![b"follower".to_vec()];
        route.extend(ReplyTo::forwarding_route(42));
        let forwarded = ReplyTo::new(route.clone(), true);
        assert!(!direct.is_forwarded() && !correlated.is_forwarded() && forwarded.is_forwarded());
        assert!(!ReplyTo::new(route, false).is_forwarded(), "a client key cannot claim to be a node");
        assert_eq!(ReplyTo::forwarded_token(&ReplyTo::forwarding_route(42)), Some(42));
        assert_eq!(ReplyTo::forwarded_token(&[b"client".to_vec(), vec![]]), None);
    }
}
