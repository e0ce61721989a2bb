//! The network: the ZeroMQ peer transport, and the security of every socket
//! (CURVE, who is let in, and who a caller is).

pub mod poll;
pub mod security;
pub mod transport;
pub mod wake;
