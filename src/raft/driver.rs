//! The Ready cycle, written once: the node's core loop, the deterministic
//! simulator, the fuzz targets and the core's unit tests all drive the core
//! through [`run_ready`], over the [`DurableStore`] and [`ReadySink`] each provides.
//! So the order that makes Raft safe — nothing that promises durability
//! leaves before the sync — is the same code everywhere, and a bug in it is
//! a bug the simulator finds.

use std::convert::Infallible;

use crate::raft::{
    Entry, HardState, LogStore, LogWrite, MemStore, Membership, Message, Raft, ReadState, SnapshotInfo, SoftState,
};

/// The durable side of a node.
pub trait DurableStore: LogStore {
    type Error;

    /// Step 2 of a `Ready`, durable once [`DurableStore::sync`] returns:
    /// start the log over after `snapshot` (whose data the shell received
    /// and staged with the message that brought it) with its membership,
    /// set `hard_state`, write `entries` (replacing whatever the store
    /// holds from the first of them on). A crash before the sync may keep
    /// any prefix of what was written since the last one, in order.
    fn write(
        &mut self,
        snapshot: Option<&SnapshotInfo>,
        hard_state: Option<&HardState>,
        entries: &[Entry],
    ) -> Result<(), Self::Error>;

    /// Makes everything written so far durable.
    fn sync(&mut self) -> Result<(), Self::Error>;

    /// [`DurableStore::write`], then [`DurableStore::sync`].
    fn persist(
        &mut self,
        snapshot: Option<&SnapshotInfo>,
        hard_state: Option<&HardState>,
        entries: &[Entry],
    ) -> Result<(), Self::Error> {
        self.write(snapshot, hard_state, entries)?;
        self.sync()
    }
}

/// Everything else around the core: the network, the state machine and the
/// clients waiting on it. `S` is the core's store, which a state machine
/// restoring a snapshot reads it from.
pub trait ReadySink<S> {
    fn send(&mut self, msg: Message);
    /// Role, term or leader changed.
    fn soft_state(&mut self, soft: SoftState);
    /// The membership in force changed (an entry was appended or cut off, or
    /// a snapshot brought it): messages to new members follow.
    fn membership(&mut self, membership: &Membership);
    /// The state machine starts over from the snapshot just installed in `store`.
    fn restore(&mut self, snapshot: &SnapshotInfo, store: &S);
    /// Committed entries, in order, to apply.
    fn apply(&mut self, entries: Vec<Entry>);
    /// A linearizable read may be served once `read.index` is applied.
    fn read_ready(&mut self, read: ReadState);
    /// A read whose leadership could not be confirmed.
    fn read_failed(&mut self, ctx: u64);
    /// Whether this shell makes writes durable itself, off the core's
    /// thread (asynchronous storage writes; see [`crate::raft::Ready`]).
    fn syncs_later(&self) -> bool {
        false
    }
    /// Only if [`ReadySink::syncs_later`]: make everything written so far
    /// durable, then call `Raft::persisted` with `written` (the last entry
    /// written; none if this batch wrote nothing) and send `messages`,
    /// after those of earlier calls.
    fn sync_later(&mut self, written: Option<LogWrite>, messages: Vec<Message>) {
        let _ = (written, messages);
        unreachable!("a shell that syncs later must take its writes");
    }
}

/// Carries out the core's `Ready`s, in the order [`crate::raft::Ready`]
/// documents, until it has nothing more to say. A storage error stops it
/// at once: the caller must not go on (the node exits, the simulator
/// counts a crash).
pub fn run_ready<S: DurableStore, H: ReadySink<S>>(raft: &mut Raft<S>, shell: &mut H) -> Result<(), S::Error> {
    while raft.has_ready() {
        let rd = raft.ready();
        let must_persist = rd.must_persist();
        let may_sync_later = rd.may_sync_later();
        if let Some(soft) = rd.soft_state {
            shell.soft_state(soft);
        }
        if let Some(membership) = &rd.membership {
            shell.membership(membership);
        }
        for msg in rd.messages {
            shell.send(msg);
        }
        if must_persist {
            raft.store_mut().write(rd.snapshot.as_ref(), rd.hard_state.as_ref(), &rd.entries)?;
        }
        // Acknowledgements without a write of their own go behind the
        // writes still being synced, which they promise too.
        let promises = must_persist || !rd.persisted_messages.is_empty();
        if promises && may_sync_later && shell.syncs_later() {
            let written = raft.defer_persistence();
            debug_assert!(written.is_some() || !must_persist, "a deferred write names its last entry");
            shell.sync_later(written, rd.persisted_messages);
        } else {
            if must_persist {
                raft.store_mut().sync()?;
            }
            for msg in rd.persisted_messages {
                shell.send(msg);
            }
            raft.advance();
        }
        if let Some(snapshot) = &rd.snapshot {
            shell.restore(snapshot, raft.store());
        }
        if !rd.committed.is_empty() {
            shell.apply(rd.committed);
        }
        for read in rd.read_states {
            shell.read_ready(read);
        }
        for ctx in rd.failed_reads {
            shell.read_failed(ctx);
        }
    }
    Ok(())
}

impl DurableStore for MemStore {
    type Error = Infallible;

    fn write(
        &mut self,
        snapshot: Option<&SnapshotInfo>,
        hard_state: Option<&HardState>,
        entries: &[Entry],
    ) -> Result<(), Infallible> {
        if let Some(snapshot) = snapshot {
            self.restore(snapshot.meta, snapshot.membership.clone());
        }
        if let Some(hs) = hard_state {
            self.hard_state = *hs;
        }
        self.append(entries);
        Ok(())
    }
    fn sync(&mut self) -> Result<(), Infallible> {
        Ok(())
    }
}
