"""Prompt reuse (models.reuse and models.forward behind the adapter, driven by grpo.rollout.decode_shared
and CompletionLogProbs' shared path) computes exactly what the per-row path computes: same log-probs
(1e-5, fp32), same gradients, same greedy tokens as Hugging Face ``generate``, with the vision tower
frozen (features reused) or trainable; also under activation checkpointing (transformers replays each
decoder layer in backward) and with ZeRO-3's ``sync_vision`` (every rank runs the same modules)."""
from types import SimpleNamespace

import pytest
import torch
from helpers import noise_image
from hf_reference import sample_hf
from transformers import Qwen2_5_VLForConditionalGeneration

from grpo.logprobs import CompletionLogProbs
from grpo.rollout import decode_shared, sample
from models import forward, reuse
from models.adapter import QwenVLAdapter
from models.loading import freeze_vision


def _messages(text, n_images=1):
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


def _grouped_batch(processor, g=3):
    """3 distinct prompts (different image grids, one with two images, one without) x g copies."""
    adapter = QwenVLAdapter(processor)
    messages = [_messages("Q?"), _messages("Which one??", 2), _messages("Text only, longer prompt here.", 0)]
    images = [[noise_image(1, (84, 112))], [noise_image(2, (112, 56)), noise_image(3, (56, 56))], []]
    return adapter, adapter.encode_prompts(messages, images).repeat_interleave(g)


def _model(ckpt, frozen, checkpointing=None):
    """``checkpointing``: None (off), "non-reentrant" (models.loading's choice) or "reentrant"."""
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt)
    if frozen:
        freeze_vision(model)
    if checkpointing:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
        model.train()
    return model


def _completions(n, t=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 600, (n, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0  # a short completion (right padding)
    mask[4, 1:] = 0
    return ids, mask


@pytest.mark.parametrize("frozen", [True, False])
def test_shared_prefix_logprobs_and_grads_equal_the_per_row_path(tiny_ckpt, tiny_processor, frozen):
    model = _model(tiny_ckpt, frozen)
    adapter, batch = _grouped_batch(tiny_processor)
    assert reuse.vision_frozen(model) == frozen
    wrapper = CompletionLogProbs(model, adapter, chunk_size=5)
    rows = [0, 1, 4, 5, 6, 8]          # a micro-batch that splits groups
    pb = batch.select(rows)
    ids, mask = _completions(len(rows))

    logp, ent = wrapper(ids, temperature=0.9, **adapter.forward_inputs(pb, ids, mask))
    (logp * mask).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    shared_logp, shared_ent = wrapper(ids, temperature=0.9, **adapter.shared_forward_inputs(pb, mask))
    (shared_logp * mask).sum().backward()

    m = mask.bool()
    assert torch.allclose(shared_logp[m], logp[m], atol=1e-5, rtol=0)
    assert torch.allclose(shared_ent[m], ent[m], atol=1e-5, rtol=0)
    shared_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert shared_grads.keys() == grads.keys()
    assert any("visual" in n for n in grads) == (not frozen)
    for name, grad in grads.items():
        assert torch.allclose(shared_grads[name], grad, atol=1e-5, rtol=1e-4), name
    # frozen: one feature computation per distinct prompt, kept for later passes; trainable: none kept
    kept = [k for k in batch.unique.cache if k != "positions"]
    assert len(kept) == (1 if frozen else 0)


def _grads_of(wrapper, ids, mask, inputs, weights):
    """(logp, entropy, {name: grad}) of sum(weights * logp) through ``wrapper``."""
    wrapper.model.zero_grad(set_to_none=True)
    logp, ent = wrapper(ids, temperature=0.9, **inputs)
    (logp * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in wrapper.model.named_parameters() if p.grad is not None}
    return logp.detach(), ent.detach(), grads


def _assert_same(a, b, mask):
    m = mask.bool()
    assert torch.allclose(a[0][m], b[0][m], atol=1e-5, rtol=0)
    assert torch.allclose(a[1][m], b[1][m], atol=1e-5, rtol=0)
    assert a[2].keys() == b[2].keys()
    for name, grad in b[2].items():
        assert torch.allclose(a[2][name], grad, atol=1e-5, rtol=1e-4), name


def _count_calls(modules):
    calls = []
    for m in modules:
        m.register_forward_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("frozen", [True, False])
@pytest.mark.parametrize("checkpointing", ["non-reentrant", "reentrant"])
def test_shared_prefix_under_activation_checkpointing_equals_the_per_row_path(tiny_ckpt, tiny_processor, frozen,
                                                                               checkpointing):
    """transformers drops the cache of a checkpointed layer unless the layer only reads it; the
    shared path's caches write once (prompt) or never (completions), so it keeps them, and runs the
    layers non-reentrantly (a reentrant checkpoint would give the cached prompt keys no gradient).
    Its log-probs and gradients equal the per-row path's, with and without checkpointing, and the
    layers were really replayed in backward."""
    model = _model(tiny_ckpt, frozen, checkpointing)
    plain = _model(tiny_ckpt, frozen)                          # same weights, no checkpointing
    adapter, batch = _grouped_batch(tiny_processor)
    assert forward.can_share_prefix(model)
    rows = [0, 1, 4, 5, 6, 8]                                  # splits groups; a prompt without image
    pb = batch.select(rows)
    ids, mask = _completions(len(rows))
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(1)) * mask
    wrapper = CompletionLogProbs(model, adapter, chunk_size=5)
    attn = _count_calls(layer.self_attn for layer in model.model.language_model.layers)
    shared = _grads_of(wrapper, ids, mask, adapter.shared_forward_inputs(pb, mask), weights)
    # 2 layers x (prompt pass + completion pass) in forward, the same again replayed in backward
    assert len(attn) == 2 * 2 * 2
    per_row = _grads_of(wrapper, ids, mask, adapter.forward_inputs(pb, ids, mask), weights)
    unchecked = _grads_of(CompletionLogProbs(plain, adapter, chunk_size=5), ids, mask,
                          adapter.shared_forward_inputs(pb, mask), weights)
    _assert_same(shared, per_row, mask)
    _assert_same(unchecked, per_row, mask)
    assert any("visual" in n for n in shared[2]) == (not frozen)
    # the layers are left as they were: the user's checkpoint function, no cache flag
    for layer in model.model.language_model.layers:
        assert layer._gradient_checkpointing_func.keywords["use_reentrant"] == (checkpointing == "reentrant")
        assert "_can_checkpoint_with_cache" not in layer.__dict__


def test_unknown_checkpoint_function_runs_the_per_row_path(tiny_ckpt, tiny_processor):
    """A checkpoint function that is not transformers' partial of torch's cannot be told reentrant
    or not: the per-row path runs (same numbers), and nothing is shared."""
    from torch.utils.checkpoint import checkpoint
    model = _model(tiny_ckpt, frozen=True, checkpointing="non-reentrant")
    for layer in model.model.language_model.layers:
        layer._gradient_checkpointing_func = lambda f, *a, **k: checkpoint(f, *a, use_reentrant=False, **k)
    assert not forward.can_share_prefix(model)
    adapter, batch = _grouped_batch(tiny_processor)
    ids, mask = _completions(len(batch))
    wrapper = CompletionLogProbs(model, adapter)
    with torch.no_grad():
        a = wrapper(ids, **adapter.shared_forward_inputs(batch, mask))[0]
        b = wrapper(ids, **adapter.forward_inputs(batch, ids, mask))[0]
    assert torch.allclose(a[mask.bool()], b[mask.bool()], atol=1e-5, rtol=0)
    assert len([k for k in batch.unique.cache if k != "positions"]) == 0     # no shared pass ran


@pytest.mark.parametrize("frozen", [True, False])
@pytest.mark.parametrize("width", [1, 6])
@pytest.mark.parametrize("checkpointing", [None, "non-reentrant"])
def test_sync_vision_runs_the_same_modules_whatever_the_batch(tiny_ckpt, tiny_processor, frozen, width, checkpointing):
    """ZeRO-3's ``sync_vision`` on one process: a micro-batch whose prompts hold no image and whose
    completions are 1 token wide still runs both backbone passes and (trainable tower) the vision
    tower, forward and backward, so every rank gathers the same parameters in the same order. The
    extra work is dropped: numbers and gradients equal the per-row path's (which adds a blank-image
    row itself), the tower's gradients being zeros there."""
    model = _model(tiny_ckpt, frozen, checkpointing)
    adapter, batch = _grouped_batch(tiny_processor)
    rows = [6, 7, 8]                                          # the text-only prompt's group
    pb = batch.select(rows)
    ids, mask = _completions(len(batch), t=width)
    ids, mask = ids[rows], torch.ones(len(rows), width, dtype=torch.long)
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(2))
    wrapper = CompletionLogProbs(model, adapter, chunk_size=5, sync_vision=True)
    tower = _count_calls([model.model.visual])
    passes = _count_calls([model.model.language_model])
    shared = _grads_of(wrapper, ids, mask, adapter.shared_forward_inputs(pb, mask), weights)
    assert len(passes) == 2                                   # prompt pass and completion pass, even for T = 1
    # trainable: on a blank image; frozen: the features of the round's distinct prompts, kept
    assert len(tower) == 1
    with torch.no_grad():
        wrapper(ids, **adapter.shared_forward_inputs(pb, mask))
    assert len(tower) == (1 if frozen else 2) and len(passes) == 4
    per_row = _grads_of(wrapper, ids, mask, adapter.forward_inputs(pb, ids, mask), weights)
    _assert_same(shared, per_row, mask)
    visual = {n: g for n, g in shared[2].items() if "visual" in n}
    assert bool(visual) == (not frozen) and all(not g.any() for g in visual.values())


def test_sync_vision_frozen_tower_agrees_across_ranks_when_features_are_missing(tiny_ckpt, tiny_processor,
                                                                                 monkeypatch):
    """Frozen tower under ZeRO-3: a rank runs it only when every rank does. With another rank
    lacking its features (simulated all-reduce), a rank that holds no image runs the tower once on
    a blank image, and a rank whose features are kept runs it once too; when no rank lacks them,
    nobody runs it."""
    model = _model(tiny_ckpt, frozen=True)
    adapter, batch = _grouped_batch(tiny_processor)
    text_only = adapter.encode_prompts([_messages("No image.", 0)], [[]]).repeat_interleave(2)
    calls = _count_calls([model.model.visual])
    seen = []

    def other_rank_lacks(flag, op=None):
        seen.append(float(flag))
        flag.fill_(1.0)                                       # MAX with a rank that needs features
    monkeypatch.setattr(reuse.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(reuse.dist, "all_reduce", other_rank_lacks)
    with torch.no_grad():
        reuse.image_features_in_step(model, text_only.unique)       # no image here: a blank one
        reuse.image_features_in_step(model, batch.unique)           # features missing: computed
        reuse.image_features_in_step(model, batch.unique)           # kept, another rank lacks: blank
    assert seen == [0.0, 1.0, 0.0] and len(calls) == 3
    assert ("image_features", id(model)) in batch.unique.cache
    assert ("image_features", id(model)) not in text_only.unique.cache
    monkeypatch.setattr(reuse.dist, "all_reduce", lambda flag, op=None: None)   # nobody lacks them
    with torch.no_grad():
        reuse.image_features_in_step(model, batch.unique)
    assert len(calls) == 3


def test_reused_features_are_not_recomputed(tiny_ckpt, tiny_processor):
    model = _model(tiny_ckpt, frozen=True)
    adapter, batch = _grouped_batch(tiny_processor)
    calls = []
    model.model.visual.register_forward_hook(lambda *a: calls.append(1))
    wrapper = CompletionLogProbs(model, adapter)
    ids, mask = _completions(len(batch))
    with torch.no_grad():
        for rows in ([0, 1, 2, 3], [4, 5, 6, 7, 8]):   # two micro-batches, then a second pass
            wrapper(ids[rows], **adapter.shared_forward_inputs(batch.select(rows), mask[rows]))
        wrapper(ids, **adapter.shared_forward_inputs(batch, mask))
    assert len(calls) == 1


def _cfg(**kw):
    base = dict(max_completion_length=8, temperature=1.0, top_p=1.0, top_k=0, num_generations=3, reuse_prompts=True)
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("frozen", [True, False])
def test_shared_greedy_decoding_equals_hf_generate(tiny_ckpt, tiny_processor, frozen):
    model = _model(tiny_ckpt, frozen).eval()
    adapter, batch = _grouped_batch(tiny_processor)
    cfg = _cfg(max_completion_length=10)
    ours = sample(model, adapter, batch, cfg, greedy=True)
    hf = sample_hf(model, adapter, batch, cfg, greedy=True)
    assert torch.equal(ours.ids, hf.ids) and torch.equal(ours.mask, hf.mask)
    unshared = sample(model, adapter, batch, _cfg(max_completion_length=10, reuse_prompts=False), greedy=True)
    assert torch.equal(unshared.ids, hf.ids)


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (20, 0.9)])
def test_sampled_logprobs_match_a_recomputed_forward(tiny_ckpt, tiny_processor, top_k, top_p):
    model = _model(tiny_ckpt, frozen=True).eval()
    adapter, batch = _grouped_batch(tiny_processor)
    cfg = _cfg(temperature=1.4, top_k=top_k, top_p=top_p, max_completion_length=12)
    torch.manual_seed(3)
    ids, logps = decode_shared(model, adapter, batch, cfg, return_logprobs=True)
    assert not torch.isin(ids, torch.tensor(adapter.never_sample_ids)).any()
    assert len(set(map(tuple, ids[:3].tolist()))) > 1          # a group's samples differ
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logp, _ = CompletionLogProbs(model, adapter)(ids, temperature=1.4, **adapter.forward_inputs(batch, ids, mask))
    assert torch.allclose(logps, logp, atol=1e-5, rtol=0)


def test_top_k_top_p_restrict_the_support():
    from grpo.rollout import next_tokens
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    never = torch.tensor([0])
    picked = next_tokens(logits, _cfg(top_k=2), never)
    assert set(picked.tolist()) == {1, 2}              # 0 suppressed, then the 2 best
    p = torch.softmax(logits[0, 1:], -1)                # [0.644, 0.237, 0.087, 0.032]
    picked = next_tokens(logits, _cfg(top_p=0.9), never)
    assert set(picked.tolist()) == {1, 2, 3} and p[:2].sum() < 0.9 < p[:3].sum()
    assert set(next_tokens(logits, _cfg(), never, greedy=True).tolist()) == {1}
