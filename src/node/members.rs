//! The node's side of membership: the members' endpoints (replicated as the
//! membership's context, JSON like `config.json`'s `nodes`), the membership
//! ops and the leadership transfers clients wait on.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use crate::config::Member;
use crate::protocol::MemberInfo;
use crate::raft::{Membership, NodeId, majority_value};
use crate::transport::bootstrap_fingerprint;

use super::replies::ReplyTo;

/// The members' endpoints a membership carries, in id order.
pub fn members_of(membership: &Membership) -> Vec<Member> {
    let mut members: Vec<Member> = serde_json::from_slice(&membership.context).unwrap_or_default();
    members.retain(|m| membership.contains(m.id));
    members.sort_by_key(|m| m.id);
    members
}

/// The first membership of a new cluster of `members`: all voters, and the
/// fingerprint they speak for until the cluster is named.
pub fn first_membership(members: &[Member]) -> Membership {
    let endpoints: Vec<(NodeId, &str)> = members.iter().map(|m| (m.id, m.raft.as_str())).collect();
    Membership {
        fingerprint: bootstrap_fingerprint(&endpoints),
        ..Membership::of_voters(members.iter().map(|m| m.id), context_of(members))
    }
}

/// The context of a membership of `members`.
pub fn context_of(members: &[Member]) -> Vec<u8> {
    serde_json::to_vec(members).expect("members always serialize")
}

/// Why a new member cannot be added as given.
pub fn check_new_member(members: &[Member], new: &Member) -> Result<(), String> {
    for (what, endpoint) in [("raft", &new.raft), ("client", &new.client)] {
        if !endpoint.starts_with("tcp://") {
            return Err(format!("`{what}` must be a tcp:// endpoint, not {endpoint:?}"));
        }
        if let Some(m) = members.iter().find(|m| &m.raft == endpoint || &m.client == endpoint) {
            return Err(format!("endpoint {endpoint} is already node {}'s", m.id));
        }
    }
    Ok(())
}

/// The `members` reply: every member with its role; on the leader, with
/// `progress` (match index, and when it was last heard from).
pub fn member_infos(
    membership: &Membership,
    progress: impl Fn(NodeId) -> Option<(u64, Option<Instant>)>,
) -> Vec<MemberInfo> {
    members_of(membership)
        .into_iter()
        .map(|m| {
            let seen = progress(m.id);
            MemberInfo {
                id: m.id,
                role: if membership.is_voter(m.id) { "voter" } else { "learner" }.to_string(),
                match_index: seen.map(|(matched, _)| matched),
                last_contact_ms: seen.and_then(|(_, at)| at).map(|at| at.elapsed().as_millis() as u64),
                raft: m.raft,
                client: m.client,
            }
        })
        .collect()
}

/// Clients waiting for a leadership transfer to complete.
#[derive(Default)]
pub struct Transfers {
    waiting: Vec<(NodeId, ReplyTo, Instant)>,
}

impl Transfers {
    pub fn wait(&mut self, to: NodeId, reply_to: ReplyTo, deadline: Instant) {
        self.waiting.push((to, reply_to, deadline));
    }

    /// Those waiting for `leader` to take over, which it has.
    pub fn done(&mut self, leader: NodeId) -> Vec<ReplyTo> {
        self.take(|to, _| to == leader).into_iter().map(|(_, reply_to)| reply_to).collect()
    }

    /// Those whose deadline passed, with the target that did not take over.
    pub fn expired(&mut self, now: Instant) -> Vec<(NodeId, ReplyTo)> {
        self.take(|_, deadline| deadline <= now)
    }

    fn take(&mut self, pick: impl Fn(NodeId, Instant) -> bool) -> Vec<(NodeId, ReplyTo)> {
        let (picked, kept): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.waiting).into_iter().partition(|(to, _, deadline)| pick(*to, *deadline));
        self.waiting = kept;
        picked.into_iter().map(|(to, reply_to, _)| (to, reply_to)).collect()
    }
}

/// When each peer was last heard from (any message), for `last_contact_ms`.
#[derive(Default)]
pub struct LastContact(HashMap<NodeId, Instant>);

impl LastContact {
    pub fn heard(&mut self, from: NodeId) {
        self.0.insert(from, Instant::now());
    }

    pub fn get(&self, id: NodeId) -> Option<Instant> {
        self.0.get(&id).copied()
    }

    /// How long ago a majority of `voters` was last heard from, `me`
    /// counting as heard now: a leader's own view of whether it still leads.
    /// `None` while no majority ever was.
    pub fn majority_silence(&self, me: NodeId, voters: &BTreeSet<NodeId>, now: Instant) -> Option<Duration> {
        // Freshness in µs before the far future, so that the highest value a
        // majority reaches is the oldest contact among the freshest majority.
        const FAR: u64 = u64::MAX;
        let freshness = |id: &NodeId| match self.get(*id) {
            _ if *id == me => FAR,
            Some(at) => FAR - now.saturating_duration_since(at).as_micros() as u64,
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

    fn member(id: NodeId) -> Member {
        let (raft, client) = (format!("tcp://127.0.0.1:{}", 7000 + id), format!("tcp://127.0.0.1:{}", 7100 + id));
        Member { id, raft, client, public_key: None }
    }

    #[test]
    fn majority_silence_is_the_age_of_the_freshest_majority() {
        let now = Instant::now();
        let mut contact = LastContact::default();
        let voters: BTreeSet<NodeId> = [0, 1, 2, 3, 4].into();
        assert_eq!(contact.majority_silence(0, &voters, now), None, "no majority heard yet");
        contact.0.insert(1, now - Duration::from_millis(30));
        contact.0.insert(2, now - Duration::from_millis(700));
        assert_eq!(contact.majority_silence(0, &voters, now), Some(Duration::from_millis(700)));
        contact.0.insert(3, now - Duration::from_millis(10));
        assert_eq!(contact.majority_silence(0, &voters, now), Some(Duration::from_millis(30)));
        assert_eq!(contact.majority_silence(0, &[0].into(), now), Some(Duration::ZERO), "alone");
    }

    #[test]
    fn members_round_trip_through_the_context_and_follow_the_membership() {
        let members = vec![member(2), member(0), member(1)];
        let membership = Membership { learners: [2].into(), ..Membership::of_voters([0, 1], context_of(&members)) };
        assert_eq!(members_of(&membership), vec![member(0), member(1), member(2)]);
        let infos = member_infos(&membership, |id| (id == 1).then_some((7, None)));
        let roles: Vec<(NodeId, &str, Option<u64>)> =
            infos.iter().map(|i| (i.id, i.role.as_str(), i.match_index)).collect();
        assert_eq!(roles, vec![(0, "voter", None), (1, "voter", Some(7)), (2, "learner", None)]);
    }

    #[test]
    fn a_new_member_needs_endpoints_of_its_own() {
        let members = vec![member(0), member(1)];
        assert!(check_new_member(&members, &member(2)).is_ok());
        let taken = Member { raft: member(1).raft, ..member(2) };
        assert!(check_new_member(&members, &taken).unwrap_err().contains("node 1"));
        let bad = Member { client: "127.0.0.1:9".into(), ..member(2) };
        assert!(check_new_member(&members, &bad).is_err());
    }
}
