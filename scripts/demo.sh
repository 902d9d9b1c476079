#!/usr/bin/env bash
# `make demo`: starts the sidecar on the embedded model and shows a real chat completion over
# the OpenAI API (JSON, then streamed). Needs only the model (`make model`) and a built binary.
set -euo pipefail
bin="${SIDECAR_BIN:?}"
model="${MODEL:?}"
config="${CONFIG:-examples/sidecar-config.yaml}"
api="127.0.0.1:${DEMO_PORT:-8080}"
admin="127.0.0.1:${DEMO_ADMIN_PORT:-9090}"
log="$(mktemp -t sluice-demo.XXXXXX.log)"

config_args=()
[[ -f "$config" ]] && config_args=(--config "$config")
HF_HUB_OFFLINE=1 "$bin" serve --model "$model" --served-name smollm2 "${config_args[@]}" \
  --listen "$api" --admin-listen "$admin" >"$log" 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null || true; rm -f "$log"' EXIT

printf 'waiting for http://%s/readyz ' "$admin"
for _ in $(seq 1 600); do
  if curl -fsS "http://$admin/readyz" >/dev/null 2>&1; then break; fi
  if ! kill -0 $pid 2>/dev/null; then echo; cat "$log"; exit 1; fi
  printf '.'; sleep 0.2
done
echo " ready"
grep -o 'cold_start_ms=[0-9]*' "$log" | head -n1 || true
model_id="$(curl -fsS "http://$api/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')"

echo
echo "== POST /v1/chat/completions (model $model_id) =="
curl -fsS "http://$api/v1/chat/completions" -H 'content-type: application/json' \
  -H 'authorization: Bearer demo-key' -d @- <<JSON | python3 -m json.tool
{"model": "$model_id", "max_tokens": 48, "temperature": 0,
 "messages": [{"role": "user", "content": "In one sentence: what is Kubernetes?"}]}
JSON

echo
echo "== the same, streamed (SSE) =="
curl -fsSN "http://$api/v1/chat/completions" -H 'content-type: application/json' \
  -H 'authorization: Bearer demo-key' -d @- <<JSON | python3 -c '
import json, sys
for line in sys.stdin:
    line = line.strip()
    if not line.startswith("data: "):
        continue
    data = line[len("data: "):]
    if data == "[DONE]":
        print("\n[DONE]")
        break
    chunk = json.loads(data)
    for c in chunk["choices"]:
        print(c["delta"].get("content") or "", end="", flush=True)
    if chunk.get("usage"):
        print("\nusage:", chunk["usage"], end="")
'
{"model": "$model_id", "max_tokens": 48, "temperature": 0, "stream": true,
 "stream_options": {"include_usage": true},
 "messages": [{"role": "user", "content": "In one sentence: what is Kubernetes?"}]}
JSON

# == rate limits ==
echo
echo "== a third request within the minute: refused by the example's 2-requests-per-minute rule =="
status="$(curl -sS -o "$log.body" -D "$log.headers" -w '%{http_code}' "http://$api/v1/chat/completions" \
  -H 'content-type: application/json' -H 'authorization: Bearer demo-key' \
  -d "{\"model\": \"$model_id\", \"max_tokens\": 8, \"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}")"
echo "HTTP $status"
grep -iE '^(retry-after|retry-after-ms|x-ratelimit-[a-z-]+|x-sluice-rule):' "$log.headers" || true
python3 -m json.tool "$log.body"
rm -f "$log.body" "$log.headers"
if [[ "$status" != 429 ]]; then
  echo "expected 429 from the example rate limit, got $status" >&2
  exit 1
fi

echo
echo "== a few metrics (http://$admin/metrics) =="
curl -fsS "http://$admin/metrics" | grep -E '^sluice_(requests_total\{|completion_tokens_total |time_to_first_token_seconds_(sum|count)|cold_start_seconds |model_load_seconds )' || true
