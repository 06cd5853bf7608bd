"""A fault-injecting chat-completions server for the judge-client tests (run as a subprocess).

Each request's prompt carries a script: ``FAULTS=429ra1,500,ok`` and ``ID=name``. The n-th
request for a given ID performs the n-th step (the last step repeats). Steps:

    ok | delayN (ms, then ok) | 429raN (Retry-After: N s) | 429 | 429date | 500 | 502 | 503 |
    529 | 400 | 401 | malformed | truncated | drop | trickle | offformat | fenced | prose | clip |
    nan | twoobj | emptychoices | nullcontent | huge | hugestream | scaled | authorkeys |
    rounding | slightlyover | echoauth | group | groupshort | grouplist | groupkeyed | groupover

``ok`` replies with the scores in ``SCORES=a,b`` (default 0.5,0.5). ``huge`` sends a 200 reply of
about 30 kB (a valid verdict padded with a long rationale), ``hugestream`` the same without a
Content-Length header (closing the connection at the end). ``scaled`` replies the scores times 10, ``authorkeys`` under
``integrity_score``/``knowledge_score``; ``rounding`` replies 1.004 and -0.004, ``slightlyover``
1.01 and 0.5; ``echoauth`` puts the request's Authorization header in a 0..10 verdict.
Group steps read each chain section ``<<<CHAIN k id>>>`` of a group prompt and grade chain k
with the ``CS=a,b`` written in its text (default 0.5,0.5): ``group`` replies
``{"chains": [{"chain": k, ...}]}`` (chains listed in reverse order), ``grouplist`` a bare list
without ids, ``groupkeyed`` an object keyed by chain number with the authors' key names,
``groupshort`` leaves out the last chain, ``groupover`` grades chain 1 with integrity 7.
``GET /stats`` returns, per ID, the arrival times, the Authorization headers and the number of
image parts received.

    python tests/rewards/judge/fault_judge.py   # prints JUDGE_URL=http://127.0.0.1:PORT/v1
"""
from __future__ import annotations

import email.utils
import json
import re
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATS: dict[str, dict] = {}
LOCK = threading.Lock()


def _text(body: dict) -> str:
    parts = []
    for m in body.get("messages", []):
        c = m.get("content")
        parts += [c] if isinstance(c, str) else [p.get("text", "") for p in c if p.get("type") == "text"]
    return "\n".join(parts)


def _images(body: dict) -> list[str]:
    return [p["image_url"]["url"] for m in body.get("messages", []) if isinstance(m.get("content"), list)
            for p in m["content"] if p.get("type") == "image_url"]


def _chat(content) -> dict:
    return {"id": "x", "object": "chat.completion", "model": "fault",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def _send(self, status: int, obj=None, raw: bytes | None = None, headers: dict | None = None):
        body = raw if raw is not None else json.dumps(obj).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        with LOCK:
            self._send(200, STATS)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = _text(body)
        plan = (re.search(r"FAULTS=([a-z0-9,]+)", text) or [None, "ok"])[1].split(",")
        key = (re.search(r"ID=(\w+)", text) or [None, "default"])[1]
        with LOCK:
            st = STATS.setdefault(key, {"times": [], "auth": [], "images": []})
            step = plan[min(len(st["times"]), len(plan) - 1)]
            st["times"].append(time.monotonic())
            st["auth"].append(self.headers.get("Authorization"))
            st["images"].append(_images(body))
        scores = re.search(r"SCORES=([0-9.]+),([0-9.]+)", text)
        self.text = text
        self.step(step, float(scores[1]) if scores else 0.5, float(scores[2]) if scores else 0.5)

    def step(self, step: str, a: float, b: float):
        verdict = json.dumps({"integrity": a, "knowledge": b, "rationale": "fault server"})
        if step.startswith("delay"):
            time.sleep(int(step[5:]) / 1000)
            step = "ok"
        if step.startswith("group"):
            return self._send(200, _chat(self.group_reply(step)))
        replies = {
            "ok": verdict, "offformat": "I would rate this answer highly!",
            "fenced": f"Here is my grade:\n```json\n{verdict}\n```", "prose": f"Verdict: {verdict} -- done.",
            "clip": '{"integrity": 7, "knowledge": -2}', "nan": '{"integrity": NaN, "knowledge": 0.5}',
            "twoobj": '{"integrity": 1, "knowledge": 1} and {"integrity": 0, "knowledge": 0}',
            "nullcontent": None,
            "huge": json.dumps({"integrity": a, "knowledge": b, "rationale": "x" * 30_000}),
            "scaled": json.dumps({"integrity": round(10 * a, 6), "knowledge": round(10 * b, 6)}),
            "authorkeys": json.dumps({"integrity_score": a, "knowledge_score": b, "rationale": "authors' keys"}),
            "rounding": '{"integrity": 1.004, "knowledge": -0.004}',
            "slightlyover": '{"integrity": 1.01, "knowledge": 0.5}',
            "echoauth": json.dumps({"integrity": 8, "knowledge": 6,
                                    "rationale": f"seen {self.headers.get('Authorization')} " + "y" * 1000}),
        }
        if step in replies:
            return self._send(200, _chat(replies[step]))
        if step == "hugestream":  # no Content-Length: the client only learns the size by reading
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(json.dumps(_chat(json.dumps({"integrity": a, "knowledge": b,
                                                           "rationale": "x" * 30_000}))).encode())
            self.wfile.flush()
            return self._drop()
        if step.startswith("429ra"):
            return self._send(429, {"error": "slow down"}, headers={"Retry-After": step[5:]})
        if step == "429date":
            when = email.utils.formatdate(time.time() + 2, usegmt=True)
            return self._send(429, {"error": "slow down"}, headers={"Retry-After": when})
        if step.isdigit():
            return self._send(int(step), {"error": {"message": f"injected {step}"}})
        if step == "malformed":
            return self._send(200, raw=b'{"choices": [{"message": {"content": "{\\"integ')
        if step == "emptychoices":
            return self._send(200, {"choices": []})
        if step == "truncated":
            self.send_response(200)
            self.send_header("Content-Length", "400")
            self.end_headers()
            self.wfile.write(json.dumps(_chat(verdict)).encode()[:60])
            return self._drop()
        if step == "trickle":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(20):
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.1)
            return self._drop()
        if step == "drop":
            return self._drop()
        raise ValueError(f"unknown fault step {step!r}")

    def group_reply(self, step: str) -> str:
        chains = re.findall(r"<<<CHAIN (\d+) ([0-9a-f]{16})>>>\n(.*?)\n<<<END CHAIN \1 \2>>>", self.text, re.DOTALL)
        entries = []
        for k, _, body in chains:
            cs = re.search(r"CS=([0-9.]+),([0-9.]+)", body)
            a, b = (float(cs[1]), float(cs[2])) if cs else (0.5, 0.5)
            entries.append({"chain": int(k), "integrity": a, "knowledge": b, "rationale": f"chain {k}"})
        if step == "groupshort":
            entries = entries[:-1]
        if step == "groupover":
            entries[0]["integrity"] = 7
        if step == "grouplist":
            return json.dumps([{key: e[key] for key in ("integrity", "knowledge")} for e in entries])
        if step == "groupkeyed":
            return json.dumps({str(e["chain"]): {"integrity_score": e["integrity"], "knowledge_score": e["knowledge"]}
                               for e in entries})
        return json.dumps({"chains": entries[::-1]})

    def _drop(self):
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


def main() -> int:
    server = Server(("127.0.0.1", 0), Handler)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    print(f"JUDGE_URL=http://127.0.0.1:{server.server_address[1]}/v1", flush=True)
    while not stop.wait(0.1):
        pass
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
