//! The wire format between Raft peers and the checks every frame passes
//! before the core sees it.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::raft::{Body, Message, NodeId, Term};

/// Bumped on any incompatible change to [`Envelope`] or [`Message`], so that
/// mixed versions refuse each other instead of misreading each other.
/// Version 2: AppendEntriesReply names the `prev_log_index` it answers,
/// which the leader needs to tell a wiped follower from a stale reply.
/// Version 3: InstallSnapshot, with its data in chunks.
/// Version 4: memberships (entries that change it, and the one a snapshot
/// holds in InstallSnapshot).
/// Version 5: cluster names (in memberships, with the fingerprint), and
/// refusals naming the cluster the refusing node speaks for.
/// Version 6: snapshot files of format 2 (with the membership; the session
/// table holding the state machine's outcomes) in InstallSnapshot's chunks.
pub const PROTOCOL_VERSION: u8 = 6;

/// How many requests of one peer's connection a node takes before it has
/// answered them, answering in the order they came: what its replies say
/// in [`Envelope::window`]. More than a leader sends (two at most, for now):
/// a later release may send more to this one.
pub const WINDOW: u8 = 16;

/// What travels in one ZeroMQ frame: MessagePack with named fields, so the
/// format is self-describing and readable by non-Rust tools.
///
/// `from` and `term` repeat the message's so that they can be checked against
/// it; a disagreement means a buggy or forged sender.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub version: u8,
    pub cluster: u64,
    pub from: NodeId,
    pub term: Term,
    pub message: Message,
    /// Only with an InstallSnapshot: a piece of the snapshot file, or, in
    /// the receiver's answer, how much of it has arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk: Option<Chunk>,
    /// Only in a reply: the sender's [`WINDOW`]. A node of 0.2.0 or older
    /// answers one request of a connection at a time and says nothing,
    /// and it ignores the field; so the protocol version stays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<u8>,
}

/// The transport streams a snapshot file as a series of InstallSnapshot
/// requests, each carrying the next piece, so a snapshot of any size
/// travels in frames well below the size limit. The receiver answers each
/// piece with how much it holds (so an interrupted transfer resumes), and
/// the last one, once the whole file is checked, with the core's reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Chunk {
    /// Bytes `offset..offset + data.len()` of a file of `total` bytes.
    Data {
        offset: u64,
        total: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The receiver holds the first `next` bytes: send from there.
    Ack { next: u64 },
}

/// The fields that must be checked before the rest can be trusted to parse:
/// a newer version may carry a message this build cannot decode, and that
/// deserves a clearer warning than "undecodable". Alone, with `refused`, it
/// is the whole answer to a request whose cluster the receiver does not
/// accept: the receiver names the cluster it speaks for instead.
#[derive(Serialize, Deserialize)]
struct Header {
    version: u8,
    cluster: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    refused: bool,
}

/// A reply as accepted: the message, the acknowledgement of a snapshot
/// piece if it is one, and how many requests the peer takes at once.
#[derive(Debug, PartialEq, Eq)]
pub struct PeerReply {
    pub message: Message,
    pub chunk: Option<Chunk>,
    pub window: u8,
}

/// A request as accepted: the message, its snapshot piece if any, and the
/// cluster it named, which the answer names too.
#[derive(Debug, PartialEq, Eq)]
pub struct PeerRequest {
    pub message: Message,
    pub chunk: Option<Chunk>,
    pub cluster: u64,
}

/// The same message as an [`Envelope`], borrowed: what is sealed.
#[derive(Serialize)]
struct Outgoing<'a> {
    version: u8,
    cluster: u64,
    from: NodeId,
    term: Term,
    message: &'a Message,
    #[serde(skip_serializing_if = "Option::is_none")]
    chunk: Option<&'a Chunk>,
    #[serde(skip_serializing_if = "Option::is_none")]
    window: Option<u8>,
}

/// A stable fingerprint of a new cluster's first members: FNV-1a 64 over
/// `"id=endpoint;"` for each, sorted by id. The members of a new cluster
/// speak by it until the cluster has named itself (see [`Wire`]), so that
/// nodes configured for different clusters (say a test cluster reusing a
/// production port) never act on each other's messages even then. Stable
/// across builds and platforms, unlike `DefaultHasher`.
pub fn bootstrap_fingerprint(members: &[(NodeId, &str)]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut sorted = members.to_vec();
    sorted.sort_unstable();
    sorted
        .iter()
        .flat_map(|(id, endpoint)| format!("{id}={endpoint};").into_bytes())
        .fold(OFFSET_BASIS, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(PRIME))
}

/// Why a frame was not accepted from, or not sent to, the network.
#[derive(Debug, PartialEq, Eq)]
pub enum Reject {
    Undecodable(String),
    Version(u8),
    Cluster(u64),
    /// The peer did not accept the cluster this node spoke for; it speaks
    /// for `cluster`.
    Refused {
        cluster: u64,
    },
    /// The envelope's `(from, term)` disagrees with the message's.
    Inconsistent {
        envelope: (NodeId, Term),
        message: (NodeId, Term),
    },
    /// Well-formed but inconsistent (see [`Message::validate`]).
    Invalid {
        from: NodeId,
        problem: String,
    },
    Misaddressed {
        from: NodeId,
        to: NodeId,
    },
    /// A reply arrived where a request belongs, or vice versa, or a reply
    /// came from a node other than the one asked.
    Unexpected {
        from: NodeId,
        request: bool,
    },
    TooLarge {
        bytes: usize,
        limit: i64,
    },
}

impl Reject {
    /// The key warnings are rate-limited by.
    pub fn reason(&self) -> &'static str {
        match self {
            Reject::Undecodable(_) => "undecodable frame",
            Reject::Version(_) => "protocol version mismatch",
            Reject::Cluster(_) => "cluster mismatch",
            Reject::Refused { .. } => "refused by another cluster",
            Reject::Inconsistent { .. } => "inconsistent envelope",
            Reject::Invalid { .. } => "inconsistent message",
            Reject::Misaddressed { .. } => "misaddressed message",
            Reject::Unexpected { .. } => "unexpected message kind",
            Reject::TooLarge { .. } => "message too large",
        }
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}: ", self.reason())?;
        match self {
            Reject::Undecodable(e) => write!(f, "{e}"),
            Reject::Version(v) => write!(f, "got {v}, speak {PROTOCOL_VERSION}"),
            Reject::Cluster(c) => write!(f, "got {c:#018x}"),
            Reject::Refused { cluster } => write!(f, "the peer speaks for {cluster:#018x}"),
            Reject::Inconsistent { envelope, message } => {
                write!(f, "envelope says (from, term) = {envelope:?}, message {message:?}")
            }
            Reject::Invalid { from, problem } => write!(f, "from node {from}: {problem}"),
            Reject::Misaddressed { from, to } => write!(f, "from {from} for node {to}"),
            Reject::Unexpected { from, request } => {
                let kind = if *request { "request" } else { "reply" };
                write!(f, "{kind} from node {from}")
            }
            Reject::TooLarge { bytes, limit } => write!(f, "{bytes} bytes, limit {limit}"),
        }
    }
}

/// This node's view of the wire: who it is, which cluster it is in and how
/// large a frame may be. Who may send is the core's business: membership
/// changes at run time, and the core drops messages from non-members.
///
/// Every envelope names a cluster, and a node acts only on those naming its
/// own. A cluster's id is random: the first leader of a new cluster chooses
/// it and commits it in a membership entry. Until a node knows it is
/// committed, the node is *unnamed*:
/// - a member of a new cluster speaks for the cluster's bootstrap
///   fingerprint (its first members' endpoints, which every one of them
///   derives alone), and also accepts the id its log holds uncommitted;
/// - a joining node speaks for nothing (0) and takes the id of the first
///   AppendEntries or InstallSnapshot it gets, which comes from the leader
///   adding it (a cluster adds nodes only once it has a name).
///
/// A named node accepts its id only: a node with an old cluster's state
/// (the others' state dirs wiped and bootstrapped anew from the same config)
/// is never heard by the new cluster, nor it by them. The one way back is
/// for the new cluster's members that have not learned its name yet: a named
/// leader brings them the log in their fingerprint (see the peer links), as
/// it does a follower that lost its state. A stopped node of an old cluster
/// cannot use that way to take over a new one: it would have to lead, and it
/// cannot win their votes (never asked for in the fingerprint).
pub struct Wire {
    me: NodeId,
    /// The cluster's id; 0 while this node does not know it yet.
    cluster: AtomicU64,
    /// The fingerprint of the cluster's first membership: this node speaks
    /// for it while unnamed. 0 while a joining node does not know it.
    fingerprint: AtomicU64,
    /// While unnamed: the id its log holds, not committed yet (0: none).
    pending: AtomicU64,
    /// As ZMQ_MAXMSGSIZE: negative means unlimited.
    max_message_bytes: i64,
}

impl Wire {
    pub fn new(me: NodeId, cluster: u64, fingerprint: u64, max_message_bytes: i64) -> Wire {
        Wire {
            me,
            cluster: AtomicU64::new(cluster),
            fingerprint: AtomicU64::new(fingerprint),
            pending: AtomicU64::new(0),
            max_message_bytes,
        }
    }

    /// The cluster this node belongs to; 0 while it does not know its id.
    pub fn cluster(&self) -> u64 {
        self.cluster.load(Ordering::Acquire)
    }

    pub fn fingerprint(&self) -> u64 {
        self.fingerprint.load(Ordering::Acquire)
    }

    /// A joined node learns the fingerprint from the membership, to reach
    /// members of the first one that have not learned the name.
    pub fn learn_fingerprint(&self, fingerprint: u64) {
        let _ = self.fingerprint.compare_exchange(0, fingerprint, Ordering::AcqRel, Ordering::Acquire);
    }

    /// The cluster's name is committed: from now on only it counts.
    pub fn name(&self, cluster: u64) {
        self.cluster.store(cluster, Ordering::Release);
    }

    /// While unnamed: the id the log holds uncommitted (0: none).
    pub fn expect(&self, cluster: u64) {
        self.pending.store(cluster, Ordering::Release);
    }

    /// While unnamed: the id the log holds, not known here to be committed
    /// (0: none).
    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Acquire)
    }

    /// What this node's own requests and replies carry.
    pub fn speaks_for(&self) -> u64 {
        match self.cluster() {
            0 => self.fingerprint(),
            cluster => cluster,
        }
    }

    /// Whether a request naming `cluster` is for this node's cluster.
    fn accepts(&self, cluster: u64) -> bool {
        match self.cluster() {
            0 => {
                let (fingerprint, pending) = (self.fingerprint(), self.pending());
                fingerprint != 0 && (cluster == fingerprint || (pending != 0 && cluster == pending))
            }
            named => cluster == named,
        }
    }

    /// Encodes an outgoing message. Refusing an oversized one here beats
    /// having the receiver's ZMQ_MAXMSGSIZE silently cut the connection.
    pub fn seal(&self, message: &Message) -> Result<Vec<u8>, Reject> {
        self.seal_as(self.speaks_for(), message, None)
    }

    /// Encodes a message naming `cluster`, with a piece of a snapshot or the
    /// answer to one.
    pub fn seal_as(&self, cluster: u64, message: &Message, chunk: Option<&Chunk>) -> Result<Vec<u8>, Reject> {
        let window = (!message.body.is_request()).then_some(WINDOW);
        let envelope = Outgoing {
            version: PROTOCOL_VERSION,
            cluster,
            from: message.from,
            term: message.term,
            message,
            chunk,
            window,
        };
        // Sized up front: regrowing a buffer through entries or a snapshot
        // piece copies them over and over.
        let data = match chunk {
            Some(Chunk::Data { data, .. }) => data.len(),
            _ => 0,
        };
        let mut bytes = Vec::with_capacity(256 + message.approx_size() + data);
        rmp_serde::encode::write_named(&mut bytes, &envelope)
            .expect("plain data always serializes to MessagePack in memory");
        match usize::try_from(self.max_message_bytes) {
            Ok(limit) if bytes.len() > limit => {
                Err(Reject::TooLarge { bytes: bytes.len(), limit: self.max_message_bytes })
            }
            _ => Ok(bytes),
        }
    }

    /// The answer to a request refused for its cluster: the one this node
    /// speaks for, so that the sender can tell a member of its own cluster
    /// that has not learned the cluster's name from a stranger.
    pub fn refusal(&self) -> Vec<u8> {
        let header = Header { version: PROTOCOL_VERSION, cluster: self.speaks_for(), refused: true };
        rmp_serde::to_vec_named(&header).expect("plain data always serializes to MessagePack in memory")
    }

    /// Accepts a request from any peer: an InstallSnapshot always with a
    /// piece of its data, anything else without.
    pub fn open_request(&self, frame: &[u8]) -> Result<PeerRequest, Reject> {
        let Envelope { message, chunk, cluster, .. } = self.open(frame, None)?;
        let from = message.from;
        if !message.body.is_request() {
            return Err(Reject::Unexpected { from, request: false });
        }
        match (&message.body, &chunk) {
            (Body::InstallSnapshot { .. }, Some(Chunk::Data { offset, total, data })) => {
                if offset.checked_add(data.len() as u64).is_none_or(|end| end > *total) {
                    let problem = format!("snapshot piece at {offset} of {} bytes overruns {total}", data.len());
                    return Err(Reject::Invalid { from, problem });
                }
            }
            // The bare message would make the core drop its log for data it never got.
            (Body::InstallSnapshot { .. }, _) => {
                return Err(Reject::Invalid { from, problem: "a snapshot without its data".into() });
            }
            (_, Some(_)) => return Err(Reject::Invalid { from, problem: "snapshot data with another message".into() }),
            (_, None) => {}
        }
        Ok(PeerRequest { message, chunk, cluster })
    }

    /// Accepts only a reply, and only from the peer that was asked: a
    /// message of the core, or the acknowledgement of a snapshot piece.
    /// `sent_as` is the cluster the request named.
    pub fn open_reply(&self, frame: &[u8], peer: NodeId, sent_as: u64) -> Result<PeerReply, Reject> {
        let Envelope { message, chunk, window, .. } = self.open(frame, Some(sent_as))?;
        let request = message.body.is_request();
        let acknowledgement =
            matches!((&message.body, &chunk), (Body::InstallSnapshot { .. }, Some(Chunk::Ack { .. })));
        let plain_reply = !request && chunk.is_none();
        if message.from != peer || !(acknowledgement || plain_reply) {
            return Err(Reject::Unexpected { from: message.from, request });
        }
        // Zero would stall the link; more than one is a promise to answer in order.
        Ok(PeerReply { message, chunk, window: window.unwrap_or(1).max(1) })
    }

    /// `sent_as`: for a reply, the cluster its request named.
    fn open(&self, frame: &[u8], sent_as: Option<u64>) -> Result<Envelope, Reject> {
        let undecodable = |e: rmp_serde::decode::Error| Reject::Undecodable(e.to_string());
        let header: Header = rmp_serde::from_slice(frame).map_err(undecodable)?;
        if header.version != PROTOCOL_VERSION {
            return Err(Reject::Version(header.version));
        }
        if header.refused {
            return Err(match sent_as {
                Some(_) => Reject::Refused { cluster: header.cluster },
                None => Reject::Undecodable("a refusal where a request belongs".into()),
            });
        }
        let joining = sent_as.is_none() && self.cluster() == 0 && self.fingerprint() == 0 && header.cluster != 0;
        let accepted = match sent_as {
            // The answer names the cluster its request did.
            Some(sent) => header.cluster == sent,
            None => self.accepts(header.cluster) || joining,
        };
        if !accepted {
            return Err(Reject::Cluster(header.cluster));
        }
        let envelope: Envelope = rmp_serde::from_slice(frame).map_err(undecodable)?;
        let Envelope { from, term, ref message, .. } = envelope;
        if (from, term) != (message.from, message.term) {
            return Err(Reject::Inconsistent { envelope: (from, term), message: (message.from, message.term) });
        }
        if message.to != self.me {
            return Err(Reject::Misaddressed { from, to: message.to });
        }
        message.validate().map_err(|problem| Reject::Invalid { from, problem })?;
        // Only a leader adds nodes: joining ends with its first message.
        if joining {
            let from_leader = matches!(message.body, Body::AppendEntries { .. } | Body::InstallSnapshot { .. });
            if !from_leader {
                return Err(Reject::Cluster(header.cluster));
            }
            // Another thread may have taken a name meanwhile.
            let taken = self.cluster.compare_exchange(0, header.cluster, Ordering::AcqRel, Ordering::Acquire);
            if taken.is_err_and(|named| named != header.cluster) {
                return Err(Reject::Cluster(header.cluster));
            }
        }
        Ok(envelope)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{Entry, Payload};

    const CLUSTER: u64 = 0xc1;

    fn wire(me: NodeId) -> Wire {
        Wire::new(me, CLUSTER, 0, 1 << 20)
    }

    fn append(from: NodeId, to: NodeId) -> Message {
        Message {
            from,
            to,
            term: 3,
            body: Body::AppendEntries {
                prev_log_index: 4,
                prev_log_term: 2,
                entries: vec![
                    Entry { index: 5, term: 3, payload: Payload::Noop },
                    Entry { index: 6, term: 3, payload: Payload::Command(vec![0, 0xff, 7].into()) },
                ],
                leader_commit: 4,
                read_seq: 9,
            },
        }
    }

    fn vote_reply(from: NodeId, to: NodeId) -> Message {
        Message { from, to, term: 3, body: Body::RequestVoteReply { granted: true, pre_vote: false } }
    }

    fn raw(envelope: &Envelope) -> Vec<u8> {
        rmp_serde::to_vec_named(envelope).unwrap()
    }

    fn envelope(message: Message) -> Envelope {
        Envelope {
            version: PROTOCOL_VERSION,
            cluster: CLUSTER,
            from: message.from,
            term: message.term,
            message,
            chunk: None,
            window: None,
        }
    }

    #[test]
    fn a_joining_node_takes_the_cluster_of_the_first_leader_message() {
        let joining = Wire::new(0, 0, 0, 1 << 20);
        let vote = Message {
            from: 1,
            to: 0,
            term: 3,
            body: Body::RequestVote { last_log_index: 9, last_log_term: 3, pre_vote: true, transfer: false },
        };
        let mut other = envelope(vote);
        other.cluster = 7;
        assert_eq!(joining.open_request(&raw(&other)), Err(Reject::Cluster(7)), "only a leader adds nodes");
        assert_eq!(joining.cluster(), 0);
        assert!(joining.open_request(&raw(&envelope(append(1, 0)))).is_ok());
        assert_eq!(joining.cluster(), CLUSTER);
        let mut other = envelope(append(1, 0));
        other.cluster = 7;
        assert_eq!(joining.open_request(&raw(&other)), Err(Reject::Cluster(7)), "joined: one cluster only");
    }

    #[test]
    fn request_and_reply_roundtrip() {
        let request = append(1, 0);
        let frame = wire(1).seal(&request).unwrap();
        assert_eq!(wire(0).open_request(&frame), Ok(PeerRequest { message: request, chunk: None, cluster: CLUSTER }));
        assert!(!frame.windows(6).any(|w| w == b"window"), "only replies say how many requests they take");

        let reply = vote_reply(0, 1);
        let frame = wire(0).seal(&reply).unwrap();
        let opened = PeerReply { message: reply.clone(), chunk: None, window: WINDOW };
        assert_eq!(wire(1).open_reply(&frame, 0, CLUSTER), Ok(opened));
    }

    #[test]
    fn a_reply_that_names_no_window_is_from_a_node_that_takes_one_request_at_a_time() {
        // As 0.2.0 and older send it; they ignore the field in ours.
        let old = raw(&envelope(vote_reply(0, 1)));
        assert_eq!(wire(1).open_reply(&old, 0, CLUSTER).map(|r| r.window), Ok(1));
        let zero = raw(&Envelope { window: Some(0), ..envelope(vote_reply(0, 1)) });
        assert_eq!(wire(1).open_reply(&zero, 0, CLUSTER).map(|r| r.window), Ok(1), "zero would stall the link");
        #[derive(Deserialize)]
        struct Old {
            version: u8,
            cluster: u64,
            from: NodeId,
            term: Term,
            message: Message,
        }
        let new = wire(0).seal(&vote_reply(0, 1)).unwrap();
        let old: Old = rmp_serde::from_slice(&new).expect("an older release decodes our replies");
        assert_eq!((old.version, old.cluster, old.from, old.term, old.message), (6, CLUSTER, 0, 3, vote_reply(0, 1)));
    }

    #[test]
    fn timeout_now_is_a_request_and_vote_requests_from_older_nodes_still_decode() {
        let timeout_now = Message { from: 1, to: 0, term: 3, body: Body::TimeoutNow };
        let frame = wire(1).seal(&timeout_now).unwrap();
        assert_eq!(wire(0).open_request(&frame).map(|r| r.message), Ok(timeout_now));

        let vote = |transfer| Body::RequestVote { last_log_index: 4, last_log_term: 2, pre_vote: false, transfer };
        let frame = wire(1).seal(&Message { from: 1, to: 0, term: 3, body: vote(true) }).unwrap();
        // Drop `transfer`, as a node without leadership transfer encodes it.
        fn strip(value: &mut rmpv::Value) {
            if let rmpv::Value::Map(entries) = value {
                entries.retain(|(k, _)| k.as_str() != Some("transfer"));
                entries.iter_mut().for_each(|(_, v)| strip(v));
            }
        }
        let mut value = rmpv::decode::read_value(&mut &frame[..]).unwrap();
        strip(&mut value);
        let mut old = Vec::new();
        rmpv::encode::write_value(&mut old, &value).unwrap();
        assert!(old.len() < frame.len(), "the field was there to drop");
        assert_eq!(wire(0).open_request(&old).map(|r| r.message.body), Ok(vote(false)));
    }

    #[test]
    fn encoding_is_a_named_map_with_binary_commands() {
        let frame = wire(1).seal(&append(1, 0)).unwrap();
        let value = rmpv::decode::read_value(&mut &frame[..]).unwrap();
        let keys: Vec<_> = value.as_map().unwrap().iter().map(|(k, _)| k.as_str().unwrap().to_owned()).collect();
        assert_eq!(keys, ["version", "cluster", "from", "term", "message"]);
        // The command travels as msgpack bin, not as an array of integers.
        let bin = [0xc4, 3, 0, 0xff, 7];
        assert!(frame.windows(bin.len()).any(|w| w == bin));
    }

    #[test]
    fn rejects_each_kind_of_bad_envelope() {
        let me = wire(0);
        let mut bad = envelope(append(1, 0));
        bad.version = PROTOCOL_VERSION + 1;
        assert_eq!(me.open_request(&raw(&bad)), Err(Reject::Version(PROTOCOL_VERSION + 1)));

        let mut bad = envelope(append(1, 0));
        bad.cluster = 7;
        assert_eq!(me.open_request(&raw(&bad)), Err(Reject::Cluster(7)));

        let mut bad = envelope(append(1, 0));
        bad.term = 2;
        assert_eq!(me.open_request(&raw(&bad)), Err(Reject::Inconsistent { envelope: (1, 2), message: (1, 3) }));

        // A node never talks to itself.
        let bad = envelope(append(0, 0));
        assert!(matches!(me.open_request(&raw(&bad)), Err(Reject::Invalid { from: 0, .. })));

        let bad = envelope(append(1, 2));
        assert_eq!(me.open_request(&raw(&bad)), Err(Reject::Misaddressed { from: 1, to: 2 }));

        let reply = raw(&envelope(vote_reply(1, 0)));
        assert_eq!(me.open_request(&reply), Err(Reject::Unexpected { from: 1, request: false }));
        assert_eq!(me.open_reply(&reply, 2, CLUSTER), Err(Reject::Unexpected { from: 1, request: false }));
        let request = raw(&envelope(append(1, 0)));
        assert_eq!(me.open_reply(&request, 1, CLUSTER), Err(Reject::Unexpected { from: 1, request: true }));
    }

    #[test]
    fn inconsistent_messages_are_rejected_at_the_boundary() {
        let mut bad = append(1, 0);
        if let Body::AppendEntries { entries, .. } = &mut bad.body {
            entries[1].term = 2; // after an entry of term 3
        }
        let rejected = wire(0).open_request(&raw(&envelope(bad)));
        assert!(matches!(rejected, Err(Reject::Invalid { from: 1, .. })), "{rejected:?}");
        let huge = Message { term: u64::MAX, ..append(1, 0) };
        assert!(matches!(wire(0).open_request(&raw(&envelope(huge))), Err(Reject::Invalid { .. })));
    }

    #[test]
    fn garbage_is_undecodable_not_a_panic() {
        let me = wire(0);
        let deep = vec![0x91; 100_000]; // arrays nested 100k deep
        let truncated = &raw(&envelope(append(1, 0)))[..20];
        let huge_claim = [0xdd, 0xff, 0xff, 0xff, 0xff]; // array of 4G elements
        for frame in [&b""[..], b"hello", &deep, truncated, &huge_claim] {
            assert!(matches!(me.open_request(frame), Err(Reject::Undecodable(_))));
        }
    }

    #[test]
    fn seal_refuses_frames_over_the_limit() {
        let small = Wire::new(1, CLUSTER, 0, 16);
        assert!(matches!(small.seal(&append(1, 0)), Err(Reject::TooLarge { limit: 16, .. })));
        let unlimited = Wire::new(1, CLUSTER, 0, -1);
        assert!(unlimited.seal(&append(1, 0)).is_ok());
    }

    #[test]
    fn fingerprint_is_stable_and_order_independent() {
        let members = [(0, "tcp://127.0.0.1:7000"), (1, "tcp://127.0.0.1:7001"), (2, "tcp://127.0.0.1:7002")];
        // Pinned: changing it splits every new cluster being started, and
        // clusters from before names were logged use it as their name.
        assert_eq!(bootstrap_fingerprint(&members), 0xde99_cf3e_1453_088e);
        let shuffled = [members[2], members[0], members[1]];
        assert_eq!(bootstrap_fingerprint(&shuffled), bootstrap_fingerprint(&members));
        let moved = [members[0], members[1], (2, "tcp://127.0.0.1:7003")];
        assert_ne!(bootstrap_fingerprint(&moved), bootstrap_fingerprint(&members));
        assert_eq!(bootstrap_fingerprint(&[]), 0xcbf2_9ce4_8422_2325);
    }

    fn naming(cluster: u64, from: NodeId) -> Vec<u8> {
        raw(&Envelope { cluster, ..envelope(append(from, 0)) })
    }

    const FINGERPRINT: u64 = 0xf1;

    #[test]
    fn an_unnamed_member_hears_its_fingerprint_and_the_name_its_log_holds_and_a_named_one_only_its_name() {
        let unnamed = Wire::new(0, 0, FINGERPRINT, 1 << 20);
        assert_eq!(unnamed.speaks_for(), FINGERPRINT);
        assert!(unnamed.open_request(&naming(FINGERPRINT, 1)).is_ok());
        assert_eq!(unnamed.open_request(&naming(CLUSTER, 1)), Err(Reject::Cluster(CLUSTER)), "an old cluster's node");
        unnamed.expect(CLUSTER);
        assert!(unnamed.open_request(&naming(CLUSTER, 1)).is_ok(), "a leader that knows the name is committed");
        assert!(unnamed.open_request(&naming(FINGERPRINT, 1)).is_ok());
        assert_eq!(unnamed.cluster(), 0, "hearing the name does not commit it");

        unnamed.name(CLUSTER);
        assert_eq!(unnamed.speaks_for(), CLUSTER);
        assert!(unnamed.open_request(&naming(CLUSTER, 1)).is_ok());
        let refused = unnamed.open_request(&naming(FINGERPRINT, 1));
        assert_eq!(
            refused,
            Err(Reject::Cluster(FINGERPRINT)),
            "named: the new cluster of a wiped majority is a stranger"
        );
    }

    #[test]
    fn an_answer_names_the_cluster_its_request_named_and_a_refusal_the_one_spoken_for() {
        let leader = Wire::new(1, CLUSTER, FINGERPRINT, 1 << 20);
        let reply = raw(&Envelope { cluster: FINGERPRINT, ..envelope(vote_reply(0, 1)) });
        assert!(leader.open_reply(&reply, 0, FINGERPRINT).is_ok());
        assert_eq!(leader.open_reply(&reply, 0, CLUSTER), Err(Reject::Cluster(FINGERPRINT)));

        let unnamed = Wire::new(0, 0, FINGERPRINT, 1 << 20);
        assert_eq!(leader.open_reply(&unnamed.refusal(), 0, CLUSTER), Err(Reject::Refused { cluster: FINGERPRINT }));
        assert!(matches!(leader.open_request(&unnamed.refusal()), Err(Reject::Undecodable(_))));
    }
}
