//! The node's HTTP endpoint (CONTRACT.md "Observability"): `/metrics`,
//! `/health`, `/status`, `/cluster` and the live web view at `/`.
//!
//! `/status` and `/health` read the status the core loop publishes on every
//! tick, so they cost the core nothing. `/cluster` asks every member's
//! client endpoint, as any client would, all at once.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use serde_json::{Value as Json, json};

use super::Shared;
use super::disk::dir_bytes;
use crate::client::Client;
use crate::config::Member;
use crate::http_server::{HttpRequest, Limits, Response, Server};
use crate::lock;
use crate::metrics::METRICS;
use crate::net::security::NodeSecurity;
use crate::wire::protocol::{LogEntryView, Reply, Request, StatusInfo};

/// The web view: one page, no build step, nothing loaded from outside.
const WEB_VIEW: &str = include_str!("web_view.html");

/// How long `/cluster` waits for a member's reply: a dead one shows as down
/// well within the 3 s the contract allows, and the page, polling every
/// 500 ms, still refreshes more than once a second.
const MEMBER_TIMEOUT: Duration = Duration::from_millis(500);

/// Most log entries per member `/cluster?log=N` shows.
const MAX_LOG_ENTRIES: u64 = 50;

pub struct HttpConfig {
    pub listen: String,
    pub state_dir: PathBuf,
    /// A node that has not heard from its leader (a leader: from a
    /// majority) for this long is not healthy: the maximum election timeout.
    pub leader_silence: Duration,
    pub security: Arc<NodeSecurity>,
    /// `client_keys` is set: keys and values are for those clients only, so
    /// no page shows any (CONTRACT.md "Security", HTTP).
    pub hide_data: bool,
}

/// Serves until dropped.
pub struct HttpServer {
    _server: Server,
}

impl HttpServer {
    pub fn start(ctx: &zmq::Context, config: HttpConfig, shared: Arc<Shared>) -> Result<HttpServer, String> {
        let listen = config.listen.clone();
        let site = Site { ctx: ctx.clone(), config, shared };
        let server =
            Server::start(&listen, Limits::DEFAULT, Arc::new(move |request: &HttpRequest| site.serve(request)))
                .map_err(|e| format!("cannot serve HTTP on {listen}: {e}"))?;
        Ok(HttpServer { _server: server })
    }
}

struct Site {
    ctx: zmq::Context,
    config: HttpConfig,
    shared: Arc<Shared>,
}

const JSON: &str = "application/json";

impl Site {
    fn serve(&self, request: &HttpRequest) -> Response {
        match request.path.as_str() {
            "/" => Response::new(200, "text/html; charset=utf-8", WEB_VIEW.to_owned()),
            "/metrics" => self.metrics(),
            "/health" => self.health(),
            "/status" => self.status(),
            "/cluster" => self.cluster(log_entries_asked(&request.query)),
            path => Response::new(404, "text/plain", format!("no page {path}\n")),
        }
    }

    fn metrics(&self) -> Response {
        METRICS.disk_bytes.set(dir_bytes(&self.config.state_dir) as i64);
        Response::new(200, "text/plain; version=0.0.4", METRICS.render())
    }

    fn own_status(&self) -> Option<StatusInfo> {
        lock(&self.shared.status).clone()
    }

    /// 200 when this node knows a leader that hears from a majority and has
    /// applied all it knows to be committed (as etcd's `/health`).
    fn health(&self) -> Response {
        let verdict = match self.own_status() {
            Some(status) => healthy(&status, self.config.leader_silence),
            None => Err("starting".to_string()),
        };
        match verdict {
            Ok(()) => Response::new(200, JSON, json!({"health": "true", "reason": ""}).to_string()),
            Err(reason) => Response::new(503, JSON, json!({"health": "false", "reason": reason}).to_string()),
        }
    }

    /// The `status` reply, as JSON.
    fn status(&self) -> Response {
        match self.own_status() {
            Some(status) => {
                let mut reply = json!(status);
                reply["ok"] = json!(true);
                Response::new(200, JSON, reply.to_string())
            }
            None => Response::new(503, JSON, json!({"ok": false, "error": "starting"}).to_string()),
        }
    }

    /// Every member's status, asked all at once, with its last `log`
    /// committed entries when asked for.
    fn cluster(&self, log: u64) -> Response {
        let members = lock(&self.shared.members).clone();
        let views: Vec<Json> = thread::scope(|scope| {
            let asks: Vec<_> = members.iter().map(|m| scope.spawn(move || self.member_view(m, log))).collect();
            asks.into_iter().map(|ask| ask.join().expect("asking a member does not panic")).collect()
        });
        Response::new(200, JSON, Json::Array(views).to_string())
    }

    fn member_view(&self, member: &Member, log: u64) -> Json {
        let status = match self.ask(member, &Request::Status) {
            Ok(Reply::Status(status)) => status,
            Ok(other) => return json!({"id": member.id, "client": member.client, "error": format!("{other:?}")}),
            Err(error) => return json!({"id": member.id, "client": member.client, "error": error}),
        };
        let mut view = json!(status);
        view["client"] = json!(member.client);
        if log > 0 {
            let from = status.last_applied.saturating_sub(log - 1).max(status.first_log_index).max(1);
            let entries: Vec<LogEntryView> = match self.ask(member, &Request::Log { from, limit: log }) {
                Ok(Reply::Log { entries }) => entries,
                _ => Vec::new(),
            };
            let entries: Vec<Json> = entries.iter().map(|e| entry_view(e, self.config.hide_data)).collect();
            view["log"] = Json::Array(entries);
        }
        view
    }

    /// One request to `member`, as a client (with this node's key pair
    /// under CURVE, which every client endpoint lets in).
    fn ask(&self, member: &Member, request: &Request) -> Result<Reply, String> {
        let curve = self.config.security.client_curve(member.id);
        let mut client = Client::new(&self.ctx, &member.client, MEMBER_TIMEOUT).with_curve(curve);
        match client.call(request) {
            Ok(Reply::Error { message, .. }) => Err(message),
            Ok(reply) => Ok(reply),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// What `/cluster?log=N` shows of an entry: all of it, or only its index,
/// term and op when keys and values must not be shown.
fn entry_view(entry: &LogEntryView, hide_data: bool) -> Json {
    if !hide_data {
        return json!(entry);
    }
    let command: Json = serde_json::from_str(&entry.command).unwrap_or_default();
    json!({"index": entry.index, "term": entry.term, "op": command["op"]})
}

/// `log=N` from a query string, capped; 0 when absent or unreadable.
fn log_entries_asked(query: &str) -> u64 {
    let asked = query.split('&').find_map(|pair| pair.strip_prefix("log=")).and_then(|n| n.parse().ok());
    asked.unwrap_or(0).min(MAX_LOG_ENTRIES)
}

/// The leader's `leader_contact_ms` is how long ago it last heard from a
/// majority, so a leader cut off from it is unhealthy before CheckQuorum
/// deposes it.
fn healthy(status: &StatusInfo, leader_silence: Duration) -> Result<(), String> {
    let Some(leader) = status.leader else { return Err("no leader known".into()) };
    let whom = if leader == status.id { "a majority".to_string() } else { format!("leader {leader}") };
    match status.leader_contact_ms {
        Some(ms) if u128::from(ms) <= leader_silence.as_millis() => {}
        Some(ms) => return Err(format!("not heard from {whom} for {ms} ms")),
        None => return Err(format!("never heard from {whom}")),
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
        let cut_off = StatusInfo { id: 0, role: "leader".into(), leader_contact_ms: Some(900), ..status() };
        assert_eq!(healthy(&cut_off, silence), Err("not heard from a majority for 900 ms".into()));
    }

    #[test]
    fn entries_show_only_index_term_and_op_when_data_is_hidden() {
        let command = r#"{"op":"put","key":"secret-key","value":"secret-value"}"#;
        let entry = LogEntryView { index: 7, term: 2, command: command.into() };
        assert_eq!(entry_view(&entry, false), json!({"index": 7, "term": 2, "command": command}));
        assert_eq!(entry_view(&entry, true), json!({"index": 7, "term": 2, "op": "put"}));
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
