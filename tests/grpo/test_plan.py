"""grpo.plan, the memory sizing guide, against independent counts:

* parameter counts against the model itself (transformers' Qwen2.5-VL built on the meta device) for
  the published Qwen2.5-VL-7B and -3B configs (tests/grpo/qwen25vl_configs/, copied from the
  checkpoints' config.json), and the model cards' totals;
* model-state memory (ZeRO-2/3, optimizer offload on/off, 1 and 8 GPUs) against DeepSpeed's own
  estimators, fed with the meta model's counts;
* the per-layer activation formula against the tensors a real forward pass saves for backward
  (``torch.autograd.graph.saved_tensors_hooks``), fp32 and bf16, with and without checkpointing;
* the log-prob chunk's working set against the resident memory a chunk's forward and backward
  take (a fresh process);
* image tokens against the Qwen2.5-VL image processor; the paper's set-up against hand arithmetic.

The real-width end-to-end check (one GRPO step vs the plan) is tests/grpo/test_real_width.py.
"""
import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from grpo.plan import (CHUNK_BUFFERS_GRAD, CHUNK_BUFFERS_NO_GRAD, ModelShape, Setup, activation_bytes, estimate,
                       image_tokens, layer_activation_bytes, main, max_image_tokens, model_state_bytes)

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = Path(__file__).parent / "qwen25vl_configs"
MODELS = {"7b": CONFIGS / "qwen2.5-vl-7b-instruct.json", "3b": CONFIGS / "qwen2.5-vl-3b-instruct.json"}
GiB = 2 ** 30


def meta_model(config: dict):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config))


def counts(model) -> dict:
    """Unique parameters (a tied matrix once), per part, and the largest module's own parameters."""
    unique = {id(p): p.numel() for p in model.parameters()}
    visual = sum(p.numel() for p in model.model.visual.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return {"total": sum(unique.values()), "visual": visual, "largest": largest,
            "embed": model.model.language_model.embed_tokens.weight.numel()}


@pytest.fixture(scope="module")
def published():
    out = {}
    for name, path in MODELS.items():
        config = json.loads(path.read_text())
        out[name] = (ModelShape.from_config(path), counts(meta_model(config)), config)
    return out


# ------------------------------------------------------------------ parameters
def test_fixture_configs_are_the_published_ones():
    c7, c3 = (json.loads(MODELS[k].read_text()) for k in ("7b", "3b"))
    assert (c7["hidden_size"], c7["num_hidden_layers"], c7["num_attention_heads"], c7["num_key_value_heads"],
            c7["intermediate_size"], c7["vocab_size"], c7["tie_word_embeddings"]) == \
        (3584, 28, 28, 4, 18944, 152064, False)
    assert (c3["hidden_size"], c3["num_hidden_layers"], c3["num_attention_heads"], c3["num_key_value_heads"],
            c3["intermediate_size"], c3["vocab_size"], c3["tie_word_embeddings"]) == \
        (2048, 36, 16, 2, 11008, 151936, True)
    for c, out in ((c7, 3584), (c3, 2048)):
        v = c["vision_config"]
        assert (v["depth"], v["hidden_size"], v["intermediate_size"], v["out_hidden_size"]) == (32, 1280, 3420, out)
        assert c["rope_scaling"]["mrope_section"] == [16, 24, 24]


@pytest.mark.parametrize("name", ["7b", "3b"])
def test_parameter_count_equals_the_model_on_the_meta_device(published, name):
    shape, real, _ = published[name]
    groups = shape.param_groups()
    assert shape.num_params == real["total"]
    assert groups["vision"] == real["visual"]
    assert groups["embed"] == real["embed"]
    assert groups["lm_head"] == (0 if shape.tie_word_embeddings else real["embed"])
    assert shape.largest_module() == real["largest"]
    # the model cards: Qwen2.5-VL-7B-Instruct 8.29B, -3B-Instruct 3.75B parameters
    assert round(shape.num_params / 1e9, 2) == {"7b": 8.29, "3b": 3.75}[name]


def test_reduced_and_other_configs_count_exactly():
    """Other shapes too: the real-width test's 1-layer cut, and a config in transformers 5's
    nested layout (text_config) as save_pretrained writes it."""
    from transformers import Qwen2_5_VLConfig
    cfg = json.loads(MODELS["7b"].read_text())
    cfg.update(num_hidden_layers=1)
    cfg["vision_config"] = {**cfg["vision_config"], "depth": 1, "fullatt_block_indexes": [0]}
    assert ModelShape.from_config(cfg).num_params == counts(meta_model(cfg))["total"] == 1_388_838_072
    nested = Qwen2_5_VLConfig(text_config=dict(vocab_size=512, hidden_size=96, num_hidden_layers=3,
                                               num_attention_heads=6, num_key_value_heads=2, intermediate_size=200),
                              vision_config=dict(depth=2, hidden_size=64, num_heads=2, intermediate_size=100,
                                                 out_hidden_size=96)).to_dict()
    with torch.device("meta"):
        from transformers import Qwen2_5_VLForConditionalGeneration
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**nested))
    assert ModelShape.from_config(nested).num_params == counts(model)["total"]


def test_freezing_and_trainable_counts(published):
    shape = published["7b"][0]
    g = shape.param_groups()
    assert shape.trainable_params(()) == shape.num_params
    assert shape.trainable_params(("vision",)) == shape.num_params - g["vision"]
    assert shape.largest_tensor(()) == 152064 * 3584
    assert shape.largest_tensor(("vision", "embed", "lm_head")) == 3584 * 18944     # an MLP matrix
    tied = published["3b"][0]
    assert tied.trainable_params(("lm_head",)) == tied.trainable_params(("embed",))  # one shared matrix
    with pytest.raises(ValueError, match="choose among"):
        shape.trainable_params(("visual",))


# ------------------------------------------------------------------ DeepSpeed's estimators
def deepspeed_table(fn, *args, **kw) -> dict:
    """Run one of DeepSpeed's printing ``*_all_cold`` estimators; {(offload_param, offload_optimizer,
    zero_init): (per CPU GiB, per GPU GiB)} from the table it prints."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn(*args, **kw)
    rows = {}
    for line in buf.getvalue().splitlines():
        m = re.match(r"\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.*)", line)
        if m:
            opts = dict(kv.split("=") for kv in m.group(3).replace(" ", "").split(","))
            key = tuple("none" if opts.get(k, "none") == "none" else "cpu"
                        for k in ("offload_param", "offload_optimizer")) + (opts.get("zero_init", "1"),)
            rows[key] = (float(m.group(1)), float(m.group(2)))
    assert rows, buf.getvalue()
    return rows


@pytest.mark.parametrize("name", ["7b", "3b"])
@pytest.mark.parametrize("gpus", [1, 8])
@pytest.mark.parametrize("offload", [False, True])
def test_model_states_match_deepspeed_zero3_estimator(published, name, gpus, offload):
    from deepspeed.runtime.zero.stage3 import (estimate_zero3_model_states_mem_needs,
                                               estimate_zero3_model_states_mem_needs_all_cold)
    shape, real, _ = published[name]
    setup = Setup(backend="deepspeed", zero_stage=3, gpus=gpus, offload_optimizer="cpu" if offload else "none",
                  freeze=())   # DeepSpeed's estimator trains every parameter
    states = model_state_bytes(shape, setup)
    ours = states["params"] + states["grads"] + states["optimizer"] + states["gathered_layer"]
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(real["total"], real["largest"], num_gpus_per_node=gpus,
                                                        cpu_offload=offload, cpu_offload_params=False, zero_init=True,
                                                        additional_buffer_factor=1.0)
    assert ours == pytest.approx(gpu, abs=4)          # DeepSpeed truncates to whole bytes
    printed = deepspeed_table(estimate_zero3_model_states_mem_needs_all_cold, real["total"], real["largest"],
                              num_gpus_per_node=gpus, additional_buffer_factor=1.0)
    assert ours / GiB == pytest.approx(printed[("none", "cpu" if offload else "none", "1")][1], abs=0.006)
    if offload:   # host: fp32 gradients, master weights and moments of this node's GPUs
        plan = estimate(shape, setup)
        assert plan.numbers["host_states_per_node"] == pytest.approx(cpu, rel=1e-9)


@pytest.mark.parametrize("name", ["7b", "3b"])
@pytest.mark.parametrize("gpus", [1, 8])
@pytest.mark.parametrize("offload", [False, True])
def test_model_states_match_deepspeed_zero2_estimator(published, name, gpus, offload):
    from deepspeed.runtime.zero.stage_1_and_2 import (estimate_zero2_model_states_mem_needs,
                                                      estimate_zero2_model_states_mem_needs_all_cold)
    shape, real, _ = published[name]
    states = model_state_bytes(shape, Setup(backend="deepspeed", zero_stage=2, gpus=gpus, freeze=(),
                                            offload_optimizer="cpu" if offload else "none"))
    ours = states["params"] + states["grads"] + states["optimizer"]
    _, gpu = estimate_zero2_model_states_mem_needs(real["total"], num_gpus_per_node=gpus, cpu_offload=offload)
    assert ours == pytest.approx(gpu, abs=4)
    printed = deepspeed_table(estimate_zero2_model_states_mem_needs_all_cold, real["total"], num_gpus_per_node=gpus)
    assert ours / GiB == pytest.approx(printed[("none", "cpu" if offload else "none", "1")][1], abs=0.006)


def test_model_states_by_hand():
    """Bytes per parameter, hand-written, on a toy shape (P = 234 parameters, 110 trainable), N = 4."""
    shape = ModelShape(vocab_size=10, hidden_size=10, num_layers=0, num_heads=1, num_kv_heads=1, head_dim=10,
                       intermediate_size=10, tie_word_embeddings=False, vision_depth=0, vision_hidden=1,
                       vision_heads=1, vision_intermediate=1, vision_out_hidden=10, patch_size=1,
                       temporal_patch_size=1, spatial_merge_size=1, in_channels=1)
    g = shape.param_groups()
    p, pt = shape.num_params, shape.trainable_params(("vision", "embed"))
    assert (p, pt) == (g["vision"] + 100 + 10 + 100, 110)      # embed 100, final norm 10, lm_head 100

    def states(**kw):
        s = model_state_bytes(shape, Setup(freeze=("vision", "embed"), **kw))
        return s["params"], s["grads"], s["optimizer"]
    assert states(backend="deepspeed", zero_stage=0) == (2 * p, 6 * pt, 12 * pt)
    assert states(backend="deepspeed", zero_stage=1, gpus=4) == (2 * p, 2 * pt + pt, 3 * pt)
    assert states(backend="deepspeed", zero_stage=2, gpus=4) == (2 * p, 1.5 * pt, 3 * pt)
    assert states(backend="deepspeed", zero_stage=3, gpus=4) == (p / 2, pt, 3 * pt)
    assert states(backend="deepspeed", zero_stage=3, gpus=4, offload_optimizer="cpu") == (p / 2, 0, 0)
    assert states(backend="torch", dtype="fp32", device="cpu") == (4 * p, 4 * pt, 8 * pt)
    assert states(backend="torch", dtype="bf16") == (2 * p, 2 * pt, 4 * pt)


def test_invalid_setups_name_the_problem(published):
    shape = published["3b"][0]
    for kw, msg in ((dict(dtype="fp32"), "fp32"), (dict(zero_stage=0, offload_optimizer="cpu"), "stage 1, 2 or 3"),
                    (dict(per_device_train_batch_size=3), "multiple of num_generations"),
                    (dict(backend="torch", gpus=8), "one process")):
        with pytest.raises(ValueError, match=msg):
            estimate(shape, Setup(**kw))


# ------------------------------------------------------------------ activations
def narrow_model(layers: int, dtype, attn: str, checkpointing: bool = False):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    text = dict(vocab_size=512, hidden_size=192, num_hidden_layers=layers, num_attention_heads=6, num_key_value_heads=2,
                intermediate_size=512, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
                bos_token_id=0, eos_token_id=1, pad_token_id=2)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=dict(depth=1, hidden_size=32, num_heads=2,
                                                                intermediate_size=64, out_hidden_size=192),
                           bos_token_id=0, eos_token_id=1, pad_token_id=2)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg).to(dtype).train()
    model.config._attn_implementation = attn
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, cfg


def saved_bytes(model, ids, mask) -> int:
    """Bytes of the distinct storages the forward pass saves for backward (weights excluded)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            seen[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=ids, attention_mask=mask, use_cache=False)
    return sum(seen.values())


@pytest.mark.parametrize("dtype,attn,padded,planned_attn", [
    (torch.float32, "sdpa", False, "flash_attention_2"),   # no mask: K/V stay at KV-head width, like flash-attn
    (torch.float32, "sdpa", True, "sdpa"),                 # a padding mask: transformers repeats K/V to all heads
    (torch.float32, "eager", False, "eager"),
    (torch.bfloat16, "sdpa", False, "flash_attention_2"),
])
def test_layer_activations_equal_what_a_layer_saves(dtype, attn, padded, planned_attn):
    """One decoder layer's saved tensors: the difference between a 2-layer and a 1-layer model."""
    n, s = 2, 96
    ids = torch.randint(3, 500, (n, s), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(n, s, dtype=torch.long)
    if padded:
        mask[0, :5] = 0
    got = [saved_bytes(narrow_model(layers, dtype, attn)[0], ids, mask) for layers in (1, 2)]
    shape = ModelShape.from_config(narrow_model(1, dtype, attn)[1].to_dict())
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    planned = layer_activation_bytes(shape, n * s, name, planned_attn, seq_len=s)
    measured = got[1] - got[0]
    assert measured == pytest.approx(planned, rel=0.03 if padded else 0.005)


def test_checkpointed_layers_keep_only_their_input():
    n, s = 2, 96
    ids = torch.randint(3, 500, (n, s), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(n, s, dtype=torch.long)
    got = [saved_bytes(narrow_model(layers, torch.float32, "sdpa", checkpointing=True)[0], ids, mask)
           for layers in (1, 3)]
    assert (got[1] - got[0]) / 2 == pytest.approx(4 * 192 * n * s, rel=0.01)   # e x h per token per layer


def held_bytes(fn) -> int:
    """Bytes of the distinct tensor storages that Python objects hold after ``fn()`` and did not
    before (weights excluded): what checkpointing keeps (the layers' inputs, captured for the
    replay) and what caches keep; tensors autograd saves in C++ are not seen."""
    import gc
    import warnings

    def tensors():
        gc.collect()
        with warnings.catch_warnings():  # isinstance() on a deprecated torch.distributed alias warns
            warnings.simplefilter("ignore")
            return [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    before = {id(o) for o in tensors()}
    out = fn()  # noqa: F841 (kept alive while counting)
    seen = {o.untyped_storage().data_ptr(): o.untyped_storage().nbytes() for o in tensors()
            if id(o) not in before and not isinstance(o, torch.nn.Parameter)}
    return sum(seen.values())


def test_checkpointed_shared_prefix_keeps_layer_inputs_and_the_prompt_cache():
    """Prompt sharing under checkpointing (models.forward.shared_prefix_hidden): per layer, the
    inputs of the prompt pass (b x P tokens) and of the completion pass (n x (T - 1) tokens), and
    the prompt's cached K/V at KV-head width (b x P), as the planner says; measured as the
    difference between a 3-layer and a 1-layer model, less one CPU RNG state per checkpointed call
    (``preserve_rng_state``; a GPU's is 16 bytes)."""
    from models import forward
    from models.batch import PromptBatch
    b, g, p, t = 2, 3, 40, 7
    got = []
    for layers in (1, 3):
        model, cfg = narrow_model(layers, torch.float32, "sdpa", checkpointing=True)
        ids = torch.randint(3, 500, (b, p), generator=torch.Generator().manual_seed(0))
        rows = PromptBatch(ids, torch.ones_like(ids), torch.zeros_like(ids), None, None,
                           torch.zeros(b, dtype=torch.long)).repeat_interleave(g)
        comp = torch.randint(3, 500, (b * g, t), generator=torch.Generator().manual_seed(1))
        got.append(held_bytes(lambda: forward.shared_prefix_hidden(model, rows, comp, torch.ones_like(comp))))
    rng = torch.get_rng_state().nbytes
    measured = (got[1] - got[0]) / 2 - 2 * rng                  # two checkpointed calls per layer
    shape = ModelShape.from_config(cfg.to_dict())
    setup = Setup(backend="torch", dtype="fp32", device="cpu", attn_implementation="sdpa", gradient_checkpointing=True,
                  num_generations=g, per_device_train_batch_size=b * g, gradient_accumulation_steps=1,
                  prompt_text_tokens=p, images_per_prompt=0, max_completion_length=t - 1)   # the tokens fed
    planned = [activation_bytes(dataclasses.replace(shape, num_layers=n), setup)[0] for n in (1, 3)]
    assert (planned[1] - planned[0]) / 2 == 4 * 192 * (b * p + b * g * (t - 1)) + 4 * 2 * 64 * b * p
    assert measured == pytest.approx((planned[1] - planned[0]) / 2, rel=0.01)


def test_activations_with_and_without_checkpointing_and_prompt_sharing(published):
    shape = published["7b"][0]
    base = Setup(backend="deepspeed", zero_stage=2, gpus=8, per_device_train_batch_size=4, prompt_text_tokens=176,
                 image_tokens=81, max_completion_length=192)
    plan = estimate(shape, base)
    shared = plan.numbers["train_tokens"]
    assert plan.numbers["shared_prefix"] and shared == 1 * 257 + 4 * 192   # micro-batch of 4 = one prompt's group
    per_row = estimate(shape, dataclasses.replace(base, reuse_prompts=False)).numbers["train_tokens"]
    assert per_row == 4 * (257 + 192)
    full, ckpt = plan.row("activations, no checkpointing"), plan.row("activations, with checkpointing")
    assert "train" in full.phases and "train" not in ckpt.phases
    # without sharing: 4 x 449 tokens, each layer keeping its bf16 input, one layer recomputed in full
    # (225,400 B per token, see test_paper_setup_by_hand), the final norm (4h + 2h) and the completion
    # rows' hidden states (2h)
    tokens = 4 * 449
    rows_ckpt = estimate(shape, dataclasses.replace(base, reuse_prompts=False)).row("activations, with checkpointing")
    assert rows_ckpt.bytes == 28 * 2 * 3584 * tokens + 225_400 * tokens + 6 * 3584 * tokens + 2 * 3584 * 4 * 192
    # checkpointing keeps prompt sharing (models.forward._cache_survives_checkpointing): 257 + 4 x 192
    # tokens; the recomputed layer also holds the prompt's K/V read by the 4 rows (2 x 2 x 512 B per
    # row and prompt token), and every layer the cached prompt K/V (2 x 2 x 512 B per prompt token)
    tokens = 257 + 4 * 192
    kv = 2 * 2 * 4 * 128
    assert ckpt.bytes == (28 * 2 * 3584 * tokens + 225_400 * tokens + kv * 4 * 257 + 28 * kv * 257
                          + 6 * 3584 * tokens + 2 * 3584 * 4 * 192)
    assert ckpt.bytes < rows_ckpt.bytes < full.bytes / 8
    for kw in (dict(zero_stage=3), dict(zero_stage=3, gradient_checkpointing=True)):
        z3 = estimate(shape, dataclasses.replace(base, **kw))
        assert z3.numbers["shared_prefix"] and z3.numbers["train_tokens"] == tokens   # shared under ZeRO-3 too


# ------------------------------------------------------------------ log-prob chunk
CHUNK_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from grpo.core import token_logprobs_from_hidden
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    V, H, R, grad = 152064, 256, 128, sys.argv[1] == "1"
    head = torch.nn.Linear(H, V, bias=False).requires_grad_(False)
    hidden = torch.randn(1, R, H, requires_grad=grad)
    ids = torch.randint(0, V, (1, R))
    base = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    with torch.set_grad_enabled(grad):
        logp = token_logprobs_from_hidden(head, hidden, ids, 1.0, R, entropy_top_k=20)[0]
        if grad:
            logp.sum().backward()
    print(json.dumps({"peak": status("VmHWM") - base, "buffer": R * V * 4}))
""")


@pytest.mark.parametrize("grad", [False, True])
def test_logprob_chunk_working_set_is_measured(grad):
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak resident size")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHUNK_SCRIPT, str(int(grad))], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    buffers = CHUNK_BUFFERS_GRAD if grad else CHUNK_BUFFERS_NO_GRAD
    # within the 25 % the planner promises (issue 15): measured 2.2-2.34 buffers without grad (the
    # allocator's pages differ between a warm checkout and a fresh clone), 5.37 with; planned 2 and 5
    assert r["peak"] == pytest.approx(buffers * r["buffer"], rel=0.25)


# ------------------------------------------------------------------ images and the paper's set-up
def test_image_tokens_follow_the_image_processor():
    from PIL import Image

    from models.processor import make_image_processor
    proc = make_image_processor(3136, 65536)
    for h, w in ((56, 56), (256, 256), (300, 1000), (2000, 1500), (40, 3000)):
        grid = proc(images=[Image.new("RGB", (w, h))], return_tensors="pt")["image_grid_thw"][0]
        assert image_tokens(65536, 3136, (h, w)) == int(grid.prod()) // 4, (h, w)
    assert image_tokens(65536) == 81              # a square image at the paper's cap: 9 x 9
    assert max_image_tokens(65536) == 83          # 65,536 / 784 = 83.6, and 1 x 83 patches fit (28 x 2,324 px)
    assert image_tokens(65536, 3136, (28, 2324)) == 83


def paper_setup(**kw) -> Setup:
    base = dict(backend="deepspeed", zero_stage=3, offload_optimizer="cpu", gpus=8, num_generations=4,
                per_device_train_batch_size=4, gradient_accumulation_steps=2, max_completion_length=192, beta=0.04,
                prompt_text_tokens=176, image_tokens=image_tokens(65536), freeze=("vision",))
    return Setup(**{**base, **kw})


def test_paper_setup_by_hand(published):
    """Qwen2.5-VL-7B, 8 GPUs, ZeRO-3 + optimizer offload, G = 4, 192 tokens, 65,536 pixels: the
    rows worked out by hand."""
    shape = published["7b"][0]
    plan = estimate(shape, paper_setup())
    P, L = 8_292_166_656, 152064 * 3584
    assert plan.row("parameters").bytes == 2 * P / 8
    assert plan.row("gradients").bytes == 0 and plan.row("optimizer state (Adam)").bytes == 0
    assert plan.row("ZeRO-3 gathered layer").bytes == 4 * L
    assert plan.row("ZeRO-3 gathered model (generation)").bytes == 2 * P
    assert plan.row("reference model (beta > 0)").bytes == 2 * P / 8
    # KV cache: 28 layers x (K + V) x 4 KV heads x 128 x 2 B, 8 rows x (257 + 192) tokens
    assert plan.row("KV cache (generation)").bytes == 28 * 2 * 4 * 128 * 2 * 8 * 449
    # one layer, bf16, per token: norms 2 x (4h + 2*2h + 4), Q/K/V/O 2 x (h + 2*512 + h), lse 4 x 28, MLP 8 I
    per_token = 2 * (4 * 3584 + 4 * 3584 + 4) + 2 * (3584 + 1024 + 3584) + 112 + 8 * 18944
    assert per_token == 225_400
    tokens = 257 + 4 * 192                               # a micro-batch of 4 = one prompt's group, run once
    # every layer also keeps the prompt's K/V read by the 4 rows' attention (flash: 4 KV heads x 128,
    # K and V, bf16)
    act = (28 * (per_token * tokens + 2 * 2 * 512 * 4 * 257) + (4 * 3584 + 2 * 3584) * tokens
           + 2 * 3584 * 4 * 192)
    assert plan.row("activations, no checkpointing").bytes == act
    # log-prob chunk: 2^26 // 152,064 = 441 rows; backward holds 5 fp32 buffers + the bf16 head output
    assert plan.row("log-prob chunk, backward").bytes == 5 * 441 * 152064 * 4 + 441 * 152064 * 2
    assert plan.peak_phase == "generate"
    gen = (2 * P / 8 + 2 * P + 2 * P / 8 + plan.row("KV cache (generation)").bytes
           + plan.row("generation working set").bytes)
    assert plan.peak == pytest.approx(gen)
    assert 19 * GiB < plan.peak < 20.5 * GiB
    no_offload = estimate(shape, paper_setup(offload_optimizer="none"))
    assert no_offload.row("optimizer state (Adam)").bytes == 12 * shape.trainable_params(("vision",)) / 8
    assert no_offload.peak > plan.peak + 10 * GiB


def test_cli_prints_a_table_and_json(capsys):
    args = ["--config", str(MODELS["7b"]), "--deepspeed", str(ROOT / "examples/configs/zero3_offload.json"),
            "--gpus", "8"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "TOTAL (peak over phases, per GPU)" in table and "ZeRO-3, optimizer offload cpu, 8 GPU(s)" in table
    assert main(args + ["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    expected = estimate(ModelShape.from_config(MODELS["7b"]), paper_setup())
    assert data["peak_bytes"] == pytest.approx(expected.peak)
    assert data["setup"]["zero_stage"] == 3 and data["setup"]["offload_optimizer"] == "cpu"
    assert main(["--config", str(MODELS["7b"]), "--dtype", "fp32"]) == 2      # not modelled: a clear error
    assert "fp32" in capsys.readouterr().err
