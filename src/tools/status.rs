//! `raft-zmq status`: every member's status at once, one row per node, like
//! `etcdctl endpoint status -w table`. An unreachable node is a row that
//! says so; the exit status tells whether every node answered.

use std::thread;
use std::time::Duration;

use serde_json::{Value as Json, json};

use super::client::ClientKeys;
use crate::client::Client;
use crate::config::Config;
use crate::keys::PublicKey;
use crate::net::security::ClientCurve;
use crate::raft::NodeId;
use crate::wire::protocol::{MemberInfo, Reply, Request, StatusInfo};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// A node to ask: its client endpoint, its id when the config names it, and
/// its CURVE key when the membership gave it (a member added at run time).
#[derive(Clone, Debug)]
pub struct Target {
    pub id: Option<NodeId>,
    pub endpoint: String,
    pub public_key: Option<PublicKey>,
}

impl Target {
    pub fn at(endpoint: String) -> Target {
        Target { id: None, endpoint, public_key: None }
    }

    /// A member as the `members` reply lists it.
    pub fn member(m: &MemberInfo) -> Target {
        let public_key = m.public_key.as_deref().and_then(|key| PublicKey::parse(key).ok());
        Target { id: Some(m.id), endpoint: m.client.clone(), public_key }
    }
}

/// How a tool sets up CURVE towards a target (`None`: plaintext).
pub type CurveFor = dyn Fn(&Target) -> Option<ClientCurve>;

/// One row: what a node answered, or why it did not.
pub struct Row {
    pub target: Target,
    pub status: Result<StatusInfo, String>,
}

/// The config's nodes.
pub fn targets_of(config: &Config) -> Vec<Target> {
    config.nodes.iter().map(|m| Target { id: Some(m.id), endpoint: m.client.clone(), public_key: None }).collect()
}

/// `--endpoints a,b,c`.
pub fn targets_from_list(list: &str) -> Vec<Target> {
    list.split(',').map(str::trim).filter(|e| !e.is_empty()).map(|e| Target::at(e.into())).collect()
}

/// Asks every target at once, then any member they report that was not
/// asked (one added at run time), so the rows cover the whole cluster. A
/// target that did not answer and is not a member (an entry of the config
/// that was removed) is left out. `curve` gives the CURVE setup towards a
/// node.
pub fn ask_all(targets: Vec<Target>, curve: &CurveFor, timeout: Duration) -> Vec<Row> {
    let ctx = zmq::Context::new();
    let mut rows = ask(&ctx, targets, curve, timeout);
    let first = rows.iter().find(|r| r.status.is_ok()).map(|r| r.target.clone());
    let members = first.and_then(|first| {
        let mut client = Client::new(&ctx, &first.endpoint, timeout).with_curve(curve(&first));
        match client.call(&Request::Members) {
            Ok(Reply::Members { members }) => Some(members),
            _ => None,
        }
    });
    if let Some(members) = members {
        rows.retain(|row| row.status.is_ok() || row.target.id.is_none_or(|id| members.iter().any(|m| m.id == id)));
        let asked = |m: &MemberInfo| {
            rows.iter().any(|r| r.target.endpoint == m.client || r.status.as_ref().is_ok_and(|s| s.id == m.id))
        };
        let extra: Vec<Target> = members.iter().filter(|m| !asked(m)).map(Target::member).collect();
        rows.extend(ask(&ctx, extra, curve, timeout));
    }
    rows.sort_by_key(|row| row.status.as_ref().ok().map(|s| s.id).or(row.target.id));
    rows
}

/// The leader among the answers: the one in the highest term, should a
/// deposed one not know yet.
pub fn leader_of(rows: &[Row]) -> Option<&StatusInfo> {
    rows.iter().filter_map(|r| r.status.as_ref().ok()).filter(|s| s.role == "leader").max_by_key(|s| s.term)
}

fn ask(ctx: &zmq::Context, targets: Vec<Target>, curve: &CurveFor, timeout: Duration) -> Vec<Row> {
    thread::scope(|scope| {
        let asks: Vec<_> = targets
            .into_iter()
            .map(|target| {
                let mut client = Client::new(ctx, &target.endpoint, timeout).with_curve(curve(&target));
                scope.spawn(move || {
                    let status = match client.call(&Request::Status) {
                        Ok(Reply::Status(status)) => Ok(*status),
                        Ok(Reply::Error { message, .. }) => Err(message),
                        Ok(other) => Err(format!("unexpected reply {other:?}")),
                        Err(e) => Err(e.to_string()),
                    };
                    Row { target, status }
                })
            })
            .collect();
        asks.into_iter().map(|ask| ask.join().expect("a status request does not panic")).collect()
    })
}

/// CURVE towards each node as `raft-zmq client` sets it up: the node's key
/// from the config (or, for a member added at run time, from the
/// membership), unless --server-key says otherwise.
pub fn curve_for(config: Option<&Config>, keys: ClientKeys) -> impl Fn(&Target) -> Option<ClientCurve> + 'static {
    let node_keys = config.and_then(|c| c.curve.as_ref()).map(|c| c.node_keys.clone()).unwrap_or_default();
    move |target| keys.towards(target.public_key.or_else(|| node_keys.get(&target.id?).copied()))
}

/// How far each node's applied index trails the leader's commit index (or
/// the highest commit index seen, with no leader among the answers).
fn lag(rows: &[Row], status: &StatusInfo) -> u64 {
    let answers = || rows.iter().filter_map(|r| r.status.as_ref().ok());
    let leader = leader_of(rows).map(|s| s.commit_index);
    let commit = leader.unwrap_or_else(|| answers().map(|s| s.commit_index).max().unwrap_or(0));
    commit.saturating_sub(status.last_applied)
}

pub fn render(rows: &[Row], format: Format) -> String {
    match format {
        Format::Json => {
            let list: Vec<Json> = rows
                .iter()
                .map(|row| match &row.status {
                    Ok(status) => {
                        let mut view = json!(status);
                        view["endpoint"] = json!(row.target.endpoint);
                        view["lag"] = json!(lag(rows, status));
                        view
                    }
                    Err(error) => json!({"id": row.target.id, "endpoint": row.target.endpoint, "error": error}),
                })
                .collect();
            format!("{}\n", Json::Array(list))
        }
        Format::Table => table(rows),
    }
}

const HEADER: [&str; 15] = [
    "ID",
    "ENDPOINT",
    "ROLE",
    "TERM",
    "LEADER",
    "COMMIT",
    "APPLIED",
    "LAST LOG",
    "FIRST LOG",
    "SNAPSHOT",
    "LAG",
    "SIZE",
    "CONTACT",
    "ALARMS",
    "ERROR",
];

fn table(rows: &[Row]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            let id = |id: Option<NodeId>| id.map_or("?".to_string(), |id| id.to_string());
            match &row.status {
                Ok(s) => vec![
                    s.id.to_string(),
                    row.target.endpoint.clone(),
                    s.role.clone(),
                    s.term.to_string(),
                    s.leader.map_or("none".into(), |l| l.to_string()),
                    s.commit_index.to_string(),
                    s.last_applied.to_string(),
                    s.last_log_index.to_string(),
                    s.first_log_index.to_string(),
                    s.snapshot_index.to_string(),
                    lag(rows, s).to_string(),
                    human_bytes(s.state_bytes),
                    s.leader_contact_ms.map_or("-".into(), |ms| format!("{ms} ms")),
                    s.alarms.join(","),
                    String::new(),
                ],
                Err(error) => {
                    let mut cells = vec![id(row.target.id), row.target.endpoint.clone(), "unreachable".into()];
                    cells.resize(HEADER.len() - 1, String::new());
                    cells.push(error.clone());
                    cells
                }
            }
        })
        .collect();
    let widths: Vec<usize> = (0..HEADER.len())
        .map(|col| cells.iter().map(|row| row[col].len()).chain([HEADER[col].len()]).max().unwrap_or(0))
        .collect();
    let line = |row: &[String]| {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, &w)| format!(" {cell:<w$} ")).collect();
        format!("|{}|\n", cells.join("|"))
    };
    let border = format!("+{}+\n", widths.iter().map(|&w| "-".repeat(w + 2)).collect::<Vec<_>>().join("+"));
    let mut out = border.clone();
    out += &line(&HEADER.map(String::from));
    out += &border;
    for row in &cells {
        out += &line(row);
    }
    out + &border
}

/// 1536 → "1.5 KiB".
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(id: NodeId, role: &str, commit: u64, applied: u64) -> StatusInfo {
        StatusInfo { role: role.into(), commit_index: commit, last_applied: applied, ..StatusInfo::sample(id) }
    }

    fn rows() -> Vec<Row> {
        let target = |id| Target { id: Some(id), endpoint: format!("tcp://127.0.0.1:710{id}"), public_key: None };
        vec![
            Row { target: target(0), status: Ok(status(0, "leader", 10, 10)) },
            Row { target: target(1), status: Ok(status(1, "follower", 8, 7)) },
            Row { target: target(2), status: Err("no reply in time".into()) },
        ]
    }

    #[test]
    fn the_table_has_a_row_per_node_and_says_which_one_is_unreachable() {
        let table = render(&rows(), Format::Table);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 7, "{table}");
        assert!(lines[1].contains("ROLE") && lines[1].contains("LAG"), "{table}");
        assert!(lines[3].contains("leader") && lines[3].contains("2.0 KiB"), "{table}");
        assert!(lines[4].contains("| 3  "), "node 1 trails the leader's commit by 3: {table}");
        assert!(lines[5].contains("unreachable") && lines[5].contains("no reply in time"), "{table}");
        assert!(lines.iter().all(|l| l.len() == lines[0].len()), "aligned columns:\n{table}");
    }

    #[test]
    fn json_has_one_object_per_node() {
        let list: Vec<Json> = serde_json::from_str(&render(&rows(), Format::Json)).unwrap();
        assert_eq!(list.len(), 3);
        assert_eq!((list[0]["role"].as_str(), list[1]["lag"].as_u64()), (Some("leader"), Some(3)));
        assert_eq!(list[2]["error"], "no reply in time");
        assert_eq!(list[2]["id"], 2);
    }

    #[test]
    fn endpoints_are_split_on_commas() {
        let targets = targets_from_list("tcp://a:1, tcp://b:2,,");
        assert_eq!(targets.iter().map(|t| t.endpoint.as_str()).collect::<Vec<_>>(), ["tcp://a:1", "tcp://b:2"]);
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
    }
}
