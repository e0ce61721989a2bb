//! The lazyfs binary mounted for real: synced writes survive `kill -9` of
//! the daemon, unsynced ones do not. Needs root and /dev/fuse.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

struct Mounted {
    daemon: Child,
    mountpoint: PathBuf,
}

impl Mounted {
    fn new(backing: &Path, mountpoint: &Path) -> Mounted {
        let daemon = Command::new(env!("CARGO_BIN_EXE_lazyfs"))
            .arg(backing)
            .arg(mountpoint)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let target = mountpoint.to_str().unwrap();
        while !fs::read_to_string("/proc/self/mountinfo").unwrap().lines().any(|l| l.split(' ').nth(4) == Some(target))
        {
            assert!(Instant::now() < deadline, "lazyfs did not mount");
            thread::sleep(Duration::from_millis(10));
        }
        Mounted { daemon, mountpoint: mountpoint.to_path_buf() }
    }
}

/// Power loss: the daemon dies with what it held.
impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        let path = std::ffi::CString::new(self.mountpoint.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: umount2(2) with a valid path.
        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    }
}

#[test]
fn synced_writes_survive_a_power_loss_and_unsynced_ones_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let (backing, mountpoint) = (dir.path().join("backing"), dir.path().join("mnt"));
    fs::create_dir_all(&backing).unwrap();
    fs::create_dir_all(&mountpoint).unwrap();
    let mountpoint = mountpoint.canonicalize().unwrap();

    let mounted = Mounted::new(&backing, &mountpoint);
    let mut log = File::create(mountpoint.join("log")).unwrap();
    log.write_all(b"first record;").unwrap();
    log.sync_data().unwrap();
    log.write_all(b"second record, never synced;").unwrap();
    // Overwriting synced bytes without a sync is lost too.
    log.write_all_at(b"FIRST", 0).unwrap();
    assert_eq!(fs::read(mountpoint.join("log")).unwrap(), b"FIRST record;second record, never synced;");

    // The atomic-replace pattern: write, fsync, rename.
    let mut tmp = File::create(mountpoint.join("snap.tmp")).unwrap();
    tmp.write_all(b"snapshot").unwrap();
    tmp.sync_all().unwrap();
    fs::rename(mountpoint.join("snap.tmp"), mountpoint.join("snap")).unwrap();
    assert_eq!(fs::read(mountpoint.join("snap")).unwrap(), b"snapshot", "readable under its new name at once");
    fs::create_dir(mountpoint.join("sub")).unwrap();
    fs::write(mountpoint.join("sub/never-synced"), b"gone").unwrap();
    let mut grown = OpenOptions::new().create(true).truncate(false).write(true).open(mountpoint.join("grown")).unwrap();
    grown.write_all(&[1; 10_000]).unwrap();
    grown.sync_data().unwrap();
    grown.set_len(100).unwrap();
    drop((log, grown, mounted));

    let _mounted = Mounted::new(&backing, &mountpoint);
    assert_eq!(fs::read(mountpoint.join("log")).unwrap(), b"first record;");
    assert_eq!(fs::read(mountpoint.join("snap")).unwrap(), b"snapshot");
    assert!(!mountpoint.join("snap.tmp").exists());
    // Names are durable at once; data only when synced.
    assert_eq!(fs::read(mountpoint.join("sub/never-synced")).unwrap(), b"");
    // An unsynced truncation is lost like a write.
    assert_eq!(fs::read(mountpoint.join("grown")).unwrap(), vec![1; 10_000]);
    let mut names: Vec<_> = fs::read_dir(&mountpoint).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, ["grown", "log", "snap", "sub"]);
}
