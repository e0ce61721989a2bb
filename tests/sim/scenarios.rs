//! Known-nasty situations, set up explicitly (durable logs written by hand,
//! scripted partitions and crashes) and then run under the same checks as
//! the random schedules.

use raft_zmq::raft::{Entry, HardState, Index, NodeId, Payload, Role, Term};

use super::cluster::{Clients, Cluster, Params};
use super::faults::{NodeSet, Partition};
use super::history::{OpKind, Outcome};
use super::random_run::LIVENESS_BOUND;
use super::rng::Rng;
use super::schedule::{MS, Time};
use super::storage::Disk;

/// A durable log with entries of the given terms. Only their positions
/// matter, so they carry no command.
fn log(terms: &[Term]) -> Vec<Entry> {
    let entry = |(i, &term)| Entry { index: i as Index + 1, term, payload: Payload::Noop };
    terms.iter().enumerate().map(entry).collect()
}

/// The disk of a node of a cluster of voters 1 to `n`.
fn disk(n: u64, term: Term, vote: Option<NodeId>, terms: &[Term]) -> Disk {
    Disk::with(n, HardState { term, vote, commit: 0 }, &log(terms))
}

fn cluster(name: &str, seed: u64, params: Params, disks: Vec<Disk>) -> Cluster {
    let rerun = format!("cargo test --release --test simulation {name}   (scenario seed {seed})");
    Cluster::new(Rng::new(seed), params, disks, rerun)
}

fn elect_someone(c: &mut Cluster) -> NodeId {
    assert!(c.run_until(c.now() + 2_000 * MS, |c| c.leader().is_some()), "no leader in a calm cluster");
    c.leader().expect("just checked")
}

fn term_of(c: &Cluster, id: NodeId) -> Term {
    c.raft(id).soft_state().term
}

#[test]
fn figure_7_leader_repairs_followers_of_every_shape() {
    // Raft paper Figure 7: when the leader of term 8 comes to power, its
    // followers may miss entries (a, b), hold extra uncommitted ones (c, d),
    // or both (e, f). All seven must end up with the leader's log.
    let leader: &[Term] = &[1, 1, 1, 4, 4, 5, 5, 6, 6, 6];
    let followers: [&[Term]; 6] = [
        &[1, 1, 1, 4, 4, 5, 5, 6, 6],
        &[1, 1, 1, 4],
        &[1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 6],
        &[1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7],
        &[1, 1, 1, 4, 4, 4, 4],
        &[1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3],
    ];
    let disks = [leader].iter().chain(&followers).map(|terms| disk(7, 7, None, terms)).collect();
    let mut c = cluster("figure_7", 7, Params::calm(7, true, true), disks);
    c.expire_election_timer(1);
    assert_eq!(elect_someone(&mut c), 1);
    assert_eq!(term_of(&c, 1), 8);
    c.set_clients(Clients::Leaders);
    c.run_for(1_000 * MS);
    c.await_liveness(LIVENESS_BOUND);
    // Quiet, so that the last writes are replicated and synced everywhere.
    c.set_clients(Clients::Off);
    c.run_for(100 * MS);
    let repaired = &c.node(1).disk().entries();
    assert!(repaired.len() > leader.len());
    assert_eq!(repaired[..leader.len()], log(leader)[..], "the leader kept its own log");
    for id in 2..=7 {
        assert_eq!(&c.node(id).disk().entries(), repaired, "follower {id} was not repaired");
    }
}

#[test]
fn figure_8_old_term_entries_survive_only_if_committed_properly() {
    // Raft paper Figure 8 (b): S1 led term 2 and got entry 2 onto S2; S5 won
    // term 3 with the votes of S3 and S4 and wrote its own entry 2. Now S1
    // wins term 4 and re-replicates its entry 2 one entry per message. If
    // it counted replicas of that term-2 entry toward commit, crashing it at
    // the wrong moment would let S5 win and overwrite a committed entry.
    // Each seed crashes S1 at a different moment, then injects random faults.
    for seed in 0..300 {
        let disks = vec![
            disk(5, 3, None, &[1, 2]),
            disk(5, 2, Some(1), &[1, 2]),
            disk(5, 3, Some(5), &[1]),
            disk(5, 3, Some(5), &[1]),
            disk(5, 3, Some(5), &[1, 3]),
        ];
        let params = Params { max_append_bytes: 1, fault_gap: (50 * MS, 500 * MS), ..Params::calm(5, false, false) };
        let mut c = cluster("figure_8", seed, params, disks);
        c.expire_election_timer(1);
        c.run_for(seed % 40 * MS);
        c.crash(1);
        c.set_clients(Clients::Leaders);
        c.start_chaos(2_000 * MS);
        c.run_for(2_000 * MS);
        c.heal_all();
        c.await_liveness(LIVENESS_BOUND);
    }
}

/// A follower cut off for many election timeouts rejoins. Returns the
/// leader and term before the cut and after the rejoin.
fn rejoin_after_partition(pre_vote: bool) -> ((NodeId, Term), (NodeId, Term)) {
    let mut c = cluster("partitioned_node_rejoins", 1, Params::calm(3, pre_vote, true), vec![Disk::bootstrap(3); 3]);
    c.set_clients(Clients::Leaders);
    let leader = elect_someone(&mut c);
    let term = term_of(&c, leader);
    let loner = if leader == 1 { 2 } else { 1 };
    c.partition(Partition::Split(NodeSet::of(&[loner])));
    c.run_for(2_000 * MS);
    let loner_term = term_of(&c, loner);
    if pre_vote {
        assert_eq!(loner_term, term, "pre-votes must not raise the loner's term");
    } else {
        assert!(loner_term > term + 5, "the loner campaigned in vain (term {loner_term})");
    }
    c.heal_network();
    c.run_for(1_000 * MS);
    c.await_liveness(LIVENESS_BOUND);
    let after = elect_someone(&mut c);
    ((leader, term), (after, term_of(&c, after)))
}

#[test]
fn partitioned_node_rejoins_without_disrupting_the_leader_with_pre_vote() {
    let (before, after) = rejoin_after_partition(true);
    assert_eq!(before, after, "the rejoining node deposed a healthy leader");
}

#[test]
fn partitioned_node_rejoins_with_a_higher_term_without_pre_vote() {
    let ((_, term_before), (_, term_after)) = rejoin_after_partition(false);
    assert!(term_after > term_before + 5, "the loner's higher term must have taken over");
}

#[test]
fn leader_isolated_from_the_majority_while_clients_still_reach_it() {
    let mut c = cluster("isolated_leader", 3, Params::calm(5, true, true), vec![Disk::bootstrap(5); 5]);
    c.set_clients(Clients::Leaders);
    let old = elect_someone(&mut c);
    let old_term = term_of(&c, old);
    c.run_for(300 * MS);
    c.partition(Partition::IsolateLeader(old));
    c.set_clients(Clients::Stuck(old));
    let cut = c.now();
    let stepped_down = |c: &Cluster| c.raft(old).soft_state().role != Role::Leader;
    // CheckQuorum notices after one to two minimum election timeouts.
    assert!(c.run_until(cut + 400 * MS, stepped_down), "the isolated leader never stepped down");
    let step_down: Time = c.now();
    c.run_for(1_000 * MS);
    let new = c.leader().expect("the majority elected a new leader");
    assert!(new != old && term_of(&c, new) > old_term);
    c.heal_network();
    c.set_clients(Clients::Leaders);
    c.await_liveness(LIVENESS_BOUND);
    let isolated: Vec<_> = c.history().ops().iter().filter(|op| op.node == old && op.invoked >= cut).collect();
    assert!(isolated.iter().any(|op| op.invoked < step_down), "clients reached the isolated leader");
    for op in isolated {
        assert!(
            matches!(op.outcome, Outcome::Failed | Outcome::Pending),
            "the isolated leader answered {:?} with {:?}",
            op.kind,
            op.outcome
        );
    }
    assert!(
        c.history().ops().iter().any(|op| matches!(op.kind, OpKind::Read(_)) && op.node == old && op.invoked >= cut)
    );
}

/// A new leader that gets only reads must still serve them: it commits an
/// entry of its own term (the no-op) to learn the commit index (§6.4, and
/// the "leader appends no no-op" row, which clients that write all
/// the time hide).
#[test]
fn a_new_leader_serves_reads_when_no_client_writes() {
    let mut c =
        cluster("reads_only_after_a_leader_change", 4, Params::calm(3, true, true), vec![Disk::bootstrap(3); 3]);
    c.set_clients(Clients::Leaders);
    let old = elect_someone(&mut c);
    c.run_for(500 * MS);
    c.set_clients(Clients::Off);
    c.crash(old);
    let new = elect_someone(&mut c);
    assert_ne!(new, old);
    let read = c.submit(new, OpKind::Read('a'));
    let served = |c: &Cluster| matches!(c.history().ops()[read as usize].outcome, Outcome::Read(_));
    assert!(c.run_until(c.now() + 1_000 * MS, served), "the new leader never served a read");
}
