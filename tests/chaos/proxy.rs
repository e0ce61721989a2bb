//! A loopback TCP proxy for one directed link: node A's connections to node
//! B's raft endpoint. ZeroMQ runs over it unchanged.
//!
//! Cutting the link behaves like a firewall that starts dropping every packet
//! of A's connections to B: bytes in flight and later ones vanish in both
//! directions, nothing is reset, and A's REQ sockets notice only by their
//! reply timeout. Those connections stay dead after the link heals (as if the
//! cut outlasted TCP's retransmissions); A's replacement sockets connect
//! afresh. A connection is never resumed mid-stream, so ZeroMQ framing is
//! never torn.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// How often idle threads look at the stop flag.
const POLL: Duration = Duration::from_millis(20);
/// How long a write to a receiver whose buffers are full may block.
const STALL: Duration = Duration::from_secs(5);

pub struct Proxy {
    listen: SocketAddr,
    state: Arc<LinkState>,
    acceptor: Option<JoinHandle<()>>,
}

struct LinkState {
    cut: AtomicBool,
    /// Bumped by every cut; a connection forwards only in the generation
    /// it was accepted in, and only if that was not during a cut.
    generation: AtomicU64,
    stop: AtomicBool,
}

impl LinkState {
    fn passes(&self, born: Option<u64>) -> bool {
        born == Some(self.generation.load(Ordering::Acquire)) && !self.cut.load(Ordering::Acquire)
    }
}

impl Proxy {
    /// Listens on a fresh 127.0.0.1 port and forwards to `target`.
    pub fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let listen = listener.local_addr().unwrap();
        let state = Arc::new(LinkState {
            cut: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let acceptor = {
            let state = state.clone();
            thread::Builder::new()
                .name(format!("proxy-{}", listen.port()))
                .spawn(move || accept(listener, target, state))
        };
        Proxy { listen, state, acceptor: Some(acceptor.unwrap()) }
    }

    /// The endpoint the source node connects to instead of the target.
    pub fn endpoint(&self) -> String {
        format!("tcp://{}", self.listen)
    }

    pub fn set_cut(&self, cut: bool) {
        if cut && !self.state.cut.swap(true, Ordering::AcqRel) {
            self.state.generation.fetch_add(1, Ordering::AcqRel);
        } else if !cut {
            self.state.cut.store(false, Ordering::Release);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Release);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// Accepts until stopped; each connection gets a pair of pump threads, and
/// they are joined before this returns.
fn accept(listener: TcpListener, target: SocketAddr, state: Arc<LinkState>) {
    let mut pumps: Vec<JoinHandle<()>> = Vec::new();
    while !state.stop.load(Ordering::Acquire) {
        pumps.retain(|pump| !pump.is_finished());
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(_) => {
                thread::sleep(POLL);
                continue;
            }
        };
        // A target that is down refuses the proxy, and so the source.
        let Ok(server) = TcpStream::connect(target) else { continue };
        let born = (!state.cut.load(Ordering::Acquire)).then(|| state.generation.load(Ordering::Acquire));
        for (from, to) in [(&client, &server), (&server, &client)] {
            let (from, to, state) = (from.try_clone().unwrap(), to.try_clone().unwrap(), state.clone());
            pumps.push(thread::spawn(move || pump(from, to, &state, born)));
        }
    }
    for pump in pumps {
        let _ = pump.join();
    }
}

/// Copies `from` to `to` while the link passes this connection, discards
/// while it does not, and closes both sides when either ends.
fn pump(mut from: TcpStream, mut to: TcpStream, state: &LinkState, born: Option<u64>) {
    from.set_read_timeout(Some(POLL)).unwrap();
    // A receiver that stops reading (a SIGSTOPped node) must not pin this
    // thread forever; giving up closes the connection, like a TCP timeout.
    to.set_write_timeout(Some(STALL)).unwrap();
    let mut buf = vec![0; 64 * 1024];
    while !state.stop.load(Ordering::Acquire) {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) if state.passes(born) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
