//! `stral route` when replicas fail, with real processes on loopback: a replica killed
//! with SIGKILL mid-run, one stopped with SIGTERM mid-run, and hostile upstreams (one
//! that accepts and never answers, one that answers garbage, one that cuts its stream).
//! The router answers each in the API's error shape, retries what sent nothing, and
//! keeps serving.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{http_with_head, next_data, open_stream, run_bench, Router, Server};
use serde_json::{json, Value};

const REPLICA_ARGS: &[&str] = &["--worker-backend", "sim", "--gpu", "h100"];

fn replica() -> Server {
    Server::start(Path::new("synthetic:tiny"), 1, REPLICA_ARGS)
}

fn url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

fn fim(i: usize) -> String {
    json!({"model": "codestral-latest", "prompt": format!("def f{i}(x):\n    "), "suffix": format!("\n\n# file {i}\n{}", "pass\n".repeat(20)), "max_tokens": 4, "temperature": 0}).to_string()
}

/// Status, the `x-stral-replica` header, and the body of one FIM request.
fn post_fim(router: &Router, i: usize) -> (u16, String, String) {
    let (s, head, body) = http_with_head(
        router.port,
        "POST",
        "/v1/fim/completions",
        Some(&fim(i)),
        &[],
    )
    .unwrap();
    let replica = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("x-stral-replica: ")
                .map(str::to_string)
        })
        .unwrap_or_default();
    (s, replica, body)
}

/// A keystroke run of `devs` developers for `secs` seconds on a background thread.
fn keystroke_in_background(port: u16, devs: u32, secs: u32) -> std::thread::JoinHandle<Value> {
    std::thread::spawn(move || {
        let report = run_bench(
            &url(port),
            &[
                "--workload",
                "keystroke",
                "--endpoint",
                "fim",
                "--concurrency",
                &devs.to_string(),
                "--duration",
                &secs.to_string(),
                "--keystroke-ms",
                "25",
                "--think-ms",
                "100",
                "--fim-max-tokens",
                "16",
                "--request-timeout",
                "30",
            ],
        );
        report["runs"][0].clone()
    })
}

fn until(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f() {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

#[test]
fn a_killed_replica_is_ejected_within_a_second_and_readmitted_after_restart() {
    let mut fleet: Vec<Server> = (0..3)
        .map(|_| std::thread::spawn(replica))
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    let urls: Vec<String> = fleet.iter().map(|s| url(s.port)).collect();
    let router = Router::start(&urls, &[]);
    router.wait_replicas_ready(3, Duration::from_secs(30));
    let run = keystroke_in_background(router.port, 8, 5);
    std::thread::sleep(Duration::from_millis(1500));

    let victim = fleet.remove(0);
    let (port, dead) = (victim.port, urls[0].clone());
    let mut pids = victim.worker_pids();
    pids.push(victim.child.id());
    for pid in &pids {
        Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
    }
    let ready = format!("stral_route_replica_ready{{replica=\"{dead}\"}}");
    let ejected = until(Duration::from_secs(5), || {
        router.sample(&ready) == Some(0.0)
    });
    drop(victim);
    let ejected = ejected.expect("the killed replica was never ejected");
    assert!(
        ejected < Duration::from_secs(1),
        "ejected after {ejected:?}"
    );
    // New requests avoid it (and all succeed).
    for i in 0..12 {
        let (s, to, body) = post_fim(&router, i);
        assert_eq!(s, 200, "{body}");
        assert_ne!(to, dead, "request {i} went to the dead replica");
    }
    let run = run.join().unwrap();
    // Only requests already streaming from the killed replica may fail.
    let cut = router
        .sample(&format!(
            "stral_route_upstream_errors_total{{replica=\"{dead}\",kind=\"stream\"}}"
        ))
        .unwrap_or(0.0);
    let failed = run["failed"].as_u64().unwrap() as f64;
    eprintln!("kill -9 mid-run: {} completed, {failed} failed, {cut} streams cut by the kill, ejected after {ejected:?}", run["completed"]);
    assert!(
        failed <= cut,
        "{failed} failed but only {cut} were streaming from the dead replica: {}",
        run["errors"]
    );
    assert!(run["completed"].as_u64().unwrap() > 10, "{run}");

    // Restarted on its port, it is readmitted and gets its share again.
    let back = Server::start_on(port, Path::new("synthetic:tiny"), 1, REPLICA_ARGS, &[]);
    let readmitted = until(Duration::from_secs(3), || {
        router.sample(&ready) == Some(1.0)
    });
    assert!(
        readmitted.is_some(),
        "not readmitted:\n{}",
        router.log_text()
    );
    let to_it = (0..12).filter(|i| post_fim(&router, *i).1 == dead).count();
    assert!(to_it > 0, "no request went to the restarted replica");
    drop(back);
}

#[test]
fn a_replica_stopped_with_sigterm_mid_run_fails_no_request() {
    let mut fleet: Vec<Server> = (0..3)
        .map(|_| std::thread::spawn(replica))
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    let urls: Vec<String> = fleet.iter().map(|s| url(s.port)).collect();
    let router = Router::start(&urls, &[]);
    router.wait_replicas_ready(3, Duration::from_secs(30));
    let run = keystroke_in_background(router.port, 8, 4);
    std::thread::sleep(Duration::from_millis(1500));
    Command::new("kill")
        .args(["-TERM", &fleet[1].child.id().to_string()])
        .status()
        .unwrap();
    let exited = until(Duration::from_secs(15), || {
        matches!(fleet[1].child.try_wait(), Ok(Some(_)))
    });
    let run = run.join().unwrap();
    eprintln!(
        "SIGTERM mid-run: {} completed, {} failed, replica exited after {exited:?}",
        run["completed"], run["failed"]
    );
    assert_eq!(run["failed"], 0, "{}", run["errors"]);
    assert!(exited.is_some(), "the replica did not exit after SIGTERM");
    assert_eq!(
        router.sample(&format!(
            "stral_route_replica_ready{{replica=\"{}\"}}",
            urls[1]
        )),
        Some(0.0)
    );
    for i in 0..6 {
        assert_eq!(post_fim(&router, i).0, 200);
    }
}

#[derive(Clone, Copy)]
enum Hostile {
    /// Accepts, reads the request, never answers.
    Silent,
    /// Answers with bytes that are not HTTP.
    Garbage,
    /// Starts an SSE stream, sends one event, closes without ending the chunked body.
    CutsStream,
}

/// A fake replica: passes `/ready` and `/metrics`, misbehaves on everything else.
fn hostile(mode: Hostile) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            std::thread::spawn(move || serve_hostile(conn, mode));
        }
    });
    port
}

fn serve_hostile(mut conn: TcpStream, mode: Hostile) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; len];
    let _ = reader.read_exact(&mut body);
    let ok = |b: &str| {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
            b.len()
        )
    };
    let reply = if line.starts_with("GET /ready ") {
        ok("{\"status\":\"ready\"}")
    } else if line.starts_with("GET /metrics ") {
        ok("stral_queue_depth 0\nstral_kv_usage_ratio 0\n")
    } else {
        match mode {
            Hostile::Silent => {
                std::thread::sleep(Duration::from_secs(30));
                return;
            }
            Hostile::Garbage => "\u{1}\u{2} this is not HTTP at all \r\n\r\n".to_string(),
            Hostile::CutsStream => {
                let event = "data: {\"id\":\"x\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\n\n";
                format!("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{event}\r\n", event.len())
            }
        }
    };
    let _ = conn.write_all(reply.as_bytes());
    let _ = conn.flush();
}

fn error_body(body: &str) -> Value {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    assert_eq!(v["object"], "error", "{v}");
    v
}

#[test]
fn hostile_upstreams_get_clear_errors_and_the_router_keeps_serving() {
    let silent = url(hostile(Hostile::Silent));
    let garbage = url(hostile(Hostile::Garbage));
    let cuts = url(hostile(Hostile::CutsStream));

    let r = Router::start(&[silent.clone()], &["--upstream-timeout", "1"]);
    r.wait_replicas_ready(1, Duration::from_secs(10));
    for i in 0..2 {
        let (s, _, body) = post_fim(&r, i);
        assert_eq!(s, 504, "{body}");
        let e = error_body(&body);
        assert_eq!(e["code"], "gateway_timeout");
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .contains("no response within"),
            "{e}"
        );
    }

    let r = Router::start(&[garbage.clone()], &[]);
    r.wait_replicas_ready(1, Duration::from_secs(10));
    let (s, _, body) = post_fim(&r, 0);
    assert_eq!(s, 502, "{body}");
    assert!(
        error_body(&body)["message"]
            .as_str()
            .unwrap()
            .contains("invalid response"),
        "{body}"
    );

    let r = Router::start(&[cuts.clone()], &[]);
    r.wait_replicas_ready(1, Duration::from_secs(10));
    let mut req: Value = serde_json::from_str(&fim(0)).unwrap();
    req["stream"] = json!(true);
    let (_s, mut reader) = open_stream(r.port, "/v1/fim/completions", &req);
    let mut events = Vec::new();
    while let Some(d) = next_data(&mut reader) {
        events.push(d);
    }
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(events[0].contains("\"Hel\""), "{events:?}");
    let e = error_body(&events[1]);
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("broke the response"),
        "{e}"
    );
    assert_eq!(
        r.sample(&format!(
            "stral_route_upstream_errors_total{{replica=\"{cuts}\",kind=\"stream\"}}"
        )),
        Some(1.0)
    );

    // Next to a real replica, what sent nothing is retried there: every request succeeds.
    let real = replica();
    for bad in [garbage, silent] {
        let r = Router::start(
            &[bad, url(real.port)],
            &["--policy", "round-robin", "--upstream-timeout", "1"],
        );
        r.wait_replicas_ready(2, Duration::from_secs(30));
        for i in 0..4 {
            let (s, to, body) = post_fim(&r, i);
            assert_eq!((s, to.as_str()), (200, url(real.port).as_str()), "{body}");
        }
        assert_eq!(r.sample("stral_route_retries_total"), Some(2.0));
    }
}
