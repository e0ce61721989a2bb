//! Getting a reply back to the client that asked: the route a request came
//! in on, and the requests a follower forwards to the leader.

use std::time::Instant;

use crate::metrics::{METRICS, seconds_since};
use crate::raft::NodeId;

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

/// A request the server sends on to the leader (`Effect::Forward`), for
/// the client endpoint, which owns the connection to the leader.
pub struct Forward {
    pub leader: NodeId,
    pub request: Vec<u8>,
    pub reply_to: ReplyTo,
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
