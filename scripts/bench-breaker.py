#!/usr/bin/env python3
"""`make bench-breaker`: how fast a sidecar's circuit breaker opens on a dead variant and closes
once it is back, and what clients see meanwhile.

Starts `sluice-sidecar serve` (the binary in argv[1]) on the demo model as variant `stable` of a
model split 50/50 with variant `canary`, whose address nothing listens on, with
`routing.breaker: {consecutiveFailures: 5, openSeconds: 5}`. One client sends short chats back to
back and reads `sluice_forward_breaker_open{variant="canary"}` after each. Once the breaker is
open, a `canary` sidecar is started on that address; the client goes on until a request is
answered by the canary again. Prints: requests and time until the breaker opened, time from the
canary being ready to the first request it answered, the open time configured, and every
non-200 answer the client got (goal: none).

    scripts/bench-breaker.py BIN MODEL
"""

import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

OPEN_SECONDS = 5
FAILURES = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(text: str, line_prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def start(binary, model, config, token, variant, api, admin) -> subprocess.Popen:
    return subprocess.Popen(
        [binary, "serve", "--model", model, "--served-name", "smollm2", "--config", config,
         "--variant", variant, "--forward-token-file", token,
         "--listen", f"127.0.0.1:{api}", "--admin-listen", f"127.0.0.1:{admin}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_ready(admin: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.time() > deadline or proc.poll() is not None:
            sys.exit("a sidecar did not become ready")
        time.sleep(0.05)


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    binary, model = sys.argv[1], sys.argv[2]
    stable_api, stable_admin = free_port(), free_port()
    canary_api, canary_admin = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        token = os.path.join(tmp, "token")
        with open(token, "w") as f:
            f.write("bench-forwarding-token\n")
        config = os.path.join(tmp, "sidecar.yaml")
        with open(config, "w") as f:
            f.write(f"""version: v1alpha1
model: smollm2
variants:
  - name: stable
    weight: 50
    address: http://127.0.0.1:{stable_api}
  - name: canary
    weight: 50
    address: http://127.0.0.1:{canary_api}
routing:
  breaker: {{consecutiveFailures: {FAILURES}, openSeconds: {OPEN_SECONDS}}}
""")
        stable = start(binary, model, config, token, "stable", stable_api, stable_admin)
        canary = None
        try:
            wait_ready(stable_admin, stable)
            conn = http.client.HTTPConnection("127.0.0.1", stable_api, timeout=60)
            body = json.dumps({"model": "smollm2", "max_tokens": 1, "temperature": 0,
                               "messages": [{"role": "user", "content": "Hi"}]})
            errors: list[int] = []

            def ask() -> str:
                conn.request("POST", "/v1/chat/completions", body,
                             {"content-type": "application/json"})
                r = conn.getresponse()
                r.read()
                if r.status != 200:
                    errors.append(r.status)
                return r.headers.get("x-sluice-variant", "")

            def breaker() -> float:
                with urllib.request.urlopen(f"http://127.0.0.1:{stable_admin}/metrics") as r:
                    text = r.read().decode()
                return metric(text, 'sluice_forward_breaker_open{variant="canary"}')

            started, sent = time.perf_counter(), 0
            while breaker() < 1:
                ask()
                sent += 1
                if time.perf_counter() - started > 60:
                    sys.exit("the breaker never opened")
            opened = time.perf_counter()
            canary = start(binary, model, config, token, "canary", canary_api, canary_admin)
            wait_ready(canary_admin, canary)
            back_up = time.perf_counter()
            while ask() != "canary":
                if time.perf_counter() - back_up > 60:
                    sys.exit("the canary never got traffic again")
            recovered = time.perf_counter()
            print(f"breaker {{consecutiveFailures: {FAILURES}, openSeconds: {OPEN_SECONDS}}}, "
                  f"canary dead, one client sending short chats back to back")
            print(f"opened after {sent} requests, {(opened - started) * 1000:.0f} ms")
            print(f"canary ready {back_up - opened:.2f} s after it opened; first answer from the "
                  f"canary {recovered - back_up:.2f} s later ({recovered - opened:.2f} s after "
                  f"it opened)")
            print(f"non-200 answers: {len(errors)} {sorted(set(errors))}")
        finally:
            for p in (stable, canary):
                if p:
                    p.terminate()
                    p.wait()


if __name__ == "__main__":
    main()
