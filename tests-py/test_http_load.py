"""scripts/http-load.py, the load driver `scripts/gpu-check.sh` and `scripts/bench-http.sh`
measure servers with, against a stand-in OpenAI server (standard library): SSE over chunked and
over close-delimited bodies, tokens counted from `usage` or from content chunks, per-level
figures, resident-memory sampling, long prompts at several concurrencies, the comparison and its
goals, and the report over several runs per server with its goals."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import io
import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("http_load", REPO / "scripts" / "http-load.py")
http_load = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(http_load)


async def _fake_server(chunked: bool, usage: bool, tokens: int, seen: list):
    """An OpenAI-ish server: streams `tokens` one-token content chunks (a role-only chunk
    first), then a usage chunk when asked and `usage` is on, then [DONE]."""

    async def handle(reader, writer):
        request = await reader.readuntil(b"\r\n\r\n")
        head = request.decode()
        length = next((int(line.split(":")[1]) for line in head.split("\r\n")
                       if line.lower().startswith("content-length")), 0)
        body = json.loads(await reader.readexactly(length)) if length else None
        if head.startswith("GET /v1/models"):
            payload = json.dumps({"data": [{"id": "fake-model"}]}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
            await writer.drain()
            writer.close()
            return
        seen.append(body)
        want = min(body["max_tokens"], tokens)
        words = body["messages"][0]["content"].split()
        if not body.get("stream"):
            payload = json.dumps({"choices": [{"message": {"content": "x " * want}}],
                                  "usage": {"prompt_tokens": len(words),
                                            "completion_tokens": want}}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload)
            await writer.drain()
            writer.close()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     + (b"Transfer-Encoding: chunked\r\n" if chunked else b"Connection: close\r\n")
                     + b"\r\n")

        def send(data: bytes):
            if chunked:
                writer.write(b"%x\r\n" % len(data) + data + b"\r\n")
            else:
                writer.write(data)

        def event(obj):
            send(b"data: " + json.dumps(obj).encode() + b"\n\n")

        event({"choices": [{"delta": {"role": "assistant", "content": ""}}]})
        for i in range(want):
            await asyncio.sleep(0.002)
            event({"choices": [{"delta": {"content": f"t{i} "},
                                "finish_reason": "length" if i == want - 1 else None}]})
        if usage and (body.get("stream_options") or {}).get("include_usage"):
            event({"choices": [], "usage": {"prompt_tokens": len(words),
                                            "completion_tokens": want}})
        send(b"data: [DONE]\n\n")
        if chunked:
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def _args(url, **kw):
    ns = dict(url=url, model=None, api_key=None, label="fake", streams="1,3", prompt_words=12,
              max_tokens=9, repeat=2, warmup=1, long_prompt_words=50, long_prompt_max_tokens=2,
              index_base=0, ignore_eos=False, no_usage=False, timeout=10.0, json=None,
              quiet=True, long_prompt_streams="1", pid=None, rss_interval=0.01)
    ns.update(kw)
    return argparse.Namespace(**ns)


def _measure(chunked, usage, **kw):
    seen = []

    async def run():
        server = await _fake_server(chunked, usage, tokens=50, seen=seen)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await http_load.measure(_args(f"http://127.0.0.1:{port}", **kw))

    return asyncio.run(run()), seen


def test_chunked_sse_with_usage():
    result, seen = _measure(chunked=True, usage=True)
    assert result["model"] == "fake-model"
    levels = {lv["streams"]: lv for lv in result["levels"]}
    assert set(levels) == {1, 3}
    for n, lv in levels.items():
        assert lv["errors"] == 0
        assert lv["requests"] == 2 * n
        assert lv["count_source"] == "usage"
        assert lv["completion_tokens_mean"] == 9
        assert lv["agg_tok_s"] > 0 and lv["decode_tok_s_mean"] > 0
        assert lv["ttft_last_s"] >= lv["ttft_p50_s"] > 0
    assert levels[1]["prompt_tok_s"] > 0 and levels[3]["prompt_tok_s"] is None
    assert result["prefill"]["prompt_tokens_mean"] > 50
    # Greedy, streamed, usage asked for; every prompt distinct (warm-ups included).
    streamed = [b for b in seen if b.get("stream")]
    assert all(b["temperature"] == 0 and b["stream_options"] == {"include_usage": True}
               for b in streamed)
    prompts = [b["messages"][0]["content"] for b in streamed]
    assert len(set(prompts)) == len(prompts)


def test_close_delimited_without_usage_counts_chunks():
    result, _ = _measure(chunked=False, usage=False, streams="2", long_prompt_words=0)
    (lv,) = result["levels"]
    assert lv["errors"] == 0 and lv["count_source"] == "chunks"
    assert lv["completion_tokens_mean"] == 9
    assert result["prefill"] is None


def test_prompts_are_deterministic_and_sized():
    assert http_load.prompt_text(7, 40) == http_load.prompt_text(7, 40)
    assert http_load.prompt_text(7, 40) != http_load.prompt_text(8, 40)
    assert len(http_load.prompt_text(3, 40).split(":", 1)[1].split()) == 40


def test_compare_prints_ratios_and_goals():
    a, _ = _measure(chunked=True, usage=True, streams="1,3", long_prompt_words=0)
    b = json.loads(json.dumps(a))
    b["label"] = "other"
    for lv in b["levels"]:
        lv["decode_tok_s_mean"] *= 2
    out = io.StringIO()
    ok = http_load.compare(a, b, True, 1.0, 1000.0, out=out)
    text = out.getvalue()
    assert not ok
    assert "0.50x" in text  # A's decode is half of B's
    assert "goal: single-stream decode A >= 1.00x B: 0.50x -> NOT MET" in text
    assert "summary (A vs B):" in text


def test_rss_sampling_and_long_prompts_at_several_streams():
    # The test process itself stands in for the server's process.
    result, seen = _measure(chunked=True, usage=True, streams="1,2", long_prompt_streams="1,3",
                            pid=os.getpid())
    assert result["rss"]["pid"] == os.getpid()
    assert result["rss"]["start_kb"] > 0 and result["rss"]["end_kb"] > 0
    for lv in result["levels"] + result["long_levels"]:
        assert lv["rss_samples"] >= 1
        assert lv["rss_peak_kb"] >= lv["rss_end_kb"] > 0
        assert lv["rss_hwm_kb"] >= lv["rss_peak_kb"]
        assert 0.0 <= lv["other_cpu_pct"] <= 100.0
    longs = {lv["streams"]: lv for lv in result["long_levels"]}
    assert set(longs) == {1, 3}
    assert result["prefill"] is longs[1] or result["prefill"] == longs[1]
    assert longs[3]["requests"] == 2 * 3 and longs[3]["errors"] == 0
    assert longs[3]["agg_tok_s"] > 0 and longs[3]["completion_tokens_mean"] == 2
    assert longs[3]["prompt_tokens_mean"] > 50
    # Long prompts are distinct too, and as long as asked.
    long_prompts = [b["messages"][0]["content"] for b in seen
                    if b.get("stream") and len(b["messages"][0]["content"].split()) > 50]
    # one warm-up round and two timed ones per level
    assert len(long_prompts) == 3 * (1 + 3) and len(set(long_prompts)) == len(long_prompts)
    out = io.StringIO()
    http_load.print_table(result, out=out)
    assert "3 (long prompt," in out.getvalue() and "resident memory (VmRSS)" in out.getvalue()


def test_rss_of_a_missing_process():
    assert http_load.read_rss_kb(2**22 + 12345) == (None, None)

    async def run():
        return await http_load.measure(_args("http://127.0.0.1:9", model="m", pid=2**22 + 12345))

    try:
        asyncio.run(run())
    except http_load.HttpError as e:
        assert "/proc/" in str(e)
    else:
        raise AssertionError("a --pid with no process must fail")


def _run(label, agg, ttft, last, decode, rss_peak, start=100 << 10, long_agg=None):
    """A synthetic http-load result: levels 1 and 4 (agg[i], ttft[i], ...) and a long level 1."""
    levels = []
    for i, n in enumerate((1, 4)):
        levels.append({"streams": n, "errors": 0, "error_samples": [], "agg_tok_s": agg[i],
                       "ttft_p50_s": ttft[i], "ttft_last_s": last[i],
                       "decode_tok_s_mean": decode[i], "completion_tokens_mean": 128.0,
                       "prompt_tokens_mean": 89.0, "rss_peak_kb": rss_peak if n == 4 else start})
    longs = [{"streams": 1, "errors": 0, "error_samples": [], "agg_tok_s": long_agg or agg[0],
              "ttft_p50_s": 0.5, "ttft_last_s": 0.5, "decode_tok_s_mean": decode[0],
              "completion_tokens_mean": 64.0, "prompt_tokens_mean": 1003.0}]
    return {"label": label, "levels": levels, "long_levels": longs, "prefill": longs[0],
            "rss": {"start_kb": start, "end_kb": start + 1024}}


def test_report_medians_spread_and_goals(tmp_path):
    a = [_run("sidecar", (50, 80), (0.2, 0.6), (0.2, 0.9), (55, 25), 900 << 10),
         _run("sidecar", (60, 70), (0.3, 0.5), (0.3, 1.4), (58, 20), 1100 << 10),
         _run("sidecar", (55, 90), (0.1, 0.7), (0.1, 1.0), (57, 22), 1000 << 10)]
    b = [_run("llama-server", (100, 100), (0.1, 0.4), (0.1, 0.4), (100, 30), 300 << 10)
         for _ in range(3)]
    rep = http_load.build_report(a, b)
    rows = {(r["kind"], r["streams"]): r for r in rep["rows"]}
    assert list(rows) == [("short", 1), ("short", 4), ("long", 1)]
    agg1 = rows[("short", 1)]["metrics"]["agg_tok_s"]
    assert agg1["a"] == {"median": 55, "min": 50, "max": 60, "n": 3}
    assert agg1["ratio"] == 0.55
    assert agg1["ratio_range"]["min"] == 0.5 and agg1["ratio_range"]["max"] == 0.6
    # The sidecar's last stream over its p50 at 4 streams: medians 1.0 s / 0.6 s.
    assert rows[("short", 4)]["a_last_over_p50"]["max"] == 1.4 / 0.5
    assert rep["memory"]["top_streams"] == 4 and rep["memory"]["peak_ratio"] == 1000 / 300
    out = io.StringIO()
    ok = http_load.print_report(rep, out=out)
    text = out.getvalue()
    assert not ok
    assert "| 1 | 55.0 vs 100.0 (0.55x) | 200 vs 100 (2.00x) | - | 57.0 vs 100.0 |" in text
    assert "| 1, long prompts (1,003 tok) | 55.0 vs 100.0 (0.55x) |" in text
    assert "50.0-60.0 vs 100.0-100.0 (0.50x-0.60x)" in text
    assert "peak under 4 streams 1,000 (900-1,100) vs 300 (300-300), 3.33x" in text
    assert ("goal: aggregate tok/s >= 1.00x llama-server at every level: 1: 0.55x; 4: 0.80x; "
            "long 1: 0.55x -> NOT MET (at 1, 4, long 1)") in text
    assert "goal: TTFT p50 <= llama-server's at every level:" in text
    assert ("goal: sidecar's last-stream TTFT <= 2.0x its TTFT p50: 4: 1.67x (1,000 / 600 ms; "
            "worst run 2.80x) -> MET") in text
    assert "goal: peak RSS under the top level <= llama-server's + 20%" in text
    assert "goals: 1 of 4 met; NOT MET: aggregate, TTFT p50, RSS" in text
    assert "WARNING: other work" not in text  # the synthetic runs say nothing of it
    a[1]["levels"][1]["other_cpu_pct"] = 35.0
    a[0]["levels"][1]["other_cpu_pct"] = 3.0
    out = io.StringIO()
    http_load.print_report(http_load.build_report(a, b), out=out)
    assert "CPUs during the levels (worst level of any run): 35% while sidecar ran, - while" in (
        out.getvalue())
    assert "WARNING: other work took up to 35% of the CPUs" in out.getvalue()

    # The command line: files in, the table out, exit 3 while a goal is unmet, JSON saved.
    paths = {}
    for side, runs in (("a", a), ("b", b)):
        paths[side] = []
        for i, r in enumerate(runs):
            f = tmp_path / f"{side}{i}.json"
            f.write_text(json.dumps(r))
            paths[side].append(str(f))
    saved = tmp_path / "report.json"
    rc = http_load.main(["--report", "--runs-a", *paths["a"], "--runs-b", *paths["b"], "--goals",
                         "--json", str(saved)])
    assert rc == 3
    assert json.loads(saved.read_text())["goals_met"] is False
    # Every goal met: B slower, A lean and fair.
    fast = [_run("sidecar", (200, 300), (0.05, 0.1), (0.05, 0.15), (200, 80), 310 << 10)]
    out = io.StringIO()
    assert http_load.print_report(http_load.build_report(fast, b[:1]), out=out)
    assert "goals: 4 of 4 met" in out.getvalue()
    assert "one run each: no spread" in out.getvalue()
