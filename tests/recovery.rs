//! A worker crash costs a pause, not an error: real `stral serve` + `stral worker`
//! processes, `kill -9` of a worker while 40 clients stream, and a request that
//! crashes its workers every time it runs (the test-only fault hook,
//! `worker::fault::CRASH_ON_TOKEN`).

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::{next_data, open_stream, synth_model, Server};
use coordinator::tokenizer::Tokenizer;
use serde_json::{json, Value};

fn model_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("stral-recovery-model");
        let _ = std::fs::remove_dir_all(&dir);
        synth_model(&dir, "hf");
        dir
    })
}

/// Request `i` of the mix: FIM or chat, greedy or seeded sampling.
fn request(i: usize, max_tokens: u32) -> (&'static str, Value) {
    let mut body = if i % 2 == 0 {
        json!({"model": "codestral-latest", "prompt": format!("def f{i}(x):\n    "), "suffix": "\nprint(f(1))\n"})
    } else {
        json!({"model": "codestral-latest", "messages": [{"role": "user", "content": format!("Write function number {i} in Rust.")}]})
    };
    body["max_tokens"] = json!(max_tokens);
    body["min_tokens"] = json!(max_tokens);
    if i % 4 < 2 {
        body["temperature"] = json!(0);
    } else {
        body["temperature"] = json!(0.9);
        body["seed"] = json!(1000 + i);
    }
    let path = if i % 2 == 0 {
        "/v1/fim/completions"
    } else {
        "/v1/chat/completions"
    };
    (path, body)
}

/// The texts of requests `0..n` on an undisturbed server, sent concurrently.
fn reference(server: &Server, n: usize, max_tokens: u32) -> Vec<String> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                scope.spawn(move || {
                    let (path, body) = request(i, max_tokens);
                    let (status, v) = server.post(path, &body);
                    assert_eq!(status, 200, "{v}");
                    text_of(&v)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn text_of(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no text in {v}"))
        .to_string()
}

/// One streaming client: counts its data events in `seen`; returns its text, or the
/// error event it got.
fn stream(
    port: u16,
    path: &'static str,
    mut body: Value,
    seen: Arc<AtomicUsize>,
) -> Result<String, String> {
    body["stream"] = json!(true);
    let (_sock, mut reader) = open_stream(port, path, &body);
    let mut text = String::new();
    while let Some(d) = next_data(&mut reader) {
        if d == "[DONE]" {
            return Ok(text);
        }
        let v: Value = serde_json::from_str(&d).map_err(|e| format!("{e}: {d}"))?;
        if v.get("error").is_some() {
            return Err(d);
        }
        text.push_str(v["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
        seen.fetch_add(1, Ordering::SeqCst);
    }
    Err(format!("the stream ended without [DONE] after {text:?}"))
}

/// Requests `0..n`, each streamed by a thread of its own.
struct Streams {
    /// Data events each stream has seen so far.
    seen: Vec<Arc<AtomicUsize>>,
    /// 1 once a stream ended.
    done: Vec<Arc<AtomicUsize>>,
    clients: Vec<std::thread::JoinHandle<Result<String, String>>>,
}

fn start_streams(server: &Server, n: usize, max_tokens: u32) -> Streams {
    let seen: Vec<Arc<AtomicUsize>> = (0..n).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let done: Vec<Arc<AtomicUsize>> = (0..n).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let port = server.port;
    let clients = (0..n)
        .map(|i| {
            let (path, body) = request(i, max_tokens);
            let (seen, done) = (seen[i].clone(), done[i].clone());
            std::thread::spawn(move || {
                let r = stream(port, path, body, seen);
                done.store(1, Ordering::SeqCst);
                r
            })
        })
        .collect();
    Streams {
        seen,
        done,
        clients,
    }
}

fn kill_worker(server: &Server, which: usize) {
    let pids = server.worker_pids();
    assert_eq!(pids.len(), 2, "expected two workers, found {pids:?}");
    let ok = std::process::Command::new("kill")
        .args(["-KILL", &pids[which].to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

/// Waits until every stream that has not finished saw more than `at[i]` events.
fn wait_for_progress(
    seen: &[Arc<AtomicUsize>],
    at: &[usize],
    done: &[Arc<AtomicUsize>],
    limit: Duration,
) {
    let t = Instant::now();
    while t.elapsed() < limit {
        if seen
            .iter()
            .zip(at)
            .zip(done)
            .all(|((s, &a), d)| d.load(Ordering::SeqCst) == 1 || s.load(Ordering::SeqCst) > a)
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("streams made no progress within {limit:?}");
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn forty_streams_survive_two_worker_kills_with_unchanged_text_and_no_leaked_blocks() {
    let n = 40;
    let max_tokens = 48;
    let server = Server::start(model_dir(), 2, &[]);
    // The undisturbed run: the same requests, not streamed.
    let want = reference(&server, n, max_tokens);

    let Streams {
        seen,
        done,
        clients,
    } = start_streams(&server, n, max_tokens);
    // Everyone is streaming: kill a worker; once every stream moved on, kill one again.
    wait_for_progress(&seen, &vec![2; n], &done, Duration::from_secs(120));
    assert!(
        done.iter().all(|d| d.load(Ordering::SeqCst) == 0),
        "a stream finished before the first kill"
    );
    kill_worker(&server, 1);
    let at: Vec<usize> = seen.iter().map(|s| s.load(Ordering::SeqCst)).collect();
    wait_for_progress(&seen, &at, &done, Duration::from_secs(120));
    let unfinished = done
        .iter()
        .filter(|d| d.load(Ordering::SeqCst) == 0)
        .count();
    kill_worker(&server, 0);

    let mut errors = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        match c.join().unwrap() {
            Ok(text) => assert_eq!(
                text, want[i],
                "request {i}: the recovered stream's text differs"
            ),
            Err(e) => errors.push(format!("request {i}: {e}")),
        }
    }
    assert!(errors.is_empty(), "client-visible errors: {errors:#?}");
    assert!(
        unfinished > 0,
        "no request was streaming at the second kill"
    );
    assert_eq!(server.metric("stral_worker_restarts_total"), 2.0);
    assert!(server.metric("stral_requests_recovered_total") >= n as f64);
    assert_eq!(server.metric("stral_recovery_seconds_count"), 2.0);
    assert!(
        wait_until(Duration::from_secs(5), || server
            .metric("stral_kv_blocks_used")
            == 0.0),
        "blocks leaked"
    );
    println!("40 streams, 2 kills ({unfinished} streams still running at the second): 0 errors");
}

#[test]
fn a_request_that_crashes_the_workers_every_time_fails_with_500_and_the_rest_complete() {
    // The longest piece of a rare word: no other prompt holds it, and the tiny model
    // is unlikely to emit it on its own.
    let tok = Tokenizer::codestral().unwrap();
    let poison_text = "zymurgical";
    let ids = tok.encode(poison_text).unwrap();
    let poison = *ids
        .iter()
        .max_by_key(|id| tok.decode(&[**id]).len())
        .unwrap();
    let server = Server::start_env(
        model_dir(),
        2,
        &[],
        &[(worker::fault::CRASH_ON_TOKEN, &poison.to_string())],
    );
    let n = 6;
    let max_tokens = 40;
    let want = reference(&server, n, max_tokens);
    let Streams {
        seen,
        done,
        clients,
    } = start_streams(&server, n, max_tokens);
    wait_for_progress(&seen, &vec![2; n], &done, Duration::from_secs(120));
    let (status, v) = server.post(
        "/v1/fim/completions",
        &json!({"model": "codestral-latest", "prompt": format!("# {poison_text}\n"), "max_tokens": 8}),
    );
    assert_eq!(status, 500, "{v}");
    let message = v["message"].as_str().unwrap_or_default();
    assert!(message.contains("crashed"), "{v}");
    for (i, c) in clients.into_iter().enumerate() {
        let text = c
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(text, want[i], "request {i}");
    }
    assert_eq!(
        server.metric("stral_worker_restarts_total"),
        2.0,
        "one crash, one retry, then detected"
    );
    let (status, v) = server.post(request(0, 4).0, &request(0, 4).1);
    assert_eq!(status, 200, "the server keeps serving: {v}");
    assert!(
        wait_until(Duration::from_secs(5), || server
            .metric("stral_kv_blocks_used")
            == 0.0),
        "blocks leaked"
    );
}
