"""Prompt reuse (models.reuse and models.forward behind the adapter, driven by grpo.rollout.decode_shared
and CompletionLogProbs' shared path) computes exactly what the per-row path computes: same log-probs
(1e-5, fp32), same gradients, same greedy tokens as Hugging Face ``generate``, with the vision tower
frozen (features reused) or trainable."""
from types import SimpleNamespace

import pytest
import torch
from helpers import noise_image
from hf_reference import sample_hf
from transformers import Qwen2_5_VLForConditionalGeneration

from grpo.logprobs import CompletionLogProbs
from grpo.rollout import decode_shared, sample
from models import reuse
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


def _model(ckpt, frozen):
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt)
    if frozen:
        freeze_vision(model)
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
