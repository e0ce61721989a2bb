//! When each peer was last heard from, for `last_contact_ms` and for a
//! leader's own view of whether a majority still follows it.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use crate::raft::{NodeId, majority_value};

use super::Time;

#[derive(Default)]
pub struct LastContact(HashMap<NodeId, Time>);

impl LastContact {
    pub fn heard(&mut self, from: NodeId, now: Time) {
        self.0.insert(from, now);
    }

    /// How long ago `id` was last heard from, if ever.
    pub fn silence(&self, id: NodeId, now: Time) -> Option<Duration> {
        self.0.get(&id).map(|&at| now.saturating_sub(at))
    }

    /// How long ago a majority of `voters` was last heard from, `me`
    /// counting as heard now: a leader's own view of whether it still leads.
    /// `None` while no majority ever was.
    pub fn majority_silence(&self, me: NodeId, voters: &BTreeSet<NodeId>, now: Time) -> Option<Duration> {
        // Freshness in µs before the far future, so that the highest value a
        // majority reaches is the oldest contact among the freshest majority.
        const FAR: u64 = u64::MAX;
        let freshness = |id: &NodeId| match self.silence(*id, now) {
            _ if *id == me => FAR,
            Some(silence) => FAR - silence.as_micros() as u64,
            None => 0,
        };
        let mut values: Vec<u64> = voters.iter().map(freshness).collect();
        match majority_value(&mut values) {
            0 => None,
            fresh => Some(Duration::from_micros(FAR - fresh)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majority_silence_is_the_age_of_the_freshest_majority() {
        let now = Duration::from_secs(10);
        let mut contact = LastContact::default();
        let voters: BTreeSet<NodeId> = [0, 1, 2, 3, 4].into();
        assert_eq!(contact.majority_silence(0, &voters, now), None, "no majority heard yet");
        contact.heard(1, now - Duration::from_millis(30));
        contact.heard(2, now - Duration::from_millis(700));
        assert_eq!(contact.majority_silence(0, &voters, now), Some(Duration::from_millis(700)));
        contact.heard(3, now - Duration::from_millis(10));
        assert_eq!(contact.majority_silence(0, &voters, now), Some(Duration::from_millis(30)));
        assert_eq!(contact.majority_silence(0, &[0].into(), now), Some(Duration::ZERO), "alone");
        assert_eq!(contact.silence(1, now), Some(Duration::from_millis(30)));
        assert_eq!(contact.silence(4, now), None);
    }
}
