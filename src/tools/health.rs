//! `raft-zmq health`: a node's `/health` page from the command line, so that
//! a container's health check needs nothing in the image but the binary
//! (no curl).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// More than any `/health` answer; a server that sends more is not ours.
const MAX_RESPONSE_BYTES: u64 = 64 * 1024;

/// What a node said: the status code and the body.
pub struct Answer {
    pub code: u16,
    pub body: String,
}

/// `GET /health` from the node serving HTTP at `address` (HOST:PORT), all
/// of it within `timeout`.
pub fn ask(address: &str, timeout: Duration) -> Result<Answer, String> {
    let deadline = Instant::now() + timeout;
    let unreachable = |e: std::io::Error| format!("cannot reach {address}: {e}");
    let target =
        address.to_socket_addrs().map_err(unreachable)?.next().ok_or_else(|| format!("{address}: no address"))?;
    let mut stream = TcpStream::connect_timeout(&target, timeout).map_err(unreachable)?;
    let left = || deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    stream.set_write_timeout(Some(left())).map_err(unreachable)?;
    write!(stream, "GET /health HTTP/1.0\r\nHost: {address}\r\n\r\n").map_err(unreachable)?;
    stream.set_read_timeout(Some(left())).map_err(unreachable)?;
    let mut response = Vec::new();
    stream.take(MAX_RESPONSE_BYTES).read_to_end(&mut response).map_err(unreachable)?;
    parse(&String::from_utf8_lossy(&response)).ok_or_else(|| format!("{address}: not an HTTP response"))
}

fn parse(response: &str) -> Option<Answer> {
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status_line = head.lines().next()?;
    let code = status_line.strip_prefix("HTTP/1.")?.split_whitespace().nth(1)?.parse().ok()?;
    Some(Answer { code, body: body.trim_end().to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_gives_its_code_and_body() {
        let answer = parse("HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\n\r\n{}\n").unwrap();
        assert_eq!((answer.code, answer.body.as_str()), (503, "{}"));
        assert!(parse("HTTP/1.0 200 OK\r\n").is_none(), "no end of head");
        assert!(parse("SSH-2.0-OpenSSH\r\n\r\n").is_none());
    }
}
