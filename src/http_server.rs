//! A small HTTP/1.1 server for the node's observability endpoints: GET and
//! HEAD only, one request per connection, and hard limits everywhere, so
//! that no client (slow, idle, flooding or malformed) can take memory,
//! threads or the node with it: a few worker threads, a bounded queue of
//! accepted connections (beyond it, connections are closed at once), a
//! capped request head, and read and write timeouts.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{Receiver, TrySendError, bounded};
use log::{debug, warn};

/// Requests handled at once: a scrape, browsers and a health probe never
/// wait for each other, and a few slow or silent clients do not hold up the
/// rest (each holds a worker for at most the I/O timeouts).
const WORKERS: usize = 8;
/// Accepted connections waiting for a worker; more are closed at once.
const QUEUE: usize = 64;
/// The request line and headers; a longer head gets 431.
const MAX_HEAD_BYTES: usize = 8 * 1024;
/// How long a client may take to send its request head, and to take each
/// piece of the response.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often idle threads look at the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(100);

pub struct Request {
    pub method: String,
    pub path: String,
    pub query: String,
}

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

pub type Handler = Arc<dyn Fn(&Request) -> Response + Send + Sync>;

/// Serves until stopped (or dropped).
pub struct Server {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    pub fn start(listen: &str, handler: Handler) -> io::Result<Server> {
        let listener = TcpListener::bind(listen)?;
        // Non-blocking, so the accepting thread notices the stop flag.
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (queue, connections) = bounded::<TcpStream>(QUEUE);
        let mut threads = Vec::with_capacity(WORKERS + 1);
        for n in 0..WORKERS {
            let (stop, connections, handler) = (stop.clone(), connections.clone(), handler.clone());
            threads.push(thread::Builder::new().name(format!("http-{n}")).spawn(move || {
                work(&stop, &connections, handler.as_ref());
            })?);
        }
        let accepting = stop.clone();
        threads.push(thread::Builder::new().name("http-accept".into()).spawn(move || {
            while !accepting.load(Ordering::Acquire) {
                match listener.accept() {
                    Ok((stream, _)) => match queue.try_send(stream) {
                        Ok(()) => {}
                        // Dropping the stream closes it: the client sees a reset, not a hang.
                        Err(TrySendError::Full(_)) => debug!("HTTP: too many connections waiting; one closed"),
                        Err(TrySendError::Disconnected(_)) => return,
                    },
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(STOP_CHECK / 5),
                    Err(e) => {
                        // E.g. out of file descriptors: wait rather than spin.
                        warn!("HTTP: cannot accept a connection: {e}");
                        thread::sleep(STOP_CHECK);
                    }
                }
            }
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

fn work(stop: &AtomicBool, connections: &Receiver<TcpStream>, handler: &(dyn Fn(&Request) -> Response + Send + Sync)) {
    while !stop.load(Ordering::Acquire) {
        let Ok(stream) = connections.recv_timeout(STOP_CHECK) else { continue };
        if let Err(e) = serve(stream, handler) {
            debug!("HTTP: {e}");
        }
    }
}

/// Reads one request, answers it, closes the connection.
fn serve(mut stream: TcpStream, handler: &(dyn Fn(&Request) -> Response + Send + Sync)) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let response = match read_head(&mut stream)? {
        Err(response) => response,
        Ok(head) => match parse(&head) {
            Err(response) => response,
            Ok(request) if request.method == "HEAD" => Response { body: String::new(), ..handler(&request) },
            Ok(request) => handler(&request),
        },
    };
    write_response(&mut stream, &response)
}

/// The request head (up to the blank line), or the error response to send.
fn read_head(stream: &mut TcpStream) -> io::Result<Result<String, Response>> {
    let mut head = Vec::new();
    let mut buf = [0; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        if head.len() > MAX_HEAD_BYTES {
            return Ok(Err(Response::new(431, "text/plain", "request head too large\n".into())));
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before the end of the request head"));
        }
        head.extend_from_slice(&buf[..n]);
    }
    match String::from_utf8(head) {
        Ok(head) => Ok(Ok(head)),
        Err(_) => Ok(Err(Response::new(400, "text/plain", "request head is not UTF-8\n".into()))),
    }
}

fn parse(head: &str) -> Result<Request, Response> {
    let bad = |why: &str| Response::new(400, "text/plain", format!("{why}\n"));
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
    Ok(Request { method: method.into(), path: path.into(), query: query.into() })
}

fn write_response(stream: &mut TcpStream, response: &Response) -> io::Result<()> {
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

    fn exchange(address: &str, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(address).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        stream.write_all(request).unwrap();
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response
    }

    fn server() -> (Server, String) {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = probe.local_addr().unwrap().to_string();
        drop(probe);
        let handler: Handler = Arc::new(|request: &Request| {
            Response::new(200, "text/plain", format!("{} {} {}", request.method, request.path, request.query))
        });
        (Server::start(&address, handler).unwrap(), address)
    }

    #[test]
    fn answers_get_and_head_and_refuses_the_rest() {
        let (_server, address) = server();
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
    fn a_huge_head_is_refused_and_idle_clients_do_not_block_others() {
        let (_server, address) = server();
        let mut huge = b"GET / HTTP/1.1\r\n".to_vec();
        huge.extend(std::iter::repeat_n(b'x', 64 * 1024));
        assert!(exchange(&address, &huge).starts_with("HTTP/1.1 431 "));
        // Silent clients hold a worker each, not the server.
        let idle: Vec<TcpStream> = (0..WORKERS - 1).map(|_| TcpStream::connect(&address).unwrap()).collect();
        let ok = exchange(&address, b"GET /still HTTP/1.1\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 "), "{ok}");
        drop(idle);
    }
}
