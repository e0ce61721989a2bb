//! The members' endpoints (replicated as the
//! membership's context, JSON like `config.json`'s `nodes`), and what the
//! membership ops reply.

use crate::config::{Member, check_endpoint};
use crate::raft::{Membership, NodeId};
use crate::wire::envelope::bootstrap_fingerprint;
use crate::wire::protocol::MemberInfo;

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

/// Why a new member cannot be added as given. Its endpoints are checked as
/// the config's are: once committed, an endpoint every node must connect to
/// cannot be taken back by restarting with a fixed file.
pub fn check_new_member(members: &[Member], new: &Member) -> Result<(), String> {
    for (what, endpoint) in [("raft", &new.raft), ("client", &new.client)] {
        check_endpoint(endpoint).map_err(|why| format!("`{what}` endpoint {endpoint:?}: {why}"))?;
        if let Some(m) = members.iter().find(|m| &m.raft == endpoint || &m.client == endpoint) {
            return Err(format!("endpoint {endpoint} is already node {}'s", m.id));
        }
    }
    Ok(())
}

/// The `members` reply: every member with its role; on the leader, with
/// `progress` (match index, and how many ms ago it was last heard from).
pub fn member_infos(
    membership: &Membership,
    progress: impl Fn(NodeId) -> Option<(u64, Option<u64>)>,
) -> Vec<MemberInfo> {
    members_of(membership)
        .into_iter()
        .map(|m| {
            let seen = progress(m.id);
            MemberInfo {
                id: m.id,
                role: if membership.is_voter(m.id) { "voter" } else { "learner" }.to_string(),
                match_index: seen.map(|(matched, _)| matched),
                last_contact_ms: seen.and_then(|(_, silence_ms)| silence_ms),
                raft: m.raft,
                client: m.client,
                public_key: m.public_key,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: NodeId) -> Member {
        let (raft, client) = (format!("tcp://127.0.0.1:{}", 7000 + id), format!("tcp://127.0.0.1:{}", 7100 + id));
        Member { id, raft, client, public_key: None }
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
        for (raft, why) in [
            ("tcp://127.0.0.1", "must be tcp://host:port"),
            ("tcp://:x", "host is empty"),
            ("tcp://a:x", "port must be a number in 1..=65535"),
            ("127.0.0.1:9", "must start with tcp://"),
            (
                "tcp://0.0.0.0:9",
                "a wildcard address cannot be connected to: advertise an address or name that peers and clients reach, and bind the wildcard with raft_listen / client_listen",
            ),
        ] {
            let bad = Member { raft: raft.into(), ..member(2) };
            assert_eq!(check_new_member(&members, &bad), Err(format!("`raft` endpoint {raft:?}: {why}")));
        }
        let bad_client = Member { client: "tcp://127.0.0.1".into(), ..member(2) };
        assert!(check_new_member(&members, &bad_client).unwrap_err().starts_with("`client` endpoint"));
    }
}
