//! The sidecar templates and tokenizes each prompt once, before admission, and hands the tokens
//! to the engine: they are the very tokens the engine's own tokenization request answers (so
//! the rate limiter, the context check and the model all see the same prompt), and a
//! generation from them reports their count as `usage.prompt_tokens`, for chat and plain-text
//! prompts alike.
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
async fn prompts_are_tokenized_as_the_engine_tokenizes_them() {
    let engine = common::load_engine(common::model_path()).await;
    let params = GenerationParams {
        max_tokens: Some(1),
        temperature: Some(0.0),
        ..Default::default()
    };
    for prompt in prompts() {
        let tokenized = engine.tokenize(&prompt).await.unwrap();
        let in_engine = engine.tokenize_in_engine(&prompt).await.unwrap();
        assert_eq!(tokenized.tokens(), in_engine, "{prompt:?}");
        let counted = tokenized.len();
        let mut generation = engine.submit(tokenized, &params, false).await.unwrap();
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
