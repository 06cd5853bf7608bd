"""LoRA through peft (``peft_config=`` on GRPOTrainer and SFTTrainer, ``models.lora``).

Checked against independent computations: the base weights against a fresh load of the
checkpoint (bit for bit), the reference log-probs against a plain model that never saw peft, the
saved adapters through ``peft.PeftModel.from_pretrained`` and the merged folder through
``models.load_policy``, a resumed run against an uninterrupted one, the prompt-reuse path against
the per-row path, and 2 DeepSpeed processes (ZeRO-2, ZeRO-3) against 1 process."""
import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
from ds_common import FixedSampler, LengthReward, dataset, make_config, run_two_ranks, tiny_model  # noqa: E402

from grpo import GRPOTrainer, SFTConfig, SFTTrainer
from grpo.logprobs import CompletionLogProbs
from grpo.rollout import Completions
from models import ModelConfig, load_policy, load_processor
from models.lora import QWEN_VL_TARGET_MODULES, AdaptersDisabled, default_lora_config

LANGUAGE_PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def lora(**kw):
    return default_lora_config(r=4, lora_alpha=8, **kw)


def grpo(ckpt, out, peft_config, sampler=True, **kw):
    trainer = GRPOTrainer(tiny_model(ckpt), [LengthReward()], args=make_config(str(out), **{"beta": 0.04, **kw}),
                          train_dataset=dataset(), processing_class=tiny_model.processor, peft_config=peft_config)
    if sampler:
        trainer.sampler = FixedSampler()
    return trainer


def plain(ckpt):
    """The checkpoint as loaded without peft (the independent base model)."""
    return load_policy(ModelConfig(str(ckpt), freeze_vision=True))


def base_name(lora_name: str) -> str:
    return lora_name.replace(".base_layer.", ".")


def check_base_unchanged(model, ckpt):
    """Every weight but the adapters equals the checkpoint's bit for bit; returns the adapters."""
    fresh = dict(plain(ckpt).named_parameters())
    seen, adapters = set(), {}
    for name, p in model.named_parameters():
        if ".lora_" in name:
            adapters[name] = p.detach().clone()
            continue
        key = base_name(name)
        assert torch.equal(p.detach(), fresh[key].detach()), f"{key} changed"
        seen.add(key)
    assert seen == set(fresh), "some base weights are missing from the LoRA model"
    return adapters


def batch(trainer, n_prompts=2):
    """A grouped batch of prompts (images included) and fixed completions."""
    items = dataset()[:n_prompts]
    messages, images = zip(*(trainer.prompt_fn(it) for it in items))
    prompts = trainer.adapter.encode_prompts(list(messages), list(images)).repeat_interleave(trainer.args.num_generations)
    return prompts, FixedSampler()(None, trainer.adapter, prompts, trainer.args)


def plain_logprobs(model, adapter, prompts, comp: Completions, temperature=1.0):
    """Per-row forward of a model outside any trainer (no reuse, no engine)."""
    with torch.no_grad():
        logp, _ = CompletionLogProbs(model, adapter)(completion_ids=comp.ids, temperature=temperature,
                                                     **adapter.forward_inputs(prompts, comp.ids, comp.mask))
    return logp


# ------------------------------------------------------------------ what trains
def test_default_targets_are_the_language_model_projections(tiny_ckpt, tmp_path):
    trainer = grpo(tiny_ckpt, tmp_path, lora())
    names = [n for n, p in trainer.engine.model.named_parameters() if p.requires_grad]
    layers = trainer.engine.model.config.text_config.num_hidden_layers
    assert len(names) == 2 * len(LANGUAGE_PROJECTIONS) * layers     # lora_A and lora_B of each
    assert all(".lora_" in n and "language_model" in n and n.split(".lora_")[0].rsplit(".", 1)[1] in LANGUAGE_PROJECTIONS
               for n in names), names
    assert not any("visual" in n for n in names)
    # the optimizer holds exactly the adapters
    held = {id(p) for g in trainer.engine.optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for n, p in trainer.engine.model.named_parameters() if p.requires_grad}


def test_a_step_changes_only_the_adapters(tiny_ckpt, tmp_path):
    trainer = grpo(tiny_ckpt, tmp_path, lora(), max_steps=2)
    before = {n: p.detach().clone() for n, p in trainer.engine.model.named_parameters() if ".lora_" in n}
    assert all(float(v.abs().max()) == 0 for n, v in before.items() if "lora_B" in n)  # peft's init: B = 0
    history = trainer.train()
    assert all(h["skipped_step"] == 0 for h in history)
    after = check_base_unchanged(trainer.engine.model, tiny_ckpt)
    assert after.keys() == before.keys()
    # B moves at step 1; A's gradient is B^T (...) = 0 there, so A moves at step 2
    for name in after:
        assert not torch.equal(after[name], before[name]), f"{name} did not train"
    assert history[1]["kl_mean"] > 0  # the policy left the reference


def test_user_config_is_used_as_given_and_not_modified(tiny_ckpt, tmp_path):
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "qkv"])  # vision attention too
    original = copy.deepcopy(cfg)
    trainer = grpo(tiny_ckpt, tmp_path, cfg)
    assert cfg == original  # target_modules filled on a copy only when None
    names = [n for n, p in trainer.engine.model.named_parameters() if p.requires_grad]
    assert any("visual" in n and ".qkv.lora_A" in n for n in names)
    assert all(".q_proj.lora_" in n or ".qkv.lora_" in n for n in names)
    assert trainer.lora.config.target_modules == {"q_proj", "qkv"}
    # target_modules=None: the Qwen2.5-VL default
    assert grpo(tiny_ckpt, tmp_path / "b", LoraConfig(r=2)).lora.config.target_modules == QWEN_VL_TARGET_MODULES


def test_bad_configs_name_the_field(tiny_ckpt, tmp_path):
    with pytest.raises(TypeError, match="peft.LoraConfig"):
        grpo(tiny_ckpt, tmp_path, {"r": 8})
    with pytest.raises(ValueError, match="peft_config"):
        grpo(tiny_ckpt, tmp_path, LoraConfig(r=2, target_modules=["no_such_module"]))
    with pytest.raises(ValueError, match="bias='all'.*reference"):
        grpo(tiny_ckpt, tmp_path, lora(bias="all"))
    grpo(tiny_ckpt, tmp_path, lora(bias="all"), beta=0.0)  # no reference: allowed


# ------------------------------------------------------------------ the reference
def test_reference_is_the_base_model_with_adapters_disabled_and_no_copy(tiny_ckpt, tmp_path, monkeypatch):
    copied = []
    deepcopy = copy.deepcopy

    def spy(obj, *a, **kw):
        if isinstance(obj, torch.nn.Module):
            copied.append(type(obj).__name__)
        return deepcopy(obj, *a, **kw)
    monkeypatch.setattr(copy, "deepcopy", spy)
    trainer = grpo(tiny_ckpt, tmp_path, lora(init_lora_weights=False))  # random A and B: LoRA active
    monkeypatch.setattr(copy, "deepcopy", deepcopy)
    assert copied == []
    ref = trainer.engine.ref_module
    assert isinstance(ref, AdaptersDisabled) and not isinstance(ref, torch.nn.Module)
    assert ref.lora.model is trainer.engine.model
    # parameters held: one network plus the adapters, nothing else
    n_base = sum(p.numel() for p in plain(tiny_ckpt).parameters())
    n_adapters = sum(p.numel() for n, p in trainer.engine.model.named_parameters() if ".lora_" in n)
    assert sum(p.numel() for p in trainer.engine.module.parameters()) == n_base + n_adapters

    prompts, comp = batch(trainer)
    ref_logp = trainer._logprobs(trainer.engine.ref_forward, prompts, comp)[0]
    policy_logp = trainer._logprobs(trainer.engine.forward, prompts, comp)[0]
    base = plain_logprobs(plain(tiny_ckpt), trainer.adapter, prompts, comp, trainer.args.temperature)
    m = comp.mask.bool()
    assert (ref_logp - base)[m].abs().max() <= 1e-6
    assert (policy_logp - base)[m].abs().max() > 1e-2  # the adapters do change the policy
    # the adapters are back on, and still trainable, after the reference pass
    assert torch.equal(trainer._logprobs(trainer.engine.forward, prompts, comp)[0], policy_logp)
    assert all(p.requires_grad for n, p in trainer.engine.model.named_parameters() if ".lora_" in n)


@pytest.mark.parametrize("vision_lora", [False, True])
def test_reuse_on_and_off_give_the_same_logprobs(tiny_ckpt, tmp_path, vision_lora):
    """Real generation first (it caches each prompt's image features with the adapters on), then
    the rollout's reference pass; with adapters in the vision tower those cached features must not
    serve the reference (adapters off) nor be reused while the tower trains."""
    targets = r".*(language_model.*\.(q_proj|v_proj|down_proj)|visual\.blocks\.\d+\.attn\.qkv)" if vision_lora else None
    cfg = lora(init_lora_weights=False, **({"target_modules": targets} if targets else {}))
    trainer = grpo(tiny_ckpt, tmp_path, cfg, sampler=False, reuse_prompts=True, max_completion_length=6)
    assert any("visual" in n for n, p in trainer.engine.model.named_parameters() if p.requires_grad) == vision_lora
    rollout = trainer.rollout(0)          # generation, then the reference pass, reuse on
    prompts, comp = rollout.prompts, rollout.completions
    assert prompts.unique is not None and len(prompts.unique.input_ids) < len(prompts)
    m = comp.mask.bool()
    reuse = {"policy": trainer._logprobs(trainer.engine.forward, prompts, comp)[0],
             "reference": trainer._logprobs(trainer.engine.ref_forward, prompts, comp)[0]}
    trainer.args = trainer.args.replace(reuse_prompts=False)
    per_row = {"policy": trainer._logprobs(trainer.engine.forward, prompts, comp)[0],
               "reference": trainer._logprobs(trainer.engine.ref_forward, prompts, comp)[0]}
    for k in reuse:  # 1e-5: the tolerance of the reuse path without LoRA (test_reuse_prefix.py)
        assert (reuse[k] - per_row[k])[m].abs().max() <= 1e-5, k
    assert (rollout.ref_logp - per_row["reference"])[m].abs().max() <= 1e-5
    base = plain_logprobs(plain(tiny_ckpt), trainer.adapter, prompts, comp, trainer.args.temperature)
    assert (per_row["reference"] - base)[m].abs().max() <= 1e-6
    assert (per_row["policy"] - base)[m].abs().max() > 1e-2


# ------------------------------------------------------------------ saving
def test_saved_adapters_and_merged_model_reload_as_the_trained_policy(tiny_ckpt, tmp_path):
    trainer = grpo(tiny_ckpt, tmp_path / "run", lora(), max_steps=2)
    trainer.train()
    prompts, comp = batch(trainer)
    trained = plain_logprobs(trainer.engine.model, trainer.adapter, prompts, comp)
    m = comp.mask.bool()

    adapters = trainer.save_model(tmp_path / "adapters")
    assert (adapters / "adapter_config.json").is_file() and (adapters / "adapter_model.safetensors").is_file()
    assert not (adapters / "model.safetensors").exists()
    assert json.loads((adapters / "adapter_config.json").read_text())["r"] == 4
    reloaded = PeftModel.from_pretrained(plain(tiny_ckpt), adapters).get_base_model()
    assert (plain_logprobs(reloaded, trainer.adapter, prompts, comp) - trained)[m].abs().max() <= 1e-5

    merged = trainer.save_model(tmp_path / "merged", merged=True)
    assert not (merged / "adapter_config.json").exists()
    with safe_open(str(merged / "model.safetensors"), "pt") as f, \
            safe_open(str(Path(tiny_ckpt) / "model.safetensors"), "pt") as g:
        assert set(f.keys()) == set(g.keys())  # a plain checkpoint's tensors, no LoRA ones
    model = load_policy(ModelConfig(str(merged)))
    proc = load_processor(merged)  # tokenizer and image processor saved with it
    from models import QwenVLAdapter
    adapter = QwenVLAdapter(proc)
    assert (plain_logprobs(model, adapter, prompts, comp) - trained)[m].abs().max() <= 1e-5
    assert (plain_logprobs(plain(tiny_ckpt), adapter, prompts, comp) - trained)[m].abs().max() > 1e-3
    # grpo.evaluate answers with the merged model as with the trained policy (greedy)
    from grpo.evaluate import predict
    records = dataset(4)
    ours = predict(trainer.engine.model, trainer.adapter, records, max_new_tokens=5, progress=False)
    theirs = predict(model, adapter, records, max_new_tokens=5, progress=False)
    assert [p.completion for p in ours] == [p.completion for p in theirs]
    # saving left the live weights as they were
    check_base_unchanged(trainer.engine.model, tiny_ckpt)
    assert torch.equal(plain_logprobs(trainer.engine.model, trainer.adapter, prompts, comp), trained)


def test_resume_gives_the_same_next_losses_and_checkpoints_hold_only_adapters(tiny_ckpt, tmp_path):
    """Real sampling (RNG restored from the checkpoint): 3 steps straight vs 1 + resume to 3."""
    def run(out, steps, resume=None, save_steps=0, peft_config=None):
        return grpo(tiny_ckpt, out, peft_config or lora(), sampler=False, max_steps=steps, save_steps=save_steps,
                    resume_from_checkpoint=resume)
    straight = run(tmp_path / "a", 3).train()
    run(tmp_path / "b", 1, save_steps=1).train()
    folder = tmp_path / "b" / "checkpoint-1"
    assert (folder / "model" / "adapter_model.safetensors").is_file()
    assert not (folder / "model" / "model.safetensors").exists()
    state = torch.load(folder / "optimizer.pt", weights_only=False)["optimizer"]["state"]
    n_adapters = sum(1 for n, p in run(tmp_path / "c", 1).engine.model.named_parameters() if p.requires_grad)
    assert len(state) == n_adapters
    with pytest.raises(ValueError, match="peft_config"):
        run(tmp_path / "b", 3, resume="auto", peft_config=default_lora_config(r=8)).train()
    # the other kind of trainer on each kind of checkpoint: a message that says what to pass
    def full(out, steps, **kw):
        trainer = GRPOTrainer(tiny_model(tiny_ckpt), [LengthReward()], processing_class=tiny_model.processor,
                              args=make_config(str(out), beta=0.04, max_steps=steps, **kw), train_dataset=dataset())
        trainer.sampler = FixedSampler()
        return trainer
    with pytest.raises(RuntimeError, match=r"holds LoRA adapters .* no peft_config: pass the peft_config"):
        full(tmp_path / "b", 3, resume_from_checkpoint="auto").train()
    full(tmp_path / "f", 1, save_steps=1).train()
    with pytest.raises(RuntimeError, match=r"holds full model weights, not LoRA adapters .* drop peft_config"):
        run(tmp_path / "f", 3, resume="auto").train()
    resumed = run(tmp_path / "b", 3, resume="auto").train()
    assert len(resumed) == 2
    for key in ("loss", "kl_mean", "grad_norm", "reward/mean"):
        assert [h[key] for h in resumed] == pytest.approx([h[key] for h in straight[1:]], rel=1e-6, abs=1e-9), key
    assert abs(resumed[-1]["loss"]) > 0 and resumed[-1]["kl_mean"] > 0


def test_preflight_estimates_the_adapter_checkpoint_not_the_full_model(tiny_ckpt, tmp_path):
    from grpo.checkpoint import MARGIN_BYTES, estimate_checkpoint_bytes
    trainer = grpo(tiny_ckpt, tmp_path, lora(), max_steps=1)
    trainer.train()                                                   # writes checkpoint-1
    written = sum(p.stat().st_size for p in (tmp_path / "checkpoint-1").rglob("*") if p.is_file())
    need, how = estimate_checkpoint_bytes(trainer.engine.model)
    assert written <= need <= 1.2 * written + MARGIN_BYTES and "LoRA adapter weights" in how
    full, _ = estimate_checkpoint_bytes(plain(tiny_ckpt))
    assert need - MARGIN_BYTES < 0.1 * (full - MARGIN_BYTES)


# ------------------------------------------------------------------ SFT
def test_sft_with_lora_learns_and_keeps_the_base(tiny_ckpt, tmp_path):
    items = [{**it, "target": "<answer>A</answer>"} for it in dataset()]
    args = SFTConfig(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=8, learning_rate=1e-2,
                     output_dir=str(tmp_path), disable_tqdm=True)
    trainer = SFTTrainer(tiny_model(tiny_ckpt), args, items, tiny_model.processor, peft_config=lora())
    assert trainer.engine.ref_module is None
    history = trainer.train()
    assert history[-1]["loss"] < history[0]["loss"] - 1.0  # nats per target token (from ~ln 2048)
    check_base_unchanged(trainer.engine.model, tiny_ckpt)
    merged = load_policy(ModelConfig(str(trainer.save_model(tmp_path / "merged", merged=True))))
    prompts, comp = _sft_batch(trainer, items)
    m = comp.mask.bool()
    assert (plain_logprobs(merged, trainer.adapter, prompts, comp)
            - plain_logprobs(trainer.engine.model, trainer.adapter, prompts, comp))[m].abs().max() <= 1e-5


def _sft_batch(trainer, items):
    messages, images = zip(*(trainer.prompt_fn(it) for it in items[:4]))
    prompts = trainer.adapter.encode_prompts(list(messages), list(images))
    ids, mask = trainer.encode_targets(items[:4])
    return prompts, Completions(ids, mask, torch.zeros(len(ids), dtype=torch.bool))


# ------------------------------------------------------------------ DeepSpeed, 2 processes
@pytest.fixture(scope="module")
def two_ranks(tiny_ckpt, tmp_path_factory):
    return run_two_ranks("ds_lora.py", tmp_path_factory.mktemp("ds_lora"), tiny_ckpt, timeout=900)


@pytest.mark.distributed
@pytest.mark.parametrize("variant", ["zero2", "zero3"])
def test_zero_two_processes_match_one_process_with_lora(two_ranks, tiny_ckpt, tmp_path, variant):
    from ds_lora import LORA_BATCH, lora_config
    trainer = GRPOTrainer(tiny_model(tiny_ckpt), [LengthReward()], train_dataset=dataset(),
                          processing_class=tiny_model.processor, peft_config=lora_config(),
                          args=make_config(str(tmp_path), **{**LORA_BATCH, "prompts_per_step": 2 * LORA_BATCH["prompts_per_step"]}))
    trainer.sampler = FixedSampler()
    single = trainer.train()
    ds = two_ranks[0][variant]
    assert ds["zero_stage"] == int(variant[-1]) and ds["world_size"] == 2
    assert ds["partitioned"] is (True if variant == "zero3" else None)
    for rank in two_ranks:
        assert rank[variant]["base_max_abs_change"] == 0.0  # base weights bit for bit (all gathered)
        assert rank[variant]["reference_shares_policy"]
    # the tolerances of test_deepspeed.py: step 1 differs only in summation order (a few fp32 ulps),
    # later steps follow Adam updates at lr 1e-2 that magnify rounding (1e-3 relative still tells a
    # wrong normaliser, a factor 2, or a reference that kept the adapters, KL 0 vs > 0, apart)
    for key, ours in (("loss", "loss"), ("grad_norm", "grad_norm"), ("kl", "kl_mean")):
        expected = [h[ours] for h in single]
        assert ds[key][0] == pytest.approx(expected[0], rel=1e-5, abs=1e-7), key
        assert ds[key] == pytest.approx(expected, rel=1e-3, abs=1e-6), key
    assert ds["kl"][-1] > 0
    ours = {n: p.detach().flatten().tolist() for n, p in trainer.engine.model.named_parameters() if ".lora_" in n}
    assert ours.keys() == ds["adapters"].keys()
    for name, values in ours.items():
        worst = max(abs(a - b) for a, b in zip(ds["adapters"][name], values))
        # Adam's step is lr * m / (sqrt(v) + eps): a coordinate's move is at most ~lr per step and
        # is perturbed by rounding only in proportion to its gradient's relative error (~1e-6),
        # except where the gradient itself is rounding noise; 4 steps x lr 1e-2 x 1e-3 = 4e-5 covers
        # the former (measured: 2e-6 at most) and still fails an adapter that trained differently
        # (every lora_B moves by 4e-2 or more over the 4 steps)
        assert worst < 4e-5, (name, worst)
    # what save_model wrote under ZeRO (gathered from the shards) is that run's adapters, exactly
    out = Path(ds["saved"])
    with safe_open(str(out / "adapters" / "adapter_model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k).flatten().tolist() for k in f.keys()}
    assert saved == {"base_model.model." + n.replace(".default.", "."): v for n, v in ds["adapters"].items()}
    # and the merged folder is the model those adapters make (1e-5: merging W + BA in fp32 rounds
    # differently from adding BAx to Wx), close to the 1-process policy (adapters within 4e-5)
    reloaded = PeftModel.from_pretrained(plain(tiny_ckpt), out / "adapters").get_base_model()
    merged = load_policy(ModelConfig(str(out / "merged")))
    prompts, comp = batch(trainer)
    m = comp.mask.bool()
    theirs = plain_logprobs(reloaded, trainer.adapter, prompts, comp)
    assert (plain_logprobs(merged, trainer.adapter, prompts, comp) - theirs)[m].abs().max() <= 1e-5
    mine = plain_logprobs(trainer.engine.model, trainer.adapter, prompts, comp)
    assert (theirs - mine)[m].abs().max() <= 1e-4


@pytest.mark.distributed
def test_zero3_lora_resume_continues_with_identical_losses(two_ranks):
    rank = two_ranks[0]["resume"]
    assert rank["tail"] == pytest.approx(rank["full"][1:], rel=1e-6, abs=1e-9)
    assert rank["checkpoint_files"] and not any(f.endswith("model.safetensors") and "adapter" not in f
                                                 for f in rank["checkpoint_files"])
