//! The OpenAI API features applications use, through the official `openai` Python client
//! against the real binary on the demo model: structured outputs (the client's `parse` helper,
//! JSON mode, a streamed schema), a forced tool call and its follow-up turn, log-probabilities
//! on both APIs, seeded sampling, several choices (`n`), and the fields that are refused by
//! name or ignored.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

const SCRIPT: &str = r#"
import json, sys, openai, pydantic
client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused", max_retries=0)
model = sys.argv[2]
ask = [{"role": "user", "content": "Name a large city, its country and its population."}]
chat = client.chat.completions
parse = getattr(chat, "parse", None) or client.beta.chat.completions.parse

def bad_request(param, **kwargs):
    try:
        chat.create(model=model, messages=ask, max_tokens=8, **kwargs)
    except openai.BadRequestError as e:
        assert e.body["param"] == param, (param, e.body)
        return e.body["message"]
    raise SystemExit(f"expected a 400 naming {param}")

# --- structured output: the client's parse helper sends a strict json_schema and parses it ---
class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=24)
    country: str = pydantic.Field(max_length=24)
    population: int = pydantic.Field(ge=0, le=100_000_000)

r = parse(model=model, messages=ask, response_format=City, max_tokens=96, temperature=0)
city = r.choices[0].message.parsed
assert isinstance(city, City), r
print("parsed:", city)

# JSON mode: any JSON object.
r = chat.create(model=model, messages=ask, response_format={"type": "json_object"},
                max_tokens=96, temperature=0)
assert r.choices[0].finish_reason == "stop", r
assert isinstance(json.loads(r.choices[0].message.content), dict), r

# A schema, streamed: the deltas join into a valid document.
schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
          "confidence": {"type": "integer", "minimum": 0, "maximum": 100}},
          "required": ["answer", "confidence"], "additionalProperties": False}
text = "".join(c.choices[0].delta.content or "" for c in chat.create(
    model=model, messages=[{"role": "user", "content": "Is water wet?"}], stream=True,
    response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}},
    max_tokens=32, temperature=0) if c.choices)
doc = json.loads(text)
assert doc["answer"] in ("yes", "no") and 0 <= doc["confidence"] <= 100, doc

# A schema keyword constrained decoding cannot enforce is refused by name, not ignored.
message = bad_request("response_format", response_format={"type": "json_schema", "json_schema": {
    "name": "tags", "schema": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}})
assert "uniqueItems" in message, message

# --- tools: a forced call, then the tool's answer in a follow-up turn ---
weather = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
                          "required": ["city"], "additionalProperties": False}}}
question = [{"role": "user", "content": "What is the weather in Paris?"}]
r = chat.create(model=model, messages=question, tools=[weather], max_tokens=48, temperature=0,
                tool_choice={"type": "function", "function": {"name": "get_weather"}})
call = r.choices[0].message.tool_calls[0]
assert call.type == "function" and call.function.name == "get_weather", r
assert isinstance(json.loads(call.function.arguments)["city"], str), call
assert r.choices[0].message.content is None, r
follow_up = question + [
    {"role": "assistant", "content": None, "tool_calls": [{"id": call.id, "type": "function",
     "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
    {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}]
r = chat.create(model=model, messages=follow_up, tools=[weather], tool_choice="none",
                max_tokens=16, temperature=0)
assert r.choices[0].message.content and not r.choices[0].message.tool_calls, r

# "required" with the client's strict pydantic tool: the call is parsed into the model class.
class GetTime(pydantic.BaseModel):
    timezone: str = pydantic.Field(max_length=32)

r = parse(model=model, messages=[{"role": "user", "content": "What time is it in Tokyo?"}],
          tools=[openai.pydantic_function_tool(GetTime)], tool_choice="required",
          max_tokens=48, temperature=0)
assert r.choices[0].finish_reason == "tool_calls", r
parsed = r.choices[0].message.tool_calls[0].function.parsed_arguments
assert isinstance(parsed, GetTime), r

# Streamed: the pieces of the call join into one call.
name, arguments, finish = "", "", None
for c in chat.create(model=model, messages=question, tools=[weather], tool_choice="required",
                     max_tokens=48, temperature=0, stream=True):
    for choice in c.choices:
        for piece in choice.delta.tool_calls or []:
            name += piece.function.name or ""
            arguments += piece.function.arguments or ""
        finish = choice.finish_reason or finish
assert name == "get_weather" and finish == "tool_calls", (name, finish)
assert isinstance(json.loads(arguments)["city"], str), arguments

# "auto" (the default with tools): the first token decides between a call and text. The demo
# model's tokens that start with "{" are pushed up or down to see both ways.
brace = ["107", "6150", "26754", "34026", "38894", "39428", "39876", "40343"]
r = chat.create(model=model, messages=question, tools=[weather], max_tokens=48, temperature=0,
                logit_bias={"107": 100})
assert r.choices[0].finish_reason == "tool_calls", r
assert json.loads(r.choices[0].message.tool_calls[0].function.arguments)["city"], r
r = chat.create(model=model, messages=question, tools=[weather], tool_choice="auto", max_tokens=16,
                temperature=0, logit_bias={b: -100 for b in brace})
assert r.choices[0].message.content and not r.choices[0].message.tool_calls, r
streamed = [c.choices[0].delta for c in chat.create(
    model=model, messages=question, tools=[weather], max_tokens=16, temperature=0, stream=True,
    logit_bias={b: -100 for b in brace}) if c.choices]
assert "".join(d.content or "" for d in streamed) == r.choices[0].message.content, streamed
calls = [p for c in chat.create(model=model, messages=question, tools=[weather], max_tokens=48,
         temperature=0, stream=True, logit_bias={"107": 100}) if c.choices
         for p in c.choices[0].delta.tool_calls or []]
assert len(calls) == 1 and calls[0].function.name == "get_weather", calls
assert json.loads(calls[0].function.arguments)["city"], calls

# --- log-probabilities ---
r = chat.create(model=model, messages=ask, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
content = r.choices[0].logprobs.content
assert 1 <= len(content) <= r.usage.completion_tokens, r
for t in content:
    assert t.logprob <= 0 and len(t.top_logprobs) == 3, t
    # Greedy: each token is the most likely one.
    assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-4, t
streamed = [t for c in chat.create(model=model, messages=ask, max_tokens=8, temperature=0, stream=True,
            logprobs=True) if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
assert [t.token for t in streamed] == [t.token for t in content], (streamed, content)
c = client.completions.create(model=model, prompt="1, 2, 3,", max_tokens=4, temperature=0, logprobs=2)
lp = c.choices[0].logprobs
prompt_tokens = c.usage.prompt_tokens
assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4, lp
assert all(p <= 0 for p in lp.token_logprobs) and all(1 <= len(t) <= 2 for t in lp.top_logprobs), lp
# The tokens spell the text, its leading space included, each at its offset in it.
assert "".join(lp.tokens) == c.choices[0].text, (lp, c)
assert all(c.choices[0].text[o:].startswith(t) for o, t in zip(lp.text_offset, lp.tokens)), (lp, c)

# --- seed: a sampled answer is reproduced by its seed ---
def sampled(seed):
    return chat.create(model=model, messages=ask, max_tokens=16, temperature=1.0,
                       seed=seed).choices[0].message.content
first = sampled(7)
assert sampled(7) == first
assert len({sampled(s) for s in (1, 2, 3)} | {first}) > 1, "different seeds, different samples"

# --- n: several choices, each its own sample, usage summed ---
r = chat.create(model=model, messages=ask, max_tokens=16, temperature=1.0, seed=3, n=3)
assert [c.index for c in r.choices] == [0, 1, 2] and all(c.message.content for c in r.choices), r
assert 3 <= r.usage.completion_tokens <= 48, r.usage
# Choice i is seeded with seed + i: choice 1 is what seed 4 alone gives.
assert r.choices[1].message.content == sampled(4), r
texts, finishes, usage = {}, {}, None
for c in chat.create(model=model, messages=ask, max_tokens=16, temperature=1.0, seed=3, n=2,
                     stream=True, stream_options={"include_usage": True}):
    usage = c.usage or usage
    for choice in c.choices:
        texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
        finishes[choice.index] = choice.finish_reason or finishes.get(choice.index)
assert texts == {0: r.choices[0].message.content, 1: r.choices[1].message.content}, texts
assert set(finishes) == {0, 1} and None not in finishes.values(), finishes
assert usage is not None and 2 <= usage.completion_tokens <= 32, usage
c = client.completions.create(model=model, prompt="1, 2, 3,", max_tokens=4, temperature=0, n=2)
assert [x.index for x in c.choices] == [0, 1] and c.choices[0].text == c.choices[1].text, c
assert c.usage.completion_tokens == 8 and c.usage.prompt_tokens == prompt_tokens, c.usage

# --- fields: refused by name when they would change the answer, else ignored ---
bad_request("guided_json", extra_body={"guided_json": {"type": "object"}})
bad_request("top_logprobs", top_logprobs=2)
r = chat.create(model=model, messages=ask, max_tokens=4, temperature=0, user="team-a",
                metadata={"app": "test"}, extra_body={"top_k": 1, "some_future_hint": True})
assert r.choices[0].message.content, r
print("openai features ok")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_features_through_the_official_client() {
    let mut sidecar = Sidecar::spawn(&[]);
    sidecar.wait_ready().await;
    let out = run_openai_client(SCRIPT, &[&sidecar.api, "smollm2"]);
    assert!(out.contains("openai features ok"), "{out}");
}
