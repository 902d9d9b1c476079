//! `tools` and `tool_choice`, by constrained decoding: a call is a well-formed call whatever the
//! model, with arguments valid against the function's parameter schema, carried as
//! `tool_calls`. `required` and a named function force one; with `auto` (the default when
//! tools are given) the grammar lets the answer be either a call or text that does not start
//! like one, so the model's first token decides, and an answer is never text that merely
//! looks like a call.

use serde_json::{Value, json};

use super::{
    ApiError,
    types::{FunctionCall, ToolCall},
};
use crate::engine::OutputFormat;

/// The functions a request offers and the call it forces.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolPlan {
    /// What the answer must be.
    pub answer: ToolAnswer,
    /// The functions offered (all of them are described to the model).
    pub functions: Vec<Function>,
}

/// A function a request offers.
#[derive(Clone, Debug, PartialEq)]
pub struct Function {
    /// Its name (`a-z`, `A-Z`, `0-9`, `_`, `-`; at most 64).
    pub name: String,
    /// What it does, for the model.
    pub description: Option<String>,
    /// A JSON Schema of its arguments (an object).
    pub parameters: Value,
}

/// The call an answer is.
#[derive(Clone, Debug, PartialEq)]
pub enum ToolAnswer {
    /// A call to this function: the output is its arguments.
    Named(String),
    /// A call to one of the functions: the output is `{"name": ..., "arguments": {...}}`.
    Required,
    /// A call as for [`ToolAnswer::Required`], or text (which cannot start with `{`).
    Auto,
}

/// Reads `tools` and `tool_choice`: `None` when the answer is text (no tools, or
/// `tool_choice: "none"`).
pub fn parse(
    tools: Option<Value>,
    tool_choice: Option<Value>,
) -> Result<Option<ToolPlan>, ApiError> {
    let functions = match tools {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(tools)) => tools
            .into_iter()
            .enumerate()
            .map(|(i, tool)| function(i, tool))
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::invalid(
                "tools",
                "tools must be an array of {\"type\": \"function\", \"function\": {...}}",
            ));
        }
    };
    if let Some(i) = (1..functions.len()).find(|&i| {
        functions[..i]
            .iter()
            .any(|f: &Function| f.name == functions[i].name)
    }) {
        return Err(ApiError::invalid(
            format!("tools[{i}].function.name"),
            format!("two tools are named {:?}", functions[i].name),
        ));
    }
    let answer = match tool_choice {
        None | Some(Value::Null) if functions.is_empty() => return Ok(None),
        Some(Value::String(choice)) if choice == "none" => return Ok(None),
        _ if functions.is_empty() => {
            return Err(ApiError::invalid(
                "tool_choice",
                "tool_choice is only allowed when tools are specified",
            ));
        }
        None | Some(Value::Null) => ToolAnswer::Auto,
        Some(Value::String(choice)) => match choice.as_str() {
            "required" => ToolAnswer::Required,
            "auto" => ToolAnswer::Auto,
            other => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!(
                        "invalid tool_choice {other:?}: expected \"none\", \"auto\", \"required\" or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"
                    ),
                ));
            }
        },
        Some(choice) => {
            let name = choice
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| choice.get("type").and_then(Value::as_str) == Some("function"));
            let Some(name) = name else {
                return Err(ApiError::invalid(
                    "tool_choice",
                    "a tool_choice object must be {\"type\": \"function\", \"function\": {\"name\": ...}}",
                ));
            };
            if !functions.iter().any(|f| f.name == name) {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!("tool_choice names the function {name:?}, which is not in tools"),
                ));
            }
            ToolAnswer::Named(name.to_owned())
        }
    };
    Ok(Some(ToolPlan { answer, functions }))
}

/// `tools[i]`, checked as OpenAI does.
fn function(i: usize, tool: Value) -> Result<Function, ApiError> {
    let param = format!("tools[{i}]");
    if tool.get("type").and_then(Value::as_str) != Some("function") {
        return Err(ApiError::invalid(
            format!("{param}.type"),
            format!("{param}.type must be \"function\""),
        ));
    }
    let Some(f) = tool.get("function").and_then(Value::as_object) else {
        return Err(ApiError::invalid(
            format!("{param}.function"),
            format!("{param}.function must be an object with a name"),
        ));
    };
    let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
    let valid_name = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !valid_name {
        return Err(ApiError::invalid(
            format!("{param}.function.name"),
            format!(
                "invalid function name {name:?}: 1 to 64 letters, digits, underscores or dashes"
            ),
        ));
    }
    let parameters = match f.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(_) => {
            return Err(ApiError::invalid(
                format!("{param}.function.parameters"),
                format!("{param}.function.parameters must be a JSON Schema object"),
            ));
        }
    };
    Ok(Function {
        name: name.to_owned(),
        description: f
            .get("description")
            .and_then(Value::as_str)
            .map(str::to_owned),
        parameters,
    })
}

impl ToolPlan {
    /// What the output is held to: the named function's arguments, a call to any of them, or
    /// (`auto`) such a call or text.
    pub fn output(&self) -> OutputFormat {
        match &self.answer {
            ToolAnswer::Named(name) => OutputFormat::JsonSchema(
                self.functions
                    .iter()
                    .find(|f| &f.name == name)
                    .map_or_else(|| json!({"type": "object"}), |f| f.parameters.clone()),
            ),
            ToolAnswer::Required => OutputFormat::JsonSchema(self.any_call()),
            ToolAnswer::Auto => OutputFormat::TextOrJson(self.any_call()),
        }
    }

    /// The schema of a call to any of the functions.
    fn any_call(&self) -> Value {
        let calls: Vec<Value> = self
            .functions
            .iter()
            .map(|f| {
                json!({
                    "type": "object",
                    "properties": {
                        "name": {"const": f.name},
                        "arguments": f.parameters,
                    },
                    "required": ["name", "arguments"],
                    "additionalProperties": false,
                })
            })
            .collect();
        json!({"anyOf": calls})
    }

    /// The functions described for the model, as a system message: the chat template of a
    /// model without tool support has nowhere else to put them.
    pub fn instructions(&self) -> String {
        let functions: Vec<Value> = self
            .functions
            .iter()
            .map(|f| json!({"name": f.name, "description": f.description, "parameters": f.parameters}))
            .collect();
        let ask = match &self.answer {
            ToolAnswer::Named(name) => {
                format!("Call the function {name:?}: answer with its arguments as a JSON object.")
            }
            ToolAnswer::Required => {
                "Call one of them: answer with {\"name\": ..., \"arguments\": {...}} as JSON."
                    .to_owned()
            }
            ToolAnswer::Auto => "To call one of them, answer with {\"name\": ..., \"arguments\": \
                 {...}} as JSON; otherwise answer in text."
                .to_owned(),
        };
        format!(
            "You can call these functions:\n{}\n{ask}",
            serde_json::to_string(&functions).unwrap_or_default()
        )
    }
}

impl ToolAnswer {
    /// The call `output` (the whole generated text) is, with id `id`; `None` when it is not
    /// one (cut short by the completion budget): it is then answered as text.
    pub fn call(&self, id: &str, output: &str) -> Option<ToolCall> {
        let (name, arguments) = match self {
            Self::Named(name) => {
                serde_json::from_str::<Value>(output).ok()?;
                (name.clone(), output.to_owned())
            }
            Self::Required | Self::Auto => {
                let call: Value = serde_json::from_str(output).ok()?;
                let name = call.get("name")?.as_str()?.to_owned();
                (name, call.get("arguments")?.to_string())
            }
        };
        Some(ToolCall {
            id: id.to_owned(),
            kind: "function".to_owned(),
            function: FunctionCall { name, arguments },
        })
    }

    /// OpenAI's finish reason for an answer that is a call: `stop` when the request named the
    /// function (as OpenAI answers a forced function), else `tool_calls`.
    pub fn finish_reason(&self) -> &'static str {
        match self {
            Self::Named(_) => "stop",
            Self::Required | Self::Auto => "tool_calls",
        }
    }
}

/// The id of the call of choice `index` answering request `request_id`.
pub fn call_id(request_id: &str, index: usize) -> String {
    format!("call_{request_id}_{index}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
    }

    #[test]
    fn choices_are_read_as_openai_does() {
        assert_eq!(parse(None, None).unwrap(), None);
        assert_eq!(parse(Some(weather()), Some(json!("none"))).unwrap(), None);
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        let plan = parse(Some(weather()), Some(named)).unwrap().unwrap();
        assert_eq!(plan.answer, ToolAnswer::Named("get_weather".into()));
        let plan = parse(Some(weather()), Some(json!("required")))
            .unwrap()
            .unwrap();
        assert_eq!(plan.answer, ToolAnswer::Required);
        for choice in [None, Some(json!("auto"))] {
            let plan = parse(Some(weather()), choice).unwrap().unwrap();
            assert_eq!(plan.answer, ToolAnswer::Auto, "OpenAI's default with tools");
        }
        for (tools, choice, param) in [
            (None, Some(json!("required")), "tool_choice"),
            (Some(weather()), Some(json!("sometimes")), "tool_choice"),
            (
                Some(weather()),
                Some(json!({"type": "function", "function": {"name": "other"}})),
                "tool_choice",
            ),
            (Some(json!({"type": "function"})), None, "tools"),
            (Some(json!([{"type": "retrieval"}])), None, "tools[0].type"),
            (
                Some(json!([{"type": "function", "function": {"name": "a b"}}])),
                None,
                "tools[0].function.name",
            ),
        ] {
            let e = parse(tools, choice).unwrap_err();
            let body = serde_json::to_value(e.body()).unwrap();
            assert_eq!(body["error"]["param"], param, "{body}");
        }
    }

    #[test]
    fn calls_are_read_from_the_constrained_output() {
        let named = ToolAnswer::Named("get_weather".into());
        let call = named.call("call_1", r#"{"city":"Paris"}"#).unwrap();
        assert_eq!(call.function.name, "get_weather");
        assert_eq!(call.function.arguments, r#"{"city":"Paris"}"#);
        assert_eq!(named.call("call_1", r#"{"city":"Par"#), None, "cut short");
        let call = ToolAnswer::Required
            .call(
                "call_2",
                r#"{"name":"get_weather","arguments":{"city":"Oslo"}}"#,
            )
            .unwrap();
        assert_eq!(call.function.name, "get_weather");
        assert_eq!(call.function.arguments, r#"{"city":"Oslo"}"#);
    }
}
