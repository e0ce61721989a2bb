//! Delay without netem: a host's outgoing packets go through an iptables
//! `NFQUEUE` to a thread of the test (in that host's namespace), which
//! holds each one for the delay, plus or minus the jitter, before it
//! accepts it. The kernel's `nfnetlink_queue` speaks netlink; this is just
//! enough of it: bind a queue, copy packet metadata only, read each packet's
//! id, send a verdict for it.
//!
//! A packet whose turn comes while the queue is full, or whose thread has
//! gone, is passed on at once (`--queue-bypass`): the delayer never drops.
//!
//! It also duplicates, for a share of the packets: it then copies the
//! whole packet, and once the packet is accepted sends the copy again
//! through a raw socket of its own, marked [`COPY_MARK`] so that the
//! queue's rule lets it pass (the kernel has no netem to do it either).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_PAYLOAD: u16 = 10;
const NF_ACCEPT: u32 = 1;

/// The firewall mark of the copies the delayer sends: the queue's rule
/// must pass them, or each copy would be queued (and copied) again.
pub const COPY_MARK: u32 = 0x2a;

/// What a delayer does to each packet.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Shaping {
    /// Held this long, ± `jitter` (uniform).
    pub delay: Duration,
    pub jitter: Duration,
    /// This share of the packets, in percent, is sent twice.
    pub duplicate_percent: u32,
}

/// One host's delayer; stops (and passes on what it holds) when dropped.
pub struct Delayer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Delayer {
    /// Shapes what queue `queue` of namespace `netns` gets. Returns once
    /// the queue is bound.
    pub fn start(netns: &str, queue: u16, shaping: Shaping, seed: u64) -> io::Result<Delayer> {
        let netns = netns.to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let stop = stop.clone();
            thread::spawn(move || {
                let copies = shaping.duplicate_percent > 0;
                let sockets = enter(&netns).and_then(|()| Ok((bind(queue, copies)?, raw_socket()?)));
                match sockets {
                    Ok((socket, raw)) => {
                        let _ = ready_tx.send(Ok(()));
                        hold(&socket, &raw, queue, shaping, seed, &stop);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
        };
        ready_rx.recv().expect("the delayer thread answers")?;
        Ok(Delayer { stop, thread: Some(thread) })
    }
}

impl Drop for Delayer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Moves the calling thread (only) into network namespace `netns`.
pub fn enter(netns: &str) -> io::Result<()> {
    let namespace = File::open(format!("/run/netns/{netns}"))?;
    // SAFETY: setns(2) on a descriptor we hold; it changes this thread's namespace only.
    if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A netlink message: header, nfgenmsg for `queue`, then `attrs`.
fn message(kind: u16, queue: u16, attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut body = vec![libc::AF_UNSPEC as u8, 0];
    body.extend_from_slice(&queue.to_be_bytes());
    for (kind, data) in attrs {
        body.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        body.extend_from_slice(&kind.to_ne_bytes());
        body.extend_from_slice(data);
        while body.len() % 4 != 0 {
            body.push(0);
        }
    }
    let mut msg = Vec::with_capacity(16 + body.len());
    msg.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    msg.extend_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | kind).to_ne_bytes());
    msg.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    msg.extend_from_slice(&body);
    msg
}

fn send(socket: &OwnedFd, msg: &[u8]) -> io::Result<()> {
    // SAFETY: sends `msg`'s bytes on a socket we own (to the kernel: the
    // socket is bound, so no address is needed).
    let sent = unsafe { libc::send(socket.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if sent < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// A raw IPv4 socket that sends whole packets, headers included, marked
/// [`COPY_MARK`].
fn raw_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2); the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mark = COPY_MARK;
    let size = std::mem::size_of::<u32>() as u32;
    // SAFETY: setsockopt(2) reads a u32 we own.
    if unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_MARK, (&mark as *const u32).cast(), size) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

/// Sends `packet` (an IPv4 packet, headers included) again.
fn send_copy(raw: &OwnedFd, packet: &[u8]) {
    if packet.len() < 20 {
        return;
    }
    // SAFETY: a zeroed sockaddr_in is valid; the destination is the packet's.
    let mut to: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    to.sin_family = libc::AF_INET as u16;
    to.sin_addr.s_addr = u32::from_ne_bytes(packet[16..20].try_into().expect("4 bytes"));
    let size = std::mem::size_of::<libc::sockaddr_in>() as u32;
    // SAFETY: sendto(2) reads `packet` and `to`, both ours.
    unsafe {
        libc::sendto(
            raw.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&to as *const libc::sockaddr_in).cast(),
            size,
        )
    };
}

/// A netfilter netlink socket bound to `queue`, copying metadata only, or
/// whole packets too with `copies`.
fn bind(queue: u16, copies: bool) -> io::Result<OwnedFd> {
    // SAFETY: socket(2); the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_NETFILTER) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a zeroed sockaddr_nl is valid; bind(2) reads it.
    let mut address: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    address.nl_family = libc::AF_NETLINK as u16;
    let size = std::mem::size_of::<libc::sockaddr_nl>() as u32;
    if unsafe { libc::bind(fd, (&address as *const libc::sockaddr_nl).cast(), size) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Bind: command 1, padding, protocol family AF_INET (big-endian).
    let mut command = vec![libc::NFQNL_CFG_CMD_BIND as u8, 0];
    command.extend_from_slice(&(libc::AF_INET as u16).to_be_bytes());
    send(&socket, &message(libc::NFQNL_MSG_CONFIG as u16, queue, &[(NFQA_CFG_CMD, &command)]))?;
    // Copy range 0, mode META: the id and headers, not the payload; or the
    // whole packet, up to 64 KiB.
    let (range, mode) = if copies { (0xffffu32, libc::NFQNL_COPY_PACKET) } else { (0, libc::NFQNL_COPY_META) };
    let mut params = range.to_be_bytes().to_vec();
    params.push(mode as u8);
    send(&socket, &message(libc::NFQNL_MSG_CONFIG as u16, queue, &[(NFQA_CFG_PARAMS, &params)]))?;
    Ok(socket)
}

/// Reads packets and accepts each one once its time comes (and sends the
/// copy of one chosen to be duplicated), until `stop`; then accepts all it
/// still holds.
fn hold(socket: &OwnedFd, raw: &OwnedFd, queue: u16, shaping: Shaping, seed: u64, stop: &AtomicBool) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut held: BinaryHeap<Reverse<(Instant, u32)>> = BinaryHeap::new();
    let mut copies: HashMap<u32, Vec<u8>> = HashMap::new();
    let mut buffer = vec![0u8; 1 << 17];
    let accept = |id: u32, copies: &mut HashMap<u32, Vec<u8>>| {
        let mut verdict = NF_ACCEPT.to_be_bytes().to_vec();
        verdict.extend_from_slice(&id.to_be_bytes());
        let _ = send(socket, &message(libc::NFQNL_MSG_VERDICT as u16, queue, &[(NFQA_VERDICT_HDR, &verdict)]));
        if let Some(copy) = copies.remove(&id) {
            send_copy(raw, &copy);
        }
    };
    let (delay, spread) = (shaping.delay.as_micros() as i64, shaping.jitter.as_micros() as i64);
    while !stop.load(Ordering::Acquire) {
        // Sleep until a packet comes or the next one held is due: ppoll's
        // timer is exact to microseconds (a socket timeout counts in ticks of
        // up to 4 ms), and at most 50 ms, to see `stop`.
        let next = held.peek().map_or(Duration::from_millis(50), |Reverse((due, _))| {
            due.saturating_duration_since(Instant::now()).min(Duration::from_millis(50))
        });
        let timeout = libc::timespec { tv_sec: 0, tv_nsec: next.as_nanos() as libc::c_long };
        let mut poll = libc::pollfd { fd: socket.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: ppoll(2) on one pollfd we own, with a timespec, no sigmask.
        unsafe { libc::ppoll(&mut poll, 1, &timeout, std::ptr::null()) };
        // SAFETY: recv(2) into a buffer we own, at most its length; never blocks.
        let n = unsafe { libc::recv(socket.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len(), libc::MSG_DONTWAIT) };
        if n > 0 {
            for (id, payload) in packets(&buffer[..n as usize]) {
                let offset = if spread > 0 { rng.i64(-spread..=spread) } else { 0 };
                let wait = Duration::from_micros((delay + offset).max(0) as u64);
                held.push(Reverse((Instant::now() + wait, id)));
                if rng.u32(0..100) < shaping.duplicate_percent {
                    copies.insert(id, payload.to_vec());
                }
            }
        }
        let now = Instant::now();
        while let Some(Reverse((due, id))) = held.peek().copied() {
            if due > now {
                break;
            }
            held.pop();
            accept(id, &mut copies);
        }
    }
    held.into_iter().for_each(|Reverse((_, id))| accept(id, &mut copies));
}

/// The packet ids of the NFQNL_MSG_PACKET messages in `data`, each with
/// its payload (empty unless the queue copies packets).
fn packets(mut data: &[u8]) -> Vec<(u32, &[u8])> {
    let mut packets = Vec::new();
    let u16_at = |d: &[u8], i: usize| u16::from_ne_bytes([d[i], d[i + 1]]);
    while data.len() >= 16 {
        let len = u32::from_ne_bytes(data[..4].try_into().unwrap()) as usize;
        if len < 16 || len > data.len() {
            break;
        }
        let kind = u16_at(data, 4);
        if kind == (NFNL_SUBSYS_QUEUE << 8) | libc::NFQNL_MSG_PACKET as u16 {
            // After the header and the 4-byte nfgenmsg: attributes.
            let (mut attrs, mut id, mut payload) = (&data[20..len], None, &data[..0]);
            while attrs.len() >= 4 {
                let (alen, akind) = (u16_at(attrs, 0) as usize, u16_at(attrs, 2) & 0x3fff);
                if alen < 4 || alen > attrs.len() {
                    break;
                }
                if akind == NFQA_PACKET_HDR && alen >= 8 {
                    id = Some(u32::from_be_bytes(attrs[4..8].try_into().unwrap()));
                }
                if akind == NFQA_PAYLOAD {
                    payload = &attrs[4..alen];
                }
                attrs = &attrs[((alen + 3) & !3).min(attrs.len())..];
            }
            packets.extend(id.map(|id| (id, payload)));
        }
        data = &data[((len + 3) & !3).min(data.len())..];
    }
    packets
}
