"""Prompt reuse (each distinct prompt run once per log-prob pass) under DeepSpeed ZeRO-3, with 2
real processes (gloo, CPU); launched by tests/grpo/test_reuse_zero3.py:

    python -m torch.distributed.run --nproc_per_node 2 tests/grpo/ds_reuse.py OUT_DIR CKPT

ZeRO-3 gathers each module's parameters by a collective when the module runs, so both ranks must
run the same modules in the same order whatever their batches hold. The batches here are built to
differ the ways that matter: rank 0's first micro-batch holds images and 5-token completions, its
second a text-only prompt with 1-token completions; rank 1 holds no image at all, 1-token
completions first, then 4-token ones.

``engine``: for three set-ups (frozen tower; trainable tower with activation checkpointing; frozen
tower with activation checkpointing) a ``grpo.engine.DeepSpeedEngine`` with a ZeRO-3 reference
engine runs, in the trainer's order, the reference pass, the old-policy (no-grad) pass and a
forward/backward over both micro-batches (gradient accumulation 2): once with the shared path and
once with the per-row path. Each rank records the log-probs and DeepSpeed's full (averaged)
gradients, and the same numbers from a plain one-process model of the same weights running the
per-row path on both ranks' batches (an independent reference for both paths).

``trainer``: GRPO runs (ZeRO-3, activation checkpointing, mu = 2, a reference model, rank 1 without
images, forced completions): reuse_prompts on and off give the same losses, and the shared path
ran. Each rank writes OUT_DIR/rank<k>.json.
"""
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/helpers.py
from ds_common import FixedSampler, LengthReward, dataset, make_config  # noqa: E402

G = 2
SETUPS = {"frozen": dict(freeze_vision=True, gradient_checkpointing=False),
          "trainable_ckpt": dict(freeze_vision=False, gradient_checkpointing=True),
          "frozen_ckpt": dict(freeze_vision=True, gradient_checkpointing=True)}


def _messages(text, images):
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}]


def rank_batch(adapter, rank):
    """(prompts (4 rows: 2 distinct x G), completion ids (4, 5), mask (4, 5), loss weights, micro-batches)."""
    from helpers import noise_image
    if rank == 0:
        pb = adapter.encode_prompts([_messages("Describe it.", 1), _messages("Text only here.", 0)],
                                    [[noise_image(1, (84, 112))], []])
        widths = [5, 4, 1, 1]
    else:
        pb = adapter.encode_prompts([_messages("No image at all.", 0), _messages("Nor here, longer.", 0)], [[], []])
        widths = [1, 1, 4, 3]
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(100, 600, (4, 5), generator=g)
    mask = (torch.arange(5)[None, :] < torch.tensor(widths)[:, None]).long()
    weights = torch.randn(4, 5, generator=g) * mask
    return pb.repeat_interleave(G), ids, mask, weights, [[0, 1], [2, 3]]


def _inputs(adapter, pb, ids, mask, rows, shared):
    sub, i, m = pb.select(rows), ids[rows], mask[rows]
    width = max(1, int(m.sum(1).max()))
    i, m = i[:, :width], m[:, :width]
    inputs = adapter.shared_forward_inputs(sub, m) if shared else adapter.forward_inputs(sub, i, m)
    return i, m, width, inputs


def passes(engine, adapter, batch, shared):
    """Reference pass, old-policy pass (no grad), then forward/backward over the micro-batches."""
    from deepspeed.utils import safe_get_full_grad
    pb, ids, mask, weights, micro = batch
    out = {"ref": torch.zeros(ids.shape), "old": torch.zeros(ids.shape)}
    with torch.no_grad():
        for name, fn in (("ref", engine.ref_forward), ("old", engine.forward)):
            for rows in micro:
                i, m, w, inputs = _inputs(adapter, pb, ids, mask, rows, shared)
                out[name][rows, :w] = fn(completion_ids=i, **inputs)[0].float() * m
    for k, rows in enumerate(micro):
        i, m, w, inputs = _inputs(adapter, pb, ids, mask, rows, shared)
        logp = engine.forward(completion_ids=i, **inputs)[0]
        engine.backward((logp * weights[rows, :w]).sum(), last=k == len(micro) - 1)
    grads = {}
    for n, p in engine.engine.module.named_parameters():
        g = safe_get_full_grad(p)  # a collective: every rank, same order
        if g is not None:
            grads[n] = g.float().flatten()
    engine.discard_step()
    return out, grads


def plain_reference(ckpt, adapter, batches, setup):
    """Per-row log-probs of this rank's batch and the gradient DeepSpeed should hold (the mean over
    ranks of each rank's summed micro-batch gradients), from one plain process."""
    from grpo.logprobs import CompletionLogProbs
    from models import ModelConfig, load_policy, load_reference
    model = load_policy(ModelConfig(str(ckpt), freeze_vision=setup["freeze_vision"]))
    ref = CompletionLogProbs(load_reference(ModelConfig(str(ckpt))), adapter)
    wrapper = CompletionLogProbs(model, adapter)
    rank = int(os.environ["RANK"])
    out = {}
    for r, (pb, ids, mask, weights, micro) in enumerate(batches):
        for k, rows in enumerate(micro):
            i, m, w, inputs = _inputs(adapter, pb, ids, mask, rows, shared=False)
            if r == rank:
                with torch.no_grad():
                    out.setdefault("ref", torch.zeros(ids.shape))[rows, :w] = ref(completion_ids=i, **inputs)[0] * m
            logp = wrapper(completion_ids=i, **inputs)[0]
            if r == rank:
                out.setdefault("old", torch.zeros(ids.shape))[rows, :w] = logp.detach() * m
            ((logp * weights[rows, :w]).sum() / len(batches)).backward()
    grads = {"model." + n: p.grad.flatten() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _max_diff(a: dict, b: dict) -> dict:
    return {"keys_equal": sorted(a) == sorted(b),
            "max_abs": max((float((a[k] - b[k]).abs().max()) for k in a if k in b), default=float("nan")),
            "max_ref": max((float(b[k].abs().max()) for k in b), default=0.0)}


def scenario_engine(ckpt, out):
    from grpo.engine import DeepSpeedEngine
    from grpo.logprobs import CompletionLogProbs
    from models import ModelConfig, load_policy, load_processor, load_reference
    from models.adapter import QwenVLAdapter
    from models import forward
    rank = int(os.environ["RANK"])
    adapter = QwenVLAdapter(load_processor(ckpt))
    batches = [rank_batch(adapter, r) for r in (0, 1)]
    calls = {"shared": 0}
    shared_prefix_hidden = forward.shared_prefix_hidden

    def counted(*a, **kw):
        calls["shared"] += 1
        return shared_prefix_hidden(*a, **kw)
    forward.shared_prefix_hidden = counted
    result = {}
    for name, setup in SETUPS.items():
        cfg = make_config(f"{out}/{name}", deepspeed=os.path.join(out, "ds_zero3.json"), num_generations=G,
                          per_device_train_batch_size=2, gradient_accumulation_steps=2)
        policy = CompletionLogProbs(load_policy(ModelConfig(str(ckpt), **setup)), adapter)
        ref = CompletionLogProbs(load_reference(ModelConfig(str(ckpt))), adapter)
        engine = DeepSpeedEngine(policy, cfg, ref)
        before = calls["shared"]
        shared_out, shared_grads = passes(engine, adapter, batches[rank], shared=True)
        calls_shared = calls["shared"] - before
        rows_out, rows_grads = passes(engine, adapter, batches[rank], shared=False)
        plain_out, plain_grads = plain_reference(ckpt, adapter, batches, setup)
        mask = batches[rank][2].bool()
        result[name] = {
            "shared_calls": calls_shared, "per_row_calls": calls["shared"] - before - calls_shared,
            "checkpointing": bool(engine.model.is_activation_checkpointing)
            if hasattr(engine.model, "is_activation_checkpointing") else bool(engine.model.is_gradient_checkpointing),
            "logp": {k: {"shared_vs_rows": float((shared_out[k] - rows_out[k])[mask].abs().max()),
                         "shared_vs_plain": float((shared_out[k] - plain_out[k])[mask].abs().max()),
                         "plain_min": float(plain_out[k][mask].min())} for k in ("ref", "old")},
            "grads_shared_vs_rows": _max_diff(shared_grads, rows_grads),
            "grads_shared_vs_plain": _max_diff(shared_grads, plain_grads),
            "visual_grads": sorted(n for n in shared_grads if ".visual." in n)[:3],
        }
        del engine
    forward.shared_prefix_hidden = shared_prefix_hidden
    return result


def scenario_trainer(ckpt, out):
    from grpo import GRPOTrainer
    from models import ModelConfig, load_policy, load_processor
    from models import forward
    rank = int(os.environ["RANK"])
    calls = {"n": 0}
    shared_prefix_hidden = forward.shared_prefix_hidden

    def counted(*a, **kw):
        calls["n"] += 1
        return shared_prefix_hidden(*a, **kw)
    forward.shared_prefix_hidden = counted
    result = {}
    for reuse in (True, False):
        calls["n"] = 0
        cfg = make_config(f"{out}/trainer_{reuse}", deepspeed=os.path.join(out, "ds_zero3.json"), beta=0.04,
                          num_iterations=2, max_steps=2, prompts_per_step=2, loss_type="dapo", reuse_prompts=reuse)
        model = load_policy(ModelConfig(str(ckpt), freeze_vision=True, gradient_checkpointing=True))
        trainer = GRPOTrainer(model, [LengthReward()], args=cfg, train_dataset=dataset(with_images=rank == 0),
                              processing_class=load_processor(ckpt))
        trainer.sampler = FixedSampler()
        history = trainer.train()
        result[f"reuse_{reuse}"] = {"loss": [h["loss"] for h in history], "kl": [h["kl_mean"] for h in history],
                                    "grad_norm": [h["grad_norm"] for h in history], "shared_calls": calls["n"]}
    forward.shared_prefix_hidden = shared_prefix_hidden
    return result


def main():
    out, ckpt = sys.argv[1], sys.argv[2]
    result = {"engine": scenario_engine(ckpt, out), "trainer": scenario_trainer(ckpt, out)}
    with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
