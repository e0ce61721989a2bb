//! The deployment files in deploy/ (docs/running.md "Deployment files") cannot drift from
//! the node: the configs inside them are loaded by the node's own
//! `Config::load` and checked for every node id their commands pass, and
//! what the files say around them (service names, replicas, ordinals,
//! ports, exit statuses) is checked against those configs. No image is
//! built and nothing is started here: Docker and Kubernetes are not in CI.

use std::fs;
use std::path::{Path, PathBuf};

use raft_zmq::config::{Config, Member};

fn deploy_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(name)
}

fn read(name: &str) -> String {
    fs::read_to_string(deploy_file(name)).unwrap_or_else(|e| panic!("deploy/{name}: {e}"))
}

/// Loads a config as `raft-zmq --config` does, and checks that node `id`
/// may be started from it (`--node-id`) for each of `ids`.
fn load_for(path: &Path, ids: impl IntoIterator<Item = u64>) -> Config {
    let config = Config::load(path).unwrap_or_else(|e| panic!("{e}"));
    for id in ids {
        config.require_member(id).unwrap_or_else(|e| panic!("--node-id {id}: {e}"));
    }
    config
}

/// Loads JSON text taken out of a deploy file, saved as `name` in `dir`.
fn load_text_for(dir: &Path, name: &str, text: &str, ids: impl IntoIterator<Item = u64>) -> Config {
    let path = dir.join(name);
    fs::write(&path, text).unwrap();
    load_for(&path, ids)
}

/// The host and the port of `tcp://HOST:PORT` (or HOST:PORT).
fn host_port(endpoint: &str) -> (&str, &str) {
    endpoint.trim_start_matches("tcp://").rsplit_once(':').expect("HOST:PORT")
}

/// A node that is reached by the name `host` and binds a wildcard on the
/// ports it advertises, serving HTTP on `http_port`.
fn assert_advertises_and_listens(member: &Member, config: &Config, host: &str, http_port: &str) {
    let id = member.id;
    let listen = config.listen_of(id);
    for (advertised, bound) in [(&member.raft, &listen.raft), (&member.client, &listen.client)] {
        assert_eq!(host_port(advertised).0, host, "node {id} advertises {advertised}");
        let bound = bound.as_deref().unwrap_or_else(|| panic!("node {id}: no listen endpoint for {advertised}"));
        assert_eq!(bound, format!("tcp://0.0.0.0:{}", host_port(advertised).1), "node {id} binds its port");
    }
    assert_eq!(config.http.get(&id).map(String::as_str), Some(&*format!("0.0.0.0:{http_port}")), "node {id} http");
}

/// The rest of the first line of `text` that starts with `prefix` after
/// its indentation (`replicas:`, `EXPOSE `, `Restart=`), trimmed.
fn value_after<'a>(text: &'a str, prefix: &str) -> &'a str {
    let line = text.lines().map(str::trim_start).find(|line| line.starts_with(prefix));
    line.unwrap_or_else(|| panic!("no line starts with {prefix:?}"))[prefix.len()..].trim()
}

/// The services of a compose file, by name, each with its lines.
fn compose_services(compose: &str) -> Vec<(String, String)> {
    let section = compose.split("\nservices:\n").nth(1).expect("services:");
    let section = section.split("\nvolumes:\n").next().unwrap();
    let mut services: Vec<(String, String)> = Vec::new();
    for line in section.lines() {
        let names_a_service = line.starts_with("  ") && !line.starts_with("   ") && line.ends_with(':');
        if names_a_service {
            services.push((line.trim().trim_end_matches(':').to_string(), String::new()));
        } else if let Some((_, body)) = services.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    services
}

/// The YAML block scalar under `key: |`: its lines, unindented.
fn block_scalar(text: &str, key: &str) -> String {
    let mut lines = text.lines().skip_while(|line| line.trim() != format!("{key}: |")).skip(1).peekable();
    let first = lines.peek().unwrap_or_else(|| panic!("no {key}: | block"));
    let indent = first.len() - first.trim_start().len();
    let inside = lines.take_while(|line| line.trim().is_empty() || line.len() - line.trim_start().len() >= indent);
    inside.map(|line| line.get(indent..).unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// The port of the `--http HOST:PORT` a health check uses.
fn health_check_port(text: &str) -> &str {
    let after = text.split(r#""--http", ""#).nth(1).expect("a health check with --http");
    host_port(after.split('"').next().unwrap()).1
}

#[test]
fn the_compose_cluster_config_is_valid_for_every_service() {
    let compose = read("compose.yaml");
    let config_path = deploy_file("config.compose.json");
    let mut ids = Vec::new();
    for (name, block) in compose_services(&compose) {
        let id: u64 = block
            .split(r#""--node-id", ""#)
            .nth(1)
            .and_then(|rest| rest.split('"').next()?.parse().ok())
            .unwrap_or_else(|| panic!("service {name}: no --node-id"));
        assert!(block.contains("./config.compose.json:/etc/raft-zmq/config.json:ro"), "{name} mounts the config");
        assert!(block.contains(&format!("{name}-data:/var/lib/raft-zmq")), "{name} keeps its state on its volume");
        assert!(compose.contains(&format!("\n  {name}-data:")), "volume {name}-data is declared");
        ids.push((id, name));
    }
    assert_eq!(ids.len(), 3, "a 3-node cluster: {ids:?}");
    let config = load_for(&config_path, ids.iter().map(|(id, _)| *id));
    assert_eq!(config.nodes.len(), ids.len(), "a service for every node");
    for (id, service) in &ids {
        let member = config.member(*id).unwrap();
        assert_advertises_and_listens(member, &config, service, health_check_port(&compose));
    }
    assert!(config.state_dir.starts_with("/var/lib/raft-zmq") && config.logs_dir.starts_with("/var/lib/raft-zmq"));
}

#[test]
fn the_image_exposes_and_checks_what_the_compose_config_binds() {
    let dockerfile = read("Dockerfile");
    let config = load_for(&deploy_file("config.compose.json"), []);
    let exposed: Vec<&str> = value_after(&dockerfile, "EXPOSE ").split_whitespace().collect();
    let member = &config.nodes[0];
    for endpoint in [&member.raft, &member.client, &config.http[&member.id]] {
        assert!(exposed.contains(&host_port(endpoint).1), "EXPOSE {exposed:?} lacks {endpoint}");
    }
    let health = dockerfile.split("HEALTHCHECK").nth(1).expect("a HEALTHCHECK");
    assert_eq!(health_check_port(health), host_port(&config.http[&member.id]).1);
    assert!(value_after(&dockerfile, "VOLUME ").contains("/var/lib/raft-zmq"));
    assert!(value_after(&dockerfile, "USER ").starts_with("raft"), "not root");
}

#[test]
fn the_statefulset_configs_are_valid_for_every_ordinal() {
    let manifests = read("kubernetes.yaml");
    let statefulset = manifests.split("\n---\n").find(|doc| doc.contains("kind: StatefulSet")).expect("a StatefulSet");
    let name = value_after(statefulset, "name:");
    let service = value_after(statefulset, "serviceName:");
    let replicas: u64 = value_after(statefulset, "replicas:").parse().unwrap();
    let dir = tempfile::tempdir().unwrap();

    // The first members are exactly the ordinals the StatefulSet starts.
    let first = load_text_for(dir.path(), "config.json", &block_scalar(&manifests, "config.json"), 0..replicas);
    assert_eq!(first.nodes.len() as u64, replicas);
    let http_line = statefulset.lines().find(|line| line.contains("{name: http, containerPort: ")).expect("http port");
    let http_port = http_line.rsplit("containerPort: ").next().unwrap().trim_end_matches('}').trim();
    assert!(statefulset.contains("httpGet: {path: /health, port: http}"), "readiness on /health");
    for member in &first.nodes {
        let host = format!("{name}-{}.{service}", member.id);
        assert_advertises_and_listens(member, &first, &host, http_port);
    }
    // The pod command picks the config by ordinal at the same boundary.
    assert!(statefulset.contains(&format!(r#"if [ "$id" -lt {replicas} ]; then"#)), "config.json below {replicas}");

    // Pods beyond join with join.json: their own entries and the first members as they are.
    let join = load_text_for(dir.path(), "join.json", &block_scalar(&manifests, "join.json"), replicas..replicas + 2);
    for member in &first.nodes {
        assert_eq!(join.member(member.id), Some(member), "join.json lists node {} as config.json does", member.id);
    }
    for member in join.nodes.iter().filter(|m| m.id >= replicas) {
        let host = format!("{name}-{}.{service}", member.id);
        assert_advertises_and_listens(member, &join, &host, http_port);
    }
}

#[test]
fn the_systemd_unit_runs_its_instance_and_does_not_restart_a_bad_config() {
    let unit = read("raft-zmq@.service");
    assert!(value_after(&unit, "ExecStart=").ends_with("--node-id %i"));
    // The status a bad config exits with (CONTRACT.md; tests/bad_input.rs).
    assert_eq!(value_after(&unit, "RestartPreventExitStatus="), "2");
    assert_eq!(value_after(&unit, "Restart="), "on-failure", "a removed node exits 0 and stays down");
    assert_eq!(value_after(&unit, "KillSignal="), "SIGTERM", "the clean stop");
}
