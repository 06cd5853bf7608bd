"""Completion log-probs: ``grpo.core.token_logprobs_from_hidden`` (the chunked log-softmax through the
output head) against hand-computed values and an independent full log-softmax; then a real (tiny)
Qwen2.5-VL through ``CompletionLogProbs``: equal to the log-probs ``generate()`` sampled with, and
chunked gradients equal to a full-vocabulary log-softmax's."""
import math

import pytest
import torch
from helpers import noise_image
from transformers import Qwen2_5_VLForConditionalGeneration

from grpo import core
from grpo.core import token_logprobs_from_hidden
from grpo.logprobs import CompletionLogProbs
from models import QwenVLAdapter

torch.set_num_threads(1)
LN2 = math.log(2.0)


def close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               atol=tol, rtol=tol, equal_nan=True)


# --------------------------------------------------------------------------- the pure function

def _identity_head(v=3, dtype=torch.float32):
    """A bias-free V x V head with identity weights: the hidden states ARE the logits."""
    head = torch.nn.Linear(v, v, bias=False).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.eye(v, dtype=dtype))
    return head


@pytest.mark.parametrize("chunk", [1, 1024])
def test_token_logprobs_hand(chunk):
    head = _identity_head()
    hidden = torch.tensor([[[0.0, 0.0, LN2], [0.0, 0.0, LN2]]], requires_grad=True)   # (1, 2, 3) = logits
    ids = torch.tensor([[2, 0]])
    logp, ent = token_logprobs_from_hidden(head, hidden, ids, chunk_size=chunk)
    # softmax([0, 0, ln2]) = [1, 1, 2] / 4 -> log p[2] = ln 0.5 = -0.693147 ; log p[0] = ln 0.25 = -1.386294
    close(logp, [[math.log(0.5), math.log(0.25)]])
    # H = 2 * (1/4) ln 4 + (1/2) ln 2 = 0.5*1.386294 + 0.5*0.693147 = 1.039721
    close(ent, [[1.0397207708399179, 1.0397207708399179]])
    logp.sum().backward()
    # d log p_k / dz = onehot(k) - p, p = [.25, .25, .5]
    close(hidden.grad, [[[-0.25, -0.25, 0.5], [0.75, -0.25, -0.5]]])
    # d/dW[v, h] = sum_rows (onehot - p)_v * hidden_h: rows sum to [0.5, -0.5, 0], hidden = [0, 0, ln2]
    close(head.weight.grad, [[0.0, 0.0, 0.5 * LN2], [0.0, 0.0, -0.5 * LN2], [0.0, 0.0, 0.0]])
    # temperature 2: z/2 = [0, 0, ln2/2] -> exp = [1, 1, sqrt2] -> p[2] = 1.414214/3.414214 = 0.414214
    with torch.no_grad():
        logp2, _ = token_logprobs_from_hidden(head, hidden, ids, temperature=2.0, chunk_size=chunk)
    close(logp2[0, 0], -0.8813735870195429)


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_match_full_log_softmax(chunk, temperature):
    g = torch.Generator().manual_seed(chunk)
    torch.manual_seed(chunk)
    head = torch.nn.Linear(8, 50)
    with torch.no_grad():
        head.weight.mul_(5)
    hidden = torch.randn(3, 5, 8, generator=g).requires_grad_(True)
    ids = torch.randint(0, 50, (3, 5), generator=g)
    w = torch.randn(3, 5, generator=g)
    logp, ent = token_logprobs_from_hidden(head, hidden, ids, temperature=temperature, chunk_size=chunk)
    (logp * w).sum().backward()
    ours = hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()
    hidden.grad = None
    head.zero_grad()
    logits = head(hidden) / temperature                                            # (3, 5, 50), all at once
    ref = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
    (ref * w).sum().backward()
    assert logp.dtype == ent.dtype == torch.float32
    torch.testing.assert_close(logp, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(ours, (hidden.grad, head.weight.grad, head.bias.grad)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    want_ent = torch.distributions.Categorical(logits=logits.detach()).entropy()
    torch.testing.assert_close(ent, want_ent, atol=1e-5, rtol=1e-5)
    assert not ent.requires_grad                                                   # a metric only


def test_token_logprobs_bf16_head_in_fp32_and_errors():
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    head = torch.nn.Linear(6, 30, bias=False).bfloat16()
    hidden = torch.randn(2, 4, 6, generator=g).bfloat16()
    ids = torch.randint(0, 30, (2, 4), generator=g)
    logp, _ = token_logprobs_from_hidden(head, hidden, ids, chunk_size=3)
    assert logp.dtype == torch.float32   # fp32 log-softmax of the bf16 head's logits
    ref = torch.log_softmax(head(hidden).float(), -1).gather(-1, ids[..., None]).squeeze(-1)
    torch.testing.assert_close(logp, ref, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs_from_hidden(head, hidden, ids, temperature=0.0)


def test_token_logprobs_chunks_never_exceed_max_logits(monkeypatch):
    monkeypatch.setattr(core, "MAX_CHUNK_LOGITS", 2 * 50)   # at most 2 rows of a 50-token vocabulary
    head = torch.nn.Linear(8, 50)
    rows = []
    head.register_forward_hook(lambda mod, inp, out: rows.append(out.shape[0]))
    g = torch.Generator().manual_seed(2)
    hidden, ids = torch.randn(3, 5, 8, generator=g), torch.randint(0, 50, (3, 5), generator=g)
    with torch.no_grad():
        logp, _ = token_logprobs_from_hidden(head, hidden, ids, chunk_size=1024)
        ref = torch.log_softmax(head(hidden), -1).gather(-1, ids[..., None]).squeeze(-1)
    assert rows[:-1] == [2] * 7 + [1]                          # 15 rows: 7 chunks of 2, then 1
    torch.testing.assert_close(logp, ref, atol=1e-6, rtol=1e-6)


def test_padding_head_calls_change_no_value_or_gradient():
    """min_head_calls (ZeRO-3 ranks call the head equally often): 15 rows in chunks of 4 need 4
    calls; asked for 7, the head runs 7 times forward and 7 more in the backward (each chunk is
    checkpointed, so recomputed), while log-probs, entropies and gradients stay those of 4 calls."""
    g = torch.Generator().manual_seed(3)
    hidden, ids = torch.randn(3, 5, 8, generator=g), torch.randint(0, 50, (3, 5), generator=g)
    weights = torch.randn(15, generator=g)
    results = {}
    for calls in (0, 7):
        head = torch.nn.Linear(8, 50)
        torch.nn.init.normal_(head.weight, generator=torch.Generator().manual_seed(4))
        torch.nn.init.zeros_(head.bias)
        seen = []
        head.register_forward_hook(lambda mod, inp, out: seen.append(out.shape[0]))
        h = hidden.clone().requires_grad_(True)
        logp, ent = token_logprobs_from_hidden(head, h, ids, chunk_size=4, min_head_calls=calls)
        forward_calls = len(seen)
        (logp.reshape(-1) * weights).sum().backward()
        results[calls] = (logp.detach(), ent.detach(), h.grad, head.weight.grad, forward_calls, seen)
    torch.testing.assert_close(results[7][0], results[0][0], rtol=0, atol=0)
    torch.testing.assert_close(results[7][1], results[0][1], rtol=0, atol=0)
    torch.testing.assert_close(results[7][2], results[0][2], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(results[7][3], results[0][3], rtol=1e-6, atol=1e-7)
    for calls, chunks in ((0, [4, 4, 4, 3]), (7, [4, 4, 4, 3, 1, 1, 1])):   # rows per call
        n, seen = results[calls][4], results[calls][5]
        assert n == len(chunks) and seen[:n] == chunks and sorted(seen[n:]) == sorted(chunks)  # backward: any order
    # without grad (reference / old-policy passes) and with no rows at all: the calls, no change
    head, seen = torch.nn.Linear(8, 50), []
    head.register_forward_hook(lambda mod, inp, out: seen.append(out.shape[0]))
    with torch.no_grad():
        logp, _ = token_logprobs_from_hidden(head, hidden, ids, chunk_size=4, min_head_calls=6)
        torch.testing.assert_close(logp, token_logprobs_from_hidden(head, hidden, ids, chunk_size=4)[0], rtol=0, atol=0)
        empty, _ = token_logprobs_from_hidden(head, hidden[:, :0], ids[:, :0], chunk_size=4, min_head_calls=3)
    assert seen == [4, 4, 4, 3, 1, 1] + [4, 4, 4, 3] + [1, 1, 1] and empty.shape == (3, 0)


def test_token_logprobs_of_no_tokens():
    logp, ent = token_logprobs_from_hidden(torch.nn.Linear(4, 9), torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.long))
    assert logp.shape == ent.shape == (2, 0) and logp.dtype == torch.float32


# --------------------------------------------------------------------------- through a real model

def _messages(text):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def test_batched_sampling_and_logprobs_match_generate(tiny_ckpt, tiny_processor):
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_ckpt).eval()
    adapter = QwenVLAdapter(tiny_processor)
    images = [[noise_image(i, (84 + 28 * i, 112))] for i in range(3)]       # different grid sizes
    batch = adapter.encode_prompts([_messages("Q" + "?" * i) for i in range(3)], images).repeat_interleave(2)
    temperature = 1.3
    out = model.generate(**adapter.generate_inputs(batch), do_sample=True, temperature=temperature, top_k=None,
                         top_p=1.0, max_new_tokens=10, output_logits=True, return_dict_in_generate=True,
                         suppress_tokens=adapter.never_sample_ids, pad_token_id=adapter.pad_token_id,
                         eos_token_id=adapter.eos_token_ids)
    completion = out.sequences[:, batch.input_ids.shape[1]:]
    assert completion.shape[0] == 6
    assert not torch.isin(completion, torch.tensor(adapter.never_sample_ids)).any()
    sampled = torch.log_softmax(torch.stack(out.logits, 1).float() / temperature, -1)
    sampled = sampled.gather(-1, completion.unsqueeze(-1)).squeeze(-1)      # (6, T)
    mask = torch.ones_like(completion)
    with torch.no_grad():
        logp, entropy = CompletionLogProbs(model, adapter, chunk_size=7)(
            completion, temperature=temperature, **adapter.forward_inputs(batch, completion, mask))
    assert torch.allclose(logp, sampled, atol=1e-5, rtol=0)
    assert (entropy > 0).all()


def test_logprobs_chunked_gradient_matches_full_softmax(tiny_ckpt, tiny_processor):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_ckpt)
    adapter = QwenVLAdapter(tiny_processor)
    batch = adapter.encode_prompts([_messages("Q")] * 2, [[noise_image(3)], [noise_image(4)]])
    ids = torch.randint(0, 500, (2, 5))
    inputs = adapter.forward_inputs(batch, ids, torch.ones_like(ids))
    logp, _ = CompletionLogProbs(model, adapter, chunk_size=3)(ids, temperature=0.7, **inputs)
    logp.sum().backward()
    ours = model.lm_head.weight.grad.clone()
    model.zero_grad()
    logits = model(**inputs).logits[:, -6:-1].float() / 0.7
    ref = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    ref.sum().backward()
    assert torch.allclose(logp, ref, atol=1e-5)
    assert torch.allclose(ours, model.lm_head.weight.grad, atol=1e-5)


@pytest.mark.parametrize("frozen", [True, False])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prefix_logprobs_and_gradients_match_a_full_forward(tiny_ckpt, tiny_processor, frozen, checkpointing):
    """The shared path (each distinct prompt run once, its KV cache read by its rows), with
    activation checkpointing and ZeRO-3's ``sync_vision``, against Hugging Face's own full forward
    over prompt + completion: same log-probs, same gradients of the head, a decoder layer and (when
    it trains) the vision tower."""
    from models.loading import freeze_vision
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_ckpt).train()
    if frozen:
        freeze_vision(model)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    adapter = QwenVLAdapter(tiny_processor)
    batch = adapter.encode_prompts([_messages("Q"), _messages("What is shown??")],
                                   [[noise_image(5)], [noise_image(6, (56, 112))]]).repeat_interleave(3)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 500, (6, 5), generator=g)
    weights = torch.randn(6, 5, generator=g)
    mask = torch.ones_like(ids)
    logp, _ = CompletionLogProbs(model, adapter, chunk_size=4, sync_vision=True)(
        ids, temperature=0.7, **adapter.shared_forward_inputs(batch, mask))
    (logp * weights).sum().backward()
    names = ["lm_head.weight", "model.language_model.layers.0.self_attn.k_proj.weight"]
    if not frozen:
        names.append("model.visual.blocks.0.attn.qkv.weight")
    params = dict(model.named_parameters())
    ours = {n: params[n].grad.clone() for n in names}
    model.zero_grad()
    if checkpointing:
        model.activation_checkpointing_disable()
    logits = model(**adapter.forward_inputs(batch, ids, mask)).logits[:, -6:-1].float() / 0.7
    ref = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    (ref * weights).sum().backward()
    assert torch.allclose(logp, ref, atol=1e-5)
    for n in names:
        assert params[n].grad.abs().max() > 1e-4, n
        assert torch.allclose(ours[n], params[n].grad, atol=1e-5, rtol=1e-4), n
