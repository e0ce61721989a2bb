//! Waits for ZeroMQ sockets and one pipe with fewer system calls than
//! `zmq_poll`.
//!
//! A socket's `ZMQ_FD` only says that commands reached its mailbox; whether
//! a message can be received, `ZMQ_EVENTS` tells, and asking costs two
//! system calls (a `getpid` and a `poll`) whenever the mailbox is empty.
//! `zmq_poll` polls every descriptor without waiting, asks every socket,
//! waits, and asks every socket again: about 18 system calls per wait for
//! the core loop's four sockets, which a leader waits in several times a
//! write. Here every socket is asked once before the wait (it may hold
//! messages that a send or receive since the last wait left behind, with
//! no signal on its `ZMQ_FD`), and after the wait only those whose
//! `ZMQ_FD` woke it: a socket whose mailbox got nothing during the wait
//! cannot have a new message, as this thread did nothing with it meanwhile.
//! A wake-up may bring commands and no message: `wait` then returns with
//! nothing ready, before its timeout.

use std::io;
use std::os::fd::RawFd;

/// Whether `pipe`, then each of `sockets`, is readable: at once if a
/// socket already is (the pipe then counts as not readable: it stays so
/// for the next wait), else once one of them is, or after `timeout_ms`
/// (negative: no limit).
pub fn wait(pipe: RawFd, sockets: &[&zmq::Socket], timeout_ms: i64) -> io::Result<Vec<bool>> {
    let mut ready = Vec::with_capacity(1 + sockets.len());
    ready.push(false);
    for socket in sockets {
        ready.push(has_message(socket)?);
    }
    if ready.contains(&true) {
        return Ok(ready);
    }
    let mut fds = Vec::with_capacity(1 + sockets.len());
    fds.push(libc::pollfd { fd: pipe, events: libc::POLLIN, revents: 0 });
    for socket in sockets {
        fds.push(libc::pollfd { fd: socket.get_fd()?, events: libc::POLLIN, revents: 0 });
    }
    let timeout = i32::try_from(timeout_ms).unwrap_or(i32::MAX).max(-1);
    // SAFETY: `fds` is a live, writable array of `fds.len()` pollfds.
    if unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) } < 0 {
        let error = io::Error::last_os_error();
        return if error.kind() == io::ErrorKind::Interrupted { Ok(ready) } else { Err(error) };
    }
    ready[0] = fds[0].revents != 0;
    for (i, socket) in sockets.iter().enumerate() {
        if fds[i + 1].revents != 0 {
            ready[i + 1] = has_message(socket)?;
        }
    }
    Ok(ready)
}

fn has_message(socket: &zmq::Socket) -> io::Result<bool> {
    Ok(socket.get_events()?.contains(zmq::POLLIN))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    use super::*;

    fn pair(ctx: &zmq::Context, name: &str) -> (zmq::Socket, zmq::Socket) {
        let (a, b) = (ctx.socket(zmq::PAIR).unwrap(), ctx.socket(zmq::PAIR).unwrap());
        a.bind(&format!("inproc://{name}")).unwrap();
        b.connect(&format!("inproc://{name}")).unwrap();
        (a, b)
    }

    #[test]
    fn a_message_that_arrives_while_waiting_wakes_the_wait() {
        let ctx = zmq::Context::new();
        let (here, there) = pair(&ctx, "arrives");
        let (idle, _idle_peer) = pair(&ctx, "idle");
        let (pipe, _writer) = UnixStream::pair().unwrap();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            there.send("x", 0).unwrap();
        });
        let started = Instant::now();
        let ready = wait(pipe.as_raw_fd(), &[&idle, &here], 10_000).unwrap();
        assert_eq!(ready, [false, false, true]);
        assert!(started.elapsed() < Duration::from_secs(5), "woken by the message, not the timeout");
        sender.join().unwrap();
    }

    /// The case `ZMQ_FD` alone gets wrong: a message whose signal an earlier
    /// receive took. It must be found without waiting.
    #[test]
    fn a_message_left_behind_by_a_receive_is_found_at_once() {
        let ctx = zmq::Context::new();
        let (here, there) = pair(&ctx, "left");
        let (pipe, _writer) = UnixStream::pair().unwrap();
        there.send("1", 0).unwrap();
        there.send("2", 0).unwrap();
        assert_eq!(wait(pipe.as_raw_fd(), &[&here], 10_000).unwrap(), [false, true]);
        assert_eq!(here.recv_bytes(0).unwrap(), b"1");
        let started = Instant::now();
        assert_eq!(wait(pipe.as_raw_fd(), &[&here], 10_000).unwrap(), [false, true]);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(here.recv_bytes(0).unwrap(), b"2");
        assert_eq!(wait(pipe.as_raw_fd(), &[&here], 0).unwrap(), [false, false]);
    }

    #[test]
    fn a_ready_socket_answers_without_looking_at_the_pipe() {
        let ctx = zmq::Context::new();
        let (here, there) = pair(&ctx, "first");
        let (pipe, mut writer) = UnixStream::pair().unwrap();
        std::io::Write::write_all(&mut writer, &[1]).unwrap();
        there.send("x", 0).unwrap();
        assert_eq!(wait(pipe.as_raw_fd(), &[&here], 10_000).unwrap(), [false, true]);
        here.recv_bytes(0).unwrap();
        assert_eq!(wait(pipe.as_raw_fd(), &[&here], 0).unwrap(), [true, false], "still readable");
    }

    #[test]
    fn the_pipe_wakes_the_wait_and_the_timeout_ends_it() {
        let ctx = zmq::Context::new();
        let (here, _there) = pair(&ctx, "pipe");
        let (pipe, mut writer) = UnixStream::pair().unwrap();
        let started = Instant::now();
        assert_eq!(wait(pipe.as_raw_fd(), &[&here], 30).unwrap(), [false, false]);
        assert!(started.elapsed() >= Duration::from_millis(30));
        std::io::Write::write_all(&mut writer, &[1]).unwrap();
        assert_eq!(wait(pipe.as_raw_fd(), &[&here], 10_000).unwrap(), [true, false]);
    }
}
