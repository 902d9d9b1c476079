//! Request bodies to a [`GenerationRequest`]: the JSON parsed (malformed JSON told apart from
//! wrong types), every field checked as OpenAI does, and the prompt's completion budget checked
//! against the context window once the prompt is counted.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::{
    engine::{ChatTurn, Engine, GenerationParams, OutputFormat, Prompt},
    openai::{
        ApiError, Kind, fields,
        tools::{self, ToolAnswer},
        types::{
            ChatCompletionRequest, CompletionRequest, MessageContent, PromptInput,
            SamplingExtensions, Stop,
        },
    },
};

/// A validated generation request, whichever route it came from.
#[derive(Debug, PartialEq)]
pub struct GenerationRequest {
    /// Which chunk/response shape.
    pub kind: Kind,
    /// Model id asked for.
    pub model: String,
    /// The prompt.
    pub prompt: Prompt,
    /// Sampling.
    pub params: GenerationParams,
    /// SSE or JSON.
    pub stream: bool,
    /// Final usage chunk on streams.
    pub include_usage: bool,
    /// The tool call the answer is (`tool_choice`), when one is forced.
    pub tool_answer: Option<ToolAnswer>,
    /// How many choices to generate (`n`).
    pub choices: usize,
}

/// The most choices (`n`) one request may ask for: each is a sequence in the engine's batch.
pub const MAX_CHOICES: u64 = 16;

/// Parses and validates the body of a `kind` request.
pub fn parse(kind: Kind, body: &[u8]) -> Result<GenerationRequest, ApiError> {
    match kind {
        Kind::Chat => parse_json::<ChatCompletionRequest>(body)?.validate(),
        Kind::Completion => parse_json::<CompletionRequest>(body)?.validate(),
    }
}

/// Parses a JSON body into `T`, telling malformed JSON from wrong types.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => {
                ApiError::MalformedJson(e.to_string())
            }
            Category::Data => ApiError::InvalidRequest {
                message: format!("invalid request body: {e}"),
                param: None,
                code: None,
            },
        }
    })
}

fn check_common(
    temperature: Option<f64>,
    top_p: Option<f64>,
    presence: Option<f32>,
    frequency: Option<f32>,
    stop: Option<Stop>,
) -> Result<Vec<String>, ApiError> {
    if let Some(t) = temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(ApiError::invalid(
            "temperature",
            format!("{t} is not a valid temperature: it must be between 0 and 2"),
        ));
    }
    if let Some(p) = top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(ApiError::invalid(
            "top_p",
            format!("{p} is not a valid top_p: it must be greater than 0 and at most 1"),
        ));
    }
    for (name, v) in [
        ("presence_penalty", presence),
        ("frequency_penalty", frequency),
    ] {
        if let Some(v) = v
            && !(-2.0..=2.0).contains(&v)
        {
            return Err(ApiError::invalid(
                name,
                format!("{v} is not a valid {name}: it must be between -2 and 2"),
            ));
        }
    }
    let stop = match stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > 4 {
        return Err(ApiError::invalid(
            "stop",
            "at most 4 stop sequences are allowed",
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "stop",
            "stop sequences must not be empty",
        ));
    }
    Ok(stop)
}

/// `logit_bias` as OpenAI takes it: an object whose keys are token ids (non-negative integers,
/// as strings) and whose values are biases between -100 and 100. Whether the ids are in the
/// model's vocabulary only the loaded engine knows: [`check_logit_bias`].
fn parse_logit_bias(logit_bias: Option<Value>) -> Result<BTreeMap<u32, f32>, ApiError> {
    let entries = match logit_bias {
        None => return Ok(BTreeMap::new()),
        Some(Value::Object(entries)) => entries,
        Some(_) => {
            return Err(ApiError::invalid(
                "logit_bias",
                "logit_bias must be an object mapping token ids to biases",
            ));
        }
    };
    let mut bias = BTreeMap::new();
    for (key, value) in entries {
        let Ok(id) = key.parse::<u32>() else {
            return Err(ApiError::invalid(
                "logit_bias",
                format!(
                    "invalid key {key:?} in logit_bias: keys must be token ids (non-negative integers)"
                ),
            ));
        };
        let Some(b) = value.as_f64().filter(|b| (-100.0..=100.0).contains(b)) else {
            return Err(ApiError::invalid(
                "logit_bias",
                format!(
                    "invalid bias {value} for token {id} in logit_bias: it must be a number between -100 and 100"
                ),
            ));
        };
        bias.insert(id, b as f32);
    }
    Ok(bias)
}

/// Checks that every token id in the request's `logit_bias` is in the loaded model's
/// vocabulary of `vocab_size` ids ([`crate::engine::Engine::vocab_size`]): parsing cannot, as
/// only the engine knows the vocabulary, so this runs once the request is parsed and an engine
/// is loaded.
pub fn check_logit_bias(request: &GenerationRequest, vocab_size: usize) -> Result<(), ApiError> {
    match request
        .params
        .logit_bias
        .keys()
        .find(|&&id| usize::try_from(id).map_or(true, |id| id >= vocab_size))
    {
        None => Ok(()),
        Some(id) => Err(ApiError::invalid(
            "logit_bias",
            format!(
                "invalid key {id} in logit_bias: token {id} is not in the model's vocabulary of {vocab_size} tokens (ids 0 to {})",
                vocab_size.saturating_sub(1)
            ),
        )),
    }
}

/// Checks that the engine can hold the output to the request's format (`response_format`, or
/// the forced tool call's parameters): a schema keyword constrained decoding cannot enforce is
/// a 400 naming the field, before the request is admitted.
pub fn check_output(request: &GenerationRequest, engine: &Engine) -> Result<(), ApiError> {
    engine.check_output(&request.params).map_err(|e| {
        let param = if request.tool_answer.is_some() {
            "tools"
        } else {
            "response_format"
        };
        ApiError::unsupported(
            param,
            format!("{param} cannot be enforced by constrained decoding: {e}"),
        )
    })
}

/// `response_format`: text (`None`), JSON mode, or a JSON Schema.
fn parse_response_format(format: Option<Value>) -> Result<Option<OutputFormat>, ApiError> {
    let Some(format) = format.filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    let invalid = |message: &str| Err(ApiError::invalid("response_format", message));
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(OutputFormat::JsonSchema(
            serde_json::json!({"type": "object"}),
        ))),
        Some("json_schema") => {
            let Some(spec) = format.get("json_schema").and_then(Value::as_object) else {
                return invalid(
                    "response_format.json_schema must be an object with a name and a schema",
                );
            };
            if spec
                .get("name")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                return invalid("response_format.json_schema.name is required");
            }
            match spec.get("schema") {
                None | Some(Value::Null) => Ok(Some(OutputFormat::JsonSchema(
                    serde_json::json!({"type": "object"}),
                ))),
                Some(schema @ (Value::Object(_) | Value::Bool(_))) => {
                    Ok(Some(OutputFormat::JsonSchema(schema.clone())))
                }
                Some(_) => {
                    invalid("response_format.json_schema.schema must be a JSON Schema object")
                }
            }
        }
        Some(other) => Err(ApiError::invalid(
            "response_format",
            format!(
                "invalid response_format type {other:?}: expected \"text\", \"json_object\" or \"json_schema\""
            ),
        )),
        None => invalid("response_format must be an object with a type"),
    }
}

/// The sampling extensions (`top_k`, `min_p`, `repetition_penalty`), checked, into `params`.
fn apply_extensions(e: SamplingExtensions, params: &mut GenerationParams) -> Result<(), ApiError> {
    if let Some(p) = e.min_p
        && !(0.0..=1.0).contains(&p)
    {
        return Err(ApiError::invalid(
            "min_p",
            format!("{p} is not a valid min_p: it must be between 0 and 1"),
        ));
    }
    if let Some(r) = e.repetition_penalty
        && !(r > 0.0 && r <= 2.0)
    {
        return Err(ApiError::invalid(
            "repetition_penalty",
            format!(
                "{r} is not a valid repetition_penalty: it must be greater than 0 and at most 2"
            ),
        ));
    }
    // top_k 0 means "all tokens", as in vLLM and llama.cpp.
    params.top_k = e
        .top_k
        .filter(|&k| k > 0)
        .map(|k| usize::try_from(k).unwrap_or(usize::MAX));
    params.min_p = e.min_p;
    params.repetition_penalty = e.repetition_penalty;
    Ok(())
}

/// The calls of an assistant message, as the model is shown them in a follow-up turn (the
/// chat template of a model without tool support has no other place for them).
fn render_tool_calls(i: usize, calls: Option<Value>) -> Result<String, ApiError> {
    let calls = match calls {
        Some(Value::Array(calls)) if !calls.is_empty() => calls,
        None | Some(Value::Null | Value::Array(_)) => return Ok(String::new()),
        Some(_) => {
            return Err(ApiError::invalid(
                format!("messages[{i}].tool_calls"),
                format!("messages[{i}].tool_calls must be an array of calls"),
            ));
        }
    };
    let mut shown = Vec::with_capacity(calls.len());
    for (j, call) in calls.iter().enumerate() {
        let function = call.get("function");
        let name = function.and_then(|f| f.get("name")).and_then(Value::as_str);
        let arguments = function
            .and_then(|f| f.get("arguments"))
            .and_then(Value::as_str);
        let (Some(name), Some(arguments)) = (name, arguments) else {
            return Err(ApiError::invalid(
                format!("messages[{i}].tool_calls[{j}]"),
                format!(
                    "messages[{i}].tool_calls[{j}] must have a function with a name and arguments (a string)"
                ),
            ));
        };
        let arguments = serde_json::from_str::<Value>(arguments)
            .unwrap_or_else(|_| Value::String(arguments.to_owned()));
        shown.push(serde_json::json!({"name": name, "arguments": arguments}));
    }
    Ok(serde_json::to_string(&shown).unwrap_or_default())
}

/// The `tool_call_id` of `messages[i]`, a tool message: required, as it names the call the
/// message answers, and a non-empty string.
fn check_tool_call_id(i: usize, tool_call_id: Option<&Value>) -> Result<(), ApiError> {
    let param = format!("messages[{i}].tool_call_id");
    match tool_call_id {
        Some(Value::String(id)) if !id.is_empty() => Ok(()),
        Some(Value::String(_)) => Err(ApiError::invalid(
            param,
            format!("messages[{i}].tool_call_id must not be empty"),
        )),
        None | Some(Value::Null) => Err(ApiError::invalid(
            param,
            format!(
                "messages[{i}] is a tool message without a tool_call_id: it must name the call it answers"
            ),
        )),
        Some(other) => Err(ApiError::invalid(
            param,
            format!("messages[{i}].tool_call_id must be a string, not {other}"),
        )),
    }
}

/// `n`: how many choices, 1 to [`MAX_CHOICES`].
fn check_choices(n: Option<u64>) -> Result<usize, ApiError> {
    match n.unwrap_or(1) {
        0 => Err(ApiError::invalid("n", "n must be at least 1")),
        n if n > MAX_CHOICES => Err(ApiError::invalid(
            "n",
            format!(
                "n = {n} is more choices than this server generates at once: at most {MAX_CHOICES}"
            ),
        )),
        n => Ok(n as usize),
    }
}

fn check_max_tokens(param: &str, v: Option<u64>) -> Result<Option<usize>, ApiError> {
    match v {
        None => Ok(None),
        Some(0) => Err(ApiError::invalid(
            param,
            format!("{param} must be at least 1"),
        )),
        Some(v) => Ok(Some(usize::try_from(v).unwrap_or(usize::MAX))),
    }
}

impl ChatCompletionRequest {
    /// Validates the request into a [`GenerationRequest`].
    pub fn validate(self) -> Result<GenerationRequest, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid(
                "messages",
                "messages must contain at least one message",
            ));
        }
        fields::check_unread(&self.other)?;
        let logprobs = match (self.logprobs, self.top_logprobs) {
            (Some(true), None) => Some(0),
            (Some(true), Some(top)) if top <= 20 => Some(top as usize),
            (Some(true), Some(top)) => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    format!("top_logprobs must be between 0 and 20, not {top}"),
                ));
            }
            (_, Some(_)) => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    "top_logprobs needs logprobs set to true",
                ));
            }
            (_, None) => None,
        };
        let response_format = parse_response_format(self.response_format)?;
        let tool_plan = tools::parse(self.tools, self.tool_choice)?;
        if tool_plan.is_some() && response_format.is_some() {
            return Err(ApiError::invalid(
                "response_format",
                "a forced tool call already fixes the output: send either response_format or tool_choice, not both",
            ));
        }
        let choices = check_choices(self.n)?;
        let stop = check_common(
            self.temperature,
            self.top_p,
            self.presence_penalty,
            self.frequency_penalty,
            self.stop,
        )?;
        let max_tokens = match self.max_completion_tokens {
            Some(_) => check_max_tokens("max_completion_tokens", self.max_completion_tokens)?,
            None => check_max_tokens("max_tokens", self.max_tokens)?,
        };
        let logit_bias = parse_logit_bias(self.logit_bias)?;
        let mut turns = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.into_iter().enumerate() {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                "tool" => "tool",
                other => {
                    return Err(ApiError::invalid(
                        format!("messages[{i}].role"),
                        format!(
                            "invalid role {other:?}: expected system, developer, user, assistant or tool"
                        ),
                    ));
                }
            };
            if role == "tool" {
                check_tool_call_id(i, m.tool_call_id.as_ref())?;
            }
            let calls = render_tool_calls(i, m.tool_calls)?;
            if !calls.is_empty() && role != "assistant" {
                return Err(ApiError::invalid(
                    format!("messages[{i}].tool_calls"),
                    format!(
                        "messages[{i}] is a {} message: only assistant messages have tool_calls",
                        m.role
                    ),
                ));
            }
            let mut content = match m.content {
                // Only an assistant message may leave its content null (OpenAI: one that
                // carries tool calls instead).
                None if role == "assistant" => String::new(),
                None => {
                    return Err(ApiError::invalid(
                        format!("messages[{i}].content"),
                        format!(
                            "messages[{i}].content is required for a {} message: only an assistant message may leave it null",
                            m.role
                        ),
                    ));
                }
                Some(MessageContent::Text(t)) => t,
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match (part.kind.as_str(), part.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            (kind, _) => {
                                return Err(ApiError::unsupported(
                                    format!("messages[{i}].content"),
                                    format!(
                                        "content parts of type {kind:?} are not supported; only text"
                                    ),
                                ));
                            }
                        }
                    }
                    text
                }
            };
            if !calls.is_empty() {
                if !content.is_empty() {
                    content.push('\n');
                }
                content.push_str(&calls);
            }
            turns.push(ChatTurn {
                role: role.to_owned(),
                content,
            });
        }
        let output = match &tool_plan {
            Some(plan) => {
                // The functions go first, in the system turn (merged into the caller's own).
                let instructions = plan.instructions();
                match turns.first_mut() {
                    Some(first) if first.role == "system" => {
                        first.content = format!("{}\n\n{instructions}", first.content);
                    }
                    _ => turns.insert(
                        0,
                        ChatTurn {
                            role: "system".to_owned(),
                            content: instructions,
                        },
                    ),
                }
                Some(plan.output())
            }
            None => response_format,
        };
        let stream = self.stream.unwrap_or(false);
        let mut request = GenerationRequest {
            kind: Kind::Chat,
            model: self.model,
            prompt: Prompt::Chat(turns),
            params: GenerationParams {
                max_tokens,
                temperature: self.temperature,
                top_p: self.top_p,
                stop,
                presence_penalty: self.presence_penalty,
                frequency_penalty: self.frequency_penalty,
                logit_bias,
                output,
                logprobs,
                // Any i64 is a valid OpenAI seed; its bits seed the generator.
                seed: self.seed.map(|seed| seed as u64),
                ..GenerationParams::default()
            },
            stream,
            include_usage: stream
                && self
                    .stream_options
                    .and_then(|o| o.include_usage)
                    .unwrap_or(false),
            tool_answer: tool_plan.map(|plan| plan.answer),
            choices,
        };
        apply_extensions(self.extensions, &mut request.params)?;
        Ok(request)
    }
}

impl CompletionRequest {
    /// Validates the request into a [`GenerationRequest`].
    pub fn validate(self) -> Result<GenerationRequest, ApiError> {
        let text = match self.prompt {
            PromptInput::Text(t) => t,
            PromptInput::Texts(mut v) if v.len() == 1 => v.remove(0),
            PromptInput::Texts(v) if v.is_empty() => {
                return Err(ApiError::invalid("prompt", "prompt must not be empty"));
            }
            PromptInput::Texts(_) => {
                return Err(ApiError::unsupported(
                    "prompt",
                    "batched prompts are not supported: send one prompt per request",
                ));
            }
            PromptInput::Tokens(_) => {
                return Err(ApiError::unsupported(
                    "prompt",
                    "token-id prompts are not supported: send text",
                ));
            }
        };
        if text.is_empty() {
            return Err(ApiError::invalid("prompt", "prompt must not be empty"));
        }
        fields::check_unread(&self.other)?;
        let logprobs = match self.logprobs {
            Some(n) if n > 5 => {
                return Err(ApiError::invalid(
                    "logprobs",
                    format!("logprobs must be between 0 and 5, not {n}"),
                ));
            }
            n => n.map(|n| n as usize),
        };
        if self.echo == Some(true) {
            return Err(ApiError::unsupported("echo", "echo is not supported"));
        }
        if self.suffix.is_some() {
            return Err(ApiError::unsupported("suffix", "suffix is not supported"));
        }
        if !matches!(self.best_of, None | Some(1)) {
            return Err(ApiError::unsupported("best_of", "best_of is not supported"));
        }
        let choices = check_choices(self.n)?;
        let stop = check_common(
            self.temperature,
            self.top_p,
            self.presence_penalty,
            self.frequency_penalty,
            self.stop,
        )?;
        // OpenAI's default for /v1/completions.
        let max_tokens = check_max_tokens("max_tokens", self.max_tokens)?.or(Some(16));
        let logit_bias = parse_logit_bias(self.logit_bias)?;
        let stream = self.stream.unwrap_or(false);
        let mut request = GenerationRequest {
            kind: Kind::Completion,
            model: self.model,
            prompt: Prompt::Text(text),
            params: GenerationParams {
                max_tokens,
                temperature: self.temperature,
                top_p: self.top_p,
                stop,
                presence_penalty: self.presence_penalty,
                frequency_penalty: self.frequency_penalty,
                logit_bias,
                output: None,
                logprobs,
                // Any i64 is a valid OpenAI seed; its bits seed the generator.
                seed: self.seed.map(|seed| seed as u64),
                ..GenerationParams::default()
            },
            stream,
            include_usage: stream
                && self
                    .stream_options
                    .and_then(|o| o.include_usage)
                    .unwrap_or(false),
            tool_answer: None,
            choices,
        };
        apply_extensions(self.extensions, &mut request.params)?;
        Ok(request)
    }
}

/// Checks the prompt plus the requested completion against the context window and returns the
/// completion budget.
pub fn completion_budget(
    context: usize,
    prompt_tokens: usize,
    max_tokens: Option<usize>,
) -> Result<usize, ApiError> {
    let wanted = max_tokens.unwrap_or(1);
    if prompt_tokens.saturating_add(wanted) > context {
        return Err(ApiError::ContextLengthExceeded {
            context,
            requested: prompt_tokens.saturating_add(wanted),
            prompt: prompt_tokens,
            completion: wanted,
        });
    }
    Ok(max_tokens.unwrap_or(context - prompt_tokens))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::engine::SamplingDefaults;
    use http::StatusCode;

    fn chat(body: &str) -> Result<GenerationRequest, ApiError> {
        parse_json::<ChatCompletionRequest>(body.as_bytes())?.validate()
    }

    fn completion(body: &str) -> Result<GenerationRequest, ApiError> {
        parse_json::<CompletionRequest>(body.as_bytes())?.validate()
    }

    #[test]
    fn sampling_defaults_fill_only_what_the_request_left_unset() {
        let defaults = SamplingDefaults {
            temperature: Some(0.7),
            top_p: Some(0.9),
        };
        let mut p = chat(r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#)
            .unwrap()
            .params;
        defaults.apply(&mut p);
        assert_eq!((p.temperature, p.top_p), (Some(0.7), Some(0.9)));
        let mut p = chat(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":0,"top_p":0.5}"#,
        )
        .unwrap()
        .params;
        defaults.apply(&mut p);
        assert_eq!((p.temperature, p.top_p), (Some(0.0), Some(0.5)));
        // top_p 0 as a default: greedy.
        let greedy = SamplingDefaults {
            temperature: Some(1.0),
            top_p: Some(0.0),
        };
        let mut p = completion(r#"{"model":"m","prompt":"x"}"#).unwrap().params;
        greedy.apply(&mut p);
        assert_eq!((p.temperature, p.top_p), (Some(0.0), None));
    }

    #[test]
    fn parses_a_full_chat_request() {
        let p = chat(
            r#"{"model":"m","messages":[{"role":"developer","content":"be brief"},
                {"role":"user","content":[{"type":"text","text":"Hi"},{"type":"text","text":"!"}]}],
                "stream":true,"stream_options":{"include_usage":true},"max_completion_tokens":8,
                "max_tokens":99,"temperature":0,"top_p":0.9,"stop":"\n","seed":1,"n":1,
                "user":"ignored","response_format":{"type":"text"}}"#,
        )
        .unwrap();
        assert_eq!(p.kind, Kind::Chat);
        assert!(p.stream && p.include_usage);
        assert_eq!(p.params.max_tokens, Some(8), "max_completion_tokens wins");
        assert_eq!(p.params.temperature, Some(0.0));
        assert_eq!(p.params.stop, vec!["\n".to_owned()]);
        let Prompt::Chat(turns) = p.prompt else {
            panic!("chat prompt")
        };
        assert_eq!(turns[0].role, "system");
        assert_eq!(turns[1].content, "Hi!");
    }

    #[test]
    fn include_usage_needs_stream() {
        let p = chat(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream_options":{"include_usage":true}}"#).unwrap();
        assert!(!p.stream && !p.include_usage);
    }

    #[test]
    fn malformed_json_and_wrong_types_are_400s_with_different_messages() {
        let e = chat(r#"{"model":"m","messages":["#).unwrap_err();
        assert!(matches!(e, ApiError::MalformedJson(_)), "{e:?}");
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        let e =
            chat(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#)
                .unwrap_err();
        assert!(matches!(e, ApiError::InvalidRequest { .. }), "{e:?}");
        assert!(e.to_string().contains("invalid type"), "{e}");
        let e = chat(r#"{"model":"m"}"#).unwrap_err();
        assert!(e.to_string().contains("missing field `messages`"), "{e}");
        let e = chat(r#"[1,2]"#).unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn refuses_what_it_cannot_do() {
        let base = r#""model":"m","messages":[{"role":"user","content":"x"}]"#;
        for (extra, param) in [
            (r#""messages":[]"#, "messages"),
            (r#""n":0"#, "n"),
            (r#""n":17"#, "n"),
            (r#""temperature":3"#, "temperature"),
            (r#""top_p":0"#, "top_p"),
            (r#""max_tokens":0"#, "max_tokens"),
            (r#""stop":["a","b","c","d","e"]"#, "stop"),
            (r#""presence_penalty":5"#, "presence_penalty"),
            (r#""top_logprobs":2"#, "top_logprobs"),
            (r#""logprobs":true,"top_logprobs":21"#, "top_logprobs"),
            (r#""response_format":{"type":"yaml"}"#, "response_format"),
            (
                r#""response_format":{"type":"json_schema"}"#,
                "response_format",
            ),
            (r#""min_p":2"#, "min_p"),
            (r#""repetition_penalty":0"#, "repetition_penalty"),
            (r#""functions":[{"name":"f"}]"#, "functions"),
            (r#""tool_choice":"required""#, "tool_choice"),
        ] {
            let body = if extra.starts_with(r#""messages""#) {
                format!(r#"{{"model":"m",{extra}}}"#)
            } else {
                format!("{{{base},{extra}}}")
            };
            let e = chat(&body).unwrap_err();
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{extra}");
            assert_eq!(e.body().error.param.as_deref(), Some(param), "{extra}: {e}");
        }
        let e = chat(r#"{"model":"m","messages":[{"role":"wizard","content":"x"}]}"#).unwrap_err();
        assert_eq!(e.body().error.param.as_deref(), Some("messages[0].role"));
        let e = chat(r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}"#).unwrap_err();
        assert_eq!(e.body().error.code, Some("unsupported_parameter"));
    }

    #[test]
    fn only_assistant_messages_may_leave_content_null() {
        for (role, content) in [
            ("user", r#","content":null"#),
            ("user", ""),
            ("system", r#","content":null"#),
            ("developer", ""),
            ("tool", r#","content":null,"tool_call_id":"call_1""#),
        ] {
            let body = format!(
                r#"{{"model":"m","messages":[{{"role":"system","content":"s"}},{{"role":"user","content":"x"}},
                    {{"role":"{role}"{content}}}]}}"#
            );
            let e = chat(&body).unwrap_err();
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(
                e.body().error.param.as_deref(),
                Some("messages[2].content"),
                "{body}: {e}"
            );
            assert!(e.to_string().contains(role), "{e}");
        }
        // An assistant turn that called tools has no content: still accepted, as empty text.
        let p = chat(
            r#"{"model":"m","messages":[{"role":"user","content":"x"},
                {"role":"assistant","content":null,"tool_calls":[]},{"role":"assistant"},
                {"role":"user","content":"y"}]}"#,
        )
        .unwrap();
        let Prompt::Chat(turns) = p.prompt else {
            panic!("chat prompt")
        };
        assert_eq!(
            (turns[1].content.as_str(), turns[2].content.as_str()),
            ("", "")
        );
    }

    #[test]
    fn tool_messages_need_a_tool_call_id() {
        for tool_call_id in [
            "",
            r#","tool_call_id":null"#,
            r#","tool_call_id":"""#,
            r#","tool_call_id":7"#,
        ] {
            let body = format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":"x"}},
                    {{"role":"tool","content":"42"{tool_call_id}}}]}}"#
            );
            let e = chat(&body).unwrap_err();
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(
                e.body().error.param.as_deref(),
                Some("messages[1].tool_call_id"),
                "{body}: {e}"
            );
        }
        let p = chat(
            r#"{"model":"m","messages":[{"role":"user","content":"x"},
                {"role":"tool","content":"42","tool_call_id":"call_1"}]}"#,
        )
        .unwrap();
        let Prompt::Chat(turns) = p.prompt else {
            panic!("chat prompt")
        };
        assert_eq!(
            (turns[1].role.as_str(), turns[1].content.as_str()),
            ("tool", "42")
        );
    }

    #[test]
    fn logit_bias_keys_are_token_ids_and_values_within_100() {
        let base = r#""model":"m","messages":[{"role":"user","content":"x"}]"#;
        for bias in [
            r#"[1,2]"#,
            r#""50256""#,
            r#"{"hello":5}"#,
            r#"{"-1":5}"#,
            r#"{"1.5":5}"#,
            r#"{"7":101}"#,
            r#"{"7":-100.5}"#,
            r#"{"7":"5"}"#,
            r#"{"7":null}"#,
        ] {
            let e = chat(&format!(r#"{{{base},"logit_bias":{bias}}}"#)).unwrap_err();
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{bias}");
            assert_eq!(
                e.body().error.param.as_deref(),
                Some("logit_bias"),
                "{bias}: {e}"
            );
        }
        let p = chat(&format!(
            r#"{{{base},"logit_bias":{{"7":-100,"31999":100,"12":2.5}}}}"#
        ))
        .unwrap();
        assert_eq!(
            p.params.logit_bias.into_iter().collect::<Vec<_>>(),
            vec![(7, -100.0), (12, 2.5), (31999, 100.0)]
        );
        let p = chat(&format!(r#"{{{base},"logit_bias":null}}"#)).unwrap();
        assert!(p.params.logit_bias.is_empty());
        let e = completion(r#"{"model":"m","prompt":"x","logit_bias":{"x":1}}"#).unwrap_err();
        assert_eq!(e.body().error.param.as_deref(), Some("logit_bias"));
    }

    #[test]
    fn logit_bias_ids_must_be_in_the_vocabulary() {
        let p =
            completion(r#"{"model":"m","prompt":"x","logit_bias":{"0":1,"31999":-100}}"#).unwrap();
        check_logit_bias(&p, 32000).unwrap();
        let p = chat(r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#).unwrap();
        check_logit_bias(&p, 32000).unwrap();

        let p = chat(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"logit_bias":{"5":1,"32000":-100}}"#,
        )
        .unwrap();
        let e = check_logit_bias(&p, 32000).unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(e.body().error.param.as_deref(), Some("logit_bias"));
        let message = e.to_string();
        assert!(
            message.contains("32000") && message.contains("vocabulary of 32000 tokens"),
            "{message}"
        );
        let p = completion(r#"{"model":"m","prompt":"x","logit_bias":{"4294967295":1}}"#).unwrap();
        let e = check_logit_bias(&p, 32000).unwrap_err();
        assert!(e.to_string().contains("4294967295"), "{e}");
    }

    #[test]
    fn completion_prompts() {
        let p = completion(r#"{"model":"m","prompt":"The capital of France is"}"#).unwrap();
        assert_eq!(p.prompt, Prompt::Text("The capital of France is".into()));
        assert_eq!(p.params.max_tokens, Some(16), "OpenAI's default");
        let p =
            completion(r#"{"model":"m","prompt":["one"],"max_tokens":3,"stream":true}"#).unwrap();
        assert_eq!(p.prompt, Prompt::Text("one".into()));
        assert!(p.stream && !p.include_usage);
        for body in [
            r#"{"model":"m","prompt":["a","b"]}"#,
            r#"{"model":"m","prompt":[1,2,3]}"#,
            r#"{"model":"m","prompt":""}"#,
            r#"{"model":"m","prompt":"x","echo":true}"#,
            r#"{"model":"m","prompt":"x","n":17}"#,
            r#"{"model":"m","prompt":"x","best_of":3}"#,
            r#"{"model":"m","prompt":"x","logprobs":6}"#,
        ] {
            let e = completion(body).unwrap_err();
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{body}");
            assert!(e.body().error.param.as_deref().is_some(), "{body}");
        }
    }

    #[test]
    fn context_window_checks() {
        assert_eq!(completion_budget(100, 10, None).unwrap(), 90);
        assert_eq!(completion_budget(100, 10, Some(5)).unwrap(), 5);
        let e = completion_budget(100, 100, None).unwrap_err();
        assert_eq!(e.body().error.code, Some("context_length_exceeded"));
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        let e = completion_budget(100, 60, Some(50)).unwrap_err();
        assert!(
            e.to_string().contains("maximum context length is 100"),
            "{e}"
        );
    }
}
