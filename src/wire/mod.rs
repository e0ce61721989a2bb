//! The formats other processes see: what clients send and get (`protocol`),
//! what nodes send each other around Raft's messages (`envelope`), and the
//! members' endpoints and keys a membership carries (`members`).

pub mod envelope;
pub mod members;
pub mod protocol;
