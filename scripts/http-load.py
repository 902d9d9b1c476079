#!/usr/bin/env python3
"""Load driver for OpenAI-compatible chat servers, measured as a user sees them.

N concurrent streaming chat completions (distinct, deterministic prompts; greedy; fixed
max_tokens) against `--url`, for each N in `--streams`; per level: aggregate completion tokens/s,
TTFT p50 and the last stream's TTFT, per-stream decode tokens/s (after the first token) and, for
one stream, prompt tokens/s (prompt tokens / TTFT). Python standard library only (asyncio, raw
HTTP/1.1, SSE parsing), so it runs wherever python3 does; works against sluice-sidecar and
llama.cpp's llama-server alike.

  http-load.py --url http://127.0.0.1:8080 --streams 1,4,16 --max-tokens 128 --json a.json
  http-load.py --url http://127.0.0.1:8080 --smoke           # one plain and one streamed chat
  http-load.py --compare a.json b.json --goals                # side by side, ratios a/b
  http-load.py --table a.json                                 # a saved result's table
  http-load.py --report --runs-a a1.json a2.json --runs-b b1.json b2.json --goals
                                     # several runs per server: medians, spread, the goals

`--pid PID` samples that server process's resident memory (VmRSS, /proc) during every level;
`--long-prompt-streams 1,4` times the long prompts at several concurrencies.

Tokens are counted from the final `usage` chunk (`stream_options.include_usage`) when the server
sends one, else as content chunks; each level says which ("usage" or "chunks").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from urllib.parse import urlsplit

WORDS = (
    "river mountain lantern copper garden winter harbor signal forest engine marble "
    "violet thunder meadow canyon pocket silver candle desert falcon island ladder "
    "mirror orchard pepper quartz rocket saddle tunnel velvet window yellow anchor "
    "basket cedar dragon ember feather glacier hollow ivory jasmine kettle lemon "
    "mosaic nectar oyster prairie quiver ribbon summit timber umbrella valley walnut"
).split()


def prompt_text(index: int, words: int) -> str:
    """A deterministic prompt of about `words` words, distinct per `index` from its first token,
    so no server reuses another request's prompt cache."""
    picked = [WORDS[(index * 7 + j * 13 + (j * j) % 11) % len(WORDS)] for j in range(words)]
    return (
        f"Request {index}. Write a long, detailed story that uses all of these words: "
        + " ".join(picked)
        + "."
    )


class HttpError(Exception):
    pass


async def _open(url: str, timeout: float):
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise HttpError(f"only http:// URLs are supported, got {url!r}")
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, limit=1 << 22), timeout
    )
    return reader, writer, f"{host}:{port}"


async def _request(method, url, path, body, headers, timeout):
    """Sends one HTTP/1.1 request; returns (status, headers, reader, writer)."""
    reader, writer, hostport = await _open(url, timeout)
    payload = json.dumps(body).encode() if body is not None else b""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {hostport}", "Connection: close"]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), timeout)
    if not status_line:
        raise HttpError("connection closed before a response")
    try:
        status = int(status_line.split()[1])
    except (IndexError, ValueError) as e:
        raise HttpError(f"bad status line {status_line!r}") from e
    hdrs = {}
    while True:
        line = await asyncio.wait_for(reader.readline(), timeout)
        if line in (b"\r\n", b"\n", b""):
            break
        k, _, v = line.decode("latin-1").partition(":")
        hdrs[k.strip().lower()] = v.strip()
    return status, hdrs, reader, writer


async def _body_chunks(reader, hdrs, timeout):
    """Yields the response body as it arrives (chunked, Content-Length or until close)."""
    if "chunked" in hdrs.get("transfer-encoding", "").lower():
        while True:
            size_line = await asyncio.wait_for(reader.readline(), timeout)
            if not size_line:
                return
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                return
            data = await asyncio.wait_for(reader.readexactly(size + 2), timeout)
            yield data[:-2]
    elif "content-length" in hdrs:
        left = int(hdrs["content-length"])
        while left > 0:
            data = await asyncio.wait_for(reader.read(min(left, 1 << 16)), timeout)
            if not data:
                return
            left -= len(data)
            yield data
    else:
        while True:
            data = await asyncio.wait_for(reader.read(1 << 16), timeout)
            if not data:
                return
            yield data


async def http_json(method, url, path, body=None, headers=None, timeout=60.0):
    status, hdrs, reader, writer = await _request(method, url, path, body, headers or {}, timeout)
    try:
        data = b"".join([c async for c in _body_chunks(reader, hdrs, timeout)])
    finally:
        writer.close()
    if status != 200:
        raise HttpError(f"{method} {path}: HTTP {status}: {data[:400].decode(errors='replace')}")
    return json.loads(data), hdrs


async def stream_chat(url, body, headers, timeout):
    """One streamed chat completion. Returns its timings (perf_counter seconds) and counts."""
    rec = {
        "start": time.perf_counter(), "first": None, "last": None, "end": None,
        "chunks": 0, "usage": None, "finish": None, "text": [], "error": None,
    }
    try:
        status, hdrs, reader, writer = await _request(
            "POST", url, "/v1/chat/completions", body, headers, timeout
        )
    except (OSError, asyncio.TimeoutError, HttpError) as e:
        rec["error"] = f"{type(e).__name__}: {e}"
        return rec
    try:
        if status != 200:
            data = b"".join([c async for c in _body_chunks(reader, hdrs, timeout)])
            rec["error"] = f"HTTP {status}: {data[:300].decode(errors='replace')}"
            return rec
        buf = b""
        done = False
        async for chunk in _body_chunks(reader, hdrs, timeout):
            now = time.perf_counter()
            buf += chunk
            while b"\n" in buf and not done:
                line, buf = buf.split(b"\n", 1)
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                try:
                    event = json.loads(data)
                except ValueError:
                    continue
                if "error" in event:
                    rec["error"] = f"stream error: {json.dumps(event['error'])[:300]}"
                    done = True
                    break
                for choice in event.get("choices") or []:
                    delta = choice.get("delta") or {}
                    content = delta.get("content") or delta.get("reasoning_content")
                    if content:
                        rec["chunks"] += 1
                        rec["text"].append(content)
                        if rec["first"] is None:
                            rec["first"] = now
                        rec["last"] = now
                    if choice.get("finish_reason"):
                        rec["finish"] = choice["finish_reason"]
                if event.get("usage"):
                    rec["usage"] = event["usage"]
            if done:
                break
        rec["end"] = time.perf_counter()
        if not done and rec["error"] is None:
            rec["error"] = "stream ended without [DONE]"
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        writer.close()
    return rec


def chat_body(args, model, index, words, max_tokens, stream=True):
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt_text(index, words)}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if stream:
        body["stream"] = True
        if not args.no_usage:
            body["stream_options"] = {"include_usage": True}
    if args.ignore_eos:
        body["ignore_eos"] = True
    return body


def headers_of(args):
    return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}


def tokens_of(rec):
    if rec["usage"] and rec["usage"].get("completion_tokens") is not None:
        return rec["usage"]["completion_tokens"], "usage"
    return rec["chunks"], "chunks"


def read_rss_kb(pid):
    """(VmRSS, VmHWM) of a process in KiB, from /proc/PID/status; (None, None) if unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return None, None
    vals = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM") and value.split():
            vals[key] = int(value.split()[0])
    return vals.get("VmRSS"), vals.get("VmHWM")


def cpu_jiffies(pid):
    """(busy jiffies of the whole machine, total jiffies, the process's own CPU jiffies, this
    driver's own), from /proc/stat and /proc/PID/stat; None where unreadable."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    total = sum(fields)  # user nice system idle iowait irq softirq steal
    busy = total - fields[3] - fields[4]
    t = os.times()
    return busy, total, int(stat[11]) + int(stat[12]), (t.user + t.system) * tick


class RssSampler:
    """Samples a process's VmRSS every `interval` seconds while the block runs (an asyncio task
    beside the requests); `summary()` gives the peak and the last sample, and the share of all the
    machine's CPUs that other processes (neither that server nor this driver) used meanwhile: a
    busy machine skews the figures. No-op without a pid."""

    def __init__(self, pid, interval=0.05):
        self.pid, self.interval = pid, interval
        self.peak = self.last = self.hwm = None
        self.samples = 0
        self._task = None
        self._cpu0 = self.other_cpu_pct = None

    def sample(self):
        rss, hwm = read_rss_kb(self.pid)
        if rss is not None:
            self.samples += 1
            self.last = rss
            self.peak = rss if self.peak is None else max(self.peak, rss)
        if hwm is not None:
            self.hwm = hwm

    async def _run(self):
        while True:
            self.sample()
            await asyncio.sleep(self.interval)

    async def __aenter__(self):
        if self.pid:
            self._cpu0 = cpu_jiffies(self.pid)
            self._task = asyncio.ensure_future(self._run())
        return self

    async def __aexit__(self, *exc):
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self.sample()
            cpu1 = cpu_jiffies(self.pid)
            if self._cpu0 and cpu1 and cpu1[1] > self._cpu0[1]:
                d = [b - a for a, b in zip(self._cpu0, cpu1)]
                other = max(0.0, d[0] - d[2] - d[3])
                self.other_cpu_pct = min(100.0, 100.0 * other / d[1])
        return False

    def summary(self):
        return {"rss_peak_kb": self.peak, "rss_end_kb": self.last, "rss_hwm_kb": self.hwm,
                "rss_samples": self.samples, "other_cpu_pct": self.other_cpu_pct}


async def run_round(args, model, streams, words, max_tokens, first_index):
    headers = headers_of(args)
    bodies = [chat_body(args, model, first_index + i, words, max_tokens) for i in range(streams)]
    t0 = time.perf_counter()
    recs = await asyncio.gather(*(stream_chat(args.url, b, headers, args.timeout) for b in bodies))
    t1 = time.perf_counter()
    return t0, t1, recs


def summarize(streams, rounds):
    """rounds: [(t0, t1, recs)]. Aggregates one level."""
    ttfts, decode, agg, last_ttft, prompt_tps, comp_tokens, prompt_tokens = [], [], [], [], [], [], []
    sources, errors, finishes = set(), [], {}
    for t0, t1, recs in rounds:
        ok = [r for r in recs if r["error"] is None and r["first"] is not None]
        errors += [r["error"] or "no content tokens" for r in recs if r not in ok]
        total = 0
        round_ttfts = []
        for r in ok:
            n, src = tokens_of(r)
            sources.add(src)
            total += n
            comp_tokens.append(n)
            ttft = r["first"] - r["start"]
            round_ttfts.append(ttft)
            finishes[r["finish"] or "none"] = finishes.get(r["finish"] or "none", 0) + 1
            # Tokens after the first over the time after the first (chunks, when usage is
            # absent, are tokens for both servers: one token per content chunk).
            if n > 1 and r["last"] > r["first"]:
                decode.append((n - 1) / (r["last"] - r["first"]))
            if r["usage"] and r["usage"].get("prompt_tokens"):
                prompt_tokens.append(r["usage"]["prompt_tokens"])
                if streams == 1 and ttft > 0:
                    prompt_tps.append(r["usage"]["prompt_tokens"] / ttft)
        ttfts += round_ttfts
        if round_ttfts:
            last_ttft.append(max(round_ttfts))
        if ok and t1 > t0:
            agg.append(total / (t1 - t0))
    med = lambda v: statistics.median(v) if v else None  # noqa: E731
    return {
        "streams": streams,
        "rounds": len(rounds),
        "requests": sum(len(r[2]) for r in rounds),
        "errors": len(errors),
        "error_samples": errors[:3],
        "count_source": "usage" if sources == {"usage"} else ("chunks" if sources else None),
        "agg_tok_s": med(agg),
        "ttft_p50_s": med(ttfts),
        "ttft_last_s": med(last_ttft),
        "decode_tok_s_mean": statistics.fmean(decode) if decode else None,
        "decode_tok_s_min": min(decode) if decode else None,
        "prompt_tok_s": med(prompt_tps),
        "prompt_tokens_mean": statistics.fmean(prompt_tokens) if prompt_tokens else None,
        "completion_tokens_mean": statistics.fmean(comp_tokens) if comp_tokens else None,
        "finish_reasons": finishes,
    }


async def resolve_model(args):
    if args.model:
        return args.model, None
    data, hdrs = await http_json("GET", args.url, "/v1/models", headers=headers_of(args),
                                 timeout=args.timeout)
    return data["data"][0]["id"], hdrs.get("server")


async def measure(args):
    model, server = await resolve_model(args)
    levels = [int(s) for s in args.streams.split(",") if s.strip()]
    long_levels = [int(s) for s in str(getattr(args, "long_prompt_streams", "1")).split(",")
                   if s.strip()]
    pid = getattr(args, "pid", None)
    interval = getattr(args, "rss_interval", 0.05)
    result = {
        "label": args.label or args.url,
        "url": args.url,
        "model": model,
        "server_header": server,
        "config": {
            "streams": levels, "prompt_words": args.prompt_words, "max_tokens": args.max_tokens,
            "repeat": args.repeat, "warmup": args.warmup, "long_prompt_words": args.long_prompt_words,
            "long_prompt_streams": long_levels if args.long_prompt_words else [],
            "long_prompt_max_tokens": args.long_prompt_max_tokens,
            "ignore_eos": args.ignore_eos, "include_usage": not args.no_usage,
        },
        "levels": [],
        "long_levels": [],
        "prefill": None,
        "rss": None,
    }
    if pid:
        # After the model's load (the server is ready), before any request.
        rss, hwm = read_rss_kb(pid)
        if rss is None:
            raise HttpError(f"cannot read /proc/{pid}/status (--pid): no such process?")
        result["rss"] = {"pid": pid, "start_kb": rss, "start_hwm_kb": hwm, "end_kb": None}
    # Every request of the run gets its own index (the warm-up rounds too), so every prompt
    # is new to the server.
    index = args.index_base

    async def measure(n, prompt_words, max_tokens, warm_tokens):
        """One level: untimed warm-up rounds, then the timed ones, the server's RSS sampled."""
        nonlocal index
        for _ in range(args.warmup):
            _, _, recs = await run_round(args, model, n, prompt_words, warm_tokens, index)
            index += n
            bad = [r["error"] for r in recs if r["error"]]
            if bad:
                print(f"warm-up at {n} stream(s): {len(bad)} error(s): {bad[0]}", file=sys.stderr)
        rounds = []
        async with RssSampler(pid, interval) as rss:
            for _ in range(args.repeat):
                rounds.append(await run_round(args, model, n, prompt_words, max_tokens, index))
                index += n
        level = summarize(n, rounds)
        if pid:
            level.update(rss.summary())
        return level

    for n in levels:
        level = await measure(n, args.prompt_words, args.max_tokens, min(args.max_tokens, 16))
        result["levels"].append(level)
        save(args, result)  # after every level: a run cut short keeps what it measured
        if not args.quiet:
            print(f"  {n:>3} stream(s): agg {fmt(level['agg_tok_s'])} tok/s, "
                  f"decode {fmt(level['decode_tok_s_mean'])} tok/s/stream, "
                  f"TTFT p50 {fmt_ms(level['ttft_p50_s'])}, errors {level['errors']}",
                  file=sys.stderr, flush=True)
    for n in long_levels if args.long_prompt_words else []:
        level = await measure(n, args.long_prompt_words, args.long_prompt_max_tokens, 4)
        level["prompt_words"] = args.long_prompt_words
        result["long_levels"].append(level)
        if n == 1:
            result["prefill"] = level  # the single-stream one, as before
        save(args, result)
        if not args.quiet:
            print(f"  {n:>3} stream(s), long prompts: agg {fmt(level['agg_tok_s'])} tok/s, "
                  f"TTFT p50 {fmt_ms(level['ttft_p50_s'])}, errors {level['errors']}",
                  file=sys.stderr, flush=True)
    if pid:
        result["rss"]["end_kb"], result["rss"]["end_hwm_kb"] = read_rss_kb(pid)
    return result


def save(args, result):
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(result, f, indent=2)
        os.replace(args.json + ".tmp", args.json)


def fmt(v, digits=1):
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def fmt_ms(v):
    return "-" if v is None else f"{v * 1000:,.1f} ms"


def print_table(result, out=sys.stdout):
    print(f"{result['label']}: model {result['model']}, prompt ~{result['config']['prompt_words']} "
          f"words, max_tokens {result['config']['max_tokens']}, "
          f"{result['config']['repeat']} round(s) per level", file=out)
    head = ("streams", "agg tok/s", "decode tok/s/stream", "TTFT p50", "TTFT last",
            "prompt tok/s", "tokens/req", "counted", "errors")
    rows = []
    for lv in result["levels"]:
        rows.append((str(lv["streams"]), fmt(lv["agg_tok_s"]),
                     f"{fmt(lv['decode_tok_s_mean'])} (min {fmt(lv['decode_tok_s_min'])})",
                     fmt_ms(lv["ttft_p50_s"]), fmt_ms(lv["ttft_last_s"]), fmt(lv["prompt_tok_s"]),
                     fmt(lv["completion_tokens_mean"]), lv["count_source"] or "-",
                     str(lv["errors"])))
    longs = _long_levels(result)
    for lv in longs:
        rows.append((f"{lv['streams']} (long prompt, {fmt(lv['prompt_tokens_mean'], 0)} tok)",
                     fmt(lv["agg_tok_s"]),
                     f"{fmt(lv['decode_tok_s_mean'])} (min {fmt(lv['decode_tok_s_min'])})",
                     fmt_ms(lv["ttft_p50_s"]), fmt_ms(lv["ttft_last_s"]), fmt(lv["prompt_tok_s"]),
                     fmt(lv["completion_tokens_mean"]), lv["count_source"] or "-",
                     str(lv["errors"])))
    _table(head, rows, out)
    rss = result.get("rss")
    if rss:
        peaks = ", ".join(f"{lv['streams']}: {fmt_mib(lv.get('rss_peak_kb'))}"
                          for lv in result["levels"])
        print(f"resident memory (VmRSS): {fmt_mib(rss['start_kb'])} after load; peak per level "
              f"{peaks}; {fmt_mib(rss.get('end_kb'))} at the end", file=out)
    for lv in result["levels"] + longs:
        for e in lv.get("error_samples") or []:
            print(f"  error ({lv['streams']} stream(s)): {e}", file=out)


def _long_levels(result):
    """A result's long-prompt levels (older results hold only the single-stream `prefill`)."""
    if result.get("long_levels"):
        return result["long_levels"]
    return [result["prefill"]] if result.get("prefill") else []


def fmt_mib(kb):
    return "-" if kb is None else f"{kb / 1024:,.0f} MiB"


def _table(head, rows, out):
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).rjust(w) for c, w in zip(r, widths))  # noqa: E731
    print(line(head), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for r in rows:
        print(line(r), file=out)


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def compare(a, b, goals, goal_decode, goal_scale, out=sys.stdout):
    print(f"A = {a['label']}  vs  B = {b['label']}  (ratio A/B; model A {a['model']}, "
          f"B {b['model']})", file=out)
    metrics = (("agg tok/s", "agg_tok_s", fmt), ("decode tok/s/stream", "decode_tok_s_mean", fmt),
               ("TTFT p50", "ttft_p50_s", fmt_ms), ("TTFT last", "ttft_last_s", fmt_ms),
               ("prompt tok/s", "prompt_tok_s", fmt))
    head = ("streams", "metric", "A", "B", "A/B")
    rows = []
    bl = {lv["streams"]: lv for lv in b["levels"]}
    for la in a["levels"]:
        lb = bl.get(la["streams"])
        if lb is None:
            continue
        for name, key, f in metrics:
            if la.get(key) is None and lb.get(key) is None:
                continue
            r = ratio(la.get(key), lb.get(key))
            rows.append((str(la["streams"]), name, f(la.get(key)), f(lb.get(key)),
                         "-" if r is None else f"{r:.2f}x"))
    pa, pb = a.get("prefill"), b.get("prefill")
    if pa and pb:
        for name, key, f in (("TTFT", "ttft_p50_s", fmt_ms), ("prompt tok/s", "prompt_tok_s", fmt)):
            r = ratio(pa.get(key), pb.get(key))
            rows.append((f"1, long prompt ({fmt(pa.get('prompt_tokens_mean'), 0)} tok)", name,
                         f(pa.get(key)), f(pb.get(key)), "-" if r is None else f"{r:.2f}x"))
    _table(head, rows, out)
    errs = sum(lv["errors"] for lv in a["levels"]) + sum(lv["errors"] for lv in b["levels"])
    if errs:
        print(f"warning: {errs} failed request(s) in these results", file=out)
    la = {lv["streams"]: lv for lv in a["levels"]}
    one_a, one_b = la.get(1), bl.get(1)
    get = lambda lv, key: lv.get(key) if lv else None  # noqa: E731
    dec = ratio(get(one_a, "decode_tok_s_mean"), get(one_b, "decode_tok_s_mean"))
    top = max(la) if la else None
    scale = ratio(get(la.get(top), "agg_tok_s"), get(one_a, "agg_tok_s"))
    topb = max(bl) if bl else None
    scale_b = ratio(get(bl.get(topb), "agg_tok_s"), get(one_b, "agg_tok_s"))
    x = lambda r: "-" if r is None else f"{r:.2f}x"  # noqa: E731
    parts = [f"single-stream decode {fmt(get(one_a, 'decode_tok_s_mean'))} vs "
             f"{fmt(get(one_b, 'decode_tok_s_mean'))} tok/s ({x(dec)})"]
    if top is not None:
        agg_b = get(bl.get(top), "agg_tok_s")
        parts.append(f"{top}-stream aggregate {fmt(get(la.get(top), 'agg_tok_s'))} vs "
                     f"{fmt(agg_b)} tok/s ({x(ratio(get(la.get(top), 'agg_tok_s'), agg_b))}), "
                     f"{x(scale)} A's single stream ({x(scale_b)} for B)")
    parts.append(f"TTFT p50 1 stream {fmt_ms(get(one_a, 'ttft_p50_s'))} vs "
                 f"{fmt_ms(get(one_b, 'ttft_p50_s'))}")
    if pa and pb:
        parts.append(f"prefill {fmt(pa.get('prompt_tok_s'))} vs {fmt(pb.get('prompt_tok_s'))} "
                     f"prompt tok/s ({x(ratio(pa.get('prompt_tok_s'), pb.get('prompt_tok_s')))})")
    print("summary (A vs B): " + "; ".join(parts), file=out)
    if not goals:
        return True
    met_dec = dec is not None and dec >= goal_decode
    print(f"goal: single-stream decode A >= {goal_decode:.2f}x B: {x(dec)} -> "
          f"{'MET' if met_dec else 'NOT MET'}", file=out)
    met_scale = scale is not None and scale >= goal_scale
    print(f"goal: A's {top}-stream aggregate >= {goal_scale:.1f}x its single stream: {x(scale)} -> "
          f"{'MET' if met_scale else 'NOT MET'}", file=out)
    return met_dec and met_scale


# --- Several runs per server (fresh processes, alternated): medians, spread, the goals. ---

def _spread(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
            "n": len(vals)}


def _med(spread):
    return spread["median"] if spread else None


def _keyed_levels(result):
    """{(kind, streams): level} of one run: kind "short" (the --streams levels) or "long"."""
    out = {("short", lv["streams"]): lv for lv in result.get("levels") or []}
    out.update({("long", lv["streams"]): lv for lv in _long_levels(result)})
    return out


REPORT_METRICS = ("agg_tok_s", "ttft_p50_s", "ttft_last_s", "decode_tok_s_mean",
                  "completion_tokens_mean", "prompt_tokens_mean", "rss_peak_kb", "other_cpu_pct")
BUSY_PCT = 10.0  # other processes' share of the CPUs during a level above which the report warns


def build_report(runs_a, runs_b):
    """Per level and metric: each server's median over its runs, min and max, the ratio of the
    medians (A/B) and the range of the ratios of paired runs (run i of A with run i of B)."""
    ka = [_keyed_levels(r) for r in runs_a]
    kb = [_keyed_levels(r) for r in runs_b]
    keys = []
    for k in sorted({k for run in ka + kb for k in run},
                    key=lambda k: (k[0] != "short", k[1])):
        if any(k in run for run in ka) and any(k in run for run in kb):
            keys.append(k)
    rows = []
    for kind, streams in keys:
        row = {"kind": kind, "streams": streams, "metrics": {}, "errors": {}, "error_samples": {}}
        for side, runs in (("a", ka), ("b", kb)):
            lvs = [run[(kind, streams)] for run in runs if (kind, streams) in run]
            row["errors"][side] = sum(lv["errors"] for lv in lvs)
            samples = [e for lv in lvs for e in lv.get("error_samples") or []]
            row["error_samples"][side] = samples[:2]
        for m in REPORT_METRICS:
            va = [run.get((kind, streams), {}).get(m) for run in ka]
            vb = [run.get((kind, streams), {}).get(m) for run in kb]
            sa, sb = _spread(va), _spread(vb)
            paired = [ratio(x, y) for x, y in zip(va, vb)]
            row["metrics"][m] = {"a": sa, "b": sb, "ratio": ratio(_med(sa), _med(sb)),
                                 "ratio_range": _spread(paired)}
        # The sidecar's fairness: its last stream's TTFT over its TTFT p50, per run.
        fair = [ratio(run.get((kind, streams), {}).get("ttft_last_s"),
                      run.get((kind, streams), {}).get("ttft_p50_s")) for run in ka]
        row["a_last_over_p50"] = _spread(fair)
        rows.append(row)
    mem = {}
    for side, runs in (("a", runs_a), ("b", runs_b)):
        mem[side] = {
            "start_kb": _spread([(r.get("rss") or {}).get("start_kb") for r in runs]),
            "end_kb": _spread([(r.get("rss") or {}).get("end_kb") for r in runs]),
        }
    top = max((r["streams"] for r in rows if r["kind"] == "short"), default=None)
    if top is not None:
        peak = next(r for r in rows if r["kind"] == "short" and r["streams"] == top)
        peak = peak["metrics"]["rss_peak_kb"]
        mem.update(top_streams=top, peak_a=peak["a"], peak_b=peak["b"], peak_ratio=peak["ratio"],
                   peak_ratio_range=peak["ratio_range"])
    return {
        "a": runs_a[0].get("label", "A") if runs_a else "A",
        "b": runs_b[0].get("label", "B") if runs_b else "B",
        "runs": {"a": len(runs_a), "b": len(runs_b)},
        "rows": rows,
        "memory": mem,
    }


def _level_name(row, short=False):
    if row["kind"] == "short":
        return str(row["streams"])
    tok = _med(row["metrics"]["prompt_tokens_mean"]["b"]) or _med(
        row["metrics"]["prompt_tokens_mean"]["a"])
    if short:
        return f"long {row['streams']}"
    return f"{row['streams']}, long prompts ({fmt(tok, 0)} tok)"


def _ms(v):
    return "-" if v is None else f"{v * 1000:,.0f}"


def _x(r, digits=2):
    return "-" if r is None else f"{r:.{digits}f}x"


def _md_table(head, rows, out):
    print("| " + " | ".join(head) + " |", file=out)
    print("|" + "---|" * len(head), file=out)
    for r in rows:
        print("| " + " | ".join(r) + " |", file=out)


def _goal_line(text, checks, out):
    """checks: [(name, shown, met)]: one line, MET only when every check is."""
    bad = [name for name, _, met in checks if not met]
    met = bool(checks) and not bad
    shown = "; ".join(f"{name}: {v}" for name, v, _ in checks) or "nothing measured"
    verdict = "MET" if met else "NOT MET" + (f" (at {', '.join(bad)})" if bad and checks else "")
    print(f"goal: {text}: {shown} -> {verdict}", file=out)
    return met


def print_report(rep, goals=True, goal_agg=1.0, goal_fair=2.0, goal_rss=1.2, out=sys.stdout):
    a, b = rep["a"], rep["b"]
    na, nb = rep["runs"]["a"], rep["runs"]["b"]
    print(f"## {a} vs {b}: medians of {na} and {nb} run(s), ratio {a}/{b}", file=out)
    print(file=out)
    head = ("streams", f"aggregate tok/s, {a} vs {b}", "TTFT p50 (ms)",
            "TTFT of the last stream (ms)", "per-stream decode tok/s")
    rows = []
    for row in rep["rows"]:
        m = row["metrics"]
        ag, tp, tl, dc = (m["agg_tok_s"], m["ttft_p50_s"], m["ttft_last_s"],
                          m["decode_tok_s_mean"])
        rows.append((
            _level_name(row),
            f"{fmt(_med(ag['a']))} vs {fmt(_med(ag['b']))} ({_x(ag['ratio'])})",
            f"{_ms(_med(tp['a']))} vs {_ms(_med(tp['b']))} ({_x(tp['ratio'])})",
            "-" if row["streams"] == 1 else f"{_ms(_med(tl['a']))} vs {_ms(_med(tl['b']))}",
            f"{fmt(_med(dc['a']))} vs {fmt(_med(dc['b']))}",
        ))
    _md_table(head, rows, out)
    print(file=out)

    def rng(sp, f):
        return "-" if sp is None else f"{f(sp['min'])}-{f(sp['max'])}"

    rows = []
    for row in rep["rows"] if max(na, nb) > 1 else []:
        m = row["metrics"]
        ag, tp, tl, dc = (m["agg_tok_s"], m["ttft_p50_s"], m["ttft_last_s"],
                          m["decode_tok_s_mean"])
        rows.append((
            _level_name(row),
            f"{rng(ag['a'], fmt)} vs {rng(ag['b'], fmt)} ({rng(ag['ratio_range'], _x)})",
            f"{rng(tp['a'], _ms)} vs {rng(tp['b'], _ms)}",
            "-" if row["streams"] == 1 else f"{rng(tl['a'], _ms)} vs {rng(tl['b'], _ms)}",
            f"{rng(dc['a'], fmt)} vs {rng(dc['b'], fmt)}",
        ))
    if rows:
        print(f"Spread over the runs (min-max, {a} vs {b}; ratio: range over paired runs, run i "
              f"of each):", file=out)
        print(file=out)
        _md_table(head, rows, out)
    else:
        print("(one run each: no spread; BENCH_HTTP_ROUNDS / more runs give one)", file=out)
    print(file=out)
    mem = rep["memory"]
    mib = lambda kb: "-" if kb is None else f"{kb / 1024:,.0f}"  # noqa: E731
    top = mem.get("top_streams")
    if top is not None:
        print(f"Resident memory (VmRSS, MiB; {a} vs {b}): after load "
              f"{mib(_med(mem['a']['start_kb']))} vs {mib(_med(mem['b']['start_kb']))}; "
              f"peak under {top} streams {mib(_med(mem.get('peak_a')))} "
              f"({rng(mem.get('peak_a'), mib)}) vs {mib(_med(mem.get('peak_b')))} "
              f"({rng(mem.get('peak_b'), mib)}), {_x(mem.get('peak_ratio'))}; after the run "
              f"{mib(_med(mem['a']['end_kb']))} vs {mib(_med(mem['b']['end_kb']))}", file=out)
    toks = []
    for row in rep["rows"]:
        ta = _med(row["metrics"]["completion_tokens_mean"]["a"])
        tb = _med(row["metrics"]["completion_tokens_mean"]["b"])
        toks.append(f"{_level_name(row, short=True)}: {fmt(ta, 0)} vs {fmt(tb, 0)}")
    print("Completion tokens per request (median; fewer than max_tokens where the model ended "
          "its answer): " + "; ".join(toks), file=out)
    busy = {}
    for side in ("a", "b"):
        worst = [row["metrics"]["other_cpu_pct"][side] for row in rep["rows"]]
        worst = [w["max"] for w in worst if w]
        busy[side] = max(worst) if worst else None
    if busy["a"] is not None or busy["b"] is not None:
        pct = lambda v: "-" if v is None else f"{v:.0f}%"  # noqa: E731
        print(f"Other processes' share of the CPUs during the levels (worst level of any run): "
              f"{pct(busy['a'])} while {a} ran, {pct(busy['b'])} while {b} ran", file=out)
        top_busy = max(v for v in busy.values() if v is not None)
        if top_busy > BUSY_PCT:
            print(f"WARNING: other work took up to {top_busy:.0f}% of the CPUs during the "
                  f"measurements: these figures do not compare the servers fairly (llama.cpp's "
                  f"spinning threads lose the most when a core is taken); rerun on a quiet "
                  f"machine", file=out)
    for row in rep["rows"]:
        for side, label in (("a", a), ("b", b)):
            if row["errors"][side]:
                sample = (row["error_samples"][side] or ["?"])[0]
                print(f"warning: {row['errors'][side]} failed request(s) of {label} at "
                      f"{_level_name(row, short=True)}: {sample}", file=out)
    if not goals:
        return True
    print(file=out)
    checks = []
    for row in rep["rows"]:
        r = row["metrics"]["agg_tok_s"]["ratio"]
        checks.append((_level_name(row, short=True), _x(r), r is not None and r >= goal_agg))
    met = [_goal_line(f"aggregate tok/s >= {goal_agg:.2f}x {b} at every level", checks, out)]
    checks = []
    for row in rep["rows"]:
        tp = row["metrics"]["ttft_p50_s"]
        ta, tb = _med(tp["a"]), _med(tp["b"])
        checks.append((_level_name(row, short=True), f"{_ms(ta)} vs {_ms(tb)} ms",
                       ta is not None and tb is not None and ta <= tb))
    met.append(_goal_line(f"TTFT p50 <= {b}'s at every level", checks, out))
    checks = []
    for row in rep["rows"]:
        if row["streams"] < 2:
            continue
        m = row["metrics"]
        fair = ratio(_med(m["ttft_last_s"]["a"]), _med(m["ttft_p50_s"]["a"]))
        worst = row["a_last_over_p50"]["max"] if row["a_last_over_p50"] else None
        checks.append((_level_name(row, short=True),
                       f"{_x(fair)} ({_ms(_med(m['ttft_last_s']['a']))} / "
                       f"{_ms(_med(m['ttft_p50_s']['a']))} ms; worst run {_x(worst)})",
                       fair is not None and fair <= goal_fair))
    met.append(_goal_line(f"{a}'s last-stream TTFT <= {goal_fair:.1f}x its TTFT p50", checks,
                          out))
    checks = []
    if top is not None:
        pr = mem.get("peak_ratio")
        checks.append((f"{top} streams", f"{mib(_med(mem.get('peak_a')))} vs "
                       f"{mib(_med(mem.get('peak_b')))} MiB, {_x(pr)} (limit {_x(goal_rss)})",
                       pr is not None and pr <= goal_rss))
    met.append(_goal_line(f"peak RSS under the top level <= {b}'s + "
                          f"{(goal_rss - 1) * 100:.0f}%", checks, out))
    ok = all(met)
    print(f"goals: {sum(met)} of {len(met)} met" + ("" if ok else "; NOT MET: " + ", ".join(
        n for n, m in zip(("aggregate", "TTFT p50", "last-stream TTFT", "RSS"), met) if not m)),
        file=out)
    return ok


async def smoke(args):
    model, _ = await resolve_model(args)
    headers = headers_of(args)
    question = "In one sentence: what is a GPU?"
    body = {"model": model, "max_tokens": args.max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": question}]}
    t = time.perf_counter()
    data, _ = await http_json("POST", args.url, "/v1/chat/completions", body, headers,
                              args.timeout)
    dt = time.perf_counter() - t
    print(f"== chat completion (model {model}, {dt * 1000:.0f} ms) ==")
    print(data["choices"][0]["message"].get("content"))
    print(f"usage: {json.dumps(data.get('usage'))}")
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    rec = await stream_chat(args.url, body, headers, args.timeout)
    if rec["error"]:
        raise HttpError(f"streamed chat completion: {rec['error']}")
    ttft = (rec["first"] - rec["start"]) * 1000 if rec["first"] else float("nan")
    print(f"== the same, streamed ({rec['chunks']} content chunks, TTFT {ttft:.0f} ms, "
          f"finish {rec['finish']}) ==")
    print("".join(rec["text"]))
    print(f"usage: {json.dumps(rec['usage'])}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8080", help="server base URL (http://)")
    p.add_argument("--model", help="model id to send (default: the first of GET /v1/models)")
    p.add_argument("--api-key", help="sent as Authorization: Bearer KEY")
    p.add_argument("--label", help="name of this server in tables and JSON (default: the URL)")
    p.add_argument("--streams", default="1,4,16", help="concurrency levels (default 1,4,16)")
    p.add_argument("--prompt-words", type=int, default=40, help="words of list in each prompt")
    p.add_argument("--max-tokens", type=int, default=128, help="max_tokens of each request")
    p.add_argument("--repeat", type=int, default=1, help="timed rounds per level (median)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed rounds per level before the timed ones (max_tokens <= 16)")
    p.add_argument("--long-prompt-words", type=int, default=0,
                   help="also time single requests with a prompt of this many words (prefill)")
    p.add_argument("--long-prompt-max-tokens", type=int, default=8)
    p.add_argument("--long-prompt-streams", default="1",
                   help="concurrency levels of the long prompts (default 1)")
    p.add_argument("--pid", type=int,
                   help="the server's process id: sample its VmRSS during every level (Linux)")
    p.add_argument("--rss-interval", type=float, default=0.05, help="seconds between samples")
    p.add_argument("--index-base", type=int, default=0,
                   help="first prompt index (runs against one server with distinct bases never "
                        "share a prompt)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="send ignore_eos: true (llama.cpp honours it; others may refuse it)")
    p.add_argument("--no-usage", action="store_true", help="do not ask for stream usage")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per read")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--quiet", action="store_true", help="no per-level progress on stderr")
    p.add_argument("--smoke", action="store_true",
                   help="print one chat completion and one streamed one, then exit")
    p.add_argument("--table", metavar="RESULT.json", help="print a saved result's table")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                   help="print two results side by side with ratios A/B")
    p.add_argument("--goals", action="store_true",
                   help="with --compare: check A's decode vs B and A's scaling; exit 3 if unmet")
    p.add_argument("--goal-decode", type=float, default=1.0)
    p.add_argument("--goal-scale", type=float, default=8.0)
    p.add_argument("--report", action="store_true",
                   help="medians and spread of several runs per server (--runs-a, --runs-b); "
                        "with --goals: aggregate, TTFT p50, last-stream TTFT and RSS goals "
                        "(exit 3 if unmet); --json saves the report")
    p.add_argument("--runs-a", nargs="+", metavar="A.json", help="with --report: A's runs")
    p.add_argument("--runs-b", nargs="+", metavar="B.json", help="with --report: B's runs")
    p.add_argument("--goal-agg", type=float, default=1.0,
                   help="with --report: A's aggregate tok/s over B's, at least (default 1.0)")
    p.add_argument("--goal-fair", type=float, default=2.0,
                   help="with --report: A's last-stream TTFT over its p50, at most (default 2.0)")
    p.add_argument("--goal-rss", type=float, default=1.2,
                   help="with --report: A's peak RSS over B's at the top level, at most (1.2)")
    args = p.parse_args(argv)

    if args.report:
        if not args.runs_a or not args.runs_b:
            p.error("--report needs --runs-a and --runs-b")
        runs = {}
        for side in ("a", "b"):
            runs[side] = []
            for path in getattr(args, f"runs_{side}"):
                try:
                    with open(path) as f:
                        runs[side].append(json.load(f))
                except (OSError, ValueError) as e:
                    print(f"http-load: --report: {path}: {e}", file=sys.stderr)
                    return 2
        rep = build_report(runs["a"], runs["b"])
        ok = print_report(rep, args.goals, args.goal_agg, args.goal_fair, args.goal_rss)
        if args.json:
            rep["goals_met"] = ok if args.goals else None
            with open(args.json + ".tmp", "w") as f:
                json.dump(rep, f, indent=2)
            os.replace(args.json + ".tmp", args.json)
        return 0 if ok or not args.goals else 3

    if args.table:
        with open(args.table) as f:
            print_table(json.load(f))
        return 0
    if args.compare:
        with open(args.compare[0]) as fa, open(args.compare[1]) as fb:
            a, b = json.load(fa), json.load(fb)
        ok = compare(a, b, args.goals, args.goal_decode, args.goal_scale)
        return 0 if ok or not args.goals else 3
    try:
        if args.smoke:
            asyncio.run(smoke(args))
            return 0
        result = asyncio.run(measure(args))
    except (OSError, asyncio.TimeoutError, HttpError, KeyError, ValueError) as e:
        print(f"http-load: {args.url}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print_table(result)
    save(args, result)
    failed = sum(lv["errors"] for lv in result["levels"])
    total = sum(lv["requests"] for lv in result["levels"])
    return 1 if total and failed == total else 0


if __name__ == "__main__":
    sys.exit(main())
