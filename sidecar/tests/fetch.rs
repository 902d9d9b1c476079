//! `sluice-sidecar fetch` against a real HTTP server on 127.0.0.1: the real binary, real
//! sockets, small generated payloads.
#![allow(clippy::unwrap_used)]

use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};

// === a tiny HTTP/1.1 server ===

/// One request the server received: the request line and its headers (lowercased names).
#[derive(Clone, Debug)]
struct Req {
    headers: Vec<(String, String)>,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Serves each connection with `handler(index of the request, request, socket)`; every
/// response closes its connection.
struct Server {
    url: String,
    requests: Arc<Mutex<Vec<Req>>>,
}

impl Server {
    fn start(handler: impl Fn(usize, &Req, &mut TcpStream) + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!(
            "http://{}/models/model.gguf",
            listener.local_addr().unwrap()
        );
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (log, handler) = (requests.clone(), Arc::new(handler));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let (log, handler) = (log.clone(), handler.clone());
                std::thread::spawn(move || {
                    let Some(req) = read_request(&stream) else {
                        return;
                    };
                    let index = {
                        let mut log = log.lock().unwrap();
                        log.push(req.clone());
                        log.len() - 1
                    };
                    handler(index, &req, &mut stream);
                });
            }
        });
        Self { url, requests }
    }

    fn requests(&self) -> Vec<Req> {
        self.requests.lock().unwrap().clone()
    }
}

fn read_request(stream: &TcpStream) -> Option<Req> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    if !line.starts_with("GET ") {
        return None;
    }
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':')?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    Some(Req { headers })
}

/// Writes a response head; `body_len` becomes Content-Length.
fn head(stream: &mut TcpStream, status: &str, body_len: usize, extra: &[(&str, String)]) {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {body_len}\r\nConnection: close\r\nContent-Type: application/octet-stream\r\n"
    );
    for (name, value) in extra {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
}

const ETAG: &str = "\"v1\"";

/// The whole file (200), or the rest of it from a `Range: bytes=N-` request (206), as a server
/// that supports resuming answers.
fn serve_file(req: &Req, stream: &mut TcpStream, payload: &[u8]) {
    let ranges = [
        ("Accept-Ranges", "bytes".to_owned()),
        ("ETag", ETAG.to_owned()),
    ];
    match req
        .header("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|r| r.parse::<usize>().ok())
    {
        Some(from) if req.header("if-range") == Some(ETAG) => {
            let rest = &payload[from..];
            let range = format!("bytes {from}-{}/{}", payload.len() - 1, payload.len());
            let mut headers = ranges.to_vec();
            headers.push(("Content-Range", range));
            head(stream, "206 Partial Content", rest.len(), &headers);
            let _ = stream.write_all(rest);
        }
        _ => {
            head(stream, "200 OK", payload.len(), &ranges);
            let _ = stream.write_all(payload);
        }
    }
}

// === helpers ===

/// Deterministic, incompressible-looking bytes.
fn payload(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn sha256(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// A fresh directory under the temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("sluice-fetch-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn out(&self) -> PathBuf {
        self.0.join("model.gguf")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn part(out: &Path) -> PathBuf {
    PathBuf::from(format!("{}.part", out.display()))
}

/// Runs `sluice-sidecar fetch --url <url> --out <out> <extra>` with short retry delays.
fn fetch(url: &str, out: &Path, extra: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice-sidecar"));
    for (name, _) in std::env::vars() {
        if name.starts_with("SLUICE_") {
            cmd.env_remove(name);
        }
    }
    cmd.args(["fetch", "--url", url, "--out"])
        .arg(out)
        .args(["--retry-backoff-secs", "0.1"])
        .args(extra)
        .env("RUST_LOG", "info")
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// What Kubernetes shows as the termination reason: the last line.
fn last_line(out: &Output) -> String {
    stderr(out).lines().last().unwrap_or_default().to_owned()
}

// === tests ===

#[test]
fn downloads_and_verifies_the_sha256() {
    let body = payload(300_000);
    let hash = sha256(&body);
    let served = body.clone();
    let server = Server::start(move |_, req, s| serve_file(req, s, &served));
    let dir = TempDir::new("ok");
    let out = fetch(&server.url, &dir.out(), &["--sha256", &hash]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(dir.out()).unwrap(), body);
    assert!(!part(&dir.out()).exists(), "the .part file is renamed away");
    assert!(
        stderr(&out).contains("download complete"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn sha256_mismatch_fails_with_both_hashes_and_leaves_no_file() {
    let body = payload(50_000);
    let actual = sha256(&body);
    let expected = sha256(b"something else");
    let served = body.clone();
    let server = Server::start(move |_, req, s| serve_file(req, s, &served));
    let dir = TempDir::new("mismatch");
    let out = fetch(&server.url, &dir.out(), &["--sha256", &expected]);
    assert!(!out.status.success());
    let line = last_line(&out);
    assert!(line.contains("sha256 mismatch"), "{line}");
    assert!(line.contains(&expected) && line.contains(&actual), "{line}");
    assert!(!dir.out().exists());
    assert!(!part(&dir.out()).exists());
}

#[test]
fn retries_a_503_then_succeeds() {
    let body = payload(20_000);
    let served = body.clone();
    let server = Server::start(move |i, req, s| {
        if i == 0 {
            head(s, "503 Service Unavailable", 4, &[]);
            let _ = s.write_all(b"busy");
        } else {
            serve_file(req, s, &served);
        }
    });
    let dir = TempDir::new("retry");
    let out = fetch(&server.url, &dir.out(), &["--sha256", &sha256(&body)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(dir.out()).unwrap(), body);
    assert_eq!(server.requests().len(), 2);
    assert!(
        stderr(&out).contains("503"),
        "the retry is logged with the status"
    );
}

#[test]
fn resumes_with_a_range_request_after_the_connection_drops() {
    let body = payload(200_000);
    let half = body.len() / 2;
    let served = body.clone();
    let server = Server::start(move |i, req, s| {
        if i == 0 {
            head(
                s,
                "200 OK",
                served.len(),
                &[("Accept-Ranges", "bytes".into()), ("ETag", ETAG.into())],
            );
            s.write_all(&served[..half]).unwrap();
            // Dropping the socket cuts the body short.
        } else {
            serve_file(req, s, &served);
        }
    });
    let dir = TempDir::new("resume");
    let out = fetch(&server.url, &dir.out(), &["--sha256", &sha256(&body)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(dir.out()).unwrap(), body);
    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(
        requests[1].header("range"),
        Some(format!("bytes={half}-").as_str())
    );
}

#[test]
fn a_stalled_download_fails_within_the_stall_timeout() {
    let body = payload(100_000);
    let served = body.clone();
    let server = Server::start(move |_, _, s| {
        head(
            s,
            "200 OK",
            served.len(),
            &[("Accept-Ranges", "bytes".into()), ("ETag", ETAG.into())],
        );
        s.write_all(&served[..served.len() / 2]).unwrap();
        s.flush().unwrap();
        // Keep the connection open and send nothing more.
        std::thread::sleep(Duration::from_secs(120));
    });
    let dir = TempDir::new("stall");
    let started = Instant::now();
    let out = fetch(
        &server.url,
        &dir.out(),
        &["--stall-timeout-secs", "1", "--attempts", "2"],
    );
    let elapsed = started.elapsed();
    assert!(!out.status.success());
    assert!(elapsed < Duration::from_secs(20), "took {elapsed:?}");
    let line = last_line(&out);
    assert!(line.contains("stalled"), "{line}");
    assert!(line.contains("gave up after 2 attempts"), "{line}");
    assert!(!dir.out().exists());
}

#[test]
fn not_found_fails_at_once() {
    let server = Server::start(|_, _, s| {
        head(s, "404 Not Found", 9, &[]);
        let _ = s.write_all(b"not found");
    });
    let dir = TempDir::new("404");
    let out = fetch(&server.url, &dir.out(), &["--attempts", "5"]);
    assert!(!out.status.success());
    let line = last_line(&out);
    assert!(line.contains("HTTP 404"), "{line}");
    assert!(line.contains(&server.url), "names the URL: {line}");
    assert_eq!(server.requests().len(), 1, "a 404 is not retried");
    assert!(!dir.out().exists());
}

#[test]
fn an_existing_file_with_the_right_sha256_is_not_downloaded_again() {
    let body = payload(10_000);
    let server = Server::start(|_, _, s| {
        head(s, "500 Internal Server Error", 0, &[]);
    });
    let dir = TempDir::new("exists");
    std::fs::write(dir.out(), &body).unwrap();
    let out = fetch(&server.url, &dir.out(), &["--sha256", &sha256(&body)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(server.requests().len(), 0);
    assert_eq!(std::fs::read(dir.out()).unwrap(), body);
}
