//! The sending half: one DEALER socket per peer, driven by the thread that
//! polls the transport, never waiting on it, so a slow or dead peer only
//! ever delays messages to itself. Requests leave as a REQ socket's would
//! (an empty delimiter, then the frame); AppendEntries up to the peer's
//! window of them at once, whose replies come back in the same order on
//! the one connection. An InstallSnapshot is sent as the snapshot file's
//! pieces, one request each (see [`Chunk`]).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use log::{debug, info, warn};

use super::name_check::NameCheck;
use super::{Inbound, deliver};
use crate::metrics::{METRICS, seconds_since};
use crate::net::security::NodeSecurity;
use crate::raft::{Body, Message, NodeId, SnapshotMeta};
use crate::storage::snapshot::Snapshots;
use crate::warnings::Warnings;
use crate::wire::envelope::{Chunk, PeerReply, Reject, Wire};

/// Bytes of snapshot per request: far below any frame limit, big enough
/// that a large snapshot takes few round trips.
pub const SNAPSHOT_CHUNK: usize = 1 << 20;

/// How long one piece of a snapshot may wait for its answer. Longer than
/// for other requests: the last one is answered once the follower has
/// checked the whole file, made it durable and installed it.
const SNAPSHOT_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// A DEALER socket to `peer` at `endpoint`. It never needs a send or
/// receive timeout: sends are DONTWAIT (connect creates the outgoing pipe at
/// once, and a window of requests is far below its high-water mark) and
/// replies are awaited with `poll`.
pub(super) fn connect(
    ctx: &zmq::Context,
    endpoint: &str,
    max_message_bytes: i64,
    security: &NodeSecurity,
    peer: NodeId,
) -> zmq::Result<zmq::Socket> {
    let socket = ctx.socket(zmq::DEALER)?;
    socket.set_linger(0)?;
    socket.set_maxmsgsize(max_message_bytes)?;
    security.client(&socket, peer)?;
    socket.connect(endpoint)?;
    Ok(socket)
}

pub(super) struct Link {
    pub(super) peer: NodeId,
    pub(super) endpoint: String,
    /// Says so when `endpoint` names a host that does not resolve.
    pub(super) name_check: NameCheck,
    pub(super) ctx: zmq::Context,
    /// `None` before the first exchange and after a failed one: replies
    /// still on their way to it would be taken for the next requests', and
    /// its queue may hold stale requests, so it is replaced.
    pub(super) socket: Option<zmq::Socket>,
    /// How many requests the peer takes at once on this connection, as its
    /// last reply said; one for a new connection (the peer may be another
    /// process, of a release that answers one at a time).
    pub(super) window: usize,
    /// AppendEntries this node keeps out at once, at most.
    pub(super) appends_in_flight: usize,
    pub(super) wire: Arc<Wire>,
    pub(super) inbound: Sender<Inbound>,
    pub(super) reply_timeout: Duration,
    pub(super) max_message_bytes: i64,
    pub(super) security: Arc<NodeSecurity>,
    pub(super) snapshots: Snapshots,
    /// The cluster to name instead of the one this node speaks for: the
    /// fingerprint, for a member of a new cluster that has not learned the
    /// cluster's name; or that name, for a member that learned it before
    /// this node (see [`Wire`] and `switch_to`).
    pub(super) speak_as: Option<u64>,
    /// The request to send once the window has room. Heartbeats and votes
    /// pile up while the peer is down; only the newest reflects this node's
    /// state, and Raft tolerates the loss of older ones. (The core keeps
    /// its AppendEntries within the window: see `Progress`.)
    pub(super) queued: Option<Message>,
    /// The requests out, oldest first, awaiting their replies in that order.
    pub(super) out: VecDeque<Exchange>,
    /// After a failure, when the core hears of it; nothing is sent until then.
    pub(super) failed_until: Option<Instant>,
    pub(super) reachable: bool,
    pub(super) warnings: Warnings,
}

/// One request and its reply, or a whole snapshot and the reply to its
/// last piece.
pub(super) struct Exchange {
    message: Message,
    /// The cluster the request named.
    asked_as: u64,
    /// When the exchange began: a failure is reported no sooner than the
    /// reply timeout after it.
    began: Instant,
    /// When the request out now was sent, and when its reply is due.
    sent: Instant,
    due: Instant,
    /// The link switched the cluster it names once in this exchange already.
    switched: bool,
    snapshot: Option<Stream>,
}

/// A snapshot file on its way, piece by piece, going on from wherever the
/// follower says it is (so a transfer interrupted by a timeout resumes).
struct Stream {
    meta: SnapshotMeta,
    file: File,
    total: u64,
    /// The piece out now.
    offset: u64,
    last: bool,
}

/// Asks the kernel to read the piece at `offset` of `file` while this one
/// is on its way, so that reading it does not hold up the core loop, which
/// sends it. A hint: nothing depends on it.
fn read_ahead(file: &File, offset: u64) {
    use std::os::fd::AsRawFd;
    let Ok(offset) = libc::off_t::try_from(offset) else { return };
    // SAFETY: the descriptor is open for as long as `file` is borrowed.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), offset, SNAPSHOT_CHUNK as libc::off_t, libc::POSIX_FADV_WILLNEED) };
}

/// The next reply on a link's socket: `[empty delimiter, frame]`, as a
/// ROUTER answers a REQ socket.
fn receive_reply(socket: &zmq::Socket) -> Result<zmq::Message, Failure> {
    let mut frames = vec![socket.recv_msg(zmq::DONTWAIT)?];
    // The rest of a multipart message is there once its first frame is.
    while frames.last().is_some_and(zmq::Message::get_more) {
        frames.push(socket.recv_msg(zmq::DONTWAIT)?);
    }
    match <[zmq::Message; 2]>::try_from(frames) {
        Ok([delimiter, reply]) if delimiter.is_empty() => Ok(reply),
        _ => Err(Reject::Undecodable("a reply not framed as [empty delimiter, frame]".into()).into()),
    }
}

enum Failure {
    Timeout,
    Zmq(zmq::Error),
    Rejected(Reject),
    /// The snapshot to send cannot be read, or the follower refused it.
    Snapshot(String),
    /// A reply that answers none of the requests out.
    Unpaired(String),
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

/// Only a leader's AppendEntries and InstallSnapshot may name the
/// fingerprint to a member that has not learned the cluster's name.
fn brings_the_log(message: &Message) -> bool {
    matches!(message.body, Body::AppendEntries { .. } | Body::InstallSnapshot { .. })
}

impl Link {
    /// Sends `message` as soon as the window has room, replacing whatever
    /// older request still waited.
    pub(super) fn send(&mut self, message: Message, now: Instant) {
        self.queued = Some(message);
        self.go_on(now);
    }

    /// Nothing out and nothing to send: a link to a gone member may go.
    pub(super) fn is_idle(&self) -> bool {
        self.out.is_empty() && self.failed_until.is_none() && self.queued.is_none()
    }

    /// The socket to poll for replies, while any is awaited.
    pub(super) fn awaiting(&self) -> Option<&zmq::Socket> {
        if self.out.is_empty() { None } else { self.socket.as_ref() }
    }

    /// When [`Link::go_on`] has something to do without a reply arriving.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.out.front().map(|exchange| exchange.due).or(self.failed_until)
    }

    /// Gives up on the requests out once the oldest reply is overdue,
    /// reports a failure once it is time, and starts the queued request
    /// when the window has room.
    pub(super) fn go_on(&mut self, now: Instant) {
        if let Some(exchange) = self.out.front()
            && now >= exchange.due
        {
            debug!("no reply from peer {} within {:?}", self.peer, exchange.due - exchange.sent);
            let began = exchange.began;
            self.fail(Failure::Timeout, began);
        }
        if self.failed_until.is_some_and(|at| now >= at) {
            self.failed_until = None;
            deliver(&self.inbound, Inbound::Unreachable(self.peer), &mut self.warnings);
        }
        if self.queued.as_ref().is_some_and(|message| self.has_room_for(message))
            && let Some(message) = self.queued.take()
        {
            let asked_as = self.speaks_for(&message);
            let exchange =
                Exchange { message, asked_as, began: now, sent: now, due: now, switched: false, snapshot: None };
            self.begin(exchange, now);
        }
    }

    /// Whether `message` may go out now: not after a failure before the
    /// core heard of it, and beside others only AppendEntries among
    /// AppendEntries, the one stream worth pipelining. Anything else goes
    /// alone, as before there were windows: a snapshot's pieces are
    /// answered by the transport, ahead of the core's replies to anything
    /// before them, and a vote or a TimeoutNow may go unanswered.
    fn has_room_for(&self, message: &Message) -> bool {
        let pipelined = |message: &Message| matches!(message.body, Body::AppendEntries { .. });
        self.failed_until.is_none()
            && (self.out.is_empty()
                || (self.out.len() < self.window.min(self.appends_in_flight)
                    && pipelined(message)
                    && self.out.iter().all(|exchange| pipelined(&exchange.message))))
    }

    /// Takes the replies the socket has, each answering a request out, and
    /// goes on from them.
    pub(super) fn on_readable(&mut self, now: Instant) {
        while let (Some(socket), Some(oldest)) = (&self.socket, self.out.front()) {
            let (began, asked_as) = (oldest.began, oldest.asked_as);
            let opened = match receive_reply(socket) {
                Ok(reply) => self.wire.open_reply(&reply, self.peer, asked_as),
                Err(Failure::Zmq(zmq::Error::EAGAIN)) => return,
                Err(failure) => return self.fail(failure, began),
            };
            let Some(answered) = self.answered_by(&opened) else {
                let unpaired = format!("{:?} answers no request out", opened.map(|reply| reply.message.body));
                return self.fail(Failure::Unpaired(unpaired), began);
            };
            // Those before it will get no answer: lost with a connection
            // libzmq made again, or left unanswered by the peer. The core
            // gives up on them by its own clock.
            for skipped in self.out.drain(..answered) {
                debug!("peer {}: no answer to {:?}", self.peer, skipped.message.body);
            }
            let exchange = self.out.pop_front().expect("found above");
            self.on_reply(exchange, opened, now);
        }
    }

    /// Which request out `opened` answers: an AppendEntries by the
    /// `prev_log_index` its reply names (several may be out); anything
    /// else goes alone, so it is the only one. `None` if it answers none
    /// of them, which only a peer's bug can cause.
    fn answered_by(&self, opened: &Result<PeerReply, Reject>) -> Option<usize> {
        let Some(Exchange { message: Message { body: Body::AppendEntries { .. }, .. }, .. }) = self.out.front() else {
            return Some(0);
        };
        let Ok(PeerReply { message: Message { body: Body::AppendEntriesReply { prev_log_index, .. }, .. }, .. }) =
            opened
        else {
            // A refusal or a broken frame is the oldest's: the link fails or goes on from it.
            return opened.is_err().then_some(0);
        };
        self.out.iter().position(|exchange| {
            matches!(exchange.message.body, Body::AppendEntries { prev_log_index: sent, .. } if sent == *prev_log_index)
        })
    }

    fn on_reply(&mut self, mut exchange: Exchange, opened: Result<PeerReply, Reject>, now: Instant) {
        match opened {
            // Once more at once if the peer refused the cluster named and
            // named one this node may speak for to it.
            Err(Reject::Refused { cluster })
                if !exchange.switched && self.switch_to(cluster, &exchange.message, exchange.asked_as) =>
            {
                exchange.switched = true;
                exchange.asked_as = self.speaks_for(&exchange.message);
                exchange.snapshot = None;
                self.begin(exchange, now);
            }
            Err(reject) => self.fail(reject.into(), exchange.began),
            Ok(PeerReply { message, chunk, window }) => {
                // A snapshot piece's acknowledgement is the transport's and names none.
                if chunk.is_none() {
                    self.window = usize::from(window);
                }
                match exchange.snapshot.take() {
                    None if chunk.is_none() => {
                        let peer = self.peer.to_string();
                        METRICS.peer_seconds.with_label_values(&[&peer]).observe(seconds_since(exchange.sent));
                        self.succeed(message);
                    }
                    None => self.fail(
                        Failure::Snapshot("a snapshot acknowledgement where none belongs".into()),
                        exchange.began,
                    ),
                    Some(stream) => self.on_piece_answered(exchange, stream, message, chunk, now),
                }
            }
        }
    }

    fn on_piece_answered(
        &mut self,
        mut exchange: Exchange,
        mut stream: Stream,
        reply: Message,
        chunk: Option<Chunk>,
        now: Instant,
    ) {
        let Stream { meta, total, offset, last, .. } = stream;
        match (reply, chunk) {
            (reply, None) if last => {
                info!(
                    "sent snapshot {}/{} to peer {} ({total} bytes in {:?})",
                    meta.index,
                    meta.term,
                    self.peer,
                    now - exchange.began
                );
                self.succeed(reply);
            }
            (_, Some(Chunk::Ack { next })) if next <= total && !(last && next == total) => {
                if last && next <= offset {
                    let refused = format!("refused after all {total} bytes were sent");
                    return self.fail(Failure::Snapshot(refused), exchange.began);
                }
                stream.offset = next;
                exchange.snapshot = Some(stream);
                let sent = self.send_piece(&mut exchange, now);
                self.await_reply(exchange, sent);
            }
            (reply, chunk) => {
                let unexpected = format!("unexpected answer {reply:?} with {chunk:?}");
                self.fail(Failure::Snapshot(unexpected), exchange.began);
            }
        }
    }

    /// Sends the exchange's request, or the first piece of its snapshot.
    fn begin(&mut self, mut exchange: Exchange, now: Instant) {
        let sent = match exchange.message.body {
            Body::InstallSnapshot { snapshot, .. } => self.open_snapshot(snapshot).and_then(|stream| {
                exchange.snapshot = Some(stream);
                self.send_piece(&mut exchange, now)
            }),
            _ => self
                .wire
                .seal_as(exchange.asked_as, &exchange.message, None)
                .map_err(Failure::from)
                .and_then(|request| self.send_request(request, &mut exchange, self.reply_timeout, now)),
        };
        self.await_reply(exchange, sent);
    }

    /// After a request of `exchange` was put on the wire (`sent`), or not.
    fn await_reply(&mut self, exchange: Exchange, sent: Result<(), Failure>) {
        match sent {
            Ok(()) => self.out.push_back(exchange),
            Err(failure) => self.fail(failure, exchange.began),
        }
    }

    fn open_snapshot(&self, meta: SnapshotMeta) -> Result<Stream, Failure> {
        let path = self.snapshots.path(meta);
        let unreadable = |e: io::Error| Failure::Snapshot(format!("cannot read {}: {e}", path.display()));
        let file = File::open(&path).map_err(unreadable)?;
        let total = file.metadata().map_err(unreadable)?.len();
        Ok(Stream { meta, file, total, offset: 0, last: false })
    }

    /// Sends the piece of the snapshot at the stream's offset.
    fn send_piece(&mut self, exchange: &mut Exchange, now: Instant) -> Result<(), Failure> {
        let stream = exchange.snapshot.as_mut().expect("a snapshot exchange");
        let mut data = vec![0; SNAPSHOT_CHUNK.min((stream.total - stream.offset) as usize)];
        let read = stream.file.seek(SeekFrom::Start(stream.offset)).and_then(|_| stream.file.read_exact(&mut data));
        read.map_err(|e| {
            Failure::Snapshot(format!("cannot read {}: {e}", self.snapshots.path(stream.meta).display()))
        })?;
        stream.last = stream.offset + data.len() as u64 == stream.total;
        if !stream.last {
            read_ahead(&stream.file, stream.offset + data.len() as u64);
        }
        let chunk = Chunk::Data { offset: stream.offset, total: stream.total, data };
        let request = self.wire.seal_as(exchange.asked_as, &exchange.message, Some(&chunk))?;
        self.send_request(request, exchange, self.reply_timeout.max(SNAPSHOT_REPLY_TIMEOUT), now)
    }

    /// Puts one request on the wire; its reply is due within `timeout`.
    fn send_request(
        &mut self,
        request: Vec<u8>,
        exchange: &mut Exchange,
        timeout: Duration,
        now: Instant,
    ) -> Result<(), Failure> {
        let socket = match self.socket.take() {
            Some(socket) => socket,
            None => {
                self.window = 1;
                connect(&self.ctx, &self.endpoint, self.max_message_bytes, &self.security, self.peer)?
            }
        };
        // A multipart message is queued whole or not at all.
        socket.send(zmq::Message::new(), zmq::SNDMORE | zmq::DONTWAIT)?;
        socket.send(request, zmq::DONTWAIT)?;
        self.socket = Some(socket);
        (exchange.sent, exchange.due) = (now, now + timeout);
        Ok(())
    }

    fn succeed(&mut self, reply: Message) {
        self.name_check.after_success();
        if !self.reachable {
            info!("peer {} reachable again", self.peer);
            self.reachable = true;
        }
        deliver(&self.inbound, Inbound::Message(reply), &mut self.warnings);
    }

    /// The socket goes (see [`Link::socket`]) with every request out; the
    /// core hears of the failure no sooner than a timeout after the
    /// exchange began. It sends again as soon as it hears, so a failure
    /// that came at once (a snapshot file that cannot be read, a refusal)
    /// would otherwise make that a hot loop (seen: 6,000 tries a second).
    fn fail(&mut self, failure: Failure, began: Instant) {
        self.socket = None;
        self.out.clear();
        match failure {
            Failure::Timeout => {}
            Failure::Zmq(e) => {
                self.warnings.warn("peer socket error", format!("peer {} at {}: {e}", self.peer, self.endpoint))
            }
            Failure::Rejected(r) => {
                METRICS.peer_rejects.with_label_values(&[r.reason()]).inc();
                let detail = format!("exchange with peer {} failed: {r}", self.peer);
                self.warnings.warn(r.reason(), detail)
            }
            Failure::Snapshot(problem) => {
                self.warnings.warn("snapshot not sent", format!("snapshot to peer {}: {problem}", self.peer))
            }
            Failure::Unpaired(reply) => self.warnings.warn("unpaired reply", format!("peer {}: {reply}", self.peer)),
        }
        if self.reachable {
            info!("peer {} unreachable at {}", self.peer, self.endpoint);
            self.reachable = false;
        }
        if let Some(problem) = self.name_check.after_failure() {
            warn!(
                "peer {} at {}: the name does not resolve: {problem}; \
                 ZeroMQ looks it up again on every connect",
                self.peer, self.endpoint
            );
        }
        self.failed_until = Some(began + self.reply_timeout);
    }

    /// The cluster a request names: the one this node speaks for, or the
    /// one this link switched to (the fingerprint for the log only).
    fn speaks_for(&self, message: &Message) -> u64 {
        match self.speak_as {
            Some(cluster) if cluster == self.wire.pending() => cluster,
            Some(cluster) if cluster == self.wire.fingerprint() && brings_the_log(message) => cluster,
            _ => self.wire.speaks_for(),
        }
    }

    /// Whether to name `theirs` to this peer from now on, having been
    /// refused in `asked_as`:
    /// - what this node speaks for anyway (the cluster's name once the peer
    ///   has learned it; the fingerprint, while this node is unnamed, to a
    ///   member that lost the name, say wiped);
    /// - the name this node's log holds but this node does not know to be
    ///   committed yet, which the peer does: the peer heard of the commit
    ///   first (from this very leader, between the commit and this node
    ///   following it, or from an earlier leader). The name is random and
    ///   only this cluster's log holds it, so it may ask for votes too;
    /// - from a named leader bringing the log, the fingerprint of the
    ///   cluster's first membership, to a member that has not learned the
    ///   name (started late, or wiped). Never to ask for a vote: a node with
    ///   an old cluster's state must not win the votes of a new cluster's
    ///   members.
    fn switch_to(&mut self, theirs: u64, message: &Message, asked_as: u64) -> bool {
        let (named, fingerprint, pending) = (self.wire.cluster(), self.wire.fingerprint(), self.wire.pending());
        let learned_first = named == 0 && pending != 0 && theirs == pending;
        let unnamed_member = named != 0 && fingerprint != 0 && theirs == fingerprint && brings_the_log(message);
        let next = if theirs != 0 && theirs == self.wire.speaks_for() {
            None
        } else if learned_first || unnamed_member {
            Some(theirs)
        } else {
            return false;
        };
        // Refused in the very cluster they speak for: nothing to switch to.
        if theirs == asked_as {
            return false;
        }
        info!("peer {}: naming cluster {theirs:#018x} to it from now on", self.peer);
        self.speak_as = next;
        true
    }
}
