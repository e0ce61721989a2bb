//! The sending half: one thread and one REQ socket per peer, so a slow or
//! dead peer only ever delays messages to itself. An InstallSnapshot is
//! sent as the snapshot file's pieces, one request each (see [`Chunk`]).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use log::{debug, info, warn};

use super::name_check::NameCheck;
use super::{Inbound, STOP_CHECK, deliver};
use crate::metrics::{METRICS, seconds_since};
use crate::net::security::NodeSecurity;
use crate::raft::{Body, Message, NodeId, SnapshotMeta};
use crate::storage::snapshot::Snapshots;
use crate::warnings::Warnings;
use crate::wire::envelope::{Chunk, Reject, Wire};

/// Bytes of snapshot per request: far below any frame limit, big enough
/// that a large snapshot takes few round trips.
pub const SNAPSHOT_CHUNK: usize = 1 << 20;

/// How long one piece of a snapshot may wait for its answer. Longer than
/// for other requests: the last one is answered once the follower has
/// checked the whole file, made it durable and installed it.
const SNAPSHOT_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// Says so when `endpoint` names a host that does not resolve.
    pub(super) name_check: NameCheck,
    pub(super) ctx: zmq::Context,
    /// `None` before the first exchange and after a failed one: a REQ
    /// socket whose reply never came is stuck, and its queue may hold stale
    /// requests, so it is replaced.
    pub(super) socket: Option<zmq::Socket>,
    pub(super) queue: Receiver<Message>,
    pub(super) wire: Arc<Wire>,
    pub(super) inbound: Sender<Inbound>,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) reply_timeout: Duration,
    pub(super) max_message_bytes: i64,
    pub(super) security: Arc<NodeSecurity>,
    pub(super) snapshots: Snapshots,
    /// The cluster to name instead of the one this node speaks for: the
    /// fingerprint, for a member of a new cluster that has not learned the
    /// cluster's name; or that name, for a member that learned it before
    /// this node (see [`Wire`] and `switch_to`).
    pub(super) speak_as: Option<u64>,
}

enum Failure {
    Stopped,
    Timeout,
    Zmq(zmq::Error),
    Rejected(Reject),
    /// The snapshot to send cannot be read, or the follower refused it.
    Snapshot(String),
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
    /// Runs until the transport drops the queue's sender (shutdown).
    pub(super) fn run(mut self) {
        let mut warnings = Warnings::default();
        let mut reachable = true;
        while let Ok(oldest) = self.queue.recv() {
            // Heartbeats and votes pile up while the peer is down. Only the
            // newest reflects this node's state; older ones are stale and
            // Raft tolerates their loss.
            let message = self.queue.try_iter().last().unwrap_or(oldest);
            let started = Instant::now();
            let outcome = match self.exchange(message) {
                Ok(reply) => {
                    self.name_check.after_success();
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
                        Failure::Zmq(e) => {
                            warnings.warn("peer socket error", format!("peer {} at {}: {e}", self.peer, self.endpoint))
                        }
                        Failure::Rejected(r) => {
                            METRICS.peer_rejects.with_label_values(&[r.reason()]).inc();
                            let detail = format!("exchange with peer {} failed: {r}", self.peer);
                            warnings.warn(r.reason(), detail)
                        }
                        Failure::Snapshot(problem) => {
                            warnings.warn("snapshot not sent", format!("snapshot to peer {}: {problem}", self.peer))
                        }
                    }
                    if reachable {
                        info!("peer {} unreachable at {}", self.peer, self.endpoint);
                        reachable = false;
                    }
                    if let Some(problem) = self.name_check.after_failure() {
                        warn!(
                            "peer {} at {}: the name does not resolve: {problem}; \
                             ZeroMQ looks it up again on every connect",
                            self.peer, self.endpoint
                        );
                    }
                    // The core sends again as soon as it hears of a failure.
                    // One that came back at once (a snapshot file that cannot
                    // be read, a refusal) would make that a hot loop (seen:
                    // 6,000 tries a second), so every failure is reported
                    // no sooner than a timeout would be.
                    if !self.sleep_until(started + self.reply_timeout) {
                        return;
                    }
                    Inbound::Unreachable(self.peer)
                }
            };
            deliver(&self.inbound, outcome, &mut warnings);
        }
    }

    /// One request and its reply, or a whole snapshot and the reply to its
    /// last piece; once more at once if the peer refused the cluster named
    /// and named one this node may speak for to it.
    fn exchange(&mut self, message: Message) -> Result<Message, Failure> {
        let asked_as = self.speaks_for(&message);
        match self.exchange_once(&message, asked_as) {
            Err(Failure::Rejected(Reject::Refused { cluster })) if self.switch_to(cluster, &message, asked_as) => {
                self.exchange_once(&message, self.speaks_for(&message))
            }
            outcome => outcome,
        }
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

    /// `cluster`: the one the request names.
    fn exchange_once(&mut self, message: &Message, cluster: u64) -> Result<Message, Failure> {
        if let Body::InstallSnapshot { snapshot, .. } = message.body {
            return self.send_snapshot(message, snapshot, cluster);
        }
        let request = self.wire.seal_as(cluster, message, None)?;
        let started = Instant::now();
        match self.round_trip(request, cluster, self.reply_timeout)? {
            (reply, None) => {
                METRICS.peer_seconds.with_label_values(&[&self.peer.to_string()]).observe(seconds_since(started));
                Ok(reply)
            }
            (_, Some(_)) => Err(Failure::Snapshot("a snapshot acknowledgement where none belongs".into())),
        }
    }

    /// Streams the snapshot file piece by piece, going on from wherever the
    /// follower says it is (so a transfer interrupted by a timeout resumes).
    fn send_snapshot(&mut self, message: &Message, snapshot: SnapshotMeta, cluster: u64) -> Result<Message, Failure> {
        let path = self.snapshots.path(snapshot);
        let unreadable = |e: io::Error| Failure::Snapshot(format!("cannot read {}: {e}", path.display()));
        let mut file = File::open(&path).map_err(unreadable)?;
        let total = file.metadata().map_err(unreadable)?.len();
        let started = Instant::now();
        let mut offset = 0;
        loop {
            let mut data = vec![0; SNAPSHOT_CHUNK.min((total - offset) as usize)];
            file.seek(SeekFrom::Start(offset)).and_then(|_| file.read_exact(&mut data)).map_err(unreadable)?;
            let last = offset + data.len() as u64 == total;
            let chunk = Chunk::Data { offset, total, data };
            let request = self.wire.seal_as(cluster, message, Some(&chunk))?;
            match self.round_trip(request, cluster, self.reply_timeout.max(SNAPSHOT_REPLY_TIMEOUT))? {
                (reply, None) if last => {
                    info!(
                        "sent snapshot {}/{} to peer {} ({total} bytes in {:?})",
                        snapshot.index,
                        snapshot.term,
                        self.peer,
                        started.elapsed()
                    );
                    return Ok(reply);
                }
                (_, Some(Chunk::Ack { next })) if next <= total && !(last && next == total) => {
                    if last && next <= offset {
                        return Err(Failure::Snapshot(format!("refused after all {total} bytes were sent")));
                    }
                    offset = next;
                }
                (reply, chunk) => {
                    return Err(Failure::Snapshot(format!("unexpected answer {reply:?} with {chunk:?}")));
                }
            }
        }
    }

    /// One request, one reply. On any failure the socket is dropped here and
    /// a fresh one is connected for the next request.
    /// `cluster`: the one the request names, and so must the reply.
    fn round_trip(
        &mut self,
        request: Vec<u8>,
        cluster: u64,
        timeout: Duration,
    ) -> Result<(Message, Option<Chunk>), Failure> {
        let socket = match self.socket.take() {
            Some(socket) => socket,
            None => connect(&self.ctx, &self.endpoint, self.max_message_bytes, &self.security, self.peer)?,
        };
        socket.send(request, zmq::DONTWAIT)?;
        self.await_reply(&socket, timeout)?;
        let reply = socket.recv_bytes(zmq::DONTWAIT)?;
        let reply = self.wire.open_reply(&reply, self.peer, cluster)?;
        self.socket = Some(socket);
        Ok(reply)
    }

    /// Sleeps until `deadline` in slices; false if told to stop meanwhile.
    fn sleep_until(&self, deadline: Instant) -> bool {
        loop {
            if self.stop.load(Ordering::Acquire) {
                return false;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            std::thread::sleep(left.min(STOP_CHECK));
        }
    }

    /// Waits up to `timeout`, in slices so that shutdown is prompt.
    fn await_reply(&self, socket: &zmq::Socket, timeout: Duration) -> Result<(), Failure> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stop.load(Ordering::Acquire) {
                return Err(Failure::Stopped);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                debug!("no reply from peer {} within {timeout:?}", self.peer);
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
