//! Abuse against the real binary on loopback, as a hostile or broken client would send it:
//! malformed and oversized bodies (invalid UTF-8, JSON nested 30,000 deep, `max_tokens` and `n`
//! past any sense), a body over the limit trickled in, 10,000 idle connections, and a client
//! vanishing at every stage of a streamed request. Each gets a bounded answer in OpenAI's error
//! shape (or a clean close), and afterwards the process holds the file descriptors and the
//! memory it held before. `connections.rs` covers slow heads and trickling bodies (408), and
//! connection floods on a small open-file limit.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;
use http_body_util::BodyExt;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Bound on any one wait: a hang fails the test instead of blocking it.
const HANG: Duration = Duration::from_secs(60);
const CHAT: &str = "/v1/chat/completions";
/// Requests counted as left by their client before the answer.
const GONE_SERIES: &str =
    "sluice_requests_total{route=\"/v1/completions\",variant=\"default\",status=\"499\"}";
/// The body limit the sidecar runs with here (`--max-body-bytes`).
const MAX_BODY: usize = 64 << 10;

/// The descriptors and resident memory of a process.
#[derive(Clone, Copy, Debug)]
struct Footprint {
    fds: usize,
    rss_kb: u64,
}

impl Footprint {
    fn of(sidecar: &Sidecar) -> Self {
        let proc = format!("/proc/{}", sidecar.child.id());
        let fds = std::fs::read_dir(format!("{proc}/fd")).unwrap().count();
        let status = std::fs::read_to_string(format!("{proc}/status")).unwrap();
        let rss_kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        Self { fds, rss_kb }
    }
}

fn addr(sidecar: &Sidecar) -> String {
    sidecar.api.trim_start_matches("http://").to_owned()
}

/// The test process holds 10,000 sockets at once.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an owned struct.
    #[allow(unsafe_code)]
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    assert!(
        limit.rlim_cur >= 12_000,
        "the open-file hard limit ({}) is too low for 10,000 connections",
        limit.rlim_cur
    );
}

/// POSTs raw `body` bytes as JSON to the chat route over a fresh connection; the status and the
/// parsed body of the answer.
async fn post_bytes(sidecar: &Sidecar, body: Vec<u8>) -> (StatusCode, serde_json::Value) {
    let (status, _, text) =
        tokio::time::timeout(HANG, post_raw(&format!("{}{CHAT}", sidecar.api), body))
            .await
            .expect("a malformed request hung");
    (status, serde_json::from_str(&text).unwrap_or_default())
}

/// An answer in OpenAI's error shape.
fn assert_openai_error(what: &str, status: StatusCode, body: &serde_json::Value) {
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty())
            && error["type"].is_string()
            && error.get("code").is_some(),
        "{what}: {status} without an OpenAI error body: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abuse_gets_bounded_answers_and_leaves_descriptors_and_memory_flat() {
    raise_open_file_limit();
    let mut sidecar =
        Sidecar::spawn_with_open_files(16_384, &["--max-body-bytes", &MAX_BODY.to_string()]);
    sidecar.wait_ready().await;
    // Warm-up: the allocator's pools and the engine's buffers exist before the baseline.
    for _ in 0..3 {
        sidecar.chat_once().await;
    }
    let before = Footprint::of(&sidecar);

    malformed_bodies(&sidecar).await;
    body_over_the_limit_trickled(&sidecar).await;
    idle_connections(&sidecar, 10_000).await;
    clients_vanishing_at_every_stage(&sidecar).await;

    // Everything settled: no request in flight, no connection held, and still serving.
    sidecar
        .wait_for_metric("sluice_requests_in_flight", 0.0)
        .await;
    sidecar
        .wait_for_metric("sluice_connections_open{listener=\"api\"}", 0.0)
        .await;
    sidecar.chat_once().await;
    // The descriptors are back at once; the memory the connections' buffers took once the heap
    // is trimmed, in the background, after the burst (crate::heap).
    let flat = before.rss_kb + before.rss_kb / 20;
    let deadline = tokio::time::Instant::now() + HANG;
    let mut after = Footprint::of(&sidecar);
    while after.rss_kb > flat && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = Footprint::of(&sidecar);
    }
    eprintln!(
        "footprint before: {} fds, {} kB resident; after: {} fds, {} kB",
        before.fds, before.rss_kb, after.fds, after.rss_kb
    );
    // The admin connection the metrics read is the only one that may still be open.
    assert!(
        after.fds <= before.fds + 2,
        "descriptors grew from {} to {}",
        before.fds,
        after.fds
    );
    assert!(
        after.rss_kb <= flat,
        "resident memory grew over 5%: {} kB to {} kB",
        before.rss_kb,
        after.rss_kb
    );
}

/// Bodies no client library would send: each answered 4xx in OpenAI's error shape.
async fn malformed_bodies(sidecar: &Sidecar) {
    let chat = |extra: &str| {
        format!(r#"{{"model":"smollm2","messages":[{{"role":"user","content":"hi"}}]{extra}}}"#)
            .into_bytes()
    };
    let nested = {
        let depth = 30_000;
        let mut body = br#"{"model":"smollm2","messages":"#.to_vec();
        body.extend(std::iter::repeat_n(b'[', depth));
        body.extend(std::iter::repeat_n(b']', depth));
        body.push(b'}');
        body
    };
    let mut invalid_utf8 = chat("");
    let at = invalid_utf8.windows(2).position(|w| w == b"hi").unwrap();
    invalid_utf8[at..at + 2].copy_from_slice(&[0xff, 0xfe]);
    let many_stops: Vec<String> = (0..5_000).map(|i| format!("s{i}")).collect();
    let long_prompt = "lorem ipsum ".repeat(5_000);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("invalid UTF-8", invalid_utf8, 400),
        ("JSON nested 30,000 deep", nested, 400),
        ("not JSON", b"\x00\x01\x02{{{{".to_vec(), 400),
        ("a byte-order mark", [&b"\xef\xbb\xbf"[..], &chat("")].concat(), 400),
        ("an empty body", Vec::new(), 400),
        ("max_tokens 2^64-1", chat(r#","max_tokens":18446744073709551615"#), 400),
        ("max_tokens 1e300", chat(r#","max_tokens":1e300"#), 400),
        ("max_tokens negative", chat(r#","max_tokens":-1"#), 400),
        ("n one billion", chat(r#","n":1000000000"#), 400),
        ("n zero", chat(r#","n":0"#), 400),
        (
            "5,000 stop sequences",
            chat(&format!(r#","stop":{}"#, serde_json::to_string(&many_stops).unwrap())),
            400,
        ),
        (
            "a prompt past the context window",
            format!(
                r#"{{"model":"smollm2","messages":[{{"role":"user","content":"{long_prompt}"}}],"max_tokens":16}}"#
            )
            .into_bytes(),
            400,
        ),
        (
            "an unknown model",
            br#"{"model":"nope","messages":[{"role":"user","content":"hi"}]}"#.to_vec(),
            404,
        ),
    ];
    for (what, body, expected) in cases {
        let (status, json) = post_bytes(sidecar, body).await;
        assert_eq!(status.as_u16(), expected, "{what}: {json}");
        assert_openai_error(what, status, &json);
    }
}

/// A body over `--max-body-bytes` trickled in chunk by chunk: refused 413 once past the limit,
/// while the client is still sending.
async fn body_over_the_limit_trickled(sidecar: &Sidecar) {
    // Declared too large: refused before a byte of it is read.
    let mut declared = TcpStream::connect(addr(sidecar)).await.unwrap();
    declared
        .write_all(
            format!(
                "POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n",
                100 * MAX_BODY
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let answer = read_answer(&mut declared).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // Chunked, 1 KiB every 10 ms, twice the limit in all.
    let stream = TcpStream::connect(addr(sidecar)).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    write
        .write_all(
            format!(
                "POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                 Transfer-Encoding: chunked\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let sender = tokio::spawn(async move {
        let chunk = format!("400\r\n{}\r\n", " ".repeat(1024));
        let mut sent = 0;
        for _ in 0..(2 * MAX_BODY / 1024) {
            if write.write_all(chunk.as_bytes()).await.is_err() {
                break;
            }
            sent += 1024;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        sent
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(HANG, read.read(&mut buf))
            .await
            .expect("no answer to a body over the limit")
            .unwrap();
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    let sent = tokio::time::timeout(HANG, sender).await.unwrap().unwrap();
    eprintln!("a trickled body over the limit: 413 with {sent} bytes sent");
}

/// Everything the server sends on `stream` until it closes it (bounded by [`HANG`]).
async fn read_answer(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(HANG, stream.read_to_end(&mut out))
        .await
        .expect("the server never closed the connection");
    String::from_utf8_lossy(&out).into_owned()
}

/// `count` connections opened and left silent: the API port holds what it may (4,096 by
/// default), refuses the rest, keeps answering its probes, and lets them all go.
async fn idle_connections(sidecar: &Sidecar, count: usize) {
    let mut idle = Vec::with_capacity(count);
    for _ in 0..count {
        match TcpStream::connect(addr(sidecar)).await {
            Ok(stream) => idle.push(stream),
            Err(e) => panic!("connection {} refused by the kernel: {e}", idle.len()),
        }
    }
    let (status, _) = get(&format!("{}/readyz", sidecar.admin)).await.unwrap();
    assert_eq!(
        status,
        StatusCode::OK,
        "probes must answer under 10,000 idle connections"
    );
    let text = sidecar.metrics().await;
    let open = metric(&text, "sluice_connections_open{listener=\"api\"}").unwrap();
    let refused = metric(
        &text,
        "sluice_connections_refused_total{listener=\"api\",reason=\"max_connections\"}",
    )
    .unwrap_or(0.0);
    eprintln!("{count} idle connections: {open} held, {refused} refused so far");
    assert!(open <= 4096.0, "{open} connections held");
    drop(idle);
    sidecar
        .wait_for_metric("sluice_connections_open{listener=\"api\"}", 0.0)
        .await;
}

/// A client going away mid-head, after the head, mid-body, before the answer's head, before the
/// first token, and mid-stream: the server notices each, settles the request, and serves on.
async fn clients_vanishing_at_every_stage(sidecar: &Sidecar) {
    let counts = |text: &str| {
        (
            metric(text, GONE_SERIES).unwrap_or(0.0),
            metric(text, "sluice_generations_cancelled_total").unwrap_or(0.0),
        )
    };
    let (gone_before, cancelled_before) = counts(&sidecar.metrics().await);
    let body = serde_json::to_vec(&counting_stream(&sidecar.name)).unwrap();
    let head = format!(
        "POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    let completions = format!("POST /v1/completions{}", &head[CHAT.len() + 5..]);
    let stages: [(&str, Vec<u8>); 4] = [
        ("mid-head", head.as_bytes()[..30].to_vec()),
        ("after the head", completions.as_bytes().to_vec()),
        (
            "mid-body",
            [completions.as_bytes(), &body[..body.len() / 2]].concat(),
        ),
        (
            "before the answer's head",
            [completions.as_bytes(), &body].concat(),
        ),
    ];
    for (what, bytes) in stages {
        let mut stream = TcpStream::connect(addr(sidecar)).await.unwrap();
        stream.write_all(&bytes).await.unwrap();
        drop(stream);
        eprintln!("client gone {what}");
    }

    // Before the first token: the answer's head read, nothing of its body.
    let url = format!("{}/v1/completions", sidecar.api);
    let response = tokio::time::timeout(HANG, post_stream(&url, &counting_stream(&sidecar.name)))
        .await
        .expect("no answer head");
    assert_eq!(response.status(), StatusCode::OK);
    drop(response);

    // Mid-stream: three events read, then gone.
    let response = tokio::time::timeout(HANG, post_stream(&url, &counting_stream(&sidecar.name)))
        .await
        .expect("no answer head");
    let mut body = response.into_body();
    let mut events = 0;
    while events < 3 {
        let frame = tokio::time::timeout(HANG, body.frame())
            .await
            .expect("the stream stalled")
            .unwrap()
            .unwrap();
        if let Ok(data) = frame.into_data() {
            events += data.windows(2).filter(|w| w == b"\n\n").count();
        }
    }
    drop(body);

    // Requests left before their answer began count under 499 (a head cut short is no
    // request); streams left after their 200 went out count as 200, as in Envoy's and nginx's
    // logs, and their generation is cancelled. Nothing stays in flight.
    sidecar
        .wait_for_metric("sluice_requests_in_flight", 0.0)
        .await;
    let text = sidecar.metrics().await;
    let (gone, cancelled) = counts(&text);
    let (gone, cancelled) = (gone - gone_before, cancelled - cancelled_before);
    eprintln!("left before the answer (499): {gone}; generations cancelled: {cancelled}");
    assert_eq!(gone, 3.0, "{text}");
    assert!(cancelled >= 2.0, "{text}");
}
