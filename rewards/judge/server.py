"""A local judge that speaks the OpenAI chat-completions protocol on 127.0.0.1.

    python -m rewards.judge.server --backend rubric --port 0
    python -m rewards.judge.server --backend transformers --model /path/to/chat-checkpoint

Prints ``JUDGE_URL=http://127.0.0.1:PORT/v1`` once listening; SIGTERM or SIGINT stops it
cleanly. Endpoints: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``.

Backends: ``rubric`` (default) is the deterministic grader of :mod:`rewards.judge.rubric`
(single-completion and group prompts alike);
``transformers`` serves any local chat checkpoint (``AutoModelForCausalLM`` + the tokenizer's
chat template, greedy at temperature 0, one request at a time). ``--delay-ms`` adds a fixed
latency to every reply (used by bench/judge_throughput.py to simulate a remote judge).
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from rewards.judge.rubric import grade_prompt

MAX_BODY = 64 * 1024 * 1024


class BadRequest(ValueError):
    """The request is not a chat completion this backend can answer (HTTP 400)."""


def _message_text(message: dict) -> str:
    """Text of a chat message whose content is a string or a list of parts (images skipped)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


class RubricBackend:
    """Deterministic rubric grading of prompts rendered by :mod:`rewards.judge.prompt`: a
    single-completion prompt gets one verdict object, a group prompt (``$chains``) gets
    ``{"chains": [...]}`` with one verdict per chain."""

    name = "rubric"

    def complete(self, messages: list[dict], params: dict) -> tuple[str, int, int]:
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            raise BadRequest("no user message")
        text = _message_text(users[-1])
        verdict = grade_prompt(text)
        if verdict is None:
            raise BadRequest("user message has no delimited judge sections (render it with rewards.judge.prompt)")
        content = json.dumps(verdict)
        prompt_tokens = sum(len(_message_text(m).split()) for m in messages if isinstance(m, dict))
        return content, prompt_tokens, len(content.split())


class TransformersBackend:
    """Greedy (or sampled) generation from a local chat checkpoint, serialised by a lock."""

    name = "transformers"

    def __init__(self, model_path: str, max_new_tokens: int = 256):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path).eval()
        self.max_new_tokens = max_new_tokens
        self.lock = threading.Lock()

    def complete(self, messages: list[dict], params: dict) -> tuple[str, int, int]:
        chat = [{"role": str(m.get("role", "user")), "content": _message_text(m)}
                for m in messages if isinstance(m, dict)]
        ids = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)["input_ids"]
        temperature = float(params.get("temperature") or 0.0)
        max_new = min(int(params.get("max_tokens") or self.max_new_tokens), self.max_new_tokens)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        with self.lock, self.torch.no_grad():
            out = self.model.generate(ids, max_new_tokens=max_new, pad_token_id=self.tokenizer.eos_token_id,
                                      **sampling)
        new = out[0, ids.shape[1]:]
        return self.tokenizer.decode(new, skip_special_tokens=True), int(ids.shape[1]), int(new.shape[0])


def make_handler(backend, model_name: str, delay_s: float, verbose: bool):
    """A request-handler class bound to one backend."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections
        # Headers and body go out in two writes; with Nagle on, the body waits for the client's
        # delayed ACK (~40 ms on Linux) -- a fifth of the simulated latency in the benchmark.
        disable_nagle_algorithm = True

        def log_message(self, fmt, *args):  # quiet unless asked: one line per request is noisy
            if verbose:
                sys.stderr.write("judge_server: " + fmt % args + "\n")

        def _send(self, status: int, obj: dict) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path.rstrip("/") == "/health":
                self._send(200, {"status": "ok", "backend": backend.name})
            elif self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model_name, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            try:
                request = self._read_json()
                content, p_tok, c_tok = backend.complete(request["messages"], request)
            except BadRequest as err:
                self._send(400, {"error": {"message": str(err), "type": "invalid_request_error"}})
                return
            if delay_s:
                time.sleep(delay_s)
            self._send(200, _completion(model_name, content, p_tok, c_tok))

        def _read_json(self) -> dict:
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_BODY:
                raise BadRequest("missing or oversized body")
            try:
                request = json.loads(self.rfile.read(length))
            except ValueError:
                raise BadRequest("body is not JSON") from None
            if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
                raise BadRequest("body must be an object with a 'messages' list")
            return request

    return Handler


def _completion(model: str, content: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default backlog (5) drops connections from a 32-wide client


def serve(backend, host: str, port: int, model_name: str, delay_s: float = 0.0, verbose: bool = False) -> int:
    """Serve until SIGTERM/SIGINT; prints JUDGE_URL=... once listening."""
    server = _Server((host, port), make_handler(backend, model_name, delay_s, verbose))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    print(f"JUDGE_URL=http://{host}:{server.server_address[1]}/v1", flush=True)
    while not stop.wait(0.2):
        pass
    server.shutdown()
    server.server_close()
    print("judge server stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=("rubric", "transformers"), default="rubric")
    p.add_argument("--model", help="checkpoint directory (transformers backend)")
    p.add_argument("--served-model-name", help="model id reported in replies (default: backend name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--delay-ms", type=float, default=0.0, help="fixed latency added to every reply")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = p.parse_args(argv)
    if args.backend == "transformers":
        if not args.model:
            p.error("--backend transformers needs --model PATH (a local chat checkpoint)")
        backend = TransformersBackend(args.model, args.max_new_tokens)
    else:
        backend = RubricBackend()
    name = args.served_model_name or (args.model if args.backend == "transformers" else "rubric")
    return serve(backend, args.host, args.port, name, args.delay_ms / 1000.0, args.verbose)


class LocalJudge:
    """Handle on a judge server subprocess: ``.url``, ``.close()``; a context manager."""

    def __init__(self, process: subprocess.Popen, url: str):
        self.process, self.url = process, url

    def close(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait, SIGKILL if it hangs; returns the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> "LocalJudge":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LocalJudge(url={self.url!r}, pid={self.process.pid})"


def start_local_judge(backend: str = "rubric", *, model: str | None = None, port: int = 0,
                      delay_ms: float = 0.0, extra_args: tuple[str, ...] = (),
                      startup_timeout: float = 120.0) -> LocalJudge:
    """Start ``python -m rewards.judge.server`` and wait for its URL."""
    cmd = [sys.executable, "-m", "rewards.judge.server", "--backend", backend, "--port", str(port),
           "--delay-ms", str(delay_ms), *extra_args]
    if model:
        cmd += ["--model", str(model)]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # works without `pip install -e .`
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] and None, daemon=True).start()
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.1)
        except queue.Empty:
            if proc.poll() is not None:
                raise RuntimeError(f"judge server exited with code {proc.returncode} before listening: {cmd}")
            continue
        if line.startswith("JUDGE_URL="):
            return LocalJudge(proc, line.strip().split("=", 1)[1])
    LocalJudge(proc, "").close()
    raise TimeoutError(f"judge server printed no JUDGE_URL within {startup_timeout:.0f}s: {cmd}")


if __name__ == "__main__":
    sys.exit(main())
