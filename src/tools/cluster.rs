//! `raft-zmq cluster`: starts every node of a config as its own
//! `raft-zmq --node-id N` process and stops them together.
//!
//! Each node is a real, separate process — exactly what an operator would run
//! on separate machines — so killing one with `kill -9` is a real crash.

use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use log::{info, warn};

use crate::config::Config;

pub fn run(config_path: &Path, config: &Config) -> Result<(), Box<dyn std::error::Error>> {
    let exe = std::env::current_exe()?;
    let mut children: Vec<(u64, Child)> = Vec::new();
    for member in &config.nodes {
        let child = Command::new(&exe)
            .arg("--node-id")
            .arg(member.id.to_string())
            .arg("--config")
            .arg(config_path)
            .spawn()
            .map_err(|e| format!("cannot start node {}: {e}", member.id))?;
        info!("started node {} (pid {}): raft {}, client {}", member.id, child.id(), member.raft, member.client);
        children.push((member.id, child));
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::Release))?;
    }
    println!("cluster of {} nodes running; logs in {}; Ctrl-C stops it", children.len(), config.logs_dir.display());
    // Run until asked to stop or until every node has exited on its own.
    while !stop.load(Ordering::Acquire) {
        children.retain_mut(|(id, child)| match child.try_wait() {
            Ok(Some(status)) => {
                warn!("node {id} exited: {status}");
                false
            }
            _ => true,
        });
        if children.is_empty() {
            return Err("every node exited".into());
        }
        thread::sleep(Duration::from_millis(100));
    }
    stop_all(children);
    Ok(())
}

/// SIGTERM for a clean shutdown, SIGKILL for whoever is still up after 5 s.
fn stop_all(mut children: Vec<(u64, Child)>) {
    for (_, child) in &children {
        // SAFETY: kill(2) on a pid we spawned and have not reaped yet.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        children.retain_mut(|(_, child)| !matches!(child.try_wait(), Ok(Some(_))));
        if children.is_empty() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    for (id, child) in &mut children {
        warn!("node {id} did not stop in time; killing it");
        let _ = child.kill();
        let _ = child.wait();
    }
}
