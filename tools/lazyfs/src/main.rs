//! `lazyfs BACKING MOUNTPOINT`: mounts at MOUNTPOINT a view of the folder
//! BACKING that keeps file writes in memory until they are fsynced. Killing
//! the process (`kill -9`) is a power loss: every write not yet synced is
//! gone, as Jepsen's lazyfs does it. Unmount with `umount -l MOUNTPOINT`.
//!
//! A testing tool, not part of raft-zmq: the chaos and durability tests run
//! nodes over it. Needs root (it mounts /dev/fuse directly).

mod fs;
mod unsynced;

use std::path::PathBuf;
use std::process::ExitCode;

use fuser::{Config, MountOption, Session};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [backing, mountpoint] = &args[..] else {
        eprintln!("usage: lazyfs BACKING MOUNTPOINT");
        return ExitCode::from(2);
    };
    let backing = match PathBuf::from(backing).canonicalize() {
        Ok(path) => path,
        Err(e) => {
            eprintln!("lazyfs: {backing}: {e}");
            return ExitCode::from(2);
        }
    };
    let mut config = Config::default();
    config.mount_options.extend([MountOption::FSName("lazyfs".into()), MountOption::DefaultPermissions]);
    let session = match Session::new(fs::LazyFs::new(backing), mountpoint, &config) {
        Ok(session) => session,
        Err(e) => {
            eprintln!("lazyfs: cannot mount {mountpoint}: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Whoever waits for the mount reads this line.
    println!("mounted {mountpoint}");
    match session.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lazyfs: {e}");
            ExitCode::FAILURE
        }
    }
}
