"""Load test of `python -m rlhf.deploy.serve`: one client at a time against many concurrent clients.

    python -m rlhf.bench.serve_load RUN_DIR [--clients 16] [--requests 200] [--sequential 24]
                                            [--max-tokens 32] [--max-batch-size 16] [--batch-window-ms 20]

Starts the server on a free port in a subprocess (so clients and server do not share a Python
interpreter), then sends POST /v1/completions (HH prompts, `max_tokens`, temperature 1, `ignore_eos`
so that every request decodes `max_tokens` tokens): first --sequential requests from one client,
each after the last returned; then --requests from --clients threads at once. Prints one JSON line per phase: {"phase", "clients", "requests", "ok",
"failed", "completion_tokens", "seconds", "tokens_per_s", "requests_per_s", "p50_s", "p99_s",
"batches" (decode batches the server ran in the phase)}, then {"speedup": concurrent tokens/s over
sequential tokens/s, ...}. Exits 1 if any request failed.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np

PROMPTS = ["Any tips on cooking?", "How do I learn to swim?", "What should I read next?", "Can you help me sleep?"]


def _post(port: int, body: dict, timeout: float = 600) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _health(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/health")
    return json.loads(conn.getresponse().read())


def phase(port: int, name: str, clients: int, requests: int, model: str, max_tokens: int) -> dict:
    """`requests` requests spread over `clients` threads, each sending its next one when the last returned."""
    latencies, tokens, failed, lock = [], [], [], threading.Lock()
    todo = iter(range(requests))

    def client():
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            body = {"model": model, "max_tokens": max_tokens, "temperature": 1.0, "seed": i, "ignore_eos": True,
                    "prompt": f"\n\nHuman: {PROMPTS[i % len(PROMPTS)]}\n\nAssistant:"}
            t0 = time.perf_counter()
            try:
                status, out = _post(port, body)
            except OSError as e:
                status, out = 0, {"error": str(e)}
            dt = time.perf_counter() - t0
            with lock:
                if status == 200 and len(out.get("choices", [])) == 1:
                    latencies.append(dt)
                    tokens.append(out["usage"]["completion_tokens"])
                else:
                    failed.append((status, out))

    before = _health(port)["batches"]
    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    lat = np.array(latencies) if latencies else np.array([float("nan")])
    for status, out in failed[:3]:
        print(f"failed: {status} {out}", file=sys.stderr)
    return {"phase": name, "clients": clients, "requests": requests, "ok": len(latencies), "failed": len(failed),
            "completion_tokens": int(sum(tokens)), "seconds": round(seconds, 3),
            "tokens_per_s": round(sum(tokens) / seconds, 2), "requests_per_s": round(len(latencies) / seconds, 3),
            "p50_s": round(float(np.percentile(lat, 50)), 3), "p99_s": round(float(np.percentile(lat, 99)), 3),
            "batches": _health(port)["batches"] - before}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rlhf.bench.serve_load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--sequential", type=int, default=24, help="requests of the one-at-a-time phase")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-window-ms", type=float, default=20)
    args = p.parse_args(argv)
    if not os.path.isdir(args.run_dir):
        p.error(f"run directory {args.run_dir} does not exist")
    cmd = [sys.executable, "-m", "rlhf.deploy.serve", args.run_dir, "--port", "0",
           "--max-batch-size", str(args.max_batch_size), "--batch-window-ms", str(args.batch_window_ms),
           "--max-tokens-limit", str(max(args.max_tokens, 1))]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = server.stdout.readline()
        m = re.search(r"serving `(.+?)` .* on http://[^:]+:(\d+)/v1", line)
        if not m:
            print(f"error: the server did not start: {line.strip() or 'no output'}", file=sys.stderr)
            return 1
        model, port = m.group(1), int(m.group(2))
        _post(port, {"model": model, "prompt": "\n\nHuman: hi\n\nAssistant:", "max_tokens": 4})  # warm-up
        seq = phase(port, "sequential", 1, args.sequential, model, args.max_tokens)
        print(json.dumps(seq), flush=True)
        con = phase(port, "concurrent", args.clients, args.requests, model, args.max_tokens)
        print(json.dumps(con), flush=True)
        print(json.dumps({"speedup": round(con["tokens_per_s"] / seq["tokens_per_s"], 2),
                          "p50_ratio": round(con["p50_s"] / seq["p50_s"], 2), "threads": os.cpu_count(),
                          "run_dir": args.run_dir, "max_batch_size": args.max_batch_size,
                          "batch_window_ms": args.batch_window_ms}), flush=True)
        return 1 if seq["failed"] or con["failed"] else 0
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    sys.exit(main())
