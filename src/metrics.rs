//! The node's Prometheus metrics (CONTRACT.md "Observability"), served as
//! text on `/metrics`. A process runs one node, so they are process-wide, as
//! etcd's and TiKV's are: each thread records what it sees, with no wiring.
//! Every metric is documented in docs/running.md, "Monitoring".

use std::sync::LazyLock;
use std::time::Instant;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Latencies from 100 µs to about 13 s, doubling (fsyncs on a good SSD sit
/// at the bottom, a client write waiting out an election near the top).
fn seconds_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.0001, 2.0, 18).expect("valid buckets")
}

/// Batch sizes from 1 to 4,096 entries.
fn batch_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(1.0, 2.0, 13).expect("valid buckets")
}

pub struct Metrics {
    registry: Registry,
    pub term: IntGauge,
    pub is_leader: IntGauge,
    pub commit_index: IntGauge,
    pub applied_index: IntGauge,
    pub last_log_index: IntGauge,
    pub first_log_index: IntGauge,
    pub snapshot_index: IntGauge,
    /// By role: "voter" or "learner".
    pub members: IntGaugeVec,
    pub leader_changes: IntCounter,
    pub elections: IntCounter,
    pub proposals: IntCounter,
    pub client_requests: IntCounterVec,
    pub client_seconds: HistogramVec,
    pub fsync_seconds: Histogram,
    pub persist_entries: Histogram,
    pub apply_seconds: Histogram,
    pub apply_entries: Histogram,
    pub peer_seconds: HistogramVec,
    pub client_queue: IntGauge,
    pub apply_queue: IntGauge,
    pub snapshots: IntCounter,
    pub snapshot_seconds: Histogram,
    pub compactions: IntCounter,
    pub compaction_seconds: Histogram,
    pub disk_bytes: IntGauge,
    pub nospace: IntGauge,
    pub forged_messages: IntCounter,
    pub peer_rejects: IntCounterVec,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| {
            let gauge = IntGauge::new(name, help).expect("valid metric");
            registry.register(Box::new(gauge.clone())).expect("registered once");
            gauge
        };
        let counter = |name: &str, help: &str| {
            let counter = IntCounter::new(name, help).expect("valid metric");
            registry.register(Box::new(counter.clone())).expect("registered once");
            counter
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let histogram =
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid metric");
            registry.register(Box::new(histogram.clone())).expect("registered once");
            histogram
        };
        let histograms = |name: &str, help: &str, label: &str| {
            let opts = HistogramOpts::new(name, help).buckets(seconds_buckets());
            let histograms = HistogramVec::new(opts, &[label]).expect("valid metric");
            registry.register(Box::new(histograms.clone())).expect("registered once");
            histograms
        };
        let members =
            IntGaugeVec::new(Opts::new("raft_members", "Members in force, by role"), &["role"]).expect("valid metric");
        registry.register(Box::new(members.clone())).expect("registered once");
        let client_requests = IntCounterVec::new(
            Opts::new(
                "raft_client_requests_total",
                "Client requests answered, by op and result code (ok or an error code)",
            ),
            &["op", "code"],
        )
        .expect("valid metric");
        registry.register(Box::new(client_requests.clone())).expect("registered once");
        let peer_rejects = IntCounterVec::new(
            Opts::new(
                "raft_peer_messages_rejected_total",
                "Peer requests and replies dropped unread, by reason (e.g. protocol version mismatch)",
            ),
            &["reason"],
        )
        .expect("valid metric");
        registry.register(Box::new(peer_rejects.clone())).expect("registered once");
        let metrics = Metrics {
            term: gauge("raft_term", "Current term"),
            is_leader: gauge("raft_is_leader", "1 on the leader, 0 elsewhere"),
            commit_index: gauge("raft_commit_index", "Highest log index known to be committed"),
            applied_index: gauge("raft_applied_index", "Highest log index applied to the state machine"),
            last_log_index: gauge("raft_last_log_index", "Index of the last entry in the log"),
            first_log_index: gauge("raft_first_log_index", "Index of the oldest entry still in the log"),
            snapshot_index: gauge("raft_snapshot_index", "Last index covered by the newest snapshot (0: none)"),
            members,
            leader_changes: counter("raft_leader_changes_total", "Times this node saw a new leader"),
            elections: counter("raft_elections_started_total", "Elections this node started as a candidate"),
            proposals: counter("raft_proposals_total", "Entries this node proposed as leader"),
            client_requests,
            client_seconds: histograms(
                "raft_client_request_seconds",
                "Client request latency, from arrival to reply, by op",
                "op",
            ),
            fsync_seconds: histogram(
                "raft_fsync_seconds",
                "Duration of one durable sync of the state dir",
                seconds_buckets(),
            ),
            persist_entries: histogram("raft_persist_batch_entries", "Entries written per sync", batch_buckets()),
            apply_seconds: histogram(
                "raft_apply_seconds",
                "Duration of applying one batch of entries",
                seconds_buckets(),
            ),
            apply_entries: histogram("raft_apply_batch_entries", "Entries applied per batch", batch_buckets()),
            peer_seconds: histograms(
                "raft_peer_round_trip_seconds",
                "Round trip of one AppendEntries (or other request) to a peer, by peer id, queueing behind the ones out included",
                "peer",
            ),
            client_queue: gauge("raft_client_queue_requests", "Client requests waiting for the core loop"),
            apply_queue: gauge("raft_apply_queue_batches", "Batches of applied entries waiting for the log mirror"),
            snapshots: counter("raft_snapshots_total", "Snapshots of the state machine taken"),
            snapshot_seconds: histogram("raft_snapshot_seconds", "Duration of taking one snapshot", seconds_buckets()),
            compactions: counter("raft_compactions_total", "Log compactions after a snapshot"),
            compaction_seconds: histogram(
                "raft_compaction_seconds",
                "Duration of one log compaction",
                seconds_buckets(),
            ),
            disk_bytes: gauge("raft_disk_bytes", "Bytes the state dir takes on disk"),
            nospace: gauge("raft_alarm_nospace", "1 while the nospace alarm is raised"),
            forged_messages: counter(
                "raft_peer_forged_messages_total",
                "Peer messages dropped because their sender is not the node whose key made the connection",
            ),
            peer_rejects,
            registry,
        };
        // Every op's series exist from the start, so that a scrape of an
        // idle node has them (Prometheus leaves out a family with none).
        for op in crate::wire::protocol::Request::OPS {
            metrics.client_requests.with_label_values(&[op, "ok"]);
            metrics.client_seconds.with_label_values(&[op]);
        }
        metrics
    }

    /// The text `/metrics` serves.
    pub fn render(&self) -> String {
        TextEncoder::new().encode_to_string(&self.registry.gather()).unwrap_or_else(|e| format!("# error: {e}\n"))
    }
}

/// Seconds since `started`, for a histogram.
pub fn seconds_since(started: Instant) -> f64 {
    started.elapsed().as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contract_metrics_are_rendered() {
        let idle = METRICS.render();
        assert!(idle.contains("raft_client_requests_total{code=\"ok\",op=\"transfer_leader\"} 0"), "{idle}");
        assert!(idle.contains("raft_client_request_seconds_count{op=\"transfer_leader\"} 0"), "{idle}");
        METRICS.term.set(7);
        METRICS.client_requests.with_label_values(&["put", "ok"]).inc();
        METRICS.client_seconds.with_label_values(&["put"]).observe(0.002);
        METRICS.fsync_seconds.observe(0.001);
        let text = METRICS.render();
        for needle in [
            "raft_term 7",
            "raft_is_leader 0",
            "raft_commit_index",
            "raft_applied_index",
            "raft_client_requests_total{code=\"ok\",op=\"put\"} 1",
            "raft_client_request_seconds_bucket{op=\"put\",le=",
            "raft_fsync_seconds_bucket{le=",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
    }
}
