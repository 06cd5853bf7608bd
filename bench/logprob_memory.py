"""Peak memory of completion log-probs: ours (``grpo.core.token_logprobs_from_hidden``, what the trainer
runs) against a full-vocabulary log-softmax.

At Qwen2.5's real vocabulary (151,936 rows of the output projection), 16 completions (4 prompts x
G 4) of 384 tokens (twice the paper's length), hidden size 896 (Qwen2.5-0.5B's width; the hidden
states are a small part of either peak): log-probs of the sampled tokens, then the backward pass
into the hidden states and the output projection, as in a training step. Each variant runs in a
fresh process; peak = ru_maxrss after minus before (the inputs and weights are allocated before).
The full variant is what a plain implementation does: ``log_softmax(logits).gather`` over
(N, T, V) logits. Ours projects ``logprob_chunk_size`` rows at a time (default 1024) and
checkpoints each chunk. Target: ours / full <= 0.25.

    python bench/logprob_memory.py [--out bench/results/logprob_memory.json] [--tokens 384]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from harness import ROOT, run_worker, versions, write  # noqa: F401  (sets threads and paths)

TARGET = 0.25
VOCAB = 151_936


def measure(variant: str, n: int, t: int, hidden: int, chunk: int) -> dict:
    import torch
    torch.set_num_threads(1)
    from grpo.core import token_logprobs_from_hidden
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, VOCAB, bias=False)
    h = torch.randn(n, t, hidden, requires_grad=True)
    ids = torch.randint(0, VOCAB, (n, t))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if variant == "full":
        logp = torch.log_softmax(head(h).float(), -1).gather(-1, ids[..., None]).squeeze(-1)
    else:
        logp, _ = token_logprobs_from_hidden(head, h, ids, 1.0, chunk)
    logp.sum().backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "peak_rss_mb": peak, "baseline_rss_mb": before, "peak_delta_mb": peak - before,
            "seconds": seconds, "logp_sum": float(logp.detach().sum())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--rows", type=int, default=16, help="completions (B*G)")
    p.add_argument("--tokens", type=int, default=384)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--chunk", type=int, default=1024, help="GRPOConfig.logprob_chunk_size")
    p.add_argument("--model", default=None, help="unused: the head is built at the real vocabulary size")
    p.add_argument("--worker", default=None)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(measure(a.worker, a.rows, a.tokens, a.hidden, a.chunk)))
        return
    runs = {}
    for variant in ("ours", "full"):
        cmd = [sys.executable, __file__, "--worker", variant, "--rows", str(a.rows), "--tokens", str(a.tokens),
               "--hidden", str(a.hidden), "--chunk", str(a.chunk)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        runs[variant] = json.loads(lines[-1]) if lines else {"error": proc.stderr[-3000:]}
    ok = all("error" not in r for r in runs.values())
    ratio = runs["ours"]["peak_delta_mb"] / runs["full"]["peak_delta_mb"] if ok else None
    report = {"benchmark": "logprob_memory", "config": {"rows": a.rows, "tokens": a.tokens, "hidden": a.hidden,
              "vocab": VOCAB, "chunk": a.chunk, "dtype": "float32"}, "runs": runs, "ratio": ratio,
              "max_abs_diff_logp_sum": abs(runs["ours"]["logp_sum"] - runs["full"]["logp_sum"]) if ok else None,
              "memory_method": "ru_maxrss delta over the log-prob forward + backward, fresh process per variant",
              "target": f"ours/full <= {TARGET}", "target_met": ratio is not None and ratio <= TARGET,
              "versions": versions()}
    write("logprob_memory", report, a.out)


if __name__ == "__main__":
    main()
