//! Getting a reply back to the client that asked.
//!
//! ZeroMQ sockets are not thread-safe, so only the client endpoint thread
//! touches the ROUTER socket. Other threads (the core loop, the applier) hand
//! replies to it over an inproc PUSH/PULL pair, which also wakes its poll
//! immediately: a reply's latency is the client's latency.

use std::sync::{Arc, Mutex};

use log::error;

use crate::protocol::{ErrorCode, Reply};
use crate::raft::NodeId;

/// The ROUTER routing frames of one request: the client's identity, any
/// forwarding hops, and the empty delimiter. Sending them back with the reply
/// routes it to the right client.
#[derive(Debug)]
pub struct ReplyTo {
    pub route: Vec<Vec<u8>>,
}

impl ReplyTo {
    /// How many nodes have routed this request: 1 when it came straight from
    /// a client, 2 when a follower forwarded it to us.
    pub fn hops(&self) -> usize {
        self.route.len().saturating_sub(1)
    }
}

/// Cloneable handle that sends replies to the client endpoint thread.
#[derive(Clone)]
pub struct Replier {
    push: Arc<Mutex<zmq::Socket>>,
}

impl Replier {
    pub const ENDPOINT_PREFIX: &'static str = "inproc://raft-zmq-replies";

    /// Connects to the PULL socket the client endpoint bound at `endpoint`.
    pub fn connect(ctx: &zmq::Context, endpoint: &str) -> zmq::Result<Replier> {
        let push = ctx.socket(zmq::PUSH)?;
        push.set_linger(0)?;
        // Back-pressure rather than unbounded memory if the endpoint lags.
        push.set_sndhwm(100_000)?;
        push.connect(endpoint)?;
        Ok(Replier { push: Arc::new(Mutex::new(push)) })
    }

    pub fn send(&self, to: ReplyTo, reply: &Reply) {
        let mut frames = to.route;
        frames.push(reply.encode());
        let push = self.push.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Err(e) = push.send_multipart(frames, 0) {
            error!("cannot hand a reply to the client endpoint: {e}");
        }
    }
}

/// The `no_leader` reply of node `me`, naming the leader it knows, if any.
pub fn not_leader(me: NodeId, leader: Option<NodeId>) -> Reply {
    let message = match leader {
        Some(id) => format!("node {me} is not the leader; node {id} is"),
        None => format!("node {me} is not the leader and knows of none (election in progress)"),
    };
    Reply::error(ErrorCode::NoLeader, message, leader)
}
