//! Power loss for real processes: a node's state dir mounted through
//! `lazyfs` (tools/lazyfs), which keeps writes in memory until they are
//! fsynced. [`LazyDisk::power_loss`] kills it, and with it every write the
//! node had not synced, as a machine losing power loses its page cache.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::wait_for;

/// The lazyfs binary, built with the workspace next to raft-zmq.
fn binary() -> PathBuf {
    let path = Path::new(super::binary()).with_file_name("lazyfs");
    assert!(path.exists(), "{} is missing: build the workspace (`cargo test` builds it)", path.display());
    path
}

pub struct LazyDisk {
    /// Where the data lives; only synced writes reach it.
    backing: PathBuf,
    mountpoint: PathBuf,
    /// Its stdout and stderr.
    output: PathBuf,
    daemon: Option<Child>,
}

impl LazyDisk {
    /// Mounts `mountpoint` (created if missing) over `backing` (created if missing).
    pub fn mount(backing: PathBuf, mountpoint: PathBuf, output: PathBuf) -> LazyDisk {
        fs::create_dir_all(&backing).unwrap();
        fs::create_dir_all(&mountpoint).unwrap();
        let mut disk = LazyDisk { backing, mountpoint, output, daemon: None };
        disk.start();
        disk
    }

    fn start(&mut self) {
        assert!(self.daemon.is_none(), "already mounted");
        let log = fs::OpenOptions::new().create(true).append(true).open(&self.output).unwrap();
        let daemon = Command::new(binary())
            .arg(&self.backing)
            .arg(&self.mountpoint)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemon = Some(daemon);
        let mountpoint = self.mountpoint.canonicalize().unwrap();
        wait_for("lazyfs to mount", || {
            if let Some(status) = self.daemon.as_mut().and_then(|d| d.try_wait().unwrap()) {
                let output = fs::read_to_string(&self.output).unwrap_or_default();
                panic!("lazyfs exited ({status}) instead of mounting (it needs root and /dev/fuse):\n{output}");
            }
            let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
            // Field 5 of each line is the mount point.
            let mounted = mounts.lines().any(|line| line.split(' ').nth(4) == mountpoint.to_str());
            mounted.then_some(())
        });
    }

    /// Every write not yet fsynced is lost; the disk is mounted again at
    /// once, holding what was synced. The node using it must be dead first.
    pub fn power_loss(&mut self) {
        self.unmount();
        self.start();
    }

    fn unmount(&mut self) {
        let Some(mut daemon) = self.daemon.take() else { return };
        daemon.kill().unwrap();
        daemon.wait().unwrap();
        let path = std::ffi::CString::new(self.mountpoint.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: umount2(2) with a valid path. MNT_DETACH: the daemon is
        // gone, so the mount can only be detached.
        let rc = unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        assert_eq!(rc, 0, "umount {}: {}", self.mountpoint.display(), std::io::Error::last_os_error());
    }
}

impl Drop for LazyDisk {
    fn drop(&mut self) {
        self.unmount();
    }
}
