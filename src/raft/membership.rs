//! Membership changes, one server at a time (Raft thesis §4.1).
//!
//! Every membership entry holds the whole new membership, and a node uses
//! the newest one in its log, committed or not: a leader counts the new
//! membership's quorums from the moment it appends the entry. Because each
//! change adds or removes at most one voter, any majority of the old voters
//! and any majority of the new ones share a voter, so two leaders can never
//! be elected in one term across a change. That argument holds only for one
//! change at a time, and only once the leader has committed an entry of its
//! own term (the bug found in 2015, thesis §4.1 / raft-dev): the leader
//! refuses a change until both hold. Learners never campaign, and votes
//! and acknowledgements count only from the voters of the membership the
//! counting node holds.

use super::types::{Entry, Index, Membership, NodeId, Payload};

/// What a client (or the leader itself, to promote a learner) asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MembershipChange {
    /// A new member that receives the log but does not vote; with `promote`
    /// the leader makes it a voter once it has caught up.
    AddLearner { id: NodeId, promote: bool },
    /// A learner becomes a voter.
    Promote(NodeId),
    /// A voter or learner leaves.
    Remove(NodeId),
    /// A new cluster records the id its first leader chose, once.
    Name(u64),
}

impl MembershipChange {
    /// The membership after this change, or why it makes no sense.
    /// `context` becomes the new membership's shell data.
    pub fn apply_to(&self, current: &Membership, context: Vec<u8>) -> Result<Membership, String> {
        let mut next = Membership { context, ..current.clone() };
        match *self {
            MembershipChange::AddLearner { id, promote } => {
                if current.contains(id) {
                    return Err(format!("node {id} is already a member"));
                }
                if current.removed.contains(&id) {
                    return Err(format!("node {id} was removed; ids are never reused, so add it under a new id"));
                }
                next.learners.insert(id);
                if promote {
                    next.promote.insert(id);
                }
            }
            MembershipChange::Promote(id) => {
                if !next.learners.remove(&id) {
                    return Err(format!("node {id} is not a learner"));
                }
                next.promote.remove(&id);
                next.voters.insert(id);
            }
            MembershipChange::Remove(id) => {
                if !current.contains(id) {
                    return Err(format!("node {id} is not a member"));
                }
                if current.voters.len() == 1 && current.is_voter(id) {
                    return Err(format!("node {id} is the only voter"));
                }
                next.voters.remove(&id);
                next.learners.remove(&id);
                next.promote.remove(&id);
                next.removed.insert(id);
            }
            MembershipChange::Name(cluster) => {
                if current.cluster != 0 {
                    return Err(format!("the cluster is named {:#018x} already", current.cluster));
                }
                if cluster == 0 {
                    return Err("0 is no cluster id".into());
                }
                next.cluster = cluster;
            }
        }
        Ok(next)
    }
}

/// The memberships a log holds: the one in force at its start, then every
/// membership entry after it, oldest first. Never empty.
#[derive(Clone, Debug)]
pub struct Memberships {
    list: Vec<(Index, Membership)>,
    /// Bumped whenever the membership in force may have changed, so that
    /// whoever follows it need not keep a copy to compare.
    generation: u64,
}

impl Memberships {
    /// `list` as [`super::LogStore::memberships`] returns it.
    pub fn new(list: Vec<(Index, Membership)>) -> Memberships {
        assert!(!list.is_empty(), "a log has a membership at its start");
        debug_assert!(list.windows(2).all(|w| w[0].0 < w[1].0), "memberships out of order");
        Memberships { list, generation: 1 }
    }

    /// See the field: starts at 1.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The newest, which is the one in force.
    pub fn current(&self) -> &Membership {
        &self.list.last().expect("never empty").1
    }

    /// Index of the entry that made the current membership (or of the log
    /// start it was in force at).
    pub fn current_index(&self) -> Index {
        self.list.last().expect("never empty").0
    }

    /// The membership in force once the log up to `index` is applied.
    pub fn at(&self, index: Index) -> &Membership {
        let newer = self.list.partition_point(|(i, _)| *i <= index);
        &self.list[newer.saturating_sub(1)].1
    }

    /// Entries were appended: their memberships take effect.
    pub fn appended(&mut self, entries: &[Entry]) {
        for entry in entries {
            if let Payload::Membership(membership) = &entry.payload {
                self.list.push((entry.index, membership.clone()));
                self.generation += 1;
            }
        }
    }

    /// The log was cut from `index` on: memberships of removed entries no
    /// longer hold. The one at the log start stays.
    pub fn truncated(&mut self, index: Index) {
        let keep = self.list.partition_point(|(i, _)| *i < index).max(1);
        if keep < self.list.len() {
            self.list.truncate(keep);
            self.generation += 1;
        }
    }

    /// The log starts over after a snapshot at `index` with `membership`.
    pub fn restored(&mut self, index: Index, membership: Membership) {
        self.list = vec![(index, membership)];
        self.generation += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn voters(ids: &[NodeId]) -> Membership {
        Membership::of_voters(ids.iter().copied(), vec![])
    }

    fn entry(index: Index, membership: Membership) -> Entry {
        Entry { index, term: 1, payload: Payload::Membership(membership) }
    }

    #[test]
    fn a_learner_is_added_then_promoted_and_members_removed() {
        let start = voters(&[1, 2, 3]);
        let added = MembershipChange::AddLearner { id: 4, promote: true }.apply_to(&start, b"4".to_vec()).unwrap();
        assert_eq!((added.voters.len(), added.learners.len(), added.context.as_slice()), (3, 1, &b"4"[..]));
        assert!(added.promote.contains(&4) && !added.is_voter(4) && added.contains(4));
        let promoted = MembershipChange::Promote(4).apply_to(&added, vec![]).unwrap();
        assert_eq!(promoted.voters, [1, 2, 3, 4].into());
        assert!(promoted.learners.is_empty() && promoted.promote.is_empty());
        let removed = MembershipChange::Remove(1).apply_to(&promoted, vec![]).unwrap();
        assert_eq!((&removed.voters, &removed.removed), (&[2, 3, 4].into(), &[1].into()));
        let again = MembershipChange::AddLearner { id: 1, promote: false }.apply_to(&removed, vec![]);
        assert!(again.unwrap_err().contains("never reused"));
    }

    #[test]
    fn nonsense_changes_are_refused() {
        let start = voters(&[1]);
        let add = |id| MembershipChange::AddLearner { id, promote: false };
        assert!(add(1).apply_to(&start, vec![]).is_err(), "already a member");
        assert!(MembershipChange::Promote(1).apply_to(&start, vec![]).is_err(), "not a learner");
        assert!(MembershipChange::Remove(7).apply_to(&start, vec![]).is_err(), "not a member");
        assert!(MembershipChange::Remove(1).apply_to(&start, vec![]).is_err(), "the only voter");
        let with_learner = add(2).apply_to(&start, vec![]).unwrap();
        assert!(MembershipChange::Remove(2).apply_to(&with_learner, vec![]).is_ok(), "a learner may go");
        assert!(MembershipChange::Name(0).apply_to(&start, vec![]).is_err(), "0 is no id");
    }

    #[test]
    fn a_cluster_is_named_once_and_keeps_its_name_through_changes() {
        let named = MembershipChange::Name(0xabc).apply_to(&voters(&[1, 2]), vec![]).unwrap();
        assert_eq!((named.cluster, &named.voters), (0xabc, &[1, 2].into()));
        assert!(MembershipChange::Name(0xdef).apply_to(&named, vec![]).unwrap_err().contains("already"));
        let grown = MembershipChange::AddLearner { id: 3, promote: true }.apply_to(&named, vec![]).unwrap();
        let shrunk = MembershipChange::Remove(1).apply_to(&grown, vec![]).unwrap();
        assert_eq!(shrunk.cluster, 0xabc);
    }

    #[test]
    fn the_newest_membership_holds_and_truncation_reverts_it() {
        let mut memberships = Memberships::new(vec![(0, voters(&[1, 2, 3]))]);
        memberships.appended(&[
            Entry { index: 4, term: 1, payload: Payload::Noop },
            entry(5, voters(&[1, 2, 3, 4])),
            entry(9, voters(&[1, 2, 4])),
        ]);
        assert_eq!(memberships.current(), &voters(&[1, 2, 4]));
        assert_eq!(memberships.current_index(), 9);
        assert_eq!(memberships.at(4), &voters(&[1, 2, 3]));
        assert_eq!(memberships.at(5), &voters(&[1, 2, 3, 4]));
        assert_eq!(memberships.at(100), &voters(&[1, 2, 4]));
        assert_eq!(memberships.generation(), 3, "two membership entries");
        memberships.truncated(10);
        assert_eq!(memberships.generation(), 3, "nothing cut");
        memberships.truncated(9);
        assert_eq!((memberships.current(), memberships.generation()), (&voters(&[1, 2, 3, 4]), 4));
        memberships.truncated(1);
        assert_eq!(memberships.current(), &voters(&[1, 2, 3]), "the start's membership stays");
        memberships.restored(20, voters(&[7]));
        assert_eq!((memberships.current_index(), memberships.at(3)), (20, &voters(&[7])));
        assert_eq!(memberships.generation(), 6, "a restore changes the membership too");
    }
}
