//! Constrained output: the formats a generation can be held to (`response_format`, tool calls)
//! and the grammar each compiles to.

use mistralrs::core::llguidance::{JsonCompileOptions, api::TopLevelGrammar};

/// A format the output is held to by constrained decoding: the engine masks, at every step,
/// the tokens that cannot continue a valid output, so what it generates always parses (unless
/// the completion budget cuts it short).
#[derive(Clone, Debug, PartialEq)]
pub enum OutputFormat {
    /// A JSON value valid against this JSON Schema (`{"type":"object"}` for JSON mode).
    JsonSchema(serde_json::Value),
    /// Either such a JSON value or text that does not start with `{` (so the first token
    /// says which): a tool call the model may make or not.
    TextOrJson(serde_json::Value),
}

impl OutputFormat {
    /// The grammar the engine's constraint compiles: compact JSON (no free whitespace between
    /// tokens, as OpenAI's structured outputs produce), and a schema keyword the compiler cannot
    /// enforce is an error, never silently dropped.
    ///
    /// The document is followed by one of the model's end-of-turn tokens (`eos`): the grammar
    /// library ends a finished grammar with the tokenizer's generic end-of-text token, which a
    /// chat model's engine may not stop at (SmolLM2 stops at `<|im_end|>`, not at
    /// `<|endoftext|>`), and the sequence would then run on to its token budget.
    pub(super) fn grammar(&self, eos: &[u32]) -> TopLevelGrammar {
        let (Self::JsonSchema(schema) | Self::TextOrJson(schema)) = self;
        let mut schema = schema.clone();
        if schema.is_object() {
            let options = JsonCompileOptions {
                whitespace_flexible: false,
                lenient: false,
                ..JsonCompileOptions::default()
            };
            options.apply_to(&mut schema);
        }
        let end = match eos {
            [] => String::new(),
            ids => {
                let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
                format!(" <[{}]>", ids.join(","))
            }
        };
        let lark = match self {
            Self::JsonSchema(_) => format!("start: %json {schema}{end}"),
            Self::TextOrJson(_) => {
                format!("start: (TEXT | %json {schema}){end}\nTEXT: /[^{{][\\s\\S]*/")
            }
        };
        TopLevelGrammar::from_lark(lark)
    }
}
