//! A REQ client that speaks ZMTP 3.0 (https://rfc.zeromq.org/spec/23/,
//! NULL security) itself, over a plain blocking TCP socket: what this tool
//! does for etcd, whose JSON gateway it speaks by hand over HTTP/1.1. With
//! libzmq, every request and reply of the load would also pass through the
//! load generator's own I/O thread: two more thread wake-ups per request on
//! the machine the servers run on, which etcd's load does not cost.

use std::io::{self, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Frame flags (ZMTP 3.0 §"Framing").
const MORE: u8 = 0x01;
const LONG: u8 = 0x02;
const COMMAND: u8 = 0x04;

pub struct ZmtpReq {
    endpoint: String,
    timeout: Duration,
    /// `None` after a failed call: a reply may still be on its way to the
    /// old connection, to be taken for the next request's, so it goes (as
    /// raft-zmq's `Client` drops a REQ socket whose reply never came).
    connection: Option<Connection>,
    /// The next request, framed: reused so that a call allocates less.
    out: Vec<u8>,
}

struct Connection {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

/// The 64-byte greeting: signature, version 3.0, mechanism NULL, as a client.
fn greeting() -> [u8; 64] {
    let mut greeting = [0u8; 64];
    greeting[0] = 0xff;
    greeting[9] = 0x7f;
    greeting[10] = 3;
    greeting[12..16].copy_from_slice(b"NULL");
    greeting
}

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

impl ZmtpReq {
    /// Connects to `endpoint` (`tcp://host:port`) and does the handshake;
    /// each reply may take up to `timeout`.
    pub fn connect(endpoint: &str, timeout: Duration) -> io::Result<ZmtpReq> {
        let connection = Some(Connection::open(endpoint, timeout)?);
        Ok(ZmtpReq { endpoint: endpoint.to_string(), timeout, connection, out: Vec::new() })
    }

    /// Sends `request` as a REQ socket would (an empty delimiter, then the
    /// frame) and returns the reply's frame.
    pub fn call(&mut self, request: &[u8]) -> io::Result<Vec<u8>> {
        self.out.clear();
        self.out.extend_from_slice(&[MORE, 0]);
        match u8::try_from(request.len()) {
            Ok(size) => self.out.extend_from_slice(&[0, size]),
            Err(_) => {
                self.out.push(LONG);
                self.out.extend_from_slice(&(request.len() as u64).to_be_bytes());
            }
        }
        self.out.extend_from_slice(request);
        let mut connection = match self.connection.take() {
            Some(connection) => connection,
            None => Connection::open(&self.endpoint, self.timeout)?,
        };
        let reply = connection.exchange(&self.out)?;
        self.connection = Some(connection);
        Ok(reply)
    }
}

impl Connection {
    fn open(endpoint: &str, timeout: Duration) -> io::Result<Connection> {
        let address = endpoint.strip_prefix("tcp://").ok_or_else(|| bad(format!("not a tcp endpoint: {endpoint}")))?;
        let stream = TcpStream::connect(address)?;
        // As libzmq does: a frame leaves at once.
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut client = Connection { reader: BufReader::new(stream.try_clone()?), writer: stream };
        let mut hello = greeting().to_vec();
        // READY with one property, Socket-Type = REQ.
        let mut ready = vec![5];
        ready.extend_from_slice(b"READY");
        ready.push(11);
        ready.extend_from_slice(b"Socket-Type");
        ready.extend_from_slice(&3u32.to_be_bytes());
        ready.extend_from_slice(b"REQ");
        hello.extend_from_slice(&[COMMAND, ready.len() as u8]);
        hello.extend_from_slice(&ready);
        client.writer.write_all(&hello)?;
        let mut theirs = [0u8; 64];
        client.reader.read_exact(&mut theirs)?;
        if theirs[0] != 0xff || theirs[9] != 0x7f || theirs[10] < 3 || &theirs[12..16] != b"NULL" {
            return Err(bad("not a ZMTP 3 peer with NULL security"));
        }
        let (flags, command) = client.frame()?;
        if flags & COMMAND == 0 || !command.starts_with(b"\x05READY") {
            return Err(bad("no READY from the peer"));
        }
        Ok(client)
    }

    /// One frame: its flags and body.
    fn frame(&mut self) -> io::Result<(u8, Vec<u8>)> {
        let mut flags = [0u8; 1];
        self.reader.read_exact(&mut flags)?;
        let size = if flags[0] & LONG != 0 {
            let mut size = [0u8; 8];
            self.reader.read_exact(&mut size)?;
            u64::from_be_bytes(size)
        } else {
            let mut size = [0u8; 1];
            self.reader.read_exact(&mut size)?;
            u64::from(size[0])
        };
        let size = usize::try_from(size).map_err(|_| bad("a frame larger than memory"))?;
        let mut body = vec![0; size];
        self.reader.read_exact(&mut body)?;
        Ok((flags[0], body))
    }

    /// Sends a framed request and returns the reply's frame.
    fn exchange(&mut self, request: &[u8]) -> io::Result<Vec<u8>> {
        self.writer.write_all(request)?;
        loop {
            let (flags, delimiter) = self.frame()?;
            // A command (a PING, say) may come between messages.
            if flags & COMMAND != 0 {
                continue;
            }
            if flags & MORE == 0 || !delimiter.is_empty() {
                return Err(bad("a reply without its empty delimiter"));
            }
            let (flags, reply) = self.frame()?;
            if flags & MORE != 0 {
                return Err(bad("a reply of more than one frame"));
            }
            return Ok(reply);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against libzmq's own ROUTER, as raft-zmq's client endpoint is: short
    /// and long frames both ways, on one connection.
    /// A libzmq ROUTER on a free port that takes `batch` requests, then
    /// answers each with itself and "!", in order, `rounds` times.
    fn echo_router(batch: usize, rounds: usize) -> (String, std::thread::JoinHandle<()>) {
        let ctx = zmq::Context::new();
        let router = ctx.socket(zmq::ROUTER).unwrap();
        router.set_linger(0).unwrap();
        let endpoint = format!("tcp://127.0.0.1:{}", crate::free_port());
        router.bind(&endpoint).unwrap();
        let server = std::thread::spawn(move || {
            for _ in 0..rounds {
                let requests: Vec<Vec<Vec<u8>>> = (0..batch).map(|_| router.recv_multipart(0).unwrap()).collect();
                for mut frames in requests {
                    assert_eq!(frames.len(), 3, "[identity, empty delimiter, request]");
                    assert!(frames[1].is_empty());
                    let request = frames.pop().unwrap();
                    frames.push([&request[..], b"!"].concat());
                    router.send_multipart(frames, 0).unwrap();
                }
            }
        });
        (endpoint, server)
    }

    #[test]
    fn a_libzmq_router_answers_it_as_a_req_socket() {
        let (endpoint, server) = echo_router(1, 2);
        let mut client = ZmtpReq::connect(&endpoint, Duration::from_secs(10)).unwrap();
        assert_eq!(client.call(b"short").unwrap(), b"short!");
        let long = vec![7u8; 1000];
        assert_eq!(client.call(&long).unwrap(), [&long[..], b"!"].concat());
        server.join().unwrap();
    }

    /// A reply that comes too late never passes for the next request's.
    #[test]
    fn after_a_reply_times_out_the_next_call_gets_its_own_reply() {
        // The first is answered only once the second came, before it.
        let (endpoint, server) = echo_router(2, 1);
        let mut client = ZmtpReq::connect(&endpoint, Duration::from_millis(300)).unwrap();
        assert_eq!(client.call(b"first").unwrap_err().kind(), io::ErrorKind::WouldBlock);
        client.timeout = Duration::from_secs(10);
        assert_eq!(client.call(b"second").unwrap(), b"second!");
        assert!(client.connection.is_some(), "kept after a good call");
        server.join().unwrap();
    }

    #[test]
    fn a_peer_that_is_not_zmtp_is_refused() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("tcp://{}", listener.local_addr().unwrap());
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream.write_all(&[b'H'; 64]).unwrap();
        });
        let refused = ZmtpReq::connect(&endpoint, Duration::from_secs(10)).err().unwrap();
        assert_eq!(refused.kind(), io::ErrorKind::InvalidData);
        server.join().unwrap();
    }
}
