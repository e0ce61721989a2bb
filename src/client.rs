//! A blocking client for the client protocol: what the command-line tools,
//! the web view's cluster page and the tests talk to nodes with.

use std::time::Duration;

use crate::net::security::ClientCurve;
use crate::wire::protocol::{Reply, Request, encode_request};

/// One REQ socket to one node. A request that gets no reply in time leaves
/// the socket unusable (REQ lockstep), so it is replaced before the next call.
pub struct Client {
    ctx: zmq::Context,
    endpoint: String,
    timeout: Duration,
    /// `None`: plaintext.
    curve: Option<ClientCurve>,
    socket: Option<zmq::Socket>,
}

#[derive(Debug)]
pub enum CallError {
    /// No reply within the timeout: the request may or may not have applied.
    NoReply,
    /// The reply did not decode.
    BadReply(String),
    Zmq(zmq::Error),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::NoReply => write!(f, "no reply in time"),
            CallError::BadReply(e) => write!(f, "undecodable reply: {e}"),
            CallError::Zmq(e) => write!(f, "zmq: {e}"),
        }
    }
}

impl std::error::Error for CallError {}

impl From<zmq::Error> for CallError {
    fn from(e: zmq::Error) -> Self {
        CallError::Zmq(e)
    }
}

impl Client {
    pub fn new(ctx: &zmq::Context, endpoint: &str, timeout: Duration) -> Client {
        Client { ctx: ctx.clone(), endpoint: endpoint.to_string(), timeout, curve: None, socket: None }
    }

    /// Talks CURVE to the node when `curve` is given.
    pub fn with_curve(self, curve: Option<ClientCurve>) -> Client {
        Client { curve, ..self }
    }

    /// Sends one raw frame and returns the raw reply frame.
    pub fn call_raw(&mut self, frame: &[u8]) -> Result<Vec<u8>, CallError> {
        let socket = match self.socket.take() {
            Some(socket) => socket,
            None => {
                let socket = self.ctx.socket(zmq::REQ)?;
                socket.set_linger(0)?;
                socket.set_rcvtimeo(self.timeout.as_millis() as i32)?;
                socket.set_sndtimeo(self.timeout.as_millis() as i32)?;
                if let Some(curve) = &self.curve {
                    curve.configure(&socket)?;
                }
                socket.connect(&self.endpoint)?;
                socket
            }
        };
        socket.send(frame, 0).map_err(|e| if e == zmq::Error::EAGAIN { CallError::NoReply } else { e.into() })?;
        match socket.recv_bytes(0) {
            Ok(reply) => {
                self.socket = Some(socket);
                Ok(reply)
            }
            Err(zmq::Error::EAGAIN) => Err(CallError::NoReply),
            Err(e) => Err(e.into()),
        }
    }

    pub fn call(&mut self, request: &Request) -> Result<Reply, CallError> {
        let frame = self.call_raw(&encode_request(request))?;
        Reply::decode(&frame, request).map_err(CallError::BadReply)
    }
}
