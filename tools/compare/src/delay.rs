//! A network between the members of a cluster, for `--rtt-ms`: a TCP proxy
//! in front of each member's peer port that holds every chunk it forwards,
//! either way, for half the round trip, keeping the order. This kernel has
//! no netem, and the proxy is the same for both systems: every peer
//! connection to a member goes through it.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Starts a proxy to `127.0.0.1:target` that delays each way by
/// `one_way`; returns the port it listens on. It runs, on threads of its
/// own, for as long as the process.
pub fn proxy(target: u16, one_way: Duration) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a port for a delay proxy");
    let port = listener.local_addr().expect("a bound address").port();
    thread::spawn(move || {
        for inbound in listener.incoming() {
            let Ok(inbound) = inbound else { continue };
            let Ok(outbound) = TcpStream::connect(("127.0.0.1", target)) else { continue };
            for stream in [&inbound, &outbound] {
                let _ = stream.set_nodelay(true);
            }
            let (Ok(inbound_copy), Ok(outbound_copy)) = (inbound.try_clone(), outbound.try_clone()) else {
                continue;
            };
            thread::spawn(move || forward(inbound, outbound, one_way));
            thread::spawn(move || forward(outbound_copy, inbound_copy, one_way));
        }
    });
    port
}

/// Copies `from` to `to`, each chunk `delay` after it was read, until
/// either side closes.
fn forward(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (chunks, due) = mpsc::channel::<(Instant, Vec<u8>)>();
    thread::spawn(move || {
        for (at, chunk) in due {
            thread::sleep(at.saturating_duration_since(Instant::now()));
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Both);
    });
    let mut buffer = vec![0; 1 << 16];
    while let Ok(read @ 1..) = from.read(&mut buffer) {
        if chunks.send((Instant::now() + delay, buffer[..read].to_vec())).is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_arrive_in_order_and_no_sooner_than_the_delay_each_way() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = echo.local_addr().unwrap().port();
        thread::spawn(move || {
            let (mut stream, _) = echo.accept().unwrap();
            let mut buffer = [0; 64];
            while let Ok(read @ 1..) = stream.read(&mut buffer) {
                stream.write_all(&buffer[..read]).unwrap();
            }
        });
        let one_way = Duration::from_millis(20);
        let mut client = TcpStream::connect(("127.0.0.1", proxy(target, one_way))).unwrap();
        client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let sent = Instant::now();
        client.write_all(b"one").unwrap();
        client.write_all(b"two").unwrap();
        let mut echoed = [0; 6];
        client.read_exact(&mut echoed).unwrap();
        assert_eq!(&echoed, b"onetwo");
        assert!(sent.elapsed() >= 2 * one_way, "{:?}", sent.elapsed());
    }
}
