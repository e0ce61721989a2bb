//! The model of sled's durability: a node's disk holds exactly what the shell
//! wrote *and* synced. A crash keeps this and loses everything else.

use raft_zmq::raft::{Entry, HardState, Index, Ready};

#[derive(Clone, Debug, Default)]
pub struct Disk {
    pub hard_state: HardState,
    /// Contiguous from index 1.
    pub entries: Vec<Entry>,
}

impl Disk {
    /// Step 2 of the Ready protocol: one atomic, synced write. Returns the
    /// first index it wrote, if it wrote entries.
    pub fn persist(&mut self, rd: &Ready) -> Option<Index> {
        if let Some(hs) = rd.hard_state {
            self.hard_state = hs;
        }
        if let Some(from) = rd.truncate_from {
            self.entries.truncate(from as usize - 1);
        }
        let first = rd.entries.first()?.index;
        assert_eq!(first, self.entries.len() as Index + 1, "the core asked for a write with a gap");
        self.entries.extend_from_slice(&rd.entries);
        Some(first)
    }
}
