#!/usr/bin/env python3
"""`make bench-connections`: what idle, slow and flooding clients cost the sidecar.

Starts `sluice-sidecar serve` (the binary in argv[1]) on the demo model on loopback ports, then:
  1. its open files and resident memory before and while 2,000 connections sit idle on the API
     port, and how many of them it holds;
  2. how long it takes to close a silent connection, a half-sent request head (408) and a
     stalled body (408), with the flags given below (the defaults, unless overridden);
  3. the admin port's /readyz latency (p50, p99 of 200 probes, each on a new connection) with
     the API port idle, then with 4,500 connections offered, more than it may hold.
Prints one line per figure. Loopback only; needs ~4,200 open files itself (it raises its own
soft limit).

    scripts/bench-connections.py BIN MODEL [extra serve flags...]
"""

import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

IDLE = 2000
# Offered on top of the idle ones: past the default limit of 4,096 connections.
FLOOD = 2500


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fds_and_rss(pid: int) -> tuple[int, float]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/status") as f:
        rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return fds, rss_kb / 1024


def probe_latencies(admin: str, n: int = 200) -> tuple[float, float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        with urllib.request.urlopen(f"{admin}/readyz", timeout=10) as r:
            r.read()
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1]


def time_to_close(api: tuple[str, int], send: bytes) -> tuple[float, bytes]:
    s = socket.create_connection(api)
    s.settimeout(600)
    started = time.perf_counter()
    if send:
        s.sendall(send)
    got = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        got += chunk
    s.close()
    return time.perf_counter() - started, got


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    binary, model, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    api_port, admin_port = free_port(), free_port()
    api, admin = ("127.0.0.1", api_port), f"http://127.0.0.1:{admin_port}"
    server = subprocess.Popen(
        [binary, "serve", "--model", model, "--served-name", "m",
         "--listen", f"127.0.0.1:{api_port}", "--admin-listen", f"127.0.0.1:{admin_port}", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{admin}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline or server.poll() is not None:
                sys.exit("the sidecar did not become ready")
            time.sleep(0.1)

        fds0, rss0 = fds_and_rss(server.pid)
        p50, p99 = probe_latencies(admin)
        print(f"at rest: {fds0} open files, RSS {rss0:.1f} MB; /readyz p50 {p50:.2f} ms, p99 {p99:.2f} ms")

        idle = [socket.create_connection(api) for _ in range(IDLE)]
        time.sleep(1)
        fds1, rss1 = fds_and_rss(server.pid)
        with urllib.request.urlopen(f"{admin}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        held = next((line.split()[-1] for line in metrics.splitlines()
                     if line.startswith('sluice_connections_open{listener="api"}')), "?")
        print(f"{IDLE} idle connections: {fds1} open files (+{fds1 - fds0}), RSS {rss1:.1f} MB "
              f"(+{rss1 - rss0:.1f}); held {held}")
        # More than the limit may hold arrive while the idle ones are held.
        extra_conns = []
        for _ in range(FLOOD):
            try:
                extra_conns.append(socket.create_connection(api, timeout=5))
            except OSError:
                break
        p50, p99 = probe_latencies(admin)
        with urllib.request.urlopen(f"{admin}/metrics", timeout=10) as r:
            refused = sum(float(line.split()[-1]) for line in r.read().decode().splitlines()
                          if line.startswith('sluice_connections_refused_total{listener="api"'))
        print(f"with {IDLE + len(extra_conns)} connections offered to the API port ({refused:.0f} "
              f"refused): /readyz p50 {p50:.2f} ms, p99 {p99:.2f} ms")
        for s in idle + extra_conns:
            s.close()
        time.sleep(1)

        secs, got = time_to_close(api, b"")
        print(f"silent connection closed after {secs:.1f} s (answer: {len(got)} bytes)")
        secs, got = time_to_close(api, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        print(f"half-sent head closed after {secs:.1f} s: {got.split(b' ', 2)[1].decode() if got else 'no answer'}")
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % (len(body) + 100))
        secs, got = time_to_close(api, head + body)
        print(f"stalled body closed after {secs:.1f} s: {got.split(b' ', 2)[1].decode() if got else 'no answer'}")
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
