//! Helpers for this crate's tests and its integration tests. Not part of the
//! product; public only so that `tests/` can share them.

use std::net::TcpListener;

/// A port nothing listens on, never handed out before in this process.
///
/// Ports come from below the kernel's ephemeral range (32768+), so neither a
/// `bind(0)` elsewhere nor the source port of some outgoing connection can
/// take one between now and the node's own bind; each test binary starts at
/// its own pid-derived offset and counts up, so no two clusters share a port.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 10_000;
    const SPAN: u32 = 22_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(u32::MAX, std::process::id() * 397 % SPAN, Ordering::SeqCst, Ordering::SeqCst);
    loop {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}
