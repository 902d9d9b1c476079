//! The prompt token count admission uses (the exact count the rate limiter reserves and the
//! context check compares) is the engine's: counted from the model's chat template and tokenizer
//! directly, it equals what the engine's own tokenization request answers and what a
//! generation reports as `usage.prompt_tokens`, for chat and plain-text prompts alike.
#![allow(clippy::unwrap_used)]

mod common;

use sluice_sidecar::engine::{ChatTurn, Event, GenerationParams, Prompt};

fn turn(role: &str, content: &str) -> ChatTurn {
    ChatTurn {
        role: role.into(),
        content: content.into(),
    }
}

fn prompts() -> Vec<Prompt> {
    vec![
        Prompt::Chat(vec![turn("user", "Say hello.")]),
        Prompt::Chat(vec![
            turn("system", "You are terse."),
            turn("user", "Name a colour."),
            turn("assistant", "Blue."),
            turn("user", "Another, in French: « vert » ? 🌿"),
        ]),
        Prompt::Text("The capital of France is".into()),
        Prompt::Text("  leading spaces, tabs\tand\nnewlines, ünïcödé, 数字 123456".into()),
        Prompt::Text("word ".repeat(300)),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_counts_match_the_engine_and_usage() {
    let engine = common::load_engine(common::model_path()).await;
    let params = GenerationParams {
        max_tokens: Some(1),
        temperature: Some(0.0),
        ..Default::default()
    };
    for prompt in prompts() {
        let counted = engine.count_prompt_tokens(&prompt).await.unwrap();
        let in_engine = engine.count_prompt_tokens_in_engine(&prompt).await.unwrap();
        assert_eq!(counted, in_engine, "{prompt:?}");
        let mut generation = engine.submit(prompt.clone(), &params, false).await.unwrap();
        let mut usage = None;
        while let Some(event) = generation.next().await {
            match event {
                Event::Done { usage: u, .. } => {
                    usage = Some(u);
                    break;
                }
                Event::Delta {
                    finish_reason: Some(_),
                    usage: u,
                    ..
                } => {
                    usage = u;
                    break;
                }
                Event::Delta { .. } => {}
                Event::Failed(e) => panic!("{e}"),
            }
        }
        assert_eq!(usage.unwrap().prompt_tokens, counted, "usage of {prompt:?}");
    }
}
