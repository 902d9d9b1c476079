//! `fetch`'s pure parts: flags, the URL as logged, backoff, `Content-Range` (tests/fetch.rs runs the
//! downloads against a local server).
#![allow(clippy::unwrap_used)]

use super::*;
use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    fetch: FetchArgs,
}

fn parse(args: &[&str]) -> Result<FetchConfig> {
    let mut all = vec!["x"];
    all.extend_from_slice(args);
    Cli::try_parse_from(all)
        .map_err(|e| StartupError::Config(e.to_string()))?
        .fetch
        .validate()
}

const HASH: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

#[test]
fn validates_flags() {
    let ok = parse(&["--url", "https://h/m.gguf", "--out", "/m/model.gguf"]).unwrap();
    assert_eq!(ok.attempts, 5);
    assert_eq!(ok.stall_timeout, Duration::from_secs(60));
    let upper = format!("sha256:{}", HASH.to_uppercase());
    let ok = parse(&["--url", "http://h/m", "--out", "m", "--sha256", &upper]).unwrap();
    assert_eq!(ok.sha256.as_deref(), Some(HASH));
    for (args, want) in [
        (&["--url", "ftp://h/m", "--out", "m"][..], "http or https"),
        (&["--url", "not a url", "--out", "m"][..], "is not a URL"),
        (
            &["--url", "http://h/m", "--out", "m", "--sha256", "abc"][..],
            "64 hex digits",
        ),
        (
            &["--url", "http://h/m", "--out", "m", "--attempts", "0"][..],
            "--attempts",
        ),
        (
            &[
                "--url",
                "http://h/m",
                "--out",
                "m",
                "--stall-timeout-secs",
                "0",
            ][..],
            "--stall-timeout-secs",
        ),
    ] {
        let err = parse(args).unwrap_err().to_string();
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn shown_url_hides_secrets() {
    let url = reqwest::Url::parse("https://u:p@h.example/a/m.gguf?X-Amz-Signature=s").unwrap();
    assert_eq!(shown_url(&url), "https://h.example/a/m.gguf?…");
}

#[test]
fn backoff_doubles_and_is_capped() {
    let base = Duration::from_secs(1);
    assert_eq!(backoff(base, 1), Duration::from_secs(1));
    assert_eq!(backoff(base, 3), Duration::from_secs(4));
    assert_eq!(backoff(base, 30), MAX_WAIT);
}

#[test]
fn parses_content_range() {
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_RANGE, "bytes 100-199/200".parse().unwrap());
    assert_eq!(content_range_start(&h), Some(100));
}
