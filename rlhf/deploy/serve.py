"""Serve a finished run over HTTP with the OpenAI API, so existing clients can use its policy.

    python -m rlhf.deploy.serve RUN_DIR [--host 127.0.0.1] [--port 8000] [--model-name NAME]
        [--max-tokens-limit 256] [--max-rows 32] [--max-batch-size 16] [--batch-window-ms 20]
        [--max-body-bytes 65536] [--stage ppo|grpo|...] [--device cpu]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="ppo", prompt="\\n\\nHuman: Any tips?\\n\\nAssistant:", max_tokens=32)
    client.chat.completions.create(model="ppo", messages=[{"role": "user", "content": "Any tips?"}])

Endpoints and errors: `rlhf.deploy.api`. Concurrent requests are decoded together in batches
(`rlhf.deploy.engine`: up to --max-batch-size sequences collected for --batch-window-ms); the
model's name is --model-name, by default the stage whose policy is served. The server has no
authentication: it binds the loopback address unless --host says otherwise.
"""
from __future__ import annotations

import argparse
import copy
import ipaddress
import os
import signal
import socket
import sys


class Server:
    """A bound, loaded server: `serve_forever()` (blocks), `shutdown()` from another thread,
    `server_close()`; `server_address` is (host, port) (port 0 at construction = a free port)."""

    def __init__(self, artifacts, host: str, port: int, limits, *, name: str, max_batch_size: int,
                 batch_window_s: float, log_level: str = "warning"):
        import uvicorn

        from rlhf.deploy.api import Served, create_app
        from rlhf.deploy.engine import Engine

        self.artifacts = artifacts
        # The engine's own tokenizer: a fast tokenizer must not be used from two threads at once.
        self.engine = Engine(artifacts.policy, copy.deepcopy(artifacts.tokenizer), max_batch_size, batch_window_s)
        self.app = create_app(Served(artifacts, self.engine, name, limits))
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family)
        self.server_address = self.socket.getsockname()[:2]
        self._uvicorn = uvicorn.Server(uvicorn.Config(self.app, log_level=log_level, lifespan="off",
                                                             timeout_graceful_shutdown=5))

    def serve_forever(self) -> None:
        self._uvicorn.run(sockets=[self.socket])

    def shutdown(self) -> None:
        self._uvicorn.should_exit = True

    def server_close(self) -> None:
        self.engine.close()  # the batch in progress finishes; the models are freed in this thread
        self.socket.close()


def make_server(run_dir, host: str = "127.0.0.1", port: int = 8000, *, max_tokens_limit: int = 256,
                max_rows: int = 32, max_body_bytes: int = 65536, max_batch_size: int = 16,
                batch_window_ms: float = 20, device: str = "cpu", stage: str | None = None,
                model_name: str | None = None, log_level: str = "warning") -> Server:
    """Load the run's models, then bind. Models load here, not on the first request, so a broken
    export fails at start-up. Raises UserError for a bad run directory, OSError for a taken port."""
    from rlhf.deploy.api import Limits
    from rlhf.deploy.runs import RunArtifacts

    artifacts = RunArtifacts(run_dir, device=device, stage=stage)
    artifacts.policy, artifacts.tokenizer  # noqa: B018 - cached_property: touching them loads them
    if artifacts.reward_dir is not None:
        artifacts.reward_model, artifacts.reward_tokenizer  # noqa: B018
    limits = Limits(max_tokens_limit, max_rows, max_body_bytes)
    return Server(artifacts, host, port, limits, name=model_name or artifacts.stage, max_batch_size=max_batch_size,
                  batch_window_s=batch_window_ms / 1000, log_level=log_level)


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # another host name: it may resolve to anything
        return False


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    from rlhf.deploy.generate import positive_int

    p = argparse.ArgumentParser(prog="python -m rlhf.deploy.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by `python train.py`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one")
    p.add_argument("--model-name", default=None, help="the model's name in the API (default: the served stage)")
    p.add_argument("--max-tokens-limit", type=positive_int, default=256, help="largest max_tokens accepted")
    p.add_argument("--max-rows", type=positive_int, default=32,
                   help="most sequences per request (prompts x n), and responses per /v1/rewards request")
    p.add_argument("--max-batch-size", type=positive_int, default=16, help="most sequences decoded together")
    p.add_argument("--batch-window-ms", type=float, default=20,
                   help="how long the first waiting request waits for others to batch with")
    p.add_argument("--max-body-bytes", type=positive_int, default=65536, help="largest request body accepted")
    p.add_argument("--device", default="cpu", help="torch device to run on (default: cpu)")
    p.add_argument("--stage", default=None, help="the policy to serve: a stage of the run that produces one "
                   "(default: its last, e.g. ppo, grpo or dpo)")
    args = p.parse_args(argv)
    if not 0 <= args.batch_window_ms <= 10_000:
        p.error(f"--batch-window-ms must be in [0, 10000], got {args.batch_window_ms}")
    if not is_loopback(args.host):
        print(f"warning: binding {args.host}: the API has no authentication, so anyone who can reach "
              f"this port can run the model", file=sys.stderr)
    if not os.path.isdir(args.run_dir):  # fail before seconds of torch imports
        print(f"error: run directory {args.run_dir} does not exist", file=sys.stderr)
        return 1
    import transformers

    from rlhf.errors import UserError

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        server = make_server(args.run_dir, args.host, args.port, max_tokens_limit=args.max_tokens_limit,
                             max_rows=args.max_rows, max_body_bytes=args.max_body_bytes,
                             max_batch_size=args.max_batch_size, batch_window_ms=args.batch_window_ms,
                             device=args.device, stage=args.stage, model_name=args.model_name, log_level="info")
    except (UserError, OSError) as e:  # OSError: unreadable export, or the port is taken
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 1
    host, port = server.server_address
    print(f"serving `{server.app.state.served.name}` (policy {server.artifacts.policy_dir}) on "
          f"http://{host}:{port}/v1; Ctrl-C stops", flush=True)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again for the handler that
    # was there before it: for both, a KeyboardInterrupt, which ends this process with status 0.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        print("shut down", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
