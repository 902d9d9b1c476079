//! Connections against the real binary on loopback: silent, slow and trickling clients are cut
//! (with a 408 where an answer is possible), a flood of connections is refused while the admin
//! port keeps answering its probes, bodies must be declared JSON, requests whose client left
//! are counted under 499, and a stream still running when the drain's grace period ends finishes
//! with an error event and a clean end of the body.
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

/// Bound on any one wait here: a hang fails the test instead of blocking it (not a timing
/// assertion: every cut below comes after about a second).
const HANG: Duration = Duration::from_secs(60);

fn addr(base: &str) -> String {
    base.trim_start_matches("http://").to_owned()
}

/// Everything the server sends until it closes the connection.
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    tokio::time::timeout(HANG, stream.read_to_end(&mut out))
        .await
        .expect("the server never closed the connection")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// The status line's code and the JSON body of a raw HTTP/1.1 answer.
fn status_and_json(raw: &str) -> (u16, serde_json::Value) {
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {raw:?}"));
    (status, serde_json::from_str(body).unwrap_or_default())
}

fn post_head(path: &str, content_length: usize) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {content_length}\r\n\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_slow_and_trickling_clients_are_cut() {
    let mut sidecar = Sidecar::spawn(&[
        "--header-timeout-secs",
        "1",
        "--idle-timeout-secs",
        "1",
        "--body-timeout-secs",
        "1",
        "--body-min-rate",
        "100",
    ]);
    sidecar.wait_ready().await;
    let api = addr(&sidecar.api);

    // A connection that never sends anything is closed without an answer.
    let mut silent = TcpStream::connect(&api).await.unwrap();
    assert_eq!(read_to_close(&mut silent).await, "");

    // A request head begun and never finished: 408 in OpenAI's shape, then closed.
    let mut slow_head = TcpStream::connect(&api).await.unwrap();
    slow_head
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let raw = read_to_close(&mut slow_head).await;
    let (status, body) = status_and_json(&raw);
    assert_eq!(status, 408, "{raw}");
    assert_eq!(body["error"]["code"], "request_timeout", "{raw}");

    // A kept-alive connection is closed once it has waited the idle timeout.
    let mut kept = TcpStream::connect(&api).await.unwrap();
    kept.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let raw = read_to_close(&mut kept).await;
    assert!(raw.starts_with("HTTP/1.1 200 "), "{raw}");

    // A body that stalls after a few bytes: 408.
    let mut stalled = TcpStream::connect(&api).await.unwrap();
    let head = post_head("/v1/chat/completions", 100);
    stalled
        .write_all(format!("{head}{{\"model\"").as_bytes())
        .await
        .unwrap();
    let raw = read_to_close(&mut stalled).await;
    let (status, body) = status_and_json(&raw);
    assert_eq!(status, 408, "{raw}");
    assert!(
        raw.to_ascii_lowercase().contains("connection: close"),
        "{raw}"
    );
    assert_eq!(body["error"]["code"], "request_timeout", "{raw}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("too slowly"),
        "{raw}"
    );

    // A body trickled a byte at a time, far below the minimum rate: 408 long before it ends.
    let trickled = TcpStream::connect(&api).await.unwrap();
    let (mut read, mut write) = trickled.into_split();
    write
        .write_all(post_head("/v1/chat/completions", 10_000).as_bytes())
        .await
        .unwrap();
    let writer = tokio::spawn(async move {
        for _ in 0..10_000 {
            if write.write_all(b" ").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut out = Vec::new();
    tokio::time::timeout(HANG, read.read_to_end(&mut out))
        .await
        .expect("the trickled body was never cut")
        .unwrap();
    writer.abort();
    let raw = String::from_utf8_lossy(&out);
    assert_eq!(status_and_json(&raw).0, 408, "{raw}");

    let text = sidecar.metrics().await;
    let timed_out = |reason: &str| {
        metric(
            &text,
            &format!("sluice_connections_timed_out_total{{listener=\"api\",reason=\"{reason}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert!(timed_out("idle") >= 2.0, "{text}");
    assert!(timed_out("header") >= 1.0, "{text}");
    let answered_408 = metric(
        &text,
        "sluice_requests_total{route=\"/v1/chat/completions\",variant=\"default\",status=\"408\"}",
    );
    assert_eq!(answered_408, Some(2.0), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_is_refused_and_probes_still_answer() {
    // 128 open files: the API port may hold 16 connections; the admin port keeps its own share.
    let mut sidecar = Sidecar::spawn_with_open_files(128, &[]);
    sidecar.wait_ready().await;
    let api = addr(&sidecar.api);

    let mut flood = Vec::new();
    for _ in 0..100 {
        flood.push(TcpStream::connect(&api).await.unwrap());
    }
    // Connections past the limit are answered 503 with Retry-After and closed; the first 16 are
    // held (silent: they would be closed at the header timeout).
    let mut refused = 0;
    for stream in flood.iter_mut().skip(16) {
        let mut out = Vec::new();
        if tokio::time::timeout(HANG, stream.read_to_end(&mut out))
            .await
            .is_ok_and(|r| r.is_ok())
        {
            let raw = String::from_utf8_lossy(&out);
            if !raw.is_empty() {
                let (status, body) = status_and_json(&raw);
                assert_eq!(status, 503, "{raw}");
                assert!(raw.to_ascii_lowercase().contains("retry-after: 1"), "{raw}");
                assert_eq!(body["error"]["code"], "too_many_connections", "{raw}");
                refused += 1;
            }
        }
    }
    assert!(refused > 0, "no connection was answered 503");

    // The probes answer while the API port is full.
    let (status, body) = get(&format!("{}/readyz", sidecar.admin)).await.unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ready\n"));
    let text = sidecar.metrics().await;
    assert_eq!(
        metric(&text, "sluice_connections_open{listener=\"api\"}"),
        Some(16.0),
        "{text}"
    );
    assert!(
        metric(
            &text,
            "sluice_connections_refused_total{listener=\"api\",reason=\"max_connections\"}"
        )
        .unwrap()
            >= 84.0,
        "{text}"
    );

    // Once the flood is gone, requests are served again.
    drop(flood);
    sidecar
        .wait_for_metric("sluice_connections_open{listener=\"api\"}", 0.0)
        .await;
    sidecar.chat_once().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_may_hold_only_its_share_of_connections() {
    let mut sidecar = Sidecar::spawn(&["--max-connections-per-client", "2"]);
    sidecar.wait_ready().await;
    let api = addr(&sidecar.api);
    // Two silent connections from this address are held (until the header timeout, 20 s).
    let held = [
        TcpStream::connect(&api).await.unwrap(),
        TcpStream::connect(&api).await.unwrap(),
    ];
    sidecar
        .wait_for_metric("sluice_connections_open{listener=\"api\"}", 2.0)
        .await;
    // A third is refused, naming the per-client limit.
    let mut third = TcpStream::connect(&api).await.unwrap();
    let raw = read_to_close(&mut third).await;
    let (status, body) = status_and_json(&raw);
    assert_eq!(status, 503, "{raw}");
    assert_eq!(body["error"]["code"], "too_many_connections", "{raw}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("from one client"),
        "{raw}"
    );
    let text = sidecar.metrics().await;
    assert_eq!(
        metric(
            &text,
            "sluice_connections_refused_total{listener=\"api\",reason=\"max_connections_per_client\"}"
        ),
        Some(1.0),
        "{text}"
    );
    // The admin port is not counted against the client.
    assert_eq!(
        get(&format!("{}/healthz", sidecar.admin)).await.unwrap().0,
        StatusCode::OK
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_must_be_json_and_requests_left_by_their_client_count_as_499() {
    let mut sidecar = Sidecar::spawn(&[]);
    sidecar.wait_ready().await;
    let api = addr(&sidecar.api);
    let chat = "/v1/chat/completions";
    let body = br#"{"model":"smollm2","messages":[]}"#;

    // Content-Type: missing, text/plain (what a web page may POST cross-origin), JSON.
    for (content_type, expected) in [
        (None, 415),
        (Some("text/plain"), 415),
        (Some("application/x-www-form-urlencoded"), 415),
        (Some("Application/JSON; charset=utf-8"), 400),
    ] {
        let mut stream = TcpStream::connect(&api).await.unwrap();
        let header = content_type
            .map(|t| format!("Content-Type: {t}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "POST {chat} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{header}Content-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        stream.write_all(body).await.unwrap();
        let raw = read_to_close(&mut stream).await;
        let (status, json) = status_and_json(&raw);
        assert_eq!(status, expected, "{content_type:?}: {raw}");
        if expected == 415 {
            assert_eq!(json["error"]["code"], "unsupported_media_type", "{raw}");
        }
    }

    // A body abandoned half-way: nobody to answer, counted under 499 (not 400).
    let mut abandoned = TcpStream::connect(&api).await.unwrap();
    abandoned
        .write_all(format!("{}{{\"mod", post_head(chat, 100)).as_bytes())
        .await
        .unwrap();
    abandoned.shutdown().await.unwrap();
    drop(abandoned);

    // Cleartext HTTP/2 is not served: its preface gets the connection closed.
    let mut h2 = TcpStream::connect(&api).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_to_close(&mut h2).await, "");

    sidecar.wait_for_metric("sluice_requests_total{route=\"/v1/chat/completions\",variant=\"default\",status=\"499\"}",
        1.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_still_running_when_the_drain_ends_finishes_with_an_error_event() {
    let mut sidecar = Sidecar::spawn(&["--drain-grace-secs", "1"]);
    sidecar.wait_ready().await;
    let res = post_stream(
        &format!("{}/v1/completions", sidecar.api),
        &counting_stream(&sidecar.name),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    sidecar.sigterm();
    assert_stream_ends_with_error(first.to_vec(), body, "shutting_down").await;

    let status = tokio::time::timeout(HANG, async {
        loop {
            if let Some(status) = sidecar.child.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("did not exit after the drain");
    assert!(status.success(), "{status}:\n{}", sidecar.log());
    assert!(
        sidecar
            .log()
            .contains("grace period over; ending answers still running"),
        "{}",
        sidecar.log()
    );
}
