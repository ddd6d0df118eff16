"""`python -m rlhf.deploy.serve` and `python -m rlhf.deploy.generate` against a real (debug=fast) run: the
official `openai` client and raw HTTP against a server on a free port (completions, chat, streaming,
stop sequences, n, logprobs, rewards), every refusal's status and OpenAI error object, batching of
concurrent requests, a client hanging up mid-stream, and both CLIs."""
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
LIMIT = 64  # the test server's --max-tokens-limit
pytestmark = pytest.mark.slow  # trains a run with train.py in a subprocess


@pytest.fixture(scope="module")
def run_dir(module_tmp):
    run = module_tmp / "run"
    proc = subprocess.run([sys.executable, "train.py", "debug=fast", f"paths.output_dir={run}",
                           "callbacks.progress_bar.refresh_rate=0", "++callbacks.analysis_report=null",
                           # smaller than debug=fast alone: the models only need to exist, not to learn
                           "data.n_pairs=128", "ppo.max_steps=1", "ppo.eval_prompts=8"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def server(run_dir):
    srv = make_server(run_dir, "127.0.0.1", 0, max_tokens_limit=LIMIT, batch_window_ms=100)
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
    for k, v in ({"Content-Type": "application/json"} | (headers or {})).items():
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
    assert {k: body[k] for k in ("status", "model", "policy", "reward")} == {
        "status": "ok", "model": "ppo", "policy": str(run_dir / "ppo" / "model"), "reward": "reward_model"}


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai", reason="the test extra installs the openai client")
    host, port = server.server_address
    return openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="unused", max_retries=0, timeout=120)


def greedy(client, prompt, max_tokens=12, **kw):
    return client.completions.create(model="ppo", prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)


def test_models_list_the_served_policy(client):
    import openai

    assert [m.id for m in client.models.list()] == ["ppo"]
    assert client.models.retrieve("ppo").owned_by == "rlhf-lightning"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_completions_n_logprobs_usage_and_seed(client):
    r = client.completions.create(model="ppo", prompt=PROMPT, max_tokens=6, n=2, logprobs=2, seed=7)
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert c.finish_reason in ("stop", "length")
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) <= 6
        assert "".join(lp.tokens) == c.text and all(x <= 0 for x in lp.token_logprobs)
        # the top-2 alternatives are the two most likely tokens: the sampled one is at most as likely
        assert all(len(top) == 2 and max(top.values()) >= x for top, x in zip(lp.top_logprobs, lp.token_logprobs))
    assert r.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in r.choices)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = client.completions.create(model="ppo", prompt=PROMPT, max_tokens=6, n=2, logprobs=2, seed=7)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # a seed fixes the samples


def test_greedy_completion_is_the_training_samplers_and_batching_does_not_change_it(client, run_dir):
    from rlhf.deploy.runs import RunArtifacts

    art = RunArtifacts(run_dir)
    other = "\n\nHuman: What is a good book to read on a long trip by train?\n\nAssistant:"
    alone = [greedy(client, p).choices[0].text for p in (PROMPT, other)]
    assert alone == art_greedy(art, [PROMPT, other])
    together = greedy(client, [PROMPT, other])  # one request, two prompts of different lengths: padded
    assert [c.text for c in together.choices] == alone


def art_greedy(art, prompts, n=12):
    from rlhf.algorithms.core import truncate_after_stop
    from rlhf.models.sampling import sample

    out = []
    for p in prompts:
        enc = art.tokenizer([p], return_tensors="pt")
        resp, _ = sample(art.policy, enc.input_ids, enc.attention_mask, n, 0.0, art.tokenizer.pad_token_id,
                         art.tokenizer.eos_token_id)
        resp, mask, _ = truncate_after_stop(resp, art.tokenizer.eos_token_id, art.tokenizer.pad_token_id)
        out.append(art.tokenizer.decode(resp[0][mask[0]], skip_special_tokens=True))
    return out


def test_stop_sequences_cut_the_text_whole_and_streamed(client):
    full = greedy(client, PROMPT, 16).choices[0].text
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    cut = greedy(client, PROMPT, 16, stop=[stop, "never appears"]).choices[0]
    assert cut.text == full[:full.find(stop)] and cut.finish_reason == "stop"
    chunks = list(greedy(client, PROMPT, 16, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut.text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_streaming_completion_with_usage(client):
    chunks = list(client.completions.create(model="ppo", prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == greedy(client, PROMPT, 8).choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 8


def test_chat_completion_is_the_hh_dialogue(client, server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Any tips on cooking?"}]
    r = client.chat.completions.create(model="ppo", messages=messages, max_tokens=10, temperature=0)
    hh = "Be brief.\n\nHuman: Any tips on cooking?\n\nAssistant:"
    assert r.usage.prompt_tokens == len(server.artifacts.tokenizer(hh).input_ids)
    # the same text as a completion of the HH prompt, less the space after "Assistant:", cut at a new turn
    expected = greedy(client, hh, 10, stop="\n\nHuman:").choices[0].text.lstrip()
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == expected
    stream = list(client.chat.completions.create(model="ppo", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, logprobs=True, top_logprobs=1))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == expected
    assert stream[-1].choices[0].finish_reason in ("stop", "length")


def test_openai_client_sees_openai_errors(client):
    import openai

    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="ppo", prompt=PROMPT, temperature=-1)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt=PROMPT)
    with pytest.raises(openai.UnprocessableEntityError, match=f"limit of {LIMIT}"):
        client.completions.create(model="ppo", prompt=PROMPT, max_tokens=LIMIT + 1)
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="ppo", messages=[{"role": "wizard", "content": "hi"}])


GEN = "/v1/completions"
CHAT = "/v1/chat/completions"
OK = {"model": "ppo", "prompt": PROMPT, "max_tokens": 4}
# (method, path, body, expected status, words the error message must contain)
BAD = {
    "invalid json": ("POST", GEN, b'{"prompt": ', 400, "not valid JSON"),
    "not utf-8": ("POST", GEN, b"\xff\xfe{", 400, "not valid JSON"),
    "not an object": ("POST", GEN, ["hi"], 400, "valid dictionary"),
    "missing prompt": ("POST", GEN, {"model": "ppo"}, 400, "prompt: Field required"),
    "missing model": ("POST", GEN, {"prompt": PROMPT}, 400, "model: Field required"),
    "prompt not str": ("POST", GEN, OK | {"prompt": 5}, 400, "prompt"),
    "empty prompt": ("POST", GEN, OK | {"prompt": ""}, 400, "non-empty"),
    "unknown field": ("POST", GEN, OK | {"max_new_tokens": 4}, 400, "max_new_tokens: unrecognized"),
    "tokens float": ("POST", GEN, OK | {"max_tokens": 4.0}, 400, "max_tokens"),
    "tokens str": ("POST", GEN, OK | {"max_tokens": "4"}, 400, "max_tokens"),
    "tokens bool": ("POST", GEN, OK | {"max_tokens": True}, 400, "max_tokens"),
    "tokens zero": ("POST", GEN, OK | {"max_tokens": 0}, 400, "max_tokens"),
    "temperature negative": ("POST", GEN, OK | {"temperature": -0.5}, 400, "temperature"),
    "temperature str": ("POST", GEN, OK | {"temperature": "hot"}, 400, "temperature"),
    "temperature nan": ("POST", GEN, b'{"model": "ppo", "prompt": "x", "temperature": NaN}', 400, "temperature"),
    "n zero": ("POST", GEN, OK | {"n": 0}, 400, "n:"),
    "five stops": ("POST", GEN, OK | {"stop": list("abcde")}, 400, "at most 4 stop"),
    "top_p": ("POST", GEN, OK | {"top_p": 0.5}, 400, "top_p=0.5 is not supported"),
    "echo": ("POST", GEN, OK | {"echo": True}, 400, "echo=True is not supported"),
    "unknown model": ("POST", GEN, OK | {"model": "gpt-4"}, 404, "`gpt-4` does not exist"),
    "tokens over limit": ("POST", GEN, OK | {"max_tokens": LIMIT + 1}, 422, f"limit of {LIMIT}"),
    "n over limit": ("POST", GEN, OK | {"n": 33}, 422, "at most 32"),
    "prompt too long": ("POST", GEN, OK | {"prompt": "word " * 300}, 422, "context of"),
    "unknown role": ("POST", CHAT, {"model": "ppo", "messages": [{"role": "tool", "content": "x"}]}, 400, "role"),
    "no messages": ("POST", CHAT, {"model": "ppo", "messages": []}, 400, "messages"),
    "assistant last": ("POST", CHAT, {"model": "ppo", "messages": [{"role": "user", "content": "a"},
                                                                   {"role": "assistant", "content": "b"}]},
                       400, "last message"),
    "top_logprobs alone": ("POST", CHAT, {"model": "ppo", "messages": [{"role": "user", "content": "a"}],
                                          "top_logprobs": 2}, 400, "needs logprobs"),
    "rewards no responses": ("POST", "/v1/rewards", {"prompt": PROMPT, "responses": []}, 400, "responses"),
    "rewards too many": ("POST", "/v1/rewards", {"prompt": PROMPT, "responses": ["a"] * 33}, 422, "at most 32"),
    "rewards unknown model": ("POST", "/v1/rewards", {"model": "x", "prompt": PROMPT, "responses": ["a"]}, 404,
                              "does not exist"),
    "unknown path": ("GET", "/nope", None, 404, "unknown path /nope"),
    "old endpoint": ("POST", "/generate", {"prompt": PROMPT}, 404, "unknown path /generate"),
    "GET completions": ("GET", GEN, None, 405, "GET is not allowed on /v1/completions"),
    "POST health": ("POST", "/health", {}, 405, "POST is not allowed on /health"),
}


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_request_gets_the_openai_error_object(server, case):
    method, path, body, expected, words = case
    status, reply = request(server, method, path, body)
    assert status == expected, reply
    err = reply["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert words in err["message"] and "\n" not in err["message"], err


def test_body_over_limit_is_refused(server):
    status, reply = request(server, "POST", GEN, b" " * 65537)
    assert status == 413 and "limit is 65536" in reply["error"]["message"]
    # A claimed 1 GB body is refused at once, from the header alone: the server never waits for it.
    conn = http.client.HTTPConnection(*server.server_address, timeout=10)
    conn.putrequest("POST", GEN)
    conn.putheader("Content-Length", str(10**9))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and "1000000000 bytes" in json.loads(resp.read())["error"]["message"]
    conn.close()
    # A chunked body (no Content-Length) is counted as it arrives.
    conn = http.client.HTTPConnection(*server.server_address, timeout=10)
    conn.request("POST", GEN, body=iter([b" " * 40000, b" " * 40000]), encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 413 and "over 65536 bytes" in json.loads(resp.read())["error"]["message"]
    conn.close()


def test_server_survives_bad_requests(server):
    for method, path, body, expected, _ in BAD.values():
        assert request(server, method, path, body)[0] == expected
    assert request(server, "GET", "/health")[0] == 200
    status, body = request(server, "POST", GEN, OK)
    assert status == 200 and isinstance(body["choices"][0]["text"], str)


def test_concurrent_requests_are_batched_and_each_gets_its_answer(server):
    before = request(server, "GET", "/health")[1]["batches"]
    results: list = []
    threads = [threading.Thread(target=lambda i=i: results.append(
        request(server, "POST", GEN, OK | {"max_tokens": 6, "seed": i}))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [status for status, _ in results] == [200] * 8
    assert all(len(body["choices"]) == 1 for _, body in results)
    batches = request(server, "GET", "/health")[1]["batches"] - before
    assert 1 <= batches < 8  # fewer decode batches (one model call per step each) than requests
    before += batches
    assert request(server, "POST", GEN, OK | {"n": 4})[0] == 200
    assert request(server, "GET", "/health")[1]["batches"] == before + 1  # n choices: one batch


def test_client_disconnecting_mid_stream_leaves_the_server_healthy(server):
    dropped = request(server, "GET", "/health")[1]["dropped"]
    conn = http.client.HTTPConnection(*server.server_address, timeout=60)
    conn.request("POST", GEN, json.dumps(OK | {"max_tokens": LIMIT, "stream": True, "ignore_eos": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
    assert resp.readline().startswith(b"data: {")  # the first event arrived, then the client hangs up
    conn.sock.shutdown(2)
    conn.close()
    status, body = request(server, "POST", GEN, OK)
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")
    health = request(server, "GET", "/health")[1]
    # the abandoned sequence was dropped mid-decode, not decoded to its LIMIT tokens for nobody
    assert health["status"] == "ok" and health["dropped"] == dropped + 1


def test_rewards_are_the_runs_reward_model_then_the_tasks_gold(server, run_dir):
    from rlhf.data.synthetic import gold_reward
    from rlhf.deploy.runs import RunArtifacts

    responses = [" Thanks, happy to help with cooking.", " no"]
    status, body = request(server, "POST", "/v1/rewards", {"model": "ppo", "prompt": PROMPT, "responses": responses})
    assert status == 200 and body["source"] == "reward_model"
    expected = RunArtifacts(run_dir).score([PROMPT] * 2, responses)
    assert [d["score"] for d in body["data"]] == pytest.approx(expected, abs=1e-4)
    art = server.artifacts
    art.reward_dir, saved = None, art.reward_dir  # a run without a reward model: its task's gold
    try:
        status, body = request(server, "POST", "/v1/rewards", {"prompt": PROMPT, "responses": responses})
    finally:
        art.reward_dir = saved
    assert status == 200 and body["source"] == "gold"
    assert [d["score"] for d in body["data"]] == pytest.approx([gold_reward(PROMPT, r) for r in responses])


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
        match = re.match(r"serving `ppo` .* on http://127\.0\.0\.1:(\d+)/v1", line)
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
    assert rc == 0 and "Traceback" not in stderr and "shut down" in stderr, stderr


def test_load_benchmark_reports_both_phases(run_dir):
    proc = cli("rlhf.bench.serve_load", str(run_dir), "--clients", "4", "--requests", "8", "--sequential", "2",
               "--max-tokens", "4", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seq, con, summary = (json.loads(line) for line in proc.stdout.splitlines())
    assert (seq["phase"], seq["ok"], seq["batches"]) == ("sequential", 2, 2)
    assert (con["phase"], con["ok"], con["failed"]) == ("concurrent", 8, 0)
    assert con["completion_tokens"] == 8 * 4  # ignore_eos: every request decodes max_tokens
    assert con["batches"] < 8 and summary["speedup"] > 0


def test_malformed_or_missing_content_length_is_a_400_and_the_server_stays_healthy(server):
    """The old server's 400 (bad Content-Length) and 411 (none) cases. A malformed header never reaches the
    app: uvicorn's HTTP parser answers 400 itself (plain text). A POST without Content-Length has an empty
    body, refused as a request missing its fields (the OpenAI error object)."""
    import socket

    with socket.create_connection(server.server_address, timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n{}")
        assert s.recv(200).startswith(b"HTTP/1.1 400 ")
    status, reply = request(server, "POST", GEN, b"", content_length=False)
    assert status == 400 and "Field required" in reply["error"]["message"]
    assert request(server, "GET", "/health")[0] == 200
