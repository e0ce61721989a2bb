//! A 3-member etcd cluster on 127.0.0.1, and a client for its JSON gateway
//! over one kept-alive HTTP/1.1 connection.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::load::KvClient;
use crate::{Processes, System, free_port};

pub struct Cluster {
    members: Processes,
    /// The leader's client address, HOST:PORT.
    leader: String,
}

impl Cluster {
    /// `one_way`: the members reach each other through delay proxies.
    pub fn start(etcd: &Path, dir: &Path, one_way: Option<Duration>) -> Cluster {
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        // Where the others reach each member's peer port.
        let advertised: Vec<u16> =
            ports.iter().map(|&(_, peer)| one_way.map_or(peer, |delay| crate::delay::proxy(peer, delay))).collect();
        let initial: Vec<String> =
            advertised.iter().enumerate().map(|(i, peer)| format!("e{i}=http://127.0.0.1:{peer}")).collect();
        let members = Processes(
            ports
                .iter()
                .enumerate()
                .map(|(i, (client, peer))| {
                    let advertised = advertised[i];
                    let log = std::fs::File::create(dir.with_extension(format!("e{i}.log"))).expect("a log file");
                    Command::new(etcd)
                        .args(["--name", &format!("e{i}")])
                        .arg("--data-dir")
                        .arg(dir.join(format!("e{i}")))
                        .args(["--listen-client-urls", &format!("http://127.0.0.1:{client}")])
                        .args(["--advertise-client-urls", &format!("http://127.0.0.1:{client}")])
                        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
                        .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{advertised}")])
                        .args(["--initial-cluster", &initial.join(",")])
                        .args(["--initial-cluster-state", "new", "--initial-cluster-token", "compare"])
                        .stdout(Stdio::null())
                        .stderr(log)
                        .spawn()
                        .unwrap_or_else(|e| {
                            panic!("cannot start {} (apt-get install etcd-server): {e}", etcd.display())
                        })
                })
                .collect(),
        );
        let addresses: Vec<String> = ports.iter().map(|(client, _)| format!("127.0.0.1:{client}")).collect();
        let leader = wait_for_leader(&addresses);
        Cluster { members, leader }
    }
}

impl System for Cluster {
    fn name(&self) -> &'static str {
        "etcd"
    }

    fn client(&self) -> Box<dyn KvClient> {
        Box::new(Client::connect(&self.leader).expect("a connection to etcd's leader"))
    }

    fn cpu_seconds(&self) -> f64 {
        self.members.cpu_seconds()
    }
}

/// The member whose status says it leads, once one does.
fn wait_for_leader(addresses: &[String]) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        for address in addresses {
            let status = Client::connect(address).ok().and_then(|mut c| c.call("/v3/maintenance/status", "{}"));
            if let Some(body) = status {
                let field =
                    |name: &str| body.split(&format!("\"{name}\":\"")).nth(1)?.split('"').next().map(String::from);
                if field("leader").is_some() && field("leader") == field("member_id") {
                    return address.clone();
                }
            }
        }
        thread::sleep(Duration::from_millis(200));
    }
    panic!("etcd elected no leader within 60 s");
}

pub struct Client {
    host: String,
    reader: BufReader<TcpStream>,
}

impl Client {
    pub fn connect(address: &str) -> std::io::Result<Client> {
        let stream = TcpStream::connect(address)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Client { host: address.to_string(), reader: BufReader::new(stream) })
    }

    /// POSTs `body` to `path`; the response body if it was a 200.
    fn call(&mut self, path: &str, body: &str) -> Option<String> {
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.host,
            body.len()
        );
        self.reader.get_mut().write_all(request.as_bytes()).ok()?;
        let (status, body) = read_response(&mut self.reader)?;
        (status == 200).then_some(body)
    }
}

impl KvClient for Client {
    fn put(&mut self, key: &str, value: &str) -> bool {
        let body = format!(r#"{{"key":"{}","value":"{}"}}"#, STANDARD.encode(key), STANDARD.encode(value));
        self.call("/v3/kv/put", &body).is_some()
    }

    fn get(&mut self, key: &str) -> bool {
        self.call("/v3/kv/range", &format!(r#"{{"key":"{}"}}"#, STANDARD.encode(key))).is_some()
    }
}

/// Reads one HTTP/1.1 response: its status and body (by Content-Length, or
/// chunked).
fn read_response(reader: &mut impl BufRead) -> Option<(u16, String)> {
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let status = line.split_whitespace().nth(1)?.parse().ok()?;
    let (mut length, mut chunked) = (None, false);
    loop {
        line.clear();
        reader.read_line(&mut line).ok()?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':')?;
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse::<usize>().ok(),
            "transfer-encoding" => chunked = value.trim().eq_ignore_ascii_case("chunked"),
            _ => {}
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            reader.read_line(&mut line).ok()?;
            let size = usize::from_str_radix(line.trim().split(';').next()?, 16).ok()?;
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).ok()?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else {
        body.resize(length?, 0);
        reader.read_exact(&mut body).ok()?;
    }
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::read_response;

    #[test]
    fn responses_are_read_by_length_or_in_chunks_and_the_next_one_follows() {
        let two = "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n{\"a\"HTTP/1.1 503 No\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let mut reader = two.as_bytes();
        assert_eq!(read_response(&mut reader), Some((200, "{\"a\"".to_string())));
        assert_eq!(read_response(&mut reader), Some((503, "abcde".to_string())));
        assert_eq!(read_response(&mut reader), None, "nothing more");
    }
}
