//! Wakes a thread that waits in [`crate::net::poll::wait`] from any other
//! thread.
//!
//! The core loop waits on its sockets and on the queues other threads fill
//! at once, in one poll. A crossbeam channel cannot be polled, so
//! whoever queues something for that thread also wakes it through a socket
//! pair, which can. A burst of wake-ups before the thread looks costs one
//! write: waking a thread is what the node spends most of its CPU on.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::{SendError, Sender, TrySendError};

/// The waiting side: poll [`Wakeup::fd`] with the sockets, then
/// [`Wakeup::clear`] before looking at the queues.
pub struct Wakeup {
    read: UnixStream,
    shared: Arc<Shared>,
}

/// Wakes the thread that owns the matching [`Wakeup`]. Clone it freely.
#[derive(Clone)]
pub struct Waker(Arc<Shared>);

struct Shared {
    write: UnixStream,
    /// A byte is on its way and not yet cleared: the next wake-up need not
    /// write another.
    pending: AtomicBool,
}

impl Wakeup {
    pub fn new() -> io::Result<(Wakeup, Waker)> {
        let (read, write) = UnixStream::pair()?;
        read.set_nonblocking(true)?;
        write.set_nonblocking(true)?;
        let shared = Arc::new(Shared { write, pending: AtomicBool::new(false) });
        Ok((Wakeup { read, shared: Arc::clone(&shared) }, Waker(shared)))
    }

    /// What to wait on: readable once woken.
    pub fn fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    /// Takes the wake-ups so far. Anything queued before a wake-up that
    /// this call takes is in its queue by now; anything queued later wakes
    /// the thread again.
    pub fn clear(&self) {
        let mut bytes = [0; 64];
        while matches!((&self.read).read(&mut bytes), Ok(n) if n > 0) {}
        // Only now: a wake-up between the two finds `pending` still set and
        // writes nothing, but what it woke for is queued already. Cleared
        // first, such a wake-up's byte would be read here while `pending`
        // stayed set, and no later wake-up would ever write again.
        self.shared.pending.store(false, Ordering::SeqCst);
    }
}

impl Waker {
    pub fn wake(&self) {
        if !self.0.pending.swap(true, Ordering::SeqCst) {
            // WouldBlock means the pipe is full of wake-ups already, which
            // is as good; any other error means the waiting side is gone.
            let _ = (&self.0.write).write(&[1]);
        }
    }
}

/// A channel's sending half that wakes the receiving thread after each send.
pub struct WakingSender<T> {
    sender: Sender<T>,
    waker: Waker,
}

impl<T> Clone for WakingSender<T> {
    fn clone(&self) -> Self {
        WakingSender { sender: self.sender.clone(), waker: self.waker.clone() }
    }
}

impl<T> WakingSender<T> {
    pub fn new(sender: Sender<T>, waker: Waker) -> WakingSender<T> {
        WakingSender { sender, waker }
    }

    pub fn send(&self, item: T) -> Result<(), SendError<T>> {
        self.sender.send(item)?;
        self.waker.wake();
        Ok(())
    }

    pub fn waker(&self) -> Waker {
        self.waker.clone()
    }

    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        self.sender.try_send(item)?;
        self.waker.wake();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::thread;

    use super::*;

    fn woken(wakeup: &Wakeup, timeout_ms: i64) -> bool {
        crate::net::poll::wait(wakeup.fd(), &[], timeout_ms).unwrap()[0]
    }

    #[test]
    fn a_wake_up_ends_the_wait_until_cleared() {
        let (wakeup, waker) = Wakeup::new().unwrap();
        assert!(!woken(&wakeup, 0));
        waker.wake();
        waker.wake();
        assert!(woken(&wakeup, 0));
        wakeup.clear();
        assert!(!woken(&wakeup, 0), "one clear takes a burst of wake-ups");
        waker.wake();
        assert!(woken(&wakeup, 0), "a wake-up after the clear is not lost");
    }

    #[test]
    fn what_is_sent_from_another_thread_is_never_missed() {
        let (wakeup, waker) = Wakeup::new().unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        let sender = WakingSender::new(tx, waker);
        let items = 20_000;
        // Pauses of varying length let the waiting side go idle often, so
        // sends land at every point of its clear-and-drain.
        let producer = thread::spawn(move || {
            for i in 0..items {
                sender.send(i).unwrap();
                (0..i % 97 * 50).for_each(|n| {
                    std::hint::black_box(n);
                });
            }
        });
        let mut seen = 0;
        while seen < items {
            // A wake-up lost means a poll that waits in vain.
            assert!(woken(&wakeup, 10_000), "a wake-up was lost after {seen} of {items} items");
            wakeup.clear();
            seen += rx.try_iter().count();
        }
        producer.join().unwrap();
    }
}
