"""`python -m rlhf.deploy.serve` and `python -m rlhf.deploy.generate` against a real (debug=fast) run: real HTTP
requests to a server on a free port, every refusal's status and message, and both CLIs (~60 s)."""
from __future__ import annotations

import http.client
import json
import math
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from rlhf.deploy.serve import is_loopback, make_server

REPO = Path(__file__).resolve().parents[1]
PROMPT = "\n\nHuman: Any tips on cooking?\n\nAssistant:"
LIMIT = 64  # the test server's --max-new-tokens-limit
pytestmark = pytest.mark.slow  # trains a run with train.py in a subprocess


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("serve") / "run"
    proc = subprocess.run([sys.executable, "train.py", "debug=fast", f"paths.output_dir={run}",
                           "callbacks.progress_bar.refresh_rate=0", "++callbacks.analysis_report=null",
                           # smaller than debug=fast alone: the models only need to exist, not to learn
                           "data.n_pairs=128", "ppo.max_steps=1", "ppo.eval_prompts=8"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def server(run_dir):
    srv = make_server(run_dir, "127.0.0.1", 0, max_new_tokens_limit=LIMIT)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(10)


def request(srv, method, path, body=None, headers=None, content_length=True):
    """(status, parsed JSON body). `body` may be bytes or a JSON-able value."""
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=60)
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    conn.putrequest(method, path)
    for k, v in (headers or {}).items():
        conn.putheader(k, v)
    if body is not None and content_length:
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    resp = conn.getresponse()
    status, data = resp.status, resp.read()
    conn.close()
    assert resp.getheader("Content-Type") == "application/json"
    return status, json.loads(data)


def test_health(server, run_dir):
    status, body = request(server, "GET", "/health")
    assert status == 200
    assert body == {"status": "ok", "policy": str(run_dir / "ppo" / "model"),
                    "reward_model": str(run_dir / "rm" / "model")}


def test_generate_reward_is_the_runs_reward_model_score(server, run_dir):
    from rlhf.deploy.runs import RunArtifacts

    status, body = request(server, "POST", "/generate", {"prompt": PROMPT, "max_new_tokens": 8})
    assert status == 200, body
    assert set(body) == {"completion", "reward"}
    assert isinstance(body["completion"], str)
    assert isinstance(body["reward"], float) and math.isfinite(body["reward"])
    expected = RunArtifacts(run_dir).score([PROMPT], [body["completion"]])[0]
    assert body["reward"] == pytest.approx(expected, abs=1e-4)
    # Optional fields default (max_new_tokens=32, temperature=1.0); any positive temperature works.
    assert request(server, "POST", "/generate", {"prompt": PROMPT})[0] == 200
    assert request(server, "POST", "/generate", {"prompt": PROMPT, "max_new_tokens": 2, "temperature": 0.5})[0] == 200


# (method, path, body, extra request() kwargs, expected status, words the error message must contain)
BAD = {
    "invalid json": ("POST", "/generate", b'{"prompt": ', {}, 400, "invalid JSON"),
    "not utf-8": ("POST", "/generate", b"\xff\xfe{", {}, 400, "invalid JSON"),
    "not an object": ("POST", "/generate", ["hi"], {}, 400, "JSON object"),
    "missing prompt": ("POST", "/generate", {"max_new_tokens": 4}, {}, 400, "missing field: prompt"),
    "prompt not str": ("POST", "/generate", {"prompt": 5}, {}, 400, "prompt must be a non-empty string"),
    "empty prompt": ("POST", "/generate", {"prompt": "  "}, {}, 400, "prompt must be a non-empty string"),
    "unknown field": ("POST", "/generate", {"prompt": PROMPT, "max_tokens": 4}, {}, 400, "max_tokens"),
    "tokens float": ("POST", "/generate", {"prompt": PROMPT, "max_new_tokens": 4.0}, {}, 400, "max_new_tokens"),
    "tokens str": ("POST", "/generate", {"prompt": PROMPT, "max_new_tokens": "4"}, {}, 400, "max_new_tokens"),
    "tokens bool": ("POST", "/generate", {"prompt": PROMPT, "max_new_tokens": True}, {}, 400, "max_new_tokens"),
    "tokens zero": ("POST", "/generate", {"prompt": PROMPT, "max_new_tokens": 0}, {}, 400, "max_new_tokens"),
    "tokens negative": ("POST", "/generate", {"prompt": PROMPT, "max_new_tokens": -3}, {}, 400, "max_new_tokens"),
    "temperature zero": ("POST", "/generate", {"prompt": PROMPT, "temperature": 0}, {}, 400, "temperature"),
    "temperature negative": ("POST", "/generate", {"prompt": PROMPT, "temperature": -1.0}, {}, 400, "temperature"),
    "temperature str": ("POST", "/generate", {"prompt": PROMPT, "temperature": "hot"}, {}, 400, "temperature"),
    "temperature bool": ("POST", "/generate", {"prompt": PROMPT, "temperature": True}, {}, 400, "temperature"),
    "temperature nan": ("POST", "/generate", b'{"prompt": "x", "temperature": NaN}', {}, 400, "temperature"),
    "tokens over limit": ("POST", "/generate", {"prompt": PROMPT, "max_new_tokens": LIMIT + 1}, {}, 422,
                          f"limit of {LIMIT}"),
    "prompt too long": ("POST", "/generate", {"prompt": "word " * 300}, {}, 422, "context of"),
    "bad content-length": ("POST", "/generate", b"{}", {"headers": {"Content-Length": "x"}, "content_length": False},
                           400, "Content-Length"),
    "no content-length": ("POST", "/generate", b"", {"content_length": False}, 411, "Content-Length header required"),
    "unknown path": ("GET", "/nope", None, {}, 404, "unknown path /nope"),
    "unknown path post": ("POST", "/v1/generate", {"prompt": PROMPT}, {}, 404, "unknown path"),
    "GET generate": ("GET", "/generate", None, {}, 405, "GET not allowed on /generate"),
    "POST health": ("POST", "/health", {}, {}, 405, "POST not allowed on /health"),
    "PUT generate": ("PUT", "/generate", {"prompt": PROMPT}, {}, 405, "PUT not allowed"),
}


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_request_gets_4xx_naming_the_problem(server, case):
    method, path, body, kwargs, expected, words = case
    status, reply = request(server, method, path, body, **kwargs)
    assert status == expected, reply
    assert set(reply) == {"error"} and words in reply["error"] and "\n" not in reply["error"]


def test_body_over_limit_is_refused_from_content_length(server):
    status, reply = request(server, "POST", "/generate", b" " * (server.max_body_bytes + 1))
    assert status == 413 and "limit is 65536" in reply["error"]
    # A claimed 1 GB body is refused at once, from the header alone: the server never waits for it.
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    conn.putrequest("POST", "/generate")
    conn.putheader("Content-Length", str(10**9))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and "1000000000 bytes" in json.loads(resp.read())["error"]
    conn.close()


def test_server_survives_bad_requests(server):
    for method, path, body, kwargs, expected, _ in BAD.values():
        assert request(server, method, path, body, **kwargs)[0] == expected
    assert request(server, "GET", "/health")[0] == 200
    status, body = request(server, "POST", "/generate", {"prompt": PROMPT, "max_new_tokens": 4})
    assert status == 200 and isinstance(body["completion"], str)


def test_concurrent_requests_each_get_their_answer(server):
    """Handlers run in threads; the model lock serialises generation without failing anyone."""
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(
        request(server, "POST", "/generate", {"prompt": PROMPT, "max_new_tokens": 4}))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [status for status, _ in results] == [200] * 4


def test_non_loopback_hosts_are_flagged():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.com")


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_generate_cli(run_dir):
    proc = cli("rlhf.deploy.generate", str(run_dir), "--prompt", "Any tips on cooking?", "--num-samples", "2",
               "--max-new-tokens", "6", "--seed", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["sample"] for r in rows] == [1, 2]
    assert all(r["prompt"] == PROMPT for r in rows)  # the plain prompt was wrapped in HH markers
    assert all(isinstance(r["completion"], str) and math.isfinite(r["reward"]) for r in rows)


@pytest.mark.parametrize("module", ["rlhf.deploy.generate", "rlhf.deploy.serve"])
def test_cli_missing_run_dir_is_one_line_error(tmp_path, module):
    extra = ["--prompt", "hi"] if module == "rlhf.deploy.generate" else []
    proc = cli(module, str(tmp_path / "missing"), *extra)
    assert proc.returncode == 1
    assert proc.stdout == "" and proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1


def test_serve_cli_port_0_then_clean_shutdown(run_dir):
    proc = subprocess.Popen([sys.executable, "-m", "rlhf.deploy.serve", str(run_dir), "--port", "0"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        line = lines.get(timeout=90)
        match = re.match(r"serving on http://127\.0\.0\.1:(\d+)", line)
        assert match, line
        conn = http.client.HTTPConnection("127.0.0.1", int(match.group(1)), timeout=30)
        conn.request("GET", "/health")
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"
        conn.close()
    finally:
        # Ctrl-C where this process lets the child see SIGINT (it is ignored in background jobs);
        # otherwise SIGTERM, which the server turns into the same clean shutdown.
        sig = signal.SIGINT if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN else signal.SIGTERM
        proc.send_signal(sig)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    stderr = proc.stderr.read()
    assert rc == 0 and "Traceback" not in stderr and "shutting down" in stderr, stderr
