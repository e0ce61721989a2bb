//! Peer-to-peer transport: carries the core's [`Message`]s between nodes
//! over ZeroMQ.
//!
//! It has no thread of its own: the core loop waits in [`Transport::poll`],
//! on every socket at once and on the [`Wakeup`] the node's other threads
//! wake it with, so a message crosses no thread between the network and
//! the core (each crossing costs a wake-up, the node's largest expense).
//! - the *server* half owns a ROUTER socket bound to this node's raft
//!   endpoint; it hands incoming requests to the core and sends the core's
//!   replies back on the route each request came in on;
//! - a *link* per peer owns a DEALER socket to that peer, speaking REQ's
//!   framing; it sends requests (AppendEntries up to the peer's window,
//!   anything else alone) and hands back each reply, or
//!   [`Inbound::Unreachable`] when none comes within the reply timeout.
//!
//! Everything received goes to one crossbeam channel, which the core drains
//! after each poll. Delivery is best effort, as Raft expects: messages may
//! be lost (and stale ones are dropped on purpose), never corrupted or
//! accepted from outside the cluster.

mod name_check;
mod peer;
mod server;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use log::{debug, error};

use crate::net::poll;
use crate::net::security::{Domain, NodeSecurity};
use crate::net::wake::{Waker, Wakeup, WakingSender};
use crate::raft::{Message, NodeId, Term};
use crate::storage::snapshot::{Snapshots, Staging};
use crate::warnings::Warnings;
use crate::wire::envelope::Wire;
use name_check::NameCheck;
use peer::Link;
use server::{Admission, Server};

/// What the transport hands the core.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Inbound {
    /// A request from a peer, or a peer's reply to one of ours.
    Message(Message),
    /// A request to this peer got no valid reply in time. Each request
    /// actually sent is followed by its reply or by this (unless `inbound` is
    /// full), so the core can stop waiting for its in-flight AppendEntries.
    Unreachable(NodeId),
}

#[derive(Clone, Debug)]
pub struct TransportConfig {
    pub id: NodeId,
    /// The cluster's name, or 0 while this node does not know it (see
    /// [`Wire`]).
    pub cluster: u64,
    /// The new cluster this node was a member of, by [`bootstrap_fingerprint`];
    /// 0 if it joined a running one.
    pub fingerprint: u64,
    /// This node's own raft endpoint, e.g. `tcp://127.0.0.1:7000`.
    pub bind: String,
    /// The other members and their raft endpoints (an entry for `id` itself
    /// is ignored).
    pub peers: Vec<(NodeId, String)>,
    /// How long a request waits for its reply before the peer is reported
    /// unreachable. Long enough for a slow or lossy link (see the node's
    /// `peer_reply_timeout`): a timeout costs a new connection.
    pub reply_timeout: Duration,
    /// Largest frame sent or accepted (ZMQ_MAXMSGSIZE); negative = unlimited.
    pub max_message_bytes: i64,
    /// Plaintext, or CURVE with the nodes' keys only.
    pub security: Arc<NodeSecurity>,
    /// Where snapshots to send are read from and received ones collected.
    pub snapshots: Snapshots,
    /// Bytes to keep free on the state dir's disk: a snapshot whose
    /// declared size does not fit above them is not received.
    pub disk_reserve: u64,
    /// AppendEntries a link keeps out at once, at most (the core's
    /// `max_inflight_appends`): an append the core sends again after its
    /// in-flight timeout waits behind the one out, as it did on a REQ socket.
    pub appends_in_flight: usize,
}

#[derive(Debug)]
pub enum TransportError {
    Bind { endpoint: String, source: zmq::Error },
    Socket(zmq::Error),
    Wakeup(std::io::Error),
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            TransportError::Bind { endpoint, source } => f.write_str(&bind_problem("raft", endpoint, source)),
            TransportError::Socket(e) => write!(f, "cannot set up a zeromq socket: {e}"),
            TransportError::Wakeup(e) => write!(f, "cannot make the transport's wake-up pipe: {e}"),
        }
    }
}

/// Why the `socket` ("raft" or "client") endpoint could not be bound, with
/// what to do when its host is a DNS name, which ZeroMQ resolves only to
/// connect.
pub fn bind_problem(socket: &str, endpoint: &str, error: &zmq::Error) -> String {
    let hint = match error {
        zmq::Error::ENODEV => format!(
            " (ZeroMQ binds an IP address or an interface name, not a DNS name: \
             bind e.g. tcp://0.0.0.0:PORT with {socket}_listen)"
        ),
        _ => String::new(),
    };
    format!("cannot bind {socket} endpoint {endpoint}: {error}{hint}")
}

impl std::error::Error for TransportError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TransportError::Bind { source, .. } => Some(source),
            TransportError::Socket(e) => Some(e),
            TransportError::Wakeup(e) => Some(e),
        }
    }
}

impl From<zmq::Error> for TransportError {
    fn from(e: zmq::Error) -> TransportError {
        TransportError::Socket(e)
    }
}

/// What every link shares.
struct LinkSettings {
    id: NodeId,
    ctx: zmq::Context,
    wire: Arc<Wire>,
    inbound: Sender<Inbound>,
    reply_timeout: Duration,
    max_message_bytes: i64,
    security: Arc<NodeSecurity>,
    snapshots: Snapshots,
    appends_in_flight: usize,
}

impl LinkSettings {
    /// Connects on its first request, and again after every failure: an
    /// endpoint ZeroMQ refuses (say, no port) is a peer that stays
    /// unreachable, with a warning, never a node that cannot start.
    fn link(&self, peer: NodeId, endpoint: String) -> Link {
        Link {
            peer,
            name_check: NameCheck::new(&endpoint),
            endpoint,
            ctx: self.ctx.clone(),
            socket: None,
            wire: Arc::clone(&self.wire),
            inbound: self.inbound.clone(),
            reply_timeout: self.reply_timeout,
            max_message_bytes: self.max_message_bytes,
            security: Arc::clone(&self.security),
            snapshots: self.snapshots.clone(),
            speak_as: None,
            window: 1,
            appends_in_flight: self.appends_in_flight,
            queued: None,
            out: VecDeque::new(),
            failed_until: None,
            reachable: true,
            warnings: Warnings::default(),
        }
    }
}

/// A transport, driven by whoever calls [`Transport::poll`]: the core loop.
pub struct Transport {
    wire: Arc<Wire>,
    server: Server,
    /// The links to the members, and to gone ones until their last request
    /// is answered (`gone`).
    links: Vec<(Link, bool)>,
    /// What starting a link to a new peer takes.
    settings: LinkSettings,
    wakeup: Wakeup,
    /// Replies given on other threads (see [`Answers`]), and a sender for more.
    answers: Answers,
    answered: Receiver<Message>,
}

impl Transport {
    /// Binds the raft endpoint (failing if it is taken or invalid) and makes
    /// a link to every peer (each connects when it first sends). What
    /// arrives goes to `inbound` as [`Transport::poll`] takes it; if
    /// `inbound` is bounded and full, arrivals are dropped with a warning.
    pub fn start(
        ctx: &zmq::Context,
        cfg: TransportConfig,
        inbound: Sender<Inbound>,
    ) -> Result<Transport, TransportError> {
        let wire = Arc::new(Wire::new(cfg.id, cfg.cluster, cfg.fingerprint, cfg.max_message_bytes));

        let router = ctx.socket(zmq::ROUTER)?;
        router.set_linger(0)?;
        router.set_maxmsgsize(cfg.max_message_bytes)?;
        cfg.security.server(&router, Domain::Raft)?;
        router.bind(&cfg.bind).map_err(|source| TransportError::Bind { endpoint: cfg.bind.clone(), source })?;

        let (wakeup, waker) = Wakeup::new().map_err(TransportError::Wakeup)?;
        let (replies, answered) = crossbeam_channel::unbounded();
        let settings = LinkSettings {
            id: cfg.id,
            ctx: ctx.clone(),
            wire: Arc::clone(&wire),
            inbound: inbound.clone(),
            reply_timeout: cfg.reply_timeout,
            max_message_bytes: cfg.max_message_bytes,
            security: Arc::clone(&cfg.security),
            snapshots: cfg.snapshots.clone(),
            appends_in_flight: cfg.appends_in_flight,
        };
        let server = Server {
            router,
            wire: Arc::clone(&wire),
            inbound,
            staging: Staging::new(cfg.snapshots.clone(), cfg.disk_reserve),
            admission: Admission::default(),
            pending: HashMap::new(),
            warnings: Warnings::default(),
        };
        let mut transport = Transport {
            wire,
            server,
            links: Vec::new(),
            settings,
            wakeup,
            answers: Answers(WakingSender::new(replies, waker)),
            answered,
        };
        transport.set_peers(cfg.peers);
        Ok(transport)
    }

    /// The peers to send to from now on (an entry for this node is ignored):
    /// a link starts for each new one, and goes for each gone one once its
    /// last request is answered. A peer whose endpoint changed gets a new one.
    pub fn set_peers(&mut self, peers: Vec<(NodeId, String)>) {
        let me = self.settings.id;
        let wanted: HashMap<NodeId, String> = peers.into_iter().filter(|(id, _)| *id != me).collect();
        self.server.admission.peers = wanted.keys().copied().collect();
        for (link, gone) in &mut self.links {
            *gone |= wanted.get(&link.peer) != Some(&link.endpoint);
        }
        for (peer, endpoint) in wanted {
            if !self.links.iter().any(|(link, gone)| !gone && link.peer == peer) {
                self.links.push((self.settings.link(peer, endpoint), false));
            }
        }
        self.drop_finished_links();
    }

    /// Links to gone members go once their last request is answered.
    fn drop_finished_links(&mut self) {
        self.links.retain(|(link, gone)| !gone || !link.is_idle());
    }

    /// Waits up to `timeout` for the network, a wake-up or a link's deadline,
    /// and handles whatever is ready: requests and replies go to `inbound`,
    /// replies given elsewhere leave, overdue requests fail. The sockets in
    /// `also` (the client endpoint's) are polled too, for reading; returns
    /// which of them are readable, for their owner to handle. It may return
    /// early with nothing ready, and a wake-up may wait for the next call
    /// while a socket is readable: the caller looks at its queues after
    /// every call, woken or not.
    pub fn poll(&mut self, timeout: Duration, also: &[&zmq::Socket]) -> Vec<bool> {
        let now = Instant::now();
        let wait = match self.links.iter().filter_map(|(link, _)| link.next_deadline()).min() {
            Some(deadline) => timeout.min(deadline.saturating_duration_since(now)),
            None => timeout,
        };
        // Rounded up: a deadline a few microseconds away must not spin.
        let wait_ms = i64::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(i64::MAX);
        let awaiting: Vec<usize> = (0..self.links.len()).filter(|&i| self.links[i].0.awaiting().is_some()).collect();
        let ready: Vec<bool> = {
            let mut sockets = vec![&self.server.router];
            sockets.extend(awaiting.iter().filter_map(|&i| self.links[i].0.awaiting()));
            sockets.extend(also);
            poll::wait(self.wakeup.fd(), &sockets, wait_ms).unwrap_or_else(|e| {
                // Waited out all the same, so that an error that stays
                // cannot turn the core loop into a busy loop.
                error!("raft transport poll failed: {e}");
                std::thread::sleep(wait);
                vec![false; 1 + sockets.len()]
            })
        };
        if ready[0] {
            self.wakeup.clear();
        }
        for reply in self.answered.try_iter() {
            self.server.send_reply(reply);
        }
        if ready[1] {
            self.server.on_readable();
        }
        let now = Instant::now();
        for (slot, &i) in awaiting.iter().enumerate() {
            if ready[2 + slot] {
                self.links[i].0.on_readable(now);
            }
        }
        for (link, _) in &mut self.links {
            link.go_on(now);
        }
        self.drop_finished_links();
        self.server.expire_staging();
        ready[2 + awaiting.len()..].to_vec()
    }

    /// Wakes the thread in [`Transport::poll`] from any other.
    pub fn waker(&self) -> Waker {
        self.answers.0.waker()
    }

    /// The cluster this node is in; 0 while it does not know its name.
    pub fn cluster(&self) -> u64 {
        self.wire.cluster()
    }

    /// The cluster's name is committed (see [`Wire`]).
    pub fn name_cluster(&self, cluster: u64) {
        self.wire.name(cluster);
    }

    /// While the name is not committed: the one the log holds (0: none).
    pub fn expect_cluster(&self, cluster: u64) {
        self.wire.expect(cluster);
    }

    /// The core's current term and the leader it follows in it, if any:
    /// while it follows one, no other member's snapshot is staged. To be
    /// called before the core's messages of the same step leave, since the
    /// leader sends a snapshot as soon as it hears the follower needs one.
    pub fn follow(&mut self, term: Term, leader: Option<NodeId>) {
        let admission = &mut self.server.admission;
        (admission.term, admission.leader) = (term, leader);
    }

    /// The fingerprint of the cluster's first membership, from the log.
    pub fn learn_fingerprint(&self, fingerprint: u64) {
        self.wire.learn_fingerprint(fingerprint);
    }

    /// Never waits. A request (see [`Body::is_request`]) goes to the link
    /// to `message.to`, which sends it as soon as its last one is answered;
    /// a reply goes to that node's pending request, if any. Requests for
    /// non-peers are dropped.
    ///
    /// [`Body::is_request`]: crate::raft::Body::is_request
    pub fn send(&mut self, message: Message) {
        let to = message.to;
        if message.body.is_request() {
            match self.links.iter_mut().find(|(link, gone)| !gone && link.peer == to) {
                Some((link, _)) => link.send(message, Instant::now()),
                None => debug!("request for non-peer {to} dropped"),
            }
        } else {
            self.server.send_reply(message);
        }
    }

    /// A handle that sends replies (not requests) from another thread.
    pub fn answers(&self) -> Answers {
        self.answers.clone()
    }

    /// Sends the replies other threads gave meanwhile and lets them drain
    /// for a moment: a peer waiting on one would otherwise time out.
    pub fn shutdown(mut self) {
        for reply in self.answered.try_iter() {
            self.server.send_reply(reply);
        }
        self.server.linger();
    }
}

/// Sends replies to peers' requests from another thread, through the
/// thread that polls the transport (a zmq socket is never used by two).
#[derive(Clone)]
pub struct Answers(WakingSender<Message>);

impl Answers {
    pub fn send(&self, reply: Message) {
        debug_assert!(!reply.body.is_request(), "requests leave through Transport::send");
        // Fails only once the transport is gone (shutdown).
        let _ = self.0.send(reply);
    }
}

/// Hands `item` to the core without ever blocking a network thread.
fn deliver(inbound: &Sender<Inbound>, item: Inbound, warnings: &mut Warnings) {
    match inbound.try_send(item) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            warnings.warn("inbound queue full", "inbound queue full: the core is behind; message dropped")
        }
        Err(TrySendError::Disconnected(_)) => debug!("inbound queue closed; message dropped"),
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::thread;
    use std::time::Instant;

    use crossbeam_channel::Receiver;

    use super::*;
    use crate::raft::{Body, Entry, Payload, SnapshotMeta};
    use crate::wire::envelope::{Chunk, Envelope, PROTOCOL_VERSION, Reject};

    const CLUSTER: u64 = 0xc1;
    const PATIENCE: Duration = Duration::from_secs(5);

    /// A loopback endpoint on a free port below the ephemeral range, where
    /// no outgoing connection's source port can take it meanwhile.
    fn free_endpoint() -> String {
        format!("tcp://127.0.0.1:{}", crate::testing::free_port())
    }

    fn start(
        ctx: &zmq::Context,
        id: NodeId,
        members: &[(NodeId, String)],
        reply_timeout: Duration,
    ) -> (Running, Receiver<Inbound>) {
        start_with(ctx, id, members, reply_timeout, snapshots_dir())
    }

    fn start_with(
        ctx: &zmq::Context,
        id: NodeId,
        members: &[(NodeId, String)],
        reply_timeout: Duration,
        snapshots: Snapshots,
    ) -> (Running, Receiver<Inbound>) {
        start_in(ctx, id, members, (CLUSTER, 0), reply_timeout, snapshots)
    }

    /// `(cluster, fingerprint)` as [`TransportConfig`] has them.
    fn start_in(
        ctx: &zmq::Context,
        id: NodeId,
        members: &[(NodeId, String)],
        (cluster, fingerprint): (u64, u64),
        reply_timeout: Duration,
        snapshots: Snapshots,
    ) -> (Running, Receiver<Inbound>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let cfg = TransportConfig {
            id,
            cluster,
            fingerprint,
            bind: members.iter().find(|(m, _)| *m == id).unwrap().1.clone(),
            peers: members.to_vec(),
            reply_timeout,
            max_message_bytes: 1 << 20 | 1 << 16,
            security: Arc::new(NodeSecurity::Plain),
            snapshots,
            disk_reserve: 0,
            appends_in_flight: 2,
        };
        (Running::start(Transport::start(ctx, cfg, tx).unwrap()), rx)
    }

    type Call = Box<dyn FnOnce(&mut Transport) + Send>;

    /// A transport polled on a thread of its own, as a node's core loop
    /// polls it; the test's calls reach it through a queue.
    struct Running {
        calls: WakingSender<Call>,
        waker: Waker,
        thread: Option<thread::JoinHandle<()>>,
    }

    impl Running {
        fn start(mut transport: Transport) -> Running {
            let (calls, queue) = crossbeam_channel::unbounded::<Call>();
            let waker = transport.waker();
            let thread = thread::spawn(move || {
                loop {
                    transport.poll(Duration::from_millis(50), &[]);
                    loop {
                        match queue.try_recv() {
                            Ok(call) => call(&mut transport),
                            Err(crossbeam_channel::TryRecvError::Empty) => break,
                            Err(crossbeam_channel::TryRecvError::Disconnected) => return transport.shutdown(),
                        }
                    }
                }
            });
            Running { calls: WakingSender::new(calls, waker.clone()), waker, thread: Some(thread) }
        }

        fn call(&self, call: impl FnOnce(&mut Transport) + Send + 'static) {
            self.calls.send(Box::new(call)).unwrap();
        }

        fn send(&self, message: Message) {
            self.call(move |transport| transport.send(message));
        }

        fn follow(&self, term: Term, leader: Option<NodeId>) {
            self.call(move |transport| transport.follow(term, leader));
        }

        fn name_cluster(&self, cluster: u64) {
            self.call(move |transport| transport.name_cluster(cluster));
        }

        fn expect_cluster(&self, cluster: u64) {
            self.call(move |transport| transport.expect_cluster(cluster));
        }

        fn shutdown(self) {
            drop(self);
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            // Closing the queue stops the thread at its next look.
            self.calls = WakingSender::new(crossbeam_channel::unbounded().0, self.waker.clone());
            self.waker.wake();
            self.thread.take().unwrap().join().unwrap();
        }
    }

    /// A snapshots directory that outlives the test (the OS cleans /tmp).
    fn snapshots_dir() -> Snapshots {
        Snapshots::open(&tempfile::tempdir().unwrap().keep()).unwrap()
    }

    fn members(n: NodeId) -> Vec<(NodeId, String)> {
        (0..n).map(|id| (id, free_endpoint())).collect()
    }

    fn vote_request(from: NodeId, to: NodeId, term: Term) -> Message {
        let body = Body::RequestVote { last_log_index: 9, last_log_term: 1, pre_vote: false, transfer: false };
        Message { from, to, term, body }
    }

    fn heartbeat(from: NodeId, to: NodeId, leader_commit: u64) -> Message {
        Message {
            from,
            to,
            term: 2,
            body: Body::AppendEntries {
                prev_log_index: 0,
                prev_log_term: 0,
                entries: vec![],
                leader_commit,
                read_seq: 0,
            },
        }
    }

    fn ack(from: NodeId, to: NodeId) -> Message {
        Message {
            from,
            to,
            term: 2,
            body: Body::AppendEntriesReply {
                success: true,
                prev_log_index: 0,
                match_index: 0,
                conflict_index: 0,
                conflict_term: None,
                read_seq: 0,
            },
        }
    }

    /// Node 0 and node 1, once node 0 heard from node 1 how many requests
    /// it takes at once (a link's window is one until the peer says).
    fn leader_and_follower_with_a_window() -> ((Running, Receiver<Inbound>), (Running, Receiver<Inbound>)) {
        let ctx = zmq::Context::new();
        let nodes = members(2);
        let (leader, leader_rx) = start(&ctx, 0, &nodes, PATIENCE);
        let (follower, follower_rx) = start(&ctx, 1, &nodes, PATIENCE);
        leader.send(heartbeat(0, 1, 1));
        assert_eq!(message(&follower_rx), heartbeat(0, 1, 1));
        follower.send(ack(1, 0));
        assert_eq!(message(&leader_rx), ack(1, 0));
        ((leader, leader_rx), (follower, follower_rx))
    }

    /// Node 1's success answering node 0's AppendEntries after `prev_log_index`.
    fn acknowledged(prev_log_index: u64, match_index: u64) -> Message {
        let body = Body::AppendEntriesReply {
            success: true,
            prev_log_index,
            match_index,
            conflict_index: 0,
            conflict_term: None,
            read_seq: 0,
        };
        Message { body, ..ack(1, 0) }
    }

    /// The next item matching `wanted`, skipping others, or a panic at `deadline`.
    fn expect(rx: &Receiver<Inbound>, deadline: Instant, wanted: impl Fn(&Inbound) -> bool) -> Inbound {
        loop {
            match rx.recv_deadline(deadline) {
                Ok(item) if wanted(&item) => return item,
                Ok(_) => {}
                Err(e) => panic!("nothing wanted arrived in time: {e}"),
            }
        }
    }

    fn message(rx: &Receiver<Inbound>) -> Message {
        match rx.recv_deadline(Instant::now() + PATIENCE) {
            Ok(Inbound::Message(m)) => m,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    /// Once a peer's reply says it takes a window of requests, appends go
    /// out before the ones before them are answered; each reply comes back
    /// on the one connection, in order.
    #[test]
    fn appends_go_out_within_the_window_a_peer_names_and_are_answered_in_order() {
        let ((leader, leader_rx), (follower, follower_rx)) = leader_and_follower_with_a_window();
        leader.send(heartbeat(0, 1, 2));
        leader.send(heartbeat(0, 1, 3));
        assert_eq!(message(&follower_rx), heartbeat(0, 1, 2));
        assert_eq!(message(&follower_rx), heartbeat(0, 1, 3), "the second is out before the first is answered");
        follower.send(acknowledged(0, 2));
        follower.send(acknowledged(0, 3));
        assert_eq!(message(&leader_rx), acknowledged(0, 2));
        assert_eq!(message(&leader_rx), acknowledged(0, 3));
        leader.shutdown();
        follower.shutdown();
    }

    /// A request out that gets no answer (lost with a connection libzmq
    /// made again, or left unanswered) is passed over once a later one's
    /// reply comes: the reply is paired with its own request, and nothing
    /// waits behind the lost one until the reply timeout.
    #[test]
    fn a_reply_is_paired_with_the_append_it_answers_and_those_before_it_go() {
        let ((leader, leader_rx), (follower, follower_rx)) = leader_and_follower_with_a_window();
        let append = |prev_log_index| Message {
            body: Body::AppendEntries {
                prev_log_index,
                prev_log_term: 2,
                entries: vec![],
                leader_commit: 0,
                read_seq: 0,
            },
            ..heartbeat(0, 1, 0)
        };
        leader.send(append(4));
        leader.send(append(6));
        assert_eq!(message(&follower_rx), append(4));
        assert_eq!(message(&follower_rx), append(6));
        follower.send(acknowledged(6, 6)); // the first is never answered
        assert_eq!(message(&leader_rx), acknowledged(6, 6));
        let vote = vote_request(0, 1, 3);
        leader.send(vote.clone());
        let asked = follower_rx.recv_timeout(PATIENCE / 2).expect("the vote waits for nothing out");
        assert_eq!(asked, Inbound::Message(vote));
        leader.shutdown();
        follower.shutdown();
    }

    /// A release that answers one request at a time (0.2.0) says nothing of
    /// a window: it is sent one request at a time, the next once the last
    /// is answered.
    #[test]
    fn a_peer_that_names_no_window_is_sent_one_request_at_a_time() {
        let ctx = zmq::Context::new();
        let nodes = members(2);
        let (leader, leader_rx) = start(&ctx, 0, &nodes, PATIENCE);
        let old = ctx.socket(zmq::ROUTER).unwrap();
        old.set_linger(0).unwrap();
        old.bind(&nodes[1].1).unwrap();
        let wire = Wire::new(1, CLUSTER, 0, -1);
        // Answers as 0.2.0 does, with no window in the envelope.
        let answer = |frames: &mut Vec<zmq::Message>| {
            let request = wire.open_request(&frames.pop().unwrap()).unwrap().message;
            let reply = ack(1, 0);
            let envelope = Envelope {
                version: PROTOCOL_VERSION,
                cluster: CLUSTER,
                from: 1,
                term: 2,
                message: reply,
                chunk: None,
                window: None,
            };
            frames.push(rmp_serde::to_vec_named(&envelope).unwrap().into());
            old.send_multipart(frames.drain(..), 0).unwrap();
            request
        };
        let receive = |timeout: Duration| {
            (old.poll(zmq::POLLIN, timeout.as_millis() as i64).unwrap() > 0)
                .then(|| old.recv_multipart(0).unwrap().into_iter().map(zmq::Message::from).collect::<Vec<_>>())
        };
        leader.send(heartbeat(0, 1, 1));
        let mut first = receive(PATIENCE).unwrap();
        assert_eq!(answer(&mut first), heartbeat(0, 1, 1));
        assert_eq!(message(&leader_rx), ack(1, 0));
        leader.send(heartbeat(0, 1, 2));
        leader.send(heartbeat(0, 1, 3));
        let mut second = receive(PATIENCE).unwrap();
        assert!(receive(Duration::from_millis(300)).is_none(), "the third waits for the second's answer");
        assert_eq!(answer(&mut second), heartbeat(0, 1, 2));
        let mut third = receive(PATIENCE).unwrap();
        assert_eq!(answer(&mut third), heartbeat(0, 1, 3));
        leader.shutdown();
    }

    #[test]
    fn the_transport_moves_to_the_thread_that_polls_it_and_answers_go_from_any() {
        fn sendable<T: Send>() {}
        fn shareable<T: Send + Sync>() {}
        sendable::<Transport>();
        shareable::<Answers>();
    }

    #[test]
    fn a_snapshot_travels_in_pieces_and_only_an_intact_one_reaches_the_core() {
        let ctx = zmq::Context::new();
        let nodes = members(2);
        let (leader_dir, follower_dir) = (snapshots_dir(), snapshots_dir());
        let (a, a_rx) = start_with(&ctx, 0, &nodes, PATIENCE, leader_dir.clone());
        let (b, b_rx) = start_with(&ctx, 1, &nodes, PATIENCE, follower_dir.clone());
        let snapshot = SnapshotMeta { index: 40, term: 3 };
        let data: Vec<u8> = (0..(3 * peer::SNAPSHOT_CHUNK + 12_345)).map(|i| (i % 251) as u8).collect();
        leader_dir.save(snapshot, &Default::default(), &data).unwrap();
        let install = Message {
            from: 0,
            to: 1,
            term: 3,
            body: Body::InstallSnapshot { snapshot, membership: Default::default() },
        };
        b.follow(3, Some(0));
        a.send(install.clone());
        assert_eq!(message(&b_rx), install, "the core sees one InstallSnapshot, once all of it arrived");
        b.send(Message { from: 1, to: 0, ..ack(1, 0) });
        assert_eq!(message(&a_rx), ack(1, 0), "the core's reply answers the last piece");
        follower_dir.adopt(snapshot).unwrap();
        assert_eq!(follower_dir.load(snapshot).unwrap().data, data);

        // A damaged file never reaches the follower's core.
        let damaged = SnapshotMeta { index: 50, term: 3 };
        leader_dir.save(damaged, &Default::default(), &data).unwrap();
        let mut bytes = std::fs::read(leader_dir.path(damaged)).unwrap();
        bytes[100] ^= 0xff;
        std::fs::write(leader_dir.path(damaged), bytes).unwrap();
        a.send(Message {
            body: Body::InstallSnapshot { snapshot: damaged, membership: Default::default() },
            ..install
        });
        expect(&a_rx, Instant::now() + Duration::from_secs(15), |item| *item == Inbound::Unreachable(1));
        assert!(b_rx.try_recv().is_err(), "nothing was delivered");
        drop((a, b));
    }

    #[test]
    fn request_and_reply_cross_loopback() {
        let ctx = zmq::Context::new();
        let nodes = members(2);
        let (a, a_rx) = start(&ctx, 0, &nodes, PATIENCE);
        let (b, b_rx) = start(&ctx, 1, &nodes, PATIENCE);

        let request = Message {
            body: Body::AppendEntries {
                prev_log_index: 1,
                prev_log_term: 1,
                entries: vec![Entry { index: 2, term: 2, payload: Payload::Command(b"x=1".to_vec().into()) }],
                leader_commit: 1,
                read_seq: 4,
            },
            ..heartbeat(0, 1, 1)
        };
        a.send(request.clone());
        assert_eq!(message(&b_rx), request);
        let reply = acknowledged(1, 2);
        b.send(reply.clone());
        assert_eq!(message(&a_rx), reply);
        a.shutdown();
        b.shutdown();
    }

    /// A named leader brings the log to a member of its new cluster that has
    /// not learned the name, in the cluster's fingerprint, and asks for no
    /// vote that way; once the member knows the name, they speak by it.
    #[test]
    fn a_named_leader_reaches_a_member_that_has_not_learned_the_name_and_only_with_the_log() {
        const FINGERPRINT: u64 = 0xf1;
        let ctx = zmq::Context::new();
        let nodes = members(2);
        // A refusal is reported as a failure, no sooner than the reply timeout.
        let reply_timeout = Duration::from_millis(300);
        let (leader, leader_rx) = start_in(&ctx, 0, &nodes, (CLUSTER, FINGERPRINT), reply_timeout, snapshots_dir());
        let (member, member_rx) = start_in(&ctx, 1, &nodes, (0, FINGERPRINT), PATIENCE, snapshots_dir());

        let vote = vote_request(0, 1, 1);
        leader.send(vote.clone());
        assert_eq!(expect(&leader_rx, Instant::now() + PATIENCE, |_| true), Inbound::Unreachable(1));
        assert!(member_rx.is_empty(), "no vote asked in the fingerprint");

        leader.send(heartbeat(0, 1, 1));
        assert_eq!(message(&member_rx), heartbeat(0, 1, 1));
        member.send(ack(1, 0));
        assert_eq!(message(&leader_rx), ack(1, 0), "answered in the fingerprint it was asked in");
        leader.send(vote.clone());
        assert_eq!(expect(&leader_rx, Instant::now() + PATIENCE, |_| true), Inbound::Unreachable(1));
        assert!(member_rx.is_empty(), "still no vote asked in the fingerprint");

        member.name_cluster(CLUSTER);
        leader.send(heartbeat(0, 1, 2));
        assert_eq!(message(&member_rx), heartbeat(0, 1, 2), "refused in the fingerprint, then sent by name");
        member.send(ack(1, 0));
        assert_eq!(message(&leader_rx), ack(1, 0));
        leader.shutdown();
        member.shutdown();
    }

    /// A member that learned of the name's commit before this node (seen:
    /// the leader itself, between the commit and following it) is reached
    /// by that name at once, votes included, since this node's log holds
    /// it, and in the fingerprint again once it lost the name; a peer
    /// naming any other cluster is not.
    #[test]
    fn a_node_whose_log_holds_the_name_reaches_a_member_that_knows_it_committed() {
        const FINGERPRINT: u64 = 0xf1;
        let ctx = zmq::Context::new();
        let nodes = members(3);
        let reply_timeout = Duration::from_millis(300);
        let (leader, leader_rx) = start_in(&ctx, 0, &nodes, (0, FINGERPRINT), reply_timeout, snapshots_dir());
        let (named, named_rx) = start_in(&ctx, 1, &nodes, (CLUSTER, FINGERPRINT), PATIENCE, snapshots_dir());
        let (stranger, stranger_rx) = start_in(&ctx, 2, &nodes, (CLUSTER + 1, FINGERPRINT), PATIENCE, snapshots_dir());
        leader.expect_cluster(CLUSTER);

        leader.send(heartbeat(0, 1, 7));
        assert_eq!(message(&named_rx), heartbeat(0, 1, 7), "refused in the fingerprint, then sent by name");
        named.send(ack(1, 0));
        assert_eq!(message(&leader_rx), ack(1, 0));
        let vote = vote_request(0, 1, 2);
        leader.send(vote.clone());
        assert_eq!(message(&named_rx), vote, "a vote asked by the name the log holds");
        named.shutdown();
        drop(named_rx);

        // Wiped, it speaks the fingerprint again: so does the link.
        let (wiped, wiped_rx) = start_in(&ctx, 1, &nodes, (0, FINGERPRINT), PATIENCE, snapshots_dir());
        leader.send(heartbeat(0, 1, 8));
        assert_eq!(message(&wiped_rx), heartbeat(0, 1, 8), "refused by the name, then sent in the fingerprint");

        leader.send(heartbeat(0, 2, 7));
        expect(&leader_rx, Instant::now() + PATIENCE, |item| *item == Inbound::Unreachable(2));
        assert!(stranger_rx.is_empty(), "another cluster's member hears nothing");
        leader.shutdown();
        wiped.shutdown();
        stranger.shutdown();
    }

    /// (A sender outside the membership is the core's to drop: membership
    /// changes at run time.)
    #[test]
    fn bad_frames_are_dropped_and_valid_peers_still_served() {
        let ctx = zmq::Context::new();
        let nodes = members(2);
        let (server, inbound) = start(&ctx, 0, &nodes, PATIENCE);

        // A DEALER speaking REQ framing keeps every frame on one connection,
        // in order, so the valid request is provably processed last.
        let raw = ctx.socket(zmq::DEALER).unwrap();
        raw.set_linger(0).unwrap();
        raw.connect(&nodes[0].1).unwrap();
        let frame = |version, cluster, from, message: Message| {
            let term = message.term;
            rmp_serde::to_vec_named(&Envelope { version, cluster, from, term, message, chunk: None, window: None })
                .unwrap()
        };
        let bad = [
            b"\xc1 not msgpack".to_vec(),
            frame(PROTOCOL_VERSION + 1, CLUSTER, 1, heartbeat(1, 0, 0)),
            frame(PROTOCOL_VERSION, CLUSTER + 1, 1, heartbeat(1, 0, 0)),
            frame(PROTOCOL_VERSION, CLUSTER, 1, heartbeat(1, 5, 0)),
            frame(PROTOCOL_VERSION, CLUSTER, 0, heartbeat(1, 0, 0)),
            frame(PROTOCOL_VERSION, CLUSTER, 1, ack(1, 0)),
        ];
        for payload in &bad {
            raw.send_multipart([&b""[..], payload], 0).unwrap();
        }
        raw.send(&b"no delimiter"[..], 0).unwrap();
        raw.send_multipart([&b"x"[..], b"", b"extra"], 0).unwrap();

        let valid = heartbeat(1, 0, 3);
        raw.send_multipart([&b""[..], &frame(PROTOCOL_VERSION, CLUSTER, 1, valid.clone())], 0).unwrap();
        assert_eq!(message(&inbound), valid);
        assert!(inbound.is_empty());

        // Only the request naming another cluster got an answer: which one
        // this node speaks for.
        let wire = Wire::new(1, CLUSTER, 0, -1);
        assert!(raw.poll(zmq::POLLIN, PATIENCE.as_millis() as i64).unwrap() > 0);
        let refusal = raw.recv_multipart(0).unwrap();
        assert_eq!(wire.open_reply(&refusal[1], 0, CLUSTER + 1), Err(Reject::Refused { cluster: CLUSTER }));
        server.send(ack(0, 1));
        assert!(raw.poll(zmq::POLLIN, PATIENCE.as_millis() as i64).unwrap() > 0);
        let reply = raw.recv_multipart(0).unwrap();
        assert_eq!(reply.len(), 2);
        let reply = wire.open_reply(&reply[1], 0, CLUSTER).unwrap();
        assert_eq!((reply.message, reply.chunk), (ack(0, 1), None));
        server.shutdown();
    }

    #[test]
    fn snapshot_pieces_out_of_order_or_repeated_are_answered_with_where_to_go_on() {
        let ctx = zmq::Context::new();
        let nodes = members(2);
        let follower_dir = snapshots_dir();
        let (follower, inbound) = start_with(&ctx, 0, &nodes, PATIENCE, follower_dir.clone());
        follower.follow(2, Some(1));
        let raw = ctx.socket(zmq::REQ).unwrap();
        raw.set_linger(0).unwrap();
        raw.set_rcvtimeo(PATIENCE.as_millis() as i32).unwrap();
        raw.connect(&nodes[0].1).unwrap();
        let leader = Wire::new(1, CLUSTER, 0, -1);
        let snapshot = SnapshotMeta { index: 9, term: 2 };
        let file = crate::storage::snapshot::encode(snapshot, &Default::default(), &[7; 2500]);
        let total = file.len() as u64;
        let install = Message {
            from: 1,
            to: 0,
            term: 2,
            body: Body::InstallSnapshot { snapshot, membership: Default::default() },
        };
        // Sends the piece at `offset` (1000 bytes at most); returns the answer.
        let piece = |offset: u64| {
            let data = file[offset as usize..(offset as usize + 1000).min(file.len())].to_vec();
            let chunk = Chunk::Data { offset, total, data };
            raw.send(leader.seal_as(CLUSTER, &install, Some(&chunk)).unwrap(), 0).unwrap();
            leader.open_reply(&raw.recv_bytes(0).unwrap(), 0, CLUSTER).unwrap().chunk
        };
        assert_eq!(piece(0), Some(Chunk::Ack { next: 1000 }));
        assert_eq!(piece(0), Some(Chunk::Ack { next: 1000 }), "a repeated piece is not written twice");
        assert_eq!(piece(2000), Some(Chunk::Ack { next: 1000 }), "a piece ahead is refused: go on from 1000");
        assert_eq!(piece(1000), Some(Chunk::Ack { next: 2000 }));
        assert!(inbound.is_empty(), "nothing reaches the core before the whole file");
        let last = Chunk::Data { offset: 2000, total, data: file[2000..].to_vec() };
        raw.send(leader.seal_as(CLUSTER, &install, Some(&last)).unwrap(), 0).unwrap();
        assert_eq!(message(&inbound), install, "complete and intact: handed to the core");
        follower_dir.adopt(snapshot).unwrap();
        assert_eq!(follower_dir.load(snapshot).unwrap().data, vec![7; 2500]);
    }

    /// Only a member that may lead the follower's current term stages a
    /// snapshot: a node that is not a member, another member than the
    /// leader, or the leader of an older term gets no answer and leaves no
    /// file; once leadership moves on, the old leader's staging file goes.
    #[test]
    fn only_a_member_that_may_lead_the_current_term_makes_a_node_stage_a_snapshot() {
        let ctx = zmq::Context::new();
        let nodes = members(3);
        let dir = tempfile::tempdir().unwrap();
        let (follower, _inbound) = start_with(&ctx, 0, &nodes, PATIENCE, Snapshots::open(dir.path()).unwrap());
        let raw = ctx.socket(zmq::DEALER).unwrap();
        raw.set_linger(0).unwrap();
        raw.connect(&nodes[0].1).unwrap();
        let snapshot = SnapshotMeta { index: 9, term: 2 };
        let file = crate::storage::snapshot::encode(snapshot, &Default::default(), &[7; 2500]);
        // The first 1000 bytes, as node `from` in `term`; the answer, if any comes within a second.
        let first_piece = |from: NodeId, term| {
            let install =
                Message { from, to: 0, term, body: Body::InstallSnapshot { snapshot, membership: Default::default() } };
            let chunk = Chunk::Data { offset: 0, total: file.len() as u64, data: file[..1000].to_vec() };
            let frame = Wire::new(from, CLUSTER, 0, -1).seal_as(CLUSTER, &install, Some(&chunk)).unwrap();
            raw.send_multipart([&b""[..], &frame], 0).unwrap();
            (raw.poll(zmq::POLLIN, 1000).unwrap() > 0).then(|| raw.recv_multipart(0).unwrap())
        };
        let staged = || std::fs::read_dir(dir.path()).unwrap().count();
        follower.follow(2, Some(1));
        assert!(first_piece(7, 3).is_none(), "a node that is not a member, in a newer term");
        assert!(first_piece(2, 2).is_none(), "a member that is not the leader");
        assert!(first_piece(1, 1).is_none(), "the leader of an older term");
        assert_eq!(staged(), 0, "nothing staged");
        assert!(first_piece(1, 2).is_some(), "the leader is answered");
        assert_eq!(staged(), 1);
        follower.follow(3, Some(2));
        let deadline = Instant::now() + PATIENCE;
        while staged() > 0 {
            assert!(Instant::now() < deadline, "the deposed leader's staging file stayed");
            thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn dead_peer_is_reported_and_does_not_delay_live_ones() {
        let ctx = zmq::Context::new();
        let nodes = members(3); // node 2 never starts
        let timeout = Duration::from_millis(300);
        let (a, a_rx) = start(&ctx, 0, &nodes, timeout);
        let (_b, b_rx) = start(&ctx, 1, &nodes, timeout);

        let sent = Instant::now();
        a.send(heartbeat(0, 2, 0));
        a.send(heartbeat(0, 1, 0));
        assert_eq!(message(&b_rx), heartbeat(0, 1, 0));
        assert!(sent.elapsed() < timeout, "live peer waited {:?}", sent.elapsed());

        expect(&a_rx, sent + timeout + PATIENCE, |i| *i == Inbound::Unreachable(2));
        assert!(sent.elapsed() >= timeout);
    }

    /// A send that fails at once (here: a snapshot file that is missing)
    /// is reported no sooner than a timeout would be: the core sends again
    /// as soon as it hears, and must not spin (it once tried 6,000 times a
    /// second).
    #[test]
    fn a_failure_that_comes_at_once_is_reported_after_the_reply_timeout() {
        let ctx = zmq::Context::new();
        let nodes = members(2);
        let timeout = Duration::from_millis(300);
        let (a, a_rx) = start(&ctx, 0, &nodes, timeout);
        let (_b, _b_rx) = start(&ctx, 1, &nodes, PATIENCE);
        let missing =
            Body::InstallSnapshot { snapshot: SnapshotMeta { index: 7, term: 1 }, membership: Default::default() };
        let sent = Instant::now();
        a.send(Message { from: 0, to: 1, term: 1, body: missing });
        expect(&a_rx, sent + timeout + PATIENCE, |i| *i == Inbound::Unreachable(1));
        assert!(sent.elapsed() >= timeout, "reported after {:?}", sent.elapsed());
    }

    #[test]
    fn peer_that_starts_late_gets_messages() {
        let ctx = zmq::Context::new();
        let nodes = members(2);
        let (a, a_rx) = start(&ctx, 0, &nodes, Duration::from_millis(200));
        a.send(heartbeat(0, 1, 0));
        expect(&a_rx, Instant::now() + PATIENCE, |i| *i == Inbound::Unreachable(1));

        let (b, b_rx) = start(&ctx, 1, &nodes, PATIENCE);
        let deadline = Instant::now() + PATIENCE;
        let received = loop {
            a.send(heartbeat(0, 1, 1));
            match b_rx.recv_timeout(Duration::from_millis(300)) {
                Ok(Inbound::Message(m)) => break m,
                _ => assert!(Instant::now() < deadline, "late peer never reached"),
            }
        };
        assert_eq!(received, heartbeat(0, 1, 1));
        b.send(ack(1, 0));
        expect(&a_rx, Instant::now() + PATIENCE, |i| *i == Inbound::Message(ack(1, 0)));
    }

    #[test]
    fn only_the_newest_queued_request_is_sent() {
        let ctx = zmq::Context::new();
        let nodes = members(2);
        let (a, a_rx) = start(&ctx, 0, &nodes, Duration::from_millis(300));
        let (_b, b_rx) = start(&ctx, 1, &nodes, PATIENCE);

        // b never answers the first request, so a's sender thread is busy
        // waiting while the next ones queue up behind it.
        a.send(heartbeat(0, 1, 0));
        assert_eq!(message(&b_rx), heartbeat(0, 1, 0));
        for commit in 1..=10 {
            a.send(heartbeat(0, 1, commit));
        }
        expect(&a_rx, Instant::now() + PATIENCE, |i| *i == Inbound::Unreachable(1));
        assert_eq!(message(&b_rx), heartbeat(0, 1, 10));
    }

    /// A committed membership may name an endpoint ZeroMQ cannot connect
    /// to (written before `add_node` checked endpoints): that peer stays
    /// unreachable, and the node starts and talks to the others.
    #[test]
    fn a_peer_endpoint_that_cannot_be_connected_to_is_only_unreachable() {
        let ctx = zmq::Context::new();
        let mut nodes = members(2);
        nodes.extend([(2, "tcp://127.0.0.1".to_string()), (3, "tcp://:x".to_string())]);
        let (a, a_rx) = start(&ctx, 0, &nodes, Duration::from_millis(200));
        let (_b, b_rx) = start(&ctx, 1, &nodes, PATIENCE);
        for bad in [2, 3] {
            a.send(heartbeat(0, bad, 0));
            expect(&a_rx, Instant::now() + PATIENCE, |i| *i == Inbound::Unreachable(bad));
        }
        a.send(heartbeat(0, 1, 5));
        assert_eq!(message(&b_rx), heartbeat(0, 1, 5));
    }

    #[test]
    fn binding_a_taken_endpoint_fails() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("tcp://127.0.0.1:{}", taken.local_addr().unwrap().port());
        let (tx, _rx) = crossbeam_channel::unbounded();
        let cfg = TransportConfig {
            id: 0,
            cluster: CLUSTER,
            fingerprint: 0,
            bind: endpoint.clone(),
            peers: vec![(1, free_endpoint())],
            reply_timeout: PATIENCE,
            max_message_bytes: -1,
            security: Arc::new(NodeSecurity::Plain),
            snapshots: snapshots_dir(),
            disk_reserve: 0,
            appends_in_flight: 2,
        };
        let error = Transport::start(&zmq::Context::new(), cfg, tx).err().unwrap();
        assert_eq!(error.to_string(), format!("cannot bind raft endpoint {endpoint}: Address already in use"));
    }

    #[test]
    fn shutdown_is_prompt_while_waiting_on_a_dead_peer() {
        let ctx = zmq::Context::new();
        let nodes = members(3); // node 2 never starts
        let (a, _a_rx) = start(&ctx, 0, &nodes, Duration::from_secs(30));
        let (_b, b_rx) = start(&ctx, 1, &nodes, PATIENCE);
        a.send(heartbeat(0, 2, 0));
        a.send(heartbeat(0, 1, 0));
        // Once b has its request, both of a's senders are waiting for replies.
        message(&b_rx);
        let stopping = Instant::now();
        a.shutdown();
        assert!(stopping.elapsed() < Duration::from_secs(1), "took {:?}", stopping.elapsed());
    }

    #[test]
    fn round_trip_throughput() {
        let ctx = zmq::Context::new();
        let nodes = members(2);
        let (a, a_rx) = start(&ctx, 0, &nodes, PATIENCE);
        let (b, b_rx) = start(&ctx, 1, &nodes, PATIENCE);
        let rounds = 2000;
        let responder = thread::spawn(move || {
            for _ in 0..rounds {
                b.send(ack(1, message(&b_rx).from));
            }
        });
        let began = Instant::now();
        for commit in 0..rounds {
            a.send(heartbeat(0, 1, commit));
            assert_eq!(message(&a_rx), ack(1, 0));
        }
        let elapsed = began.elapsed();
        println!(
            "{rounds} request/reply round trips in {elapsed:?}: {:.0}/s, {:?} each",
            f64::from(rounds as u32) / elapsed.as_secs_f64(),
            elapsed / rounds as u32
        );
        responder.join().unwrap();
    }
}
