//! Key file reload across real processes: a `stral serve` with a YAML key file and
//! modification-time polling turned off (`--keys-reload-poll-ms 0`) keeps its old keys
//! when the file is rewritten, and switches to the new ones on SIGHUP — while a stream
//! admitted under the old keys runs on to its end.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{synth_model, Server};
use serde_json::{json, Value};

/// A short FIM request with `key`: the status and the lower-cased response head.
fn fim(port: u16, key: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body =
        json!({"model": "codestral-latest", "prompt": "def f():", "max_tokens": 1}).to_string();
    write!(
        s,
        "POST /v1/fim/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nAuthorization: Bearer {key}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let head = raw.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head)
}

fn header<'a>(head: &'a str, name: &str) -> &'a str {
    head.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
        .unwrap_or("")
        .trim()
}

fn reloads(server: &Server, outcome: &str) -> f64 {
    server.metric(&format!(
        "stral_key_file_reloads_total{{outcome=\"{outcome}\"}}"
    ))
}

#[test]
fn sighup_reloads_a_yaml_key_file_without_dropping_a_stream_in_flight() {
    const STREAM_TOKENS: u64 = 800;
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("stral-ops-reload-model");
    let _ = std::fs::remove_dir_all(&dir);
    synth_model(&dir, "mistral");
    let key_file = dir.join("keys.yaml");
    std::fs::write(
        &key_file,
        "keys:\n  - name: a\n    key: sk-a\n    requests_per_minute: 2\n",
    )
    .unwrap();
    let server = Server::start(
        &dir,
        1,
        &[
            "--keys-config",
            key_file.to_str().unwrap(),
            "--keys-reload-poll-ms",
            "0",
        ],
    );
    assert_eq!(reloads(&server, "ok"), 0.0);

    // A long stream on key a (its first request of two), admitted under the old keys.
    let stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let body = json!({"model": "codestral-latest", "prompt": "def fib(n):", "max_tokens": STREAM_TOKENS, "min_tokens": STREAM_TOKENS, "temperature": 0, "stream": true}).to_string();
    write!(&stream, "POST /v1/fim/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nAuthorization: Bearer sk-a\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut events = BufReader::new(stream);
    let mut line = String::new();
    while !line.starts_with("data: ") {
        line.clear();
        assert!(events.read_line(&mut line).unwrap() > 0, "stream ended");
    }
    let (status, head) = fim(server.port, "sk-a");
    assert_eq!(status, 200);
    assert_eq!(header(&head, "x-ratelimit-limit-requests"), "2");
    assert_eq!(fim(server.port, "sk-a").0, 429);

    // New limits and a new key on disk. With polling off, nothing changes — checked for
    // longer than the default poll interval (1 s), so a poll would have been seen.
    std::fs::write(
        &key_file,
        "keys:\n  - name: a\n    key: sk-a\n    requests_per_minute: 5\n  - name: b\n    key: sk-b\n",
    )
    .unwrap();
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(1500) {
        assert_eq!(fim(server.port, "sk-b").0, 401, "sk-b known before SIGHUP");
        let (status, head) = fim(server.port, "sk-a");
        assert_eq!(status, 429, "the old limit must hold until SIGHUP");
        assert_eq!(header(&head, "x-ratelimit-limit-requests"), "2");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(reloads(&server, "ok"), 0.0);

    // SIGHUP: the new file applies.
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let t = Instant::now();
    while fim(server.port, "sk-b").0 != 200 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "SIGHUP did not reload the key file"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(reloads(&server, "ok"), 1.0);
    assert_eq!(reloads(&server, "error"), 0.0);
    // Key a keeps what it used (2 of 2) under its new limit of 5.
    let (status, head) = fim(server.port, "sk-a");
    assert_eq!(status, 200);
    assert_eq!(header(&head, "x-ratelimit-limit-requests"), "5");

    // The stream admitted before the reload was still running across it, and ends
    // normally with every token it was asked for.
    assert!(
        server.metric("stral_requests_running") >= 1.0,
        "the stream ended before the reload; raise STREAM_TOKENS"
    );
    let mut rest = String::new();
    events.read_to_string(&mut rest).unwrap();
    assert!(!rest.contains("\"error\""), "{rest}");
    let data: Vec<&str> = rest
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"));
    let usage = data
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find_map(|v| v.get("usage").filter(|u| !u.is_null()).cloned())
        .expect("a usage chunk");
    assert_eq!(usage["completion_tokens"], STREAM_TOKENS);
    let (status, _) = common::http(server.port, "GET", "/health", None, &[]).unwrap();
    assert_eq!(status, 200);
}
