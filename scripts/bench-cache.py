#!/usr/bin/env python3
"""`make bench-cache`: the response cache on a repeated-prompt workload, side by side.

Starts `sluice-sidecar serve` (the binary in argv[1]) on the demo model twice, one after the
other on the same cores: with the config's `cache` off, then on. Each run gets the same
workload: 160 greedy chat requests (max_tokens 32) drawn from 16 distinct prompts, each asked 10
times in a fixed shuffled order, 4 at a time. Prints per run: wall time, requests/s, latency
p50/p99 of all requests, of cache hits (`x-sluice-cache: hit`) and of the rest, the completion
tokens the engine generated (`sluice_completion_tokens_total`), and the cache's own metrics;
then the ratios (on/off). Each client thread keeps its connection alive. A request that waited
for an identical one to finish counts as a hit (its latency is that wait).

    scripts/bench-cache.py BIN MODEL
"""

import concurrent.futures
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

PROMPTS = 16
REPEATS = 10
CONCURRENCY = 4
MAX_TOKENS = 32

CONFIG = """version: v1alpha1
model: smollm2
variants:
  - name: default
    weight: 100
{cache}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))]


def workload() -> list[str]:
    asks = [f"In one sentence, what is fact number {i} about the sea?" for i in range(PROMPTS)]
    order = [a for a in asks for _ in range(REPEATS)]
    random.Random(7).shuffle(order)
    return order


LOCAL = threading.local()


def ask(api: str, content: str) -> tuple[float, bool]:
    """One chat on this thread's kept-alive connection (as clients pool them): its latency in
    ms and whether the cache answered it."""
    host, port = api.removeprefix("http://").split(":")
    if getattr(LOCAL, "api", None) != api:
        LOCAL.conn, LOCAL.api = http.client.HTTPConnection(host, int(port), timeout=300), api
    body = json.dumps(
        {
            "model": "smollm2",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        }
    ).encode()
    started = time.perf_counter()
    LOCAL.conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
    r = LOCAL.conn.getresponse()
    r.read()
    if r.status != 200:
        sys.exit(f"HTTP {r.status}")
    hit = r.headers.get("x-sluice-cache") == "hit"
    return (time.perf_counter() - started) * 1000, hit


def run(binary: str, model: str, cache: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        config = os.path.join(tmp, "sidecar.yaml")
        with open(config, "w") as f:
            f.write(CONFIG.format(cache=cache))
        api_port, admin_port = free_port(), free_port()
        proc = subprocess.Popen(
            [binary, "serve", "--model", model, "--served-name", "smollm2", "--config", config,
             "--listen", f"127.0.0.1:{api_port}", "--admin-listen", f"127.0.0.1:{admin_port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        api, admin = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{admin_port}"
        try:
            deadline = time.time() + 120
            while True:
                try:
                    with urllib.request.urlopen(f"{admin}/readyz", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.time() > deadline or proc.poll() is not None:
                    sys.exit("the sidecar did not become ready")
                time.sleep(0.1)
            ask(api, "warm up")
            with urllib.request.urlopen(f"{admin}/metrics") as r:
                before = r.read().decode()
            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
                results = list(pool.map(lambda c: ask(api, c), workload()))
            wall = time.perf_counter() - started
            with urllib.request.urlopen(f"{admin}/metrics") as r:
                after = r.read().decode()
        finally:
            proc.terminate()
            proc.wait()
    delta = lambda name: metric(after, name) - metric(before, name)
    all_ms = [ms for ms, _ in results]
    hits = [ms for ms, hit in results if hit]
    rest = [ms for ms, hit in results if not hit]
    return {
        "wall_s": wall,
        "rps": len(results) / wall,
        "p50_ms": percentile(all_ms, 0.5),
        "p99_ms": percentile(all_ms, 0.99),
        "hits": len(hits),
        "hit_p50_ms": percentile(hits, 0.5),
        "hit_p99_ms": percentile(hits, 0.99),
        "rest_p50_ms": percentile(rest, 0.5),
        "generated_tokens": delta("sluice_completion_tokens_total"),
        "cache_hits": delta("sluice_response_cache_hits_total"),
        "cache_coalesced": delta("sluice_response_cache_coalesced_total"),
        "cache_misses": delta("sluice_response_cache_misses_total"),
        "cache_bytes": metric(after, "sluice_response_cache_bytes"),
    }


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    binary, model = sys.argv[1], sys.argv[2]
    n = PROMPTS * REPEATS
    print(f"{n} greedy chats ({PROMPTS} prompts x {REPEATS}), {CONCURRENCY} at a time, "
          f"max_tokens {MAX_TOKENS}")
    off = run(binary, model, "")
    on = run(binary, model, "cache:\n  maxBytes: 67108864\n  ttlSeconds: 600\n")
    for name, r in (("cache off", off), ("cache on", on)):
        print(f"{name:9}: {r['wall_s']:.1f} s, {r['rps']:.1f} req/s, p50 {r['p50_ms']:.1f} ms, "
              f"p99 {r['p99_ms']:.1f} ms; hits {r['hits']} (p50 {r['hit_p50_ms']:.2f} ms, "
              f"p99 {r['hit_p99_ms']:.2f} ms), others p50 {r['rest_p50_ms']:.1f} ms; "
              f"engine generated {r['generated_tokens']:.0f} tokens; cache hits/coalesced/misses "
              f"{r['cache_hits']:.0f}/{r['cache_coalesced']:.0f}/{r['cache_misses']:.0f}, "
              f"{r['cache_bytes'] / 1024:.1f} KiB held")
    print(f"on/off: wall {on['wall_s'] / off['wall_s']:.3f}x, req/s {on['rps'] / off['rps']:.2f}x, "
          f"engine tokens {on['generated_tokens'] / max(off['generated_tokens'], 1):.3f}x")


if __name__ == "__main__":
    main()
