//! Concurrent requests do not see each other: on the real binary, greedy chats that the engine
//! decodes in one batch get exactly the answers (text and log-probabilities) each gets alone.
//! Upstream's CPU decode attention kept one scratch buffer for the whole batch, so every
//! sequence got the attention of the batch's last one, and two users' answers mixed.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use futures::future::join_all;
use serde_json::json;

/// Prompts of the same length in tokens (checked below): the engine batches their decode steps.
const PROMPTS: [&str; 3] = [
    "Tell me about cats.",
    "Name a large city.",
    "Describe the deep ocean.",
];

/// A greedy chat's prompt tokens, text and log-probabilities.
async fn answer(url: &str, prompt: &str, max_tokens: u64) -> (usize, String, Vec<f64>) {
    let body = json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "logprobs": true,
    });
    let (status, res) = post_json(url, &body).await;
    assert!(status.is_success(), "{res}");
    let choice = &res["choices"][0];
    let logprobs = choice["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["logprob"].as_f64().unwrap())
        .collect();
    (
        res["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
        choice["message"]["content"].as_str().unwrap().to_owned(),
        logprobs,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_answers_are_the_answers_alone() {
    let mut sidecar = Sidecar::spawn(&[]);
    sidecar.wait_ready().await;
    let url = format!("{}/v1/chat/completions", sidecar.api);
    let mut alone = Vec::new();
    for prompt in PROMPTS {
        alone.push(answer(&url, prompt, 32).await);
    }
    let lengths: Vec<usize> = alone.iter().map(|a| a.0).collect();
    assert!(
        lengths.iter().all(|&l| l == lengths[0]),
        "the prompts must have one length to be batched: {lengths:?}"
    );
    let distinct: std::collections::BTreeSet<&str> = alone.iter().map(|a| a.1.as_str()).collect();
    assert_eq!(distinct.len(), PROMPTS.len(), "distinct answers: {alone:?}");
    for round in 0..3 {
        let together = join_all(PROMPTS.map(|p| answer(&url, p, 32))).await;
        for (i, (got, want)) in together.iter().zip(&alone).enumerate() {
            assert_eq!(
                got.1, want.1,
                "round {round}: {:?} answered differently in a batch",
                PROMPTS[i]
            );
            assert_eq!(
                got.2, want.2,
                "round {round}: {:?}: other log-probabilities in a batch",
                PROMPTS[i]
            );
        }
    }
}

/// Prompts of different lengths and answer lengths: the engine prefills them one at a time
/// (parking the others), decodes them in one ragged batch, each row its own length, and the
/// short answers finish while the long one goes on.
const UNEVEN: [(&str, u64); 3] = [
    (
        "Write a short story about a dragon who guards a library.",
        32,
    ),
    ("Hi.", 3),
    ("Name three colours of the rainbow.", 8),
];

/// Requests of different lengths decoded together, after their prompts started from the prefix
/// cache, get their answers alone: the padding of the ragged batch stays out of every row's
/// attention. (Upstream's scheduler parked all but one length mid-answer, made the parked
/// sequences prompts again once nothing else ran, and prefilled them whole on top of the KV
/// cache they already had: the model then read its context twice and answered something else.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_requests_get_their_answers_alone() {
    let mut sidecar = Sidecar::spawn(&[]);
    sidecar.wait_ready().await;
    let url = format!("{}/v1/chat/completions", sidecar.api);
    // Sixteen other chats (the cache's entries) between runs, so that every prompt below starts
    // from the template's system turn in the cache, never from its own earlier answer.
    let flush = |round: usize| {
        let url = url.clone();
        async move {
            for i in 0..16 {
                answer(&url, &format!("Flush {round}-{i}."), 1).await;
            }
        }
    };
    flush(0).await;
    let mut alone = Vec::new();
    for (prompt, max_tokens) in UNEVEN {
        alone.push(answer(&url, prompt, max_tokens).await);
    }
    for round in 1..=3 {
        flush(round).await;
        let together = join_all(UNEVEN.map(|(p, n)| answer(&url, p, n))).await;
        for (i, (got, want)) in together.iter().zip(&alone).enumerate() {
            assert_eq!(
                got.1, want.1,
                "round {round}: {:?} answered differently beside the others",
                UNEVEN[i].0
            );
            assert_eq!(
                got.2, want.2,
                "round {round}: {:?}: other log-probabilities beside the others",
                UNEVEN[i].0
            );
        }
    }
}
