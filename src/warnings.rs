//! Warnings a flood can trigger (bad frames, refused keys), rate-limited so
//! that an attacker cannot fill the disk with log lines.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::time::{Duration, Instant};

use log::warn;

/// Logs at most one warning per reason per second, so that a flood of bad
/// frames cannot fill the disk; the next one says how many were suppressed.
#[derive(Default)]
pub struct Warnings {
    last: HashMap<&'static str, (Instant, u64)>,
}

impl Warnings {
    const INTERVAL: Duration = Duration::from_secs(1);

    pub fn warn(&mut self, reason: &'static str, detail: impl fmt::Display) {
        let now = Instant::now();
        let suppressed = match self.last.entry(reason) {
            Entry::Vacant(slot) => {
                slot.insert((now, 0));
                0
            }
            Entry::Occupied(mut slot) => {
                let (since, suppressed) = slot.get_mut();
                if now.duration_since(*since) < Self::INTERVAL {
                    *suppressed += 1;
                    return;
                }
                *since = now;
                std::mem::take(suppressed)
            }
        };
        if suppressed == 0 {
            warn!("{detail}");
        } else {
            warn!("{detail} (and {suppressed} more '{reason}' suppressed)");
        }
    }
}
