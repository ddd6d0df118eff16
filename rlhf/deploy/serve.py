"""A small JSON HTTP API over a finished run: sample from its policy, score with its reward model.

    python -m rlhf.deploy.serve RUN_DIR [--host 127.0.0.1] [--port 8000] [--max-new-tokens-limit 256]
                                 [--max-body-bytes 65536]

    GET  /health   -> 200 {"status": "ok", "policy": DIR, "reward_model": DIR or null}
    POST /generate {"prompt": str, "max_new_tokens": int = 32, "temperature": float = 1.0}
                   -> 200 {"completion": str, "reward": float or null}

The prompt is used verbatim (send "\\n\\nHuman: ...\\n\\nAssistant:"); reward is the run's reward
model score of prompt + completion, null when the run has none. Every error is JSON
{"error": "..."}: 400 malformed request (bad JSON, body not an object, unknown field, missing or
empty prompt, max_new_tokens not an int >= 1, temperature not a positive number, bad
Content-Length); 404 unknown path; 405 wrong method; 411 POST without Content-Length; 413 body
over --max-body-bytes (refused from Content-Length, before reading); 422 a valid request over
the server's limits (max_new_tokens above --max-new-tokens-limit, prompt + max_new_tokens longer
than the model's context); 408 body not received in time; 500 the model call failed (logged; the
server keeps serving).
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import math
import os
import signal
import sys
import threading
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rlhf.errors import UserError
from rlhf.deploy.generate import context_overflow, positive_int

DEFAULT_MAX_NEW_TOKENS = 32
FIELDS = ("prompt", "max_new_tokens", "temperature")
# Over-limit bodies are still read and discarded up to this much: closing a socket with unread
# input makes the kernel send a reset, and the client would lose the 413 instead of reading it.
DRAIN_LIMIT = 1 << 20


class RequestError(Exception):
    """RequestError(status, message): a request the server refuses, with a one-line reason."""


def parse_generate(body: bytes, max_new_tokens_limit: int) -> tuple[str, int, float]:
    """Validate a /generate body; returns (prompt, max_new_tokens, temperature) or raises RequestError."""
    try:
        req = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"invalid JSON: {e}") from None
    if not isinstance(req, dict):
        raise RequestError(400, f"body must be a JSON object, got {type(req).__name__}")
    unknown = sorted(set(req) - set(FIELDS))
    if unknown:  # a typo such as "max_tokens" would otherwise be silently ignored
        raise RequestError(400, f"unknown field(s) {', '.join(unknown)}; expected {', '.join(FIELDS)}")
    prompt = req.get("prompt")
    if prompt is None:
        raise RequestError(400, "missing field: prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError(400, "prompt must be a non-empty string")
    n = req.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:  # bool is an int subclass in Python
        raise RequestError(400, f"max_new_tokens must be an integer >= 1, got {json.dumps(n)}")
    if n > max_new_tokens_limit:
        raise RequestError(422, f"max_new_tokens={n} is above this server's limit of {max_new_tokens_limit}")
    t = req.get("temperature", 1.0)
    # json.loads accepts NaN and Infinity, hence the isfinite check.
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise RequestError(400, f"temperature must be a positive number, got {json.dumps(t)}")
    return prompt, n, float(t)


class Handler(BaseHTTPRequestHandler):
    server: "RLHFServer"
    server_version = "rlhf-serve"
    _allow = None  # the Allow header of a 405
    _body_done = False  # set once the request body has been read, or never will be
    timeout = 60  # seconds a client may stall mid-request before its thread is freed

    def _dispatch(self) -> None:
        routes = {"/health": ("GET", self._health), "/generate": ("POST", self._generate)}
        try:
            path = self.path.split("?", 1)[0]
            if path not in routes:
                raise RequestError(404, f"unknown path {path}; endpoints: GET /health, POST /generate")
            allowed, handle = routes[path]
            if self.command != allowed:
                self._allow = allowed
                raise RequestError(405, f"{self.command} not allowed on {path}; use {allowed}")
            status, payload = 200, handle()
        except RequestError as e:
            status, payload = e.args[0], {"error": e.args[1]}
        except Exception as e:  # a bug or a model failure costs one request, never the server
            traceback.print_exc()
            status, payload = 500, {"error": f"internal error: {type(e).__name__}: {e}".splitlines()[0]}
        self._send(status, payload)

    def _health(self) -> dict:
        a = self.server.artifacts
        return {"status": "ok", "policy": str(a.policy_dir),
                "reward_model": None if a.reward_dir is None else str(a.reward_dir)}

    def _read_body(self) -> bytes:
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise RequestError(411, "Content-Length header required (chunked bodies are not supported)")
        if not raw.strip().isdigit():
            raise RequestError(400, f"invalid Content-Length: {raw!r}")
        length = int(raw)
        if length > self.server.max_body_bytes:  # decided from the header, before reading anything
            raise RequestError(413, f"body is {length} bytes; the limit is {self.server.max_body_bytes}")
        self._body_done = True
        try:
            body = self.rfile.read(length)
        except (TimeoutError, ConnectionError):
            raise RequestError(408, f"timed out reading a {length}-byte body") from None
        if len(body) < length:
            raise RequestError(400, f"body ended after {len(body)} of {length} bytes (Content-Length)")
        return body

    def _generate(self) -> dict:
        srv = self.server
        prompt, n, temperature = parse_generate(self._read_body(), srv.max_new_tokens_limit)
        # One model call at a time: they share the CPU threads, and a fast tokenizer must not be used
        # from two threads at once ("Already borrowed").
        with srv.lock:
            problem = context_overflow(srv.artifacts, prompt, n)
            if problem:
                raise RequestError(422, problem)
            completion = srv.artifacts.generate([prompt], n, temperature)[0]
            reward = srv.artifacts.score([prompt], [completion])[0] if srv.artifacts.reward_dir else None
        if reward is not None and not math.isfinite(reward):  # would be invalid JSON (NaN)
            raise RuntimeError(f"reward model returned {reward}")
        return {"completion": completion, "reward": reward}

    def _send(self, status: int, payload: dict) -> None:
        self._drain()
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 405:
                self.send_header("Allow", self._allow)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except ConnectionError:  # the client hung up: nobody is left to tell, and it is not our error
            self.close_connection = True

    def _drain(self) -> None:
        """Discard a request body nobody read (see DRAIN_LIMIT), so the response reaches the client."""
        raw = "" if self._body_done else self.headers.get("Content-Length", "")
        left = int(raw) if raw.strip().isdigit() else 0
        self._body_done = True
        try:
            while 0 < left <= DRAIN_LIMIT and (chunk := self.rfile.read(min(left, 65536))):
                left -= len(chunk)
        except OSError:  # timeout or hang-up: the response may still get through
            pass

    def send_error(self, code, message=None, explain=None):
        # http.server's own refusals (malformed request line, unsupported method) in JSON as well.
        self.close_connection = True
        self._body_done = True  # the request did not parse: its headers cannot be trusted
        self._send(code, {"error": message or HTTPStatus(code).phrase})

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _dispatch


class RLHFServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client must not keep the process alive at shutdown

    def __init__(self, address, artifacts, max_new_tokens_limit: int, max_body_bytes: int):
        self.artifacts = artifacts
        self.max_new_tokens_limit = max_new_tokens_limit
        self.max_body_bytes = max_body_bytes
        self.lock = threading.Lock()
        super().__init__(address, Handler)

    def server_close(self) -> None:
        super().server_close()
        # Let the model call in progress finish, then free the models in this thread: torch aborts the
        # process ("terminate called without an active exception") if interpreter teardown stops a
        # daemon handler thread inside a model call or while it drops the models' last reference.
        with self.lock:
            self.artifacts = None


def make_server(run_dir, host: str = "127.0.0.1", port: int = 8000, *, max_new_tokens_limit: int = 256,
                max_body_bytes: int = 65536, device: str = "cpu", stage: str | None = None) -> RLHFServer:
    """Load the run's models, then bind (port 0 = any free port). Call serve_forever() to serve.

    The models load here, not on the first request, so a broken export fails at start-up and
    the first client does not wait for it. Raises UserError for a bad run directory.
    """
    from rlhf.deploy.runs import RunArtifacts  # torch + transformers: not needed for --help

    artifacts = RunArtifacts(run_dir, device=device, stage=stage)
    artifacts.policy, artifacts.tokenizer  # noqa: B018 - cached_property: touching them loads them
    if artifacts.reward_dir is not None:
        artifacts.reward_model, artifacts.reward_tokenizer  # noqa: B018
    return RLHFServer((host, port), artifacts, max_new_tokens_limit, max_body_bytes)


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # another host name: it may resolve to anything
        return False


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM shuts down the same clean way as Ctrl-C


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rlhf.deploy.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by `python train.py`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one")
    p.add_argument("--max-new-tokens-limit", type=positive_int, default=256, help="largest max_new_tokens accepted")
    p.add_argument("--max-body-bytes", type=positive_int, default=65536, help="largest request body accepted")
    p.add_argument("--device", default="cpu", help="torch device to run on (default: cpu)")
    p.add_argument("--stage", default=None, help="the policy to serve: a stage of the run that produces one "
                   "(default: its last, e.g. ppo, grpo or dpo)")
    args = p.parse_args(argv)
    if not is_loopback(args.host):
        print(f"warning: binding {args.host}: the API has no authentication, so anyone who can reach "
              f"this port can run the model", file=sys.stderr)
    if not os.path.isdir(args.run_dir):  # fail before seconds of torch imports
        print(f"error: run directory {args.run_dir} does not exist", file=sys.stderr)
        return 1
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        server = make_server(args.run_dir, args.host, args.port, max_new_tokens_limit=args.max_new_tokens_limit,
                             max_body_bytes=args.max_body_bytes, device=args.device, stage=args.stage)
    except (UserError, OSError) as e:  # OSError: unreadable export, or the port is taken
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _interrupt)
    host, port = server.server_address[:2]
    print(f"serving on http://{host}:{port} (policy {server.artifacts.policy_dir}); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("shutting down", file=sys.stderr)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
