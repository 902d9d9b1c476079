//! Request fields outside those the server reads: one that would change the answer is refused
//! with a 400 naming it (silently ignoring it would answer a different question); one that
//! changes nothing the server does (bookkeeping, hints) is ignored, as OpenAI ignores what
//! does not apply. The README's field table lists both.

use std::collections::BTreeMap;

use serde_json::Value;

use super::ApiError;

/// Fields that would change the answer and that this server does not do, with what to use
/// instead.
const REFUSED: &[(&str, &str)] = &[
    ("audio", "audio output is not supported"),
    ("prediction", "predicted outputs are not supported"),
    (
        "functions",
        "the deprecated `functions` is not supported: send `tools`",
    ),
    (
        "function_call",
        "the deprecated `function_call` is not supported: send `tool_choice`",
    ),
    ("web_search_options", "web search is not supported"),
    (
        "guided_json",
        "vLLM's `guided_json` is not supported: send `response_format` with a json_schema",
    ),
    (
        "guided_regex",
        "vLLM's `guided_regex` is not supported: send `response_format` with a json_schema",
    ),
    (
        "guided_choice",
        "vLLM's `guided_choice` is not supported: send `response_format` with an enum json_schema",
    ),
    (
        "guided_grammar",
        "vLLM's `guided_grammar` is not supported: send `response_format` with a json_schema",
    ),
    (
        "grammar",
        "llama.cpp's `grammar` is not supported: send `response_format` with a json_schema",
    ),
    (
        "json_schema",
        "a top-level `json_schema` is not supported: send it inside `response_format`",
    ),
];

/// Checks the fields the request types did not read (`other`): the first that would change
/// the answer is refused by name; the rest are ignored.
pub fn check_unread(other: &BTreeMap<String, Value>) -> Result<(), ApiError> {
    for (name, value) in other {
        if value.is_null() {
            continue;
        }
        if let Some((_, why)) = REFUSED.iter().find(|(field, _)| field == name) {
            return Err(ApiError::unsupported(name.clone(), *why));
        }
        // Only text comes out of this server; asking for just that changes nothing.
        if name == "modalities" && *value != serde_json::json!(["text"]) {
            return Err(ApiError::unsupported(
                "modalities",
                "only [\"text\"] output is supported",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn fields_that_change_the_answer_are_refused_by_name() {
        let fields = |pairs: &[(&str, Value)]| -> BTreeMap<String, Value> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect()
        };
        let harmless = fields(&[
            ("user", json!("u-1")),
            ("metadata", json!({"team": "a"})),
            ("store", json!(false)),
            ("service_tier", json!("auto")),
            ("modalities", json!(["text"])),
            ("audio", Value::Null),
        ]);
        assert!(check_unread(&harmless).is_ok());
        for (name, value) in [
            ("audio", json!({"voice": "alloy"})),
            ("modalities", json!(["text", "audio"])),
            ("functions", json!([])),
            ("guided_json", json!({})),
        ] {
            let e = check_unread(&fields(&[(name, value)])).unwrap_err();
            let body = serde_json::to_value(e.body()).unwrap();
            assert_eq!(body["error"]["param"], name);
            assert_eq!(body["error"]["code"], "unsupported_parameter");
        }
    }
}
