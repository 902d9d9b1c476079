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

async fn answer(url: &str, prompt: &str) -> (usize, String, Vec<f64>) {
    let body = json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 32,
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
        alone.push(answer(&url, prompt).await);
    }
    let lengths: Vec<usize> = alone.iter().map(|a| a.0).collect();
    assert!(
        lengths.iter().all(|&l| l == lengths[0]),
        "the prompts must have one length to be batched: {lengths:?}"
    );
    let distinct: std::collections::BTreeSet<&str> = alone.iter().map(|a| a.1.as_str()).collect();
    assert_eq!(distinct.len(), PROMPTS.len(), "distinct answers: {alone:?}");
    for round in 0..3 {
        let together = join_all(PROMPTS.map(|p| answer(&url, p))).await;
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
