//! The node's HTTP endpoint (CONTRACT.md "Observability"): `/metrics`,
//! `/health`, `/status`, `/cluster` and the live web view at `/`.
//!
//! It is a client of the cluster like any other: `/status` and `/cluster`
//! ask each member's client endpoint, so they show what clients see, and the
//! core loop is never blocked by a slow browser. tiny_http is a small,
//! blocking server: a few OS threads, like the rest of the node, and no
//! async runtime to pull in.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{debug, warn};
use serde_json::{Value as Json, json};
use tiny_http::{Header, Method, Response, Server};

use super::disk::dir_bytes;
use crate::config::Member;
use crate::metrics::METRICS;
use crate::protocol::{LogEntryView, Reply, Request, StatusInfo};
use crate::raft::NodeId;
use crate::security::NodeSecurity;
use crate::tools::client::Client;

/// The web view: one page, no build step, nothing loaded from outside.
const WEB_VIEW: &str = include_str!("web_view.html");

/// Requests served at once: a scrape, a browser and a health probe never
/// wait for each other, and `/cluster` waits out a dead member.
const WORKERS: usize = 4;

/// How long `/cluster` waits for a member's reply: a dead one shows as down
/// well within the 3 s the contract allows, and the page, polling every
/// 500 ms, still refreshes more than once a second.
const MEMBER_TIMEOUT: Duration = Duration::from_millis(500);

/// How long `/status` and `/health` wait for this node's own reply.
const OWN_TIMEOUT: Duration = Duration::from_secs(2);

/// Most log entries per member `/cluster?log=N` shows.
const MAX_LOG_ENTRIES: u64 = 50;

pub struct HttpConfig {
    pub id: NodeId,
    pub listen: String,
    /// This node's client endpoint, which `/status` and `/health` ask.
    pub client: String,
    pub state_dir: PathBuf,
    /// A follower that has not heard from its leader for this long is not
    /// healthy: the leader may be gone (the maximum election timeout).
    pub leader_silence: Duration,
    pub security: Arc<NodeSecurity>,
}

/// The members in force, as the node knows them now.
pub type MembersFn = Arc<dyn Fn() -> Vec<Member> + Send + Sync>;

pub struct HttpServer {
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
}

impl HttpServer {
    /// Binds `config.listen` and serves until [`HttpServer::stop`].
    pub fn start(ctx: &zmq::Context, config: HttpConfig, members: MembersFn) -> Result<HttpServer, String> {
        let server =
            Server::http(&config.listen).map_err(|e| format!("cannot serve HTTP on {}: {e}", config.listen))?;
        let (server, stop) = (Arc::new(server), Arc::new(AtomicBool::new(false)));
        let site = Arc::new(Site { ctx: ctx.clone(), config, members });
        let workers = (0..WORKERS)
            .map(|n| {
                let (server, stop, site) = (server.clone(), stop.clone(), site.clone());
                thread::Builder::new().name(format!("http-{n}")).spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        match server.recv_timeout(Duration::from_millis(200)) {
                            Ok(Some(request)) => site.serve(request),
                            Ok(None) => {}
                            Err(e) => warn!("HTTP: {e}"),
                        }
                    }
                })
            })
            .collect::<Result<_, _>>()
            .map_err(|e| format!("cannot start the HTTP threads: {e}"))?;
        Ok(HttpServer { stop, workers })
    }

    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        for worker in self.workers {
            let _ = worker.join();
        }
    }
}

struct Site {
    ctx: zmq::Context,
    config: HttpConfig,
    members: MembersFn,
}

/// What one path answers: status code, content type, body.
type Page = (u16, &'static str, String);

const JSON: &str = "application/json";

impl Site {
    fn serve(&self, request: tiny_http::Request) {
        let url = request.url().to_owned();
        let (path, query) = url.split_once('?').unwrap_or((&url, ""));
        let (status, content_type, body) = match (request.method(), path) {
            (Method::Get | Method::Head, "/") => (200, "text/html; charset=utf-8", WEB_VIEW.to_owned()),
            (Method::Get | Method::Head, "/metrics") => self.metrics(),
            (Method::Get | Method::Head, "/health") => self.health(),
            (Method::Get | Method::Head, "/status") => self.status(),
            (Method::Get | Method::Head, "/cluster") => self.cluster(log_entries_asked(query)),
            (Method::Get | Method::Head, _) => (404, "text/plain", format!("no page {path}\n")),
            _ => (405, "text/plain", "only GET and HEAD\n".to_owned()),
        };
        let header = Header::from_bytes("Content-Type", content_type).expect("a valid header");
        let no_cache = Header::from_bytes("Cache-Control", "no-store").expect("a valid header");
        let response = Response::from_string(body).with_status_code(status).with_header(header).with_header(no_cache);
        if let Err(e) = request.respond(response) {
            debug!("HTTP client went away: {e}");
        }
    }

    fn metrics(&self) -> Page {
        METRICS.disk_bytes.set(dir_bytes(&self.config.state_dir) as i64);
        (200, "text/plain; version=0.0.4", METRICS.render())
    }

    /// 200 when this node knows a leader that hears from a majority and has
    /// applied all it knows to be committed (as etcd's `/health`).
    fn health(&self) -> Page {
        let verdict = self.ask_self(&Request::Status).and_then(|reply| match reply {
            Reply::Status(status) => healthy(&status, self.config.leader_silence),
            other => Err(format!("unexpected reply {other:?}")),
        });
        match verdict {
            Ok(()) => (200, JSON, json!({"health": "true", "reason": ""}).to_string()),
            Err(reason) => (503, JSON, json!({"health": "false", "reason": reason}).to_string()),
        }
    }

    fn status(&self) -> Page {
        match self.ask_self(&Request::Status) {
            Ok(Reply::Status(status)) => (200, JSON, json!(status).to_string()),
            Ok(other) => (502, JSON, json!({"id": self.config.id, "error": format!("{other:?}")}).to_string()),
            Err(error) => (503, JSON, json!({"id": self.config.id, "error": error}).to_string()),
        }
    }

    /// Every member's status, asked all at once, with its last `log`
    /// committed entries when asked for.
    fn cluster(&self, log: u64) -> Page {
        let members = (self.members)();
        let views: Vec<Json> = thread::scope(|scope| {
            let asks: Vec<_> = members.iter().map(|m| scope.spawn(move || self.member_view(m, log))).collect();
            asks.into_iter().map(|ask| ask.join().expect("asking a member does not panic")).collect()
        });
        (200, JSON, Json::Array(views).to_string())
    }

    fn member_view(&self, member: &Member, log: u64) -> Json {
        let status = match self.ask(member.id, &member.client, &Request::Status, MEMBER_TIMEOUT) {
            Ok(Reply::Status(status)) => status,
            Ok(other) => return json!({"id": member.id, "client": member.client, "error": format!("{other:?}")}),
            Err(error) => return json!({"id": member.id, "client": member.client, "error": error}),
        };
        let mut view = json!(status);
        view["client"] = json!(member.client);
        if log > 0 {
            let from = status.last_applied.saturating_sub(log - 1).max(status.first_log_index).max(1);
            let entries: Vec<LogEntryView> =
                match self.ask(member.id, &member.client, &Request::Log { from, limit: log }, MEMBER_TIMEOUT) {
                    Ok(Reply::Log { entries }) => entries,
                    _ => Vec::new(),
                };
            view["log"] = json!(entries);
        }
        view
    }

    fn ask_self(&self, request: &Request) -> Result<Reply, String> {
        self.ask(self.config.id, &self.config.client, request, OWN_TIMEOUT)
    }

    /// One request to member `id`, as a client (with this node's key pair
    /// under CURVE, which every client endpoint lets in).
    fn ask(&self, id: NodeId, endpoint: &str, request: &Request, timeout: Duration) -> Result<Reply, String> {
        let mut client = Client::new(&self.ctx, endpoint, timeout).with_curve(self.config.security.client_curve(id));
        match client.call(request) {
            Ok(Reply::Error { message, .. }) => Err(message),
            Ok(reply) => Ok(reply),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// `log=N` from a query string, capped; 0 when absent or unreadable.
fn log_entries_asked(query: &str) -> u64 {
    let asked = query.split('&').find_map(|pair| pair.strip_prefix("log=")).and_then(|n| n.parse().ok());
    asked.unwrap_or(0).min(MAX_LOG_ENTRIES)
}

fn healthy(status: &StatusInfo, leader_silence: Duration) -> Result<(), String> {
    let Some(leader) = status.leader else { return Err("no leader known".into()) };
    if let Some(alarm) = status.alarms.first() {
        return Err(format!("alarm {alarm} raised"));
    }
    match status.leader_contact_ms {
        Some(ms) if u128::from(ms) <= leader_silence.as_millis() => {}
        Some(ms) => return Err(format!("not heard from leader {leader} for {ms} ms")),
        None => return Err(format!("never heard from leader {leader}")),
    }
    if status.last_applied < status.commit_index {
        return Err(format!("applied {} of {} committed entries", status.last_applied, status.commit_index));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> StatusInfo {
        StatusInfo::sample(1)
    }

    #[test]
    fn health_needs_a_leader_heard_lately_and_everything_committed_applied() {
        let silence = Duration::from_millis(600);
        assert_eq!(healthy(&status(), silence), Ok(()));
        assert_eq!(healthy(&StatusInfo { leader: None, ..status() }, silence), Err("no leader known".into()));
        let stale = StatusInfo { leader_contact_ms: Some(601), ..status() };
        assert_eq!(healthy(&stale, silence), Err("not heard from leader 0 for 601 ms".into()));
        let behind = StatusInfo { last_applied: 9, ..status() };
        assert_eq!(healthy(&behind, silence), Err("applied 9 of 10 committed entries".into()));
        let full = StatusInfo { alarms: vec!["nospace".into()], ..status() };
        assert_eq!(healthy(&full, silence), Err("alarm nospace raised".into()));
    }

    #[test]
    fn log_query_is_read_and_capped() {
        assert_eq!(log_entries_asked(""), 0);
        assert_eq!(log_entries_asked("log=8"), 8);
        assert_eq!(log_entries_asked("x=1&log=3"), 3);
        assert_eq!(log_entries_asked("log=100000"), MAX_LOG_ENTRIES);
        assert_eq!(log_entries_asked("log=-1"), 0);
    }
}
