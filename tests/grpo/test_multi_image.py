"""Several images per record, end to end: two images of different sizes in one prompt through a
GRPO step (generation, log-probs, update), an SFT step, evaluation and the judge request; and a
Hugging Face ``datasets.Dataset`` as the trainers' and evaluation's data. The log-probs and the
SFT loss are checked against a plain Hugging Face forward pass over ``processor(text, images)``,
and swapping the two images must change them (so both images are really in the prompt)."""
import copy
import io
import math
import sys
from pathlib import Path

import datasets
import pytest
import torch
from helpers import noise_image
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from ds_common import LengthReward, tiny_model  # noqa: E402

from data import VQARecord  # noqa: E402
from data.prompts import build_messages, build_sft_target  # noqa: E402
from data import as_records  # noqa: E402
from grpo import GRPOConfig, GRPOTrainer, evaluate  # noqa: E402
from grpo.evaluate import blank_prompt  # noqa: E402
from grpo.config import SFTConfig  # noqa: E402
from grpo.samples import default_reward_sample  # noqa: E402
from grpo.sft import SFTTrainer  # noqa: E402

# (width, height): 84x56 -> 6x4 patches of 14 px, 56x112 -> 4x8; both are multiples of 28 inside
# the paper's pixel limits, so the processor keeps them as they are.
WIDE, TALL = (84, 56), (56, 112)
GRIDS = [[1, 4, 6], [1, 8, 4]]            # image_grid_thw (t, h, w) of WIDE then TALL
IMAGE_TOKENS = 4 * 6 // 4 + 8 * 4 // 4     # 2x2 patches merge into one token: 6 + 8


def _images(tmp_path):
    """Two noise images (noise moves a random model's outputs more than flat colour does)."""
    wide, tall = tmp_path / "wide.png", tmp_path / "tall.png"
    noise_image(1, WIDE).save(wide)
    noise_image(2, TALL).save(tall)
    return str(wide), str(tall)


def _records(tmp_path, n=2):
    wide, tall = _images(tmp_path)
    return [VQARecord(id=f"pair{i}", images=[wide, tall], question="Which image is red?",
                      options=["the first", "the second"], answer="the first",
                      criteria=["the first image is red"]) for i in range(n)]


def _hf_logp(model, processor, record, images, completion, temperature=1.0):
    """Log-probs of ``completion`` (token ids) after ``record``'s prompt holding ``images``,
    from Hugging Face's own forward pass (no adapter, no prompt reuse)."""
    text = processor.apply_chat_template(build_messages(record), tokenize=False,
                                         add_generation_prompt=True)
    enc = processor(text=[text], images=[Image.open(p).convert("RGB") for p in images],
                    return_tensors="pt")
    assert enc["image_grid_thw"].tolist() == ([GRIDS[0], GRIDS[1]] if images == record.images
                                              else [GRIDS[1], GRIDS[0]])
    prompt_len, ids = enc["input_ids"].shape[1], completion[None]
    with torch.no_grad():
        logits = model(input_ids=torch.cat([enc["input_ids"], ids], 1),
                       attention_mask=torch.ones(1, prompt_len + ids.shape[1], dtype=torch.long),
                       mm_token_type_ids=torch.cat([enc["mm_token_type_ids"],
                                                    torch.zeros_like(ids)], 1),
                       pixel_values=enc["pixel_values"],
                       image_grid_thw=enc["image_grid_thw"]).logits
    logits = logits[0, prompt_len - 1:prompt_len - 1 + ids.shape[1]].float() / temperature
    return logits.log_softmax(-1).gather(-1, ids[0][:, None]).squeeze(1)


def test_grpo_step_with_two_images_of_different_sizes_from_a_datasets_dataset(tiny_ckpt,
                                                                               tmp_path,
                                                                               monkeypatch):
    monkeypatch.setenv("GRPO_VLM_CACHE", str(tmp_path / "cache"))  # image bytes are written here
    wide, tall = _images(tmp_path)
    ds = datasets.Dataset.from_dict({
        "image": [[{"bytes": open(wide, "rb").read(), "path": "wide.png"},
                   {"bytes": open(tall, "rb").read(), "path": "tall.png"}]] * 2,
        "problem": ["Which image is red? A) the first B) the second"] * 2,
        "solution": ["<answer> A </answer>"] * 2}, split="train")
    model = tiny_model(tiny_ckpt)
    processor = tiny_model.processor
    reference = copy.deepcopy(model).eval()
    cfg = GRPOConfig(num_generations=2, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
                     max_completion_length=5, beta=0.04, temperature=0.9,
                     output_dir=str(tmp_path / "out"), disable_tqdm=True)
    trainer = GRPOTrainer(model, [LengthReward()], args=cfg, train_dataset=ds,
                          processing_class=processor)
    records = trainer.dataset  # the Dataset went through the R1 layout
    assert [(r.id, r.answer, len(r.images)) for r in records] == [
        ("r1-train-0", "the first", 2), ("r1-train-1", "the first", 2)]
    assert all(p.startswith(str(tmp_path / "cache" / "images")) for p in records[0].images)
    batch = trainer.rollout(0)
    prompts = batch.prompts
    assert prompts.images_per_row.tolist() == [2, 2, 2, 2]
    assert prompts.unique.image_grid_thw.tolist() == GRIDS + GRIDS
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (prompts.input_ids == pad).sum(1).tolist() == [IMAGE_TOKENS] * 4
    # the reference log-probs of every sampled completion, as Hugging Face computes them
    for row in range(4):
        mask = batch.completions.mask[row].bool()
        ids = batch.completions.ids[row][mask]
        record = records[row // 2]
        expected = _hf_logp(reference, processor, record, record.images, ids, cfg.temperature)
        swapped = _hf_logp(reference, processor, record, record.images[::-1], ids,
                           cfg.temperature)
        # the trainer agrees to float32 rounding (~5e-7); swapping the images moves the log-probs
        # by more than 100 times that, so a prompt missing or misplacing an image would fail
        assert torch.allclose(batch.ref_logp[row][mask], expected, atol=1e-5, rtol=0), row
        assert (swapped - expected).abs().max() > 1e-4
    metrics = trainer.update(batch)  # the optimizer step on the two-image batch
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])


def test_sft_step_with_two_images_matches_the_hf_loss(tiny_ckpt, tmp_path):
    records = _records(tmp_path)
    model = tiny_model(tiny_ckpt)
    processor = tiny_model.processor
    start = copy.deepcopy(model).eval()
    trainer = SFTTrainer(model, SFTConfig(per_device_train_batch_size=2, max_steps=1,
                                          learning_rate=1e-3, output_dir=str(tmp_path / "sft"),
                                          disable_tqdm=True), records, processor)
    target = processor.tokenizer(build_sft_target(records[0]) + "<|im_end|>",
                                 add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    expected = -_hf_logp(start, processor, records[0], records[0].images, target).mean()
    swapped = -_hf_logp(start, processor, records[0], records[0].images[::-1], target).mean()
    history = trainer.train()
    # both rows hold the same record: the token-mean loss is that record's mean NLL, equal to
    # float32 rounding; with the images swapped the mean moves by ~4e-5 (noise images)
    assert abs(float(expected - swapped)) > 1e-5
    assert history[0]["loss"] == pytest.approx(float(expected), abs=2e-6, rel=0)
    assert history[0]["target_tokens"] == 2 * len(target)
    # a Dataset is accepted as SFT data too (converted through the layouts)
    sft_ds = datasets.Dataset.from_dict({"image": [records[0].images], "problem": [
        "Which image is red? A) the first B) the second"], "solution": ["A"]})
    again = SFTTrainer(start, SFTConfig(per_device_train_batch_size=1, max_steps=1,
                                        output_dir=str(tmp_path / "sft2"), disable_tqdm=True),
                       sft_ds, processor)
    assert [(r.images, r.answer_letter) for r in again.dataset] == [(records[0].images, "A")]


def test_evaluation_of_a_two_image_dataset(tiny_ckpt, tiny_processor, tmp_path):
    wide, tall = _images(tmp_path)
    ds = datasets.Dataset.from_dict({
        "image": [[wide, tall], [tall, wide], [wide]],
        "problem": ["Which is red? A) the first B) the second"] * 3,
        "solution": ["A", "B", "<answer> A </answer>"]})
    model = tiny_model(tiny_ckpt).eval()
    result = evaluate(model, tiny_processor, ds, batch_size=2, max_new_tokens=3, progress=False)
    assert [p["id"] for p in result.predictions] == ["r1-dataset-0", "r1-dataset-1",
                                                     "r1-dataset-2"]
    assert result.reference_letters == {"A": 2, "B": 1} and result.n == 3
    # the grey-image control blanks every image of a record, each at its own size
    messages, images = blank_prompt()(as_records(ds)[1])
    assert [im.size for im in images] == [TALL, WIDE]
    assert [part["type"] for part in messages[1]["content"]] == ["image", "image", "text"]


@pytest.mark.server
def test_the_judge_request_carries_both_images_in_order(tmp_path):
    import asyncio
    import base64

    import httpx
    from helpers import spawn_fault_judge

    from rewards import JudgeConfig, ProcessReward
    record = _records(tmp_path, 1)[0]
    record.question = "ID=pair FAULTS=ok SCORES=0.8,0.6 " + record.question
    sample = default_reward_sample(record, "<think>red first</think><answer>A</answer>")
    assert sample.images == record.images
    judge = spawn_fault_judge()
    try:
        reward = ProcessReward(JudgeConfig(base_url=judge.url, timeout=5.0))
        assert asyncio.run(reward.ascore_batch([sample])) == [pytest.approx(0.7)]
        stats = httpx.get(judge.url.rsplit("/v1", 1)[0] + "/stats", timeout=5).json()
        urls = stats["pair"]["images"][0]
    finally:
        judge.close()
    sizes = [Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).size for u in urls]
    assert sizes == [WIDE, TALL]
