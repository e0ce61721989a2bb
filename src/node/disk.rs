//! The disk-space alarm, like etcd's NOSPACE. sled cannot recover from a
//! failed write (it stops answering), so the node keeps clear of a full disk
//! instead. Once the state dir's file system has less free space than the
//! reserve, it raises the alarm and takes no new entries: a leader refuses
//! client writes and hands leadership over (once per alarm, so that
//! leadership does not go round when every node is short of space); a
//! follower ignores appends, and the majority goes on without it. It clears
//! the alarm by itself once space returns, and the node catches up. If a
//! write fails anyway, the node stops at once (see `core_loop`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{info, warn};

use crate::metrics::METRICS;
use crate::storage::disk_space::free_bytes;

/// The name `status` lists while the alarm is raised.
pub const NOSPACE: &str = "nospace";

pub struct DiskAlarm {
    dir: PathBuf,
    reserve: u64,
    raised: bool,
    /// This alarm has not made a leader hand over yet.
    handover_due: bool,
    next_check: Instant,
    /// Bytes persisted since the last check: a fast writer is re-checked
    /// long before it could eat the reserve.
    written: u64,
    /// What the state dir took on disk at the last check.
    state_bytes: u64,
}

impl DiskAlarm {
    /// statvfs is cheap, but no need to ask more often than this.
    const CHECK_EVERY: Duration = Duration::from_millis(250);

    pub fn new(dir: &Path, reserve: u64) -> DiskAlarm {
        DiskAlarm {
            dir: dir.to_path_buf(),
            reserve,
            raised: false,
            handover_due: false,
            next_check: Instant::now(),
            written: 0,
            state_bytes: 0,
        }
    }

    /// Counts `bytes` persisted, so that the next [`DiskAlarm::poll`] looks
    /// again once they add up to an eighth of the reserve.
    pub fn wrote(&mut self, bytes: u64) {
        self.written = self.written.saturating_add(bytes);
    }

    pub fn raised(&self) -> bool {
        self.raised
    }

    /// Bytes the state dir took on disk at the last check.
    pub fn state_bytes(&self) -> u64 {
        self.state_bytes
    }

    /// A leader should hand leadership over: once per alarm, so that when
    /// every node is short of space leadership settles instead of going round.
    pub fn handover_due(&self) -> bool {
        self.raised && self.handover_due
    }

    pub fn handed_over(&mut self) {
        self.handover_due = false;
    }

    /// Re-checks the free space when due; true if the alarm changed.
    /// `promised` bytes are taken already though not written yet (a
    /// snapshot being received declared them): they count as used.
    pub fn poll(&mut self, now: Instant, promised: u64) -> bool {
        if now < self.next_check && self.written < (self.reserve / 8).max(1) {
            return false;
        }
        self.next_check = now + Self::CHECK_EVERY;
        self.written = 0;
        self.state_bytes = dir_bytes(&self.dir);
        let free = match free_bytes(&self.dir) {
            Ok(free) => free.saturating_sub(promised),
            Err(e) => {
                warn!("cannot tell the free space of {}: {e}", self.dir.display());
                return false;
            }
        };
        let raised = free < self.reserve;
        if raised == self.raised {
            return false;
        }
        self.raised = raised;
        self.handover_due = raised;
        METRICS.nospace.set(raised as i64);
        if raised {
            warn!(
                "alarm {NOSPACE}: {} has {free} bytes free (besides {promised} promised to a snapshot being \
                 received), below the reserve of {}; taking no new entries until space is freed",
                self.dir.display(),
                self.reserve
            );
        } else {
            info!("alarm {NOSPACE} cleared: {} has {free} bytes free again", self.dir.display());
        }
        true
    }
}

/// Bytes the files under `dir` take on disk (allocated blocks, so sparse
/// and preallocated files count as the disk sees them); unreadable entries
/// count 0.
pub fn dir_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => dir_bytes(&entry.path()),
            Ok(meta) => meta.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raised_below_the_reserve_and_cleared_above_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut ample = DiskAlarm::new(dir.path(), 1);
        let mut starved = DiskAlarm::new(dir.path(), u64::MAX);
        let now = Instant::now();
        assert!(!ample.poll(now, 0) && !ample.raised());
        assert!(starved.poll(now, 0) && starved.raised() && starved.handover_due());
        starved.handed_over();
        assert!(!starved.handover_due(), "once per alarm");
        assert!(!starved.poll(now + DiskAlarm::CHECK_EVERY, 0), "no change, no news");
        starved.reserve = 1;
        assert!(!starved.poll(now + DiskAlarm::CHECK_EVERY, 0), "not due yet");
        assert!(starved.poll(now + 2 * DiskAlarm::CHECK_EVERY, 0) && !starved.raised());
        starved.reserve = u64::MAX;
        starved.wrote(u64::MAX / 8);
        assert!(starved.poll(now + 2 * DiskAlarm::CHECK_EVERY, 0), "due early after many bytes written");
    }

    #[test]
    fn bytes_promised_to_a_snapshot_being_received_count_as_used() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).unwrap();
        let mut alarm = DiskAlarm::new(dir.path(), free / 2);
        let now = Instant::now();
        assert!(!alarm.poll(now, 0) && !alarm.raised());
        assert!(alarm.poll(now + DiskAlarm::CHECK_EVERY, free) && alarm.raised(), "the promise eats the reserve");
        assert!(alarm.poll(now + 2 * DiskAlarm::CHECK_EVERY, 0) && !alarm.raised(), "released with the promise");
    }

    #[test]
    fn dir_bytes_counts_nested_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("a"), vec![1; 10_000]).unwrap();
        std::fs::write(dir.path().join("sub/b"), vec![1; 20_000]).unwrap();
        assert!(dir_bytes(dir.path()) >= 30_000, "{}", dir_bytes(dir.path()));
        assert_eq!(dir_bytes(&dir.path().join("missing")), 0);
    }

    #[test]
    fn a_missing_dir_keeps_the_alarm_as_it_was() {
        let mut alarm = DiskAlarm::new(Path::new("/nonexistent/raft-zmq"), u64::MAX);
        assert!(!alarm.poll(Instant::now(), 0) && !alarm.raised());
    }
}
