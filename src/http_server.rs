//! A small HTTP/1.1 server for the node's observability endpoints: GET and
//! HEAD only, one request per connection, and hard limits everywhere, so
//! that no client (slow, idle, flooding or malformed) can take memory,
//! threads or the node with it.
//!
//! One thread accepts connections and reads their request heads, all of
//! them at once with `poll(2)`, each against one deadline for the whole
//! head (not for each read: a client sending a byte a second would renew a
//! per-read timeout forever). Only complete requests reach the few workers,
//! so clients that send their heads slowly (slowloris) hold no worker. A
//! client address holds a bounded number of connections, and so do all
//! unfinished heads together.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use log::{debug, warn};

use crate::lock;

/// The request line and headers; a longer head gets 431.
const MAX_HEAD_BYTES: usize = 8 * 1024;
/// How often idle threads look at the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// What the server lets clients hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Requests answered at once: a scrape, browsers and a health probe
    /// never wait for each other.
    pub workers: usize,
    /// Complete requests waiting for a worker; more are closed at once.
    pub queue: usize,
    /// Connections whose request head has not all arrived. A new one beyond
    /// this pushes out the oldest, so a crowd of slow clients cannot keep a
    /// quick one out.
    pub pending_heads: usize,
    /// Open connections per client address; more are closed at once.
    pub per_address: usize,
    /// How long a client may take to send its whole request head.
    pub head_deadline: Duration,
    /// How long a client may take to take each piece of the response.
    pub write_timeout: Duration,
}

impl Limits {
    pub const DEFAULT: Limits = Limits {
        workers: 8,
        queue: 64,
        pending_heads: 128,
        per_address: 16,
        head_deadline: Duration::from_secs(5),
        write_timeout: Duration::from_secs(5),
    };
}

#[derive(Debug, PartialEq, Eq)]
pub struct HttpRequest {
    pub method: String,
    pub path: String,
    pub query: String,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: String) -> Response {
        Response { status, content_type, body }
    }
}

pub type Handler = Arc<dyn Fn(&HttpRequest) -> Response + Send + Sync>;

/// A request head as it arrives, piece by piece.
#[derive(Default)]
pub struct RequestHead {
    bytes: Vec<u8>,
}

impl RequestHead {
    /// Adds what arrived. Once the head is complete (up to its first blank
    /// line) or too long: the request, or the response that refuses it.
    /// The outcome does not depend on how the bytes were split.
    pub fn push(&mut self, data: &[u8]) -> Option<Result<HttpRequest, Response>> {
        // Only ends that `data` adds are searched: a head sent a byte at a
        // time costs linear time, not quadratic.
        let searched = self.bytes.len();
        self.bytes.extend_from_slice(data);
        let end = (searched + 1..=self.bytes.len()).find(|&end| {
            let head = &self.bytes[..end];
            head.ends_with(b"\n\n") || head.ends_with(b"\r\n\r\n")
        });
        match end {
            Some(end) if end <= MAX_HEAD_BYTES => Some(parse(&self.bytes[..end])),
            None if self.bytes.len() <= MAX_HEAD_BYTES => None,
            _ => Some(Err(Response::new(431, "text/plain", "request head too large\n".into()))),
        }
    }
}

/// Serves until dropped.
pub struct Server {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    pub fn start(listen: &str, limits: Limits, handler: Handler) -> io::Result<Server> {
        let listener = TcpListener::bind(listen)?;
        // Non-blocking: the heads thread accepts whatever `poll` says is there.
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (queue, jobs) = bounded::<Job>(limits.queue);
        let mut threads = Vec::with_capacity(limits.workers + 1);
        for n in 0..limits.workers {
            let (stop, jobs, handler) = (stop.clone(), jobs.clone(), handler.clone());
            threads.push(thread::Builder::new().name(format!("http-{n}")).spawn(move || {
                work(&stop, &jobs, handler.as_ref(), limits.write_timeout);
            })?);
        }
        let reading = stop.clone();
        threads.push(thread::Builder::new().name("http-heads".into()).spawn(move || {
            Heads::new(listener, limits).run(&reading, &queue);
        })?);
        Ok(Server { stop, threads })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Open connections per client address.
#[derive(Default)]
struct PerAddress(Mutex<HashMap<IpAddr, usize>>);

/// An accepted connection, counted against its address until it is closed
/// (dropped), wherever that happens.
struct Connection {
    stream: TcpStream,
    address: IpAddr,
    counts: Arc<PerAddress>,
}

impl PerAddress {
    fn admit(self: &Arc<Self>, stream: TcpStream, address: IpAddr, cap: usize) -> Option<Connection> {
        let mut counts = lock(&self.0);
        let count = counts.entry(address).or_insert(0);
        if *count >= cap {
            return None;
        }
        *count += 1;
        Some(Connection { stream, address, counts: self.clone() })
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let mut counts = lock(&self.counts.0);
        if let Some(count) = counts.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.address);
            }
        }
    }
}

/// A complete request head (or the response that refuses it) for a worker.
struct Job {
    connection: Connection,
    request: Result<HttpRequest, Response>,
}

struct Pending {
    connection: Connection,
    head: RequestHead,
    deadline: Instant,
}

enum Progress {
    More,
    Closed,
    Done(Result<HttpRequest, Response>),
}

impl Pending {
    /// Reads what has arrived, without blocking.
    fn read(&mut self) -> Progress {
        let mut buf = [0; 1024];
        loop {
            match self.connection.stream.read(&mut buf) {
                Ok(0) => return Progress::Closed,
                Ok(n) => {
                    if let Some(request) = self.head.push(&buf[..n]) {
                        return Progress::Done(request);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Progress::More,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Progress::Closed,
            }
        }
    }
}

/// The heads thread: accepts connections and reads their request heads.
struct Heads {
    listener: TcpListener,
    limits: Limits,
    counts: Arc<PerAddress>,
    /// Oldest first.
    pending: VecDeque<Pending>,
}

impl Heads {
    fn new(listener: TcpListener, limits: Limits) -> Heads {
        Heads { listener, limits, counts: Arc::default(), pending: VecDeque::new() }
    }

    fn run(mut self, stop: &AtomicBool, jobs: &Sender<Job>) {
        while !stop.load(Ordering::Acquire) {
            let now = Instant::now();
            // Dropping a connection closes it: no answer for a late head.
            self.pending.retain(|p| p.deadline > now);
            let wait = self.pending.iter().map(|p| p.deadline - now).fold(STOP_CHECK, Duration::min);
            let listener = self.listener.as_raw_fd();
            let fds = self.pending.iter().map(|p| p.connection.stream.as_raw_fd());
            let mut polled: Vec<libc::pollfd> = std::iter::once(listener)
                .chain(fds)
                .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
                .collect();
            // Rounded up: a deadline less than a millisecond away must not spin.
            let timeout = wait.as_micros().div_ceil(1000) as libc::c_int;
            // SAFETY: `polled` is a valid array of `polled.len()` pollfds
            // that lives across the call.
            let ready = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, timeout) };
            if ready < 0 {
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::Interrupted {
                    warn!("HTTP: poll failed: {error}");
                    thread::sleep(STOP_CHECK);
                }
                continue;
            }
            // Backwards, so that removing one leaves the others' indexes.
            for index in (0..self.pending.len()).rev() {
                if polled[index + 1].revents == 0 {
                    continue;
                }
                match self.pending[index].read() {
                    Progress::More => {}
                    Progress::Closed => drop(self.pending.remove(index)),
                    Progress::Done(request) => {
                        let Some(Pending { connection, .. }) = self.pending.remove(index) else { continue };
                        match jobs.try_send(Job { connection, request }) {
                            Ok(()) => {}
                            // Dropping the job closes it: the client sees a reset, not a hang.
                            Err(TrySendError::Full(_)) => debug!("HTTP: too many requests waiting; one closed"),
                            Err(TrySendError::Disconnected(_)) => return,
                        }
                    }
                }
            }
            if polled[0].revents != 0 {
                self.accept();
            }
        }
    }

    /// Takes every connection waiting to be accepted.
    fn accept(&mut self) {
        loop {
            let (stream, peer) = match self.listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // E.g. out of file descriptors: wait rather than spin.
                    warn!("HTTP: cannot accept a connection: {e}");
                    thread::sleep(STOP_CHECK);
                    return;
                }
            };
            let address = peer.ip();
            let Some(connection) = self.counts.admit(stream, address, self.limits.per_address) else {
                debug!("HTTP: {address} holds {} connections already; one more closed", self.limits.per_address);
                continue;
            };
            if let Err(e) = connection.stream.set_nonblocking(true) {
                debug!("HTTP: {e}");
                continue;
            }
            if self.pending.len() >= self.limits.pending_heads {
                debug!("HTTP: {} request heads unfinished; the oldest closed", self.pending.len());
                self.pending.pop_front();
            }
            let deadline = Instant::now() + self.limits.head_deadline;
            self.pending.push_back(Pending { connection, head: RequestHead::default(), deadline });
        }
    }
}

fn work(
    stop: &AtomicBool,
    jobs: &Receiver<Job>,
    handler: &(dyn Fn(&HttpRequest) -> Response + Send + Sync),
    write_timeout: Duration,
) {
    while !stop.load(Ordering::Acquire) {
        let Ok(job) = jobs.recv_timeout(STOP_CHECK) else { continue };
        if let Err(e) = answer(job, handler, write_timeout) {
            debug!("HTTP: {e}");
        }
    }
}

/// Answers one request and closes the connection.
fn answer(
    job: Job,
    handler: &(dyn Fn(&HttpRequest) -> Response + Send + Sync),
    write_timeout: Duration,
) -> io::Result<()> {
    let mut stream = &job.connection.stream;
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(write_timeout))?;
    let response = match job.request {
        Err(response) => response,
        Ok(request) if request.method == "HEAD" => Response { body: String::new(), ..handler(&request) },
        Ok(request) => handler(&request),
    };
    write_response(&mut stream, &response)
}

/// A complete head (up to and including its blank line).
fn parse(head: &[u8]) -> Result<HttpRequest, Response> {
    let bad = |why: &str| Response::new(400, "text/plain", format!("{why}\n"));
    let head = std::str::from_utf8(head).map_err(|_| bad("request head is not UTF-8"))?;
    let line = head.lines().next().unwrap_or_default();
    let mut words = line.split_whitespace();
    let (Some(method), Some(target), Some(version), None) = (words.next(), words.next(), words.next(), words.next())
    else {
        return Err(bad("malformed request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(bad("only HTTP/1.x"));
    }
    if method != "GET" && method != "HEAD" {
        return Err(Response::new(405, "text/plain", "only GET and HEAD\n".into()));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Ok(HttpRequest { method: method.into(), path: path.into(), query: query.into() })
}

fn write_response(stream: &mut impl Write, response: &Response) -> io::Result<()> {
    let reason = match response.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    };
    let head = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\
         Connection: close\r\n\r\n",
        response.status,
        response.content_type,
        response.body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(response.body.as_bytes())?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Generous: the test machine may be busy.
    const PATIENCE: Duration = Duration::from_secs(10);

    fn exchange(address: &str, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(address).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        // A refused connection may be closed before the request is written.
        let _ = stream.write_all(request);
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response
    }

    fn server(limits: Limits) -> (Server, String) {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = probe.local_addr().unwrap().to_string();
        drop(probe);
        let handler: Handler = Arc::new(|request: &HttpRequest| {
            Response::new(200, "text/plain", format!("{} {} {}", request.method, request.path, request.query))
        });
        (Server::start(&address, limits, handler).unwrap(), address)
    }

    /// Whether the server closed `stream` (without answering) within `PATIENCE`.
    fn closed_unanswered(stream: &mut TcpStream) -> bool {
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut answer = Vec::new();
        match stream.read_to_end(&mut answer) {
            Ok(_) => answer.is_empty(),
            Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
        }
    }

    fn ok(response: &str) -> bool {
        response.starts_with("HTTP/1.1 200 ")
    }

    #[test]
    fn answers_get_and_head_and_refuses_the_rest() {
        let (_server, address) = server(Limits::DEFAULT);
        let ok = exchange(&address, b"GET /cluster?log=3 HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n") && ok.ends_with("\r\n\r\nGET /cluster log=3"), "{ok}");
        assert!(ok.contains("Content-Length: 18\r\n"), "{ok}");
        let head = exchange(&address, b"HEAD / HTTP/1.0\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 200 OK") && head.ends_with("\r\n\r\n"), "no body: {head}");
        assert!(exchange(&address, b"POST / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405 "));
        assert!(exchange(&address, b"GET\r\n\r\n").starts_with("HTTP/1.1 400 "));
        assert!(exchange(&address, b"GET / SPDY/3\r\n\r\n").starts_with("HTTP/1.1 400 "));
        assert!(exchange(&address, b"GET /\xff HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 400 "));
    }

    #[test]
    fn a_head_is_complete_at_its_first_blank_line_however_it_is_split() {
        let whole = b"GET /a?b HTTP/1.1\nHost: x\n\nGET /ignored HTTP/1.1\r\n\r\n";
        let expected = HttpRequest { method: "GET".into(), path: "/a".into(), query: "b".into() };
        assert_eq!(RequestHead::default().push(whole), Some(Ok(expected)));
        let mut head = RequestHead::default();
        let outcomes: Vec<_> = whole.iter().map(|byte| head.push(&[*byte])).collect();
        let first = outcomes.iter().position(Option::is_some).unwrap();
        assert_eq!(first, b"GET /a?b HTTP/1.1\nHost: x\n\n".len() - 1, "complete at the blank line");

        let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long.resize(MAX_HEAD_BYTES, b'x');
        let mut head = RequestHead::default();
        assert_eq!(head.push(&long), None, "{MAX_HEAD_BYTES} bytes may still end in time");
        let refused = head.push(b"x\r\n\r\n").unwrap().unwrap_err();
        assert_eq!(refused.status, 431);
    }

    #[test]
    fn a_huge_head_is_refused_and_idle_clients_do_not_block_others() {
        let (_server, address) = server(Limits::DEFAULT);
        let mut huge = b"GET / HTTP/1.1\r\n".to_vec();
        huge.extend(std::iter::repeat_n(b'x', 64 * 1024));
        assert!(exchange(&address, &huge).starts_with("HTTP/1.1 431 "));
        // Silent clients hold no worker: more of them than workers.
        let idle: Vec<TcpStream> =
            (0..Limits::DEFAULT.workers + 4).map(|_| TcpStream::connect(&address).unwrap()).collect();
        let answer = exchange(&address, b"GET /still HTTP/1.1\r\n\r\n");
        assert!(ok(&answer), "{answer}");
        drop(idle);
    }

    /// Slowloris: every byte arrives well within any per-read timeout, yet
    /// the head as a whole is late.
    #[test]
    fn a_head_has_one_deadline_for_all_of_it() {
        let limits = Limits { head_deadline: Duration::from_millis(300), ..Limits::DEFAULT };
        let (_server, address) = server(limits);
        let mut slow = TcpStream::connect(&address).unwrap();
        slow.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let started = Instant::now();
        let closed = loop {
            assert!(started.elapsed() < PATIENCE, "still open after {PATIENCE:?}");
            if slow.write_all(b"x").is_err() {
                break true;
            }
            let mut byte = [0];
            match slow.read(&mut byte) {
                Ok(0) => break true,
                Ok(_) => break false,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(_) => break true,
            }
        };
        assert!(closed, "answered a head that never ended");
    }

    #[test]
    fn an_address_holds_a_bounded_number_of_connections() {
        let limits = Limits { per_address: 2, head_deadline: Duration::from_secs(60), ..Limits::DEFAULT };
        let (_server, address) = server(limits);
        let held: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(&address).unwrap()).collect();
        let mut third = TcpStream::connect(&address).unwrap();
        assert!(closed_unanswered(&mut third), "a third connection from one address was kept");
        // A closed connection gives its place back, once the server sees it close.
        drop(held);
        let started = Instant::now();
        while !ok(&exchange(&address, b"GET / HTTP/1.1\r\n\r\n")) {
            assert!(started.elapsed() < PATIENCE, "the address never got its places back");
            thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_new_connection_pushes_out_the_oldest_unfinished_head() {
        let limits = Limits { pending_heads: 2, head_deadline: Duration::from_secs(60), ..Limits::DEFAULT };
        let (_server, address) = server(limits);
        let mut oldest = TcpStream::connect(&address).unwrap();
        oldest.write_all(b"GET / HT").unwrap();
        let _newer = TcpStream::connect(&address).unwrap();
        let answer = exchange(&address, b"GET /quick HTTP/1.1\r\n\r\n");
        assert!(ok(&answer), "{answer}");
        assert!(closed_unanswered(&mut oldest), "the oldest unfinished head was kept");
    }
}
