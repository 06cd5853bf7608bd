"""Evaluation: answers on a split, accuracy overall / per modality / per source / per difficulty,
format compliance, reasoning length, and the controls that say whether a number means anything.
Batched generation (greedy by default), sharded over ranks when distributed.

    result = evaluate(model, processor, records, batch_size=32, max_new_tokens=192, image_ablation=True)
    result.to_json("eval.json"); print(result.table())

Controls, because a VLM can score well without looking at its images:

* ``baselines``: chance accuracy (mean of 1 / number of options) and the best accuracy a model
  answering one constant letter would get, overall and per difficulty; ``reference_letters`` and
  ``answer_letters`` show how the correct and the predicted letters are distributed.
* ``image_ablation=True``: the same model answers again with every image replaced by a uniform
  grey image of the same size (``blank_prompt``); ``blank`` holds that result and
  ``visual_reliance`` the accuracy with images minus without, overall and per difficulty.
* ``reasoning_agreement``: of the multiple-choice answers that name one option, the share whose
  reasoning concludes that same option (read as the rubric judge reads a conclusion,
  ``rewards.judge.rubric.concluded``). An outcome reward can raise accuracy while the answer
  stops following from the chain; this says whether it did.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm.auto import tqdm

from PIL import Image

from data.convert import as_records
from models.adapter import QwenVLAdapter
from rewards import AccuracyReward, FormatReward
from rewards.accuracy import LETTERS, resolve_option
from rewards.judge.rubric import claims, concluded
from rewards.text import THINK_RE, last_answer, reasoning_text

from .rollout import sample
from .samples import default_prompt, default_reward_sample

BLANK_GREY = (128, 128, 128)


@dataclass
class Prediction:
    id: str
    modality: str
    source: str
    completion: str
    correct: bool
    well_formatted: bool
    reasoning_tokens: int
    difficulty: str = "n/a"
    chosen: str = ""        # option letter(s) the answer resolved to ("" = none; "A,B" = several)
    reference: str = ""     # the correct option's letter ("" for open questions)
    num_options: int = 0    # 0 for open questions
    concluded: str = ""     # option letter(s) the reasoning concludes ("" = none; "A,B" = several)


@dataclass
class EvalResult:
    n: int
    accuracy: float
    format_rate: float
    mean_reasoning_tokens: float
    by_modality: dict = field(default_factory=dict)   # modality -> {"n", "accuracy"}
    by_source: dict = field(default_factory=dict)     # source -> {"n", "accuracy"}
    by_difficulty: dict = field(default_factory=dict)  # extra["difficulty"] -> {"n", "accuracy"}
    predictions: list = field(default_factory=list)   # [Prediction as dict]
    answer_letters: dict = field(default_factory=dict)     # predicted letter -> count ("none": unresolved)
    reference_letters: dict = field(default_factory=dict)  # correct letter -> count
    baselines: dict = field(default_factory=dict)  # {"chance", "constant_letter", "constant_letter_accuracy",
                                                   #  "by_difficulty": {d: same keys}}
    blank: dict | None = None            # the image-ablation control (an EvalResult as dict), if run
    visual_reliance: dict | None = None  # {"overall": acc - blank acc, "by_difficulty": {d: ...}}, or
                                         # {"skipped": why} when the model answered nothing with images
    reasoning_agreement: dict = field(default_factory=dict)  # {"overall", "n", "by_difficulty": {d: ...}}

    def to_json(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def from_json(cls, path: str | Path) -> "EvalResult":
        return cls(**json.loads(Path(path).read_text()))

    def table(self) -> str:
        rows = [("overall", self.n, self.accuracy)] + [
            (f"modality={m}", v["n"], v["accuracy"]) for m, v in sorted(self.by_modality.items())] + [
            (f"source={s}", v["n"], v["accuracy"]) for s, v in sorted(self.by_source.items())] + [
            (f"difficulty={d}", v["n"], v["accuracy"]) for d, v in sorted(self.by_difficulty.items())]
        lines = ["| subset | n | accuracy |", "|---|---:|---:|"]
        lines += [f"| {name} | {n} | {100 * acc:.2f} % |" for name, n, acc in rows]
        lines.append(f"\nformat compliance {100 * self.format_rate:.1f} %, "
                     f"mean reasoning length {self.mean_reasoning_tokens:.1f} tokens")
        if self.baselines:
            b = self.baselines
            lines.append(f"chance {100 * b['chance']:.2f} %, constant letter {b['constant_letter']} "
                         f"{100 * b['constant_letter_accuracy']:.2f} %; answers by letter {self.answer_letters}")
        if self.reasoning_agreement:
            lines.append(f"reasoning concludes the answer's option in {100 * self.reasoning_agreement['overall']:.1f} % "
                         f"of {self.reasoning_agreement['n']} single-option answers")
        if self.blank is not None and "overall" in (self.visual_reliance or {}):
            lines.append(f"grey-image control {100 * self.blank['accuracy']:.2f} %, visual reliance "
                         f"{100 * self.visual_reliance['overall']:+.2f} points")
        return "\n".join(lines)


def _group(preds: list[Prediction], key: str) -> dict:
    out: dict = {}
    for p in preds:
        entry = out.setdefault(getattr(p, key), {"n": 0, "correct": 0})
        entry["n"] += 1
        entry["correct"] += int(p.correct)
    return {k: {"n": v["n"], "accuracy": v["correct"] / v["n"]} for k, v in out.items()}


def letter_baselines(preds: list[Prediction]) -> dict:
    """Chance accuracy (mean over items of 1 / number of options; open questions count 0) and the
    accuracy of always answering the single most frequent correct letter."""
    if not preds:
        return {}
    chance = sum(1 / p.num_options for p in preds if p.num_options) / len(preds)
    counts = Counter(p.reference for p in preds if p.reference)
    letter, hits = min(counts.items(), key=lambda kv: (-kv[1], kv[0])) if counts else ("", 0)
    return {"chance": chance, "constant_letter": letter, "constant_letter_accuracy": hits / len(preds)}


def reasoning_agreement(preds: list[Prediction]) -> dict:
    """Among multiple-choice predictions whose answer names exactly one option: the share whose
    reasoning concludes exactly that option, overall (with ``n``) and per difficulty."""
    rows = [p for p in preds if p.num_options and p.chosen and "," not in p.chosen]
    if not rows:
        return {}

    def rate(ps: list[Prediction]) -> float:
        return sum(p.concluded == p.chosen for p in ps) / len(ps)
    levels = sorted({p.difficulty for p in rows})
    return {"overall": rate(rows), "n": len(rows),
            "by_difficulty": {d: rate([p for p in rows if p.difficulty == d]) for d in levels}}


def summarize(preds: list[Prediction]) -> EvalResult:
    n = len(preds)
    if n == 0:
        raise ValueError("no predictions to summarize: the evaluation split is empty")
    levels = sorted({p.difficulty for p in preds})
    baselines = {**letter_baselines(preds),
                 "by_difficulty": {d: letter_baselines([p for p in preds if p.difficulty == d]) for d in levels}}
    return EvalResult(n=n, accuracy=sum(p.correct for p in preds) / n,
                      format_rate=sum(p.well_formatted for p in preds) / n,
                      mean_reasoning_tokens=sum(p.reasoning_tokens for p in preds) / n,
                      by_modality=_group(preds, "modality"), by_source=_group(preds, "source"),
                      by_difficulty=_group(preds, "difficulty"),
                      predictions=[asdict(p) for p in preds],
                      answer_letters=dict(sorted(Counter(p.chosen or "none" for p in preds if p.num_options).items())),
                      reference_letters=dict(sorted(Counter(p.reference for p in preds if p.reference).items())),
                      baselines=baselines, reasoning_agreement=reasoning_agreement(preds))


def claim_balance(predictions, records) -> dict[str, dict]:
    """What the predictions' reasoning claims about each attribute, against the truth, for the
    records whose ``criteria`` read ``<attribute> is <value>, not <other>[ or <other>]`` (read as
    the rubric judge reads them, ``rewards.judge.rubric.claims``). Per attribute: ``truth`` and
    ``claimed`` (value -> count; ``claimed`` also counts ``"both"`` and ``"none"``), ``right``
    (chains claiming the true value alone) of ``n``. Accuracy that moves because claims drift to
    one value while the truth stays balanced is a prior moving, not an attribute being read.
    ``predictions``: ``Prediction``s or their dicts; ``records``: with ``id`` and ``criteria``."""
    criteria = {str(_attr(r, "id")): _attr(r, "criteria", None) for r in as_records(records)}
    table: dict[str, dict] = {}
    for p in predictions:
        p = p if isinstance(p, dict) else asdict(p)
        crit = criteria.get(p["id"])
        if not crit:
            continue
        for subject, (truth, claim) in claims(crit, reasoning_text(p["completion"])).items():
            row = table.setdefault(subject, {"truth": {}, "claimed": {}, "right": 0, "n": 0})
            row["truth"][truth] = row["truth"].get(truth, 0) + 1
            row["claimed"][claim] = row["claimed"].get(claim, 0) + 1
            row["right"] += claim == truth
            row["n"] += 1
    return table


def visual_reliance(with_images: EvalResult, blank: EvalResult) -> dict:
    """Accuracy with the images minus accuracy with uniform grey images, overall and per difficulty."""
    return {"overall": with_images.accuracy - blank.accuracy,
            "by_difficulty": {d: v["accuracy"] - blank.by_difficulty[d]["accuracy"]
                              for d, v in with_images.by_difficulty.items() if d in blank.by_difficulty}}


def blank_prompt(prompt_fn=default_prompt):
    """A ``prompt_fn`` that gives the same messages as ``prompt_fn`` with every image replaced by a
    uniform grey image of the same size (the image-ablation control)."""
    def blanked(item):
        messages, images = prompt_fn(item)
        return messages, [Image.new("RGB", image.size, BLANK_GREY) for image in images]
    return blanked


def _letters(sample) -> tuple[str, str, int]:
    """(chosen letter(s), reference letter, number of options) of one scored sample."""
    options = list(sample.options or [])
    if not options:
        return "", "", 0
    answer = last_answer(sample.completion)
    chosen = ",".join(sorted(resolve_option(answer, options))) if answer is not None else ""
    ref = LETTERS[options.index(sample.answer)] if sample.answer in options \
        else ",".join(sorted(resolve_option(str(sample.answer), options)))
    return chosen, ref, len(options)


def reasoning_conclusion(sample) -> str:
    """The option letter(s) the reasoning of a multiple-choice ``sample`` concludes, comma-joined
    ("" when it concludes none or the question is open), read as the rubric judge reads them."""
    if not sample.options:
        return ""
    return ",".join(sorted(concluded(reasoning_text(sample.completion), list(sample.options), "option",
                                     last_answer(sample.completion))))


def _attr(item, name, default=""):
    return item.get(name, default) if isinstance(item, dict) else getattr(item, name, default)


@torch.no_grad()
def predict(model, adapter: QwenVLAdapter, records, *, batch_size: int = 32, max_new_tokens: int = 192,
            greedy: bool = True, temperature: float = 1.0, progress: bool = True,
            prompt_fn=default_prompt) -> list[Prediction]:
    """Generate one answer per record and score it (accuracy: ``rewards.AccuracyReward``, format:
    ``rewards.FormatReward``). ``records``: a list of ``data.VQARecord`` / dict items or a Hugging
    Face ``datasets.Dataset`` (``data.as_records``)."""
    records = as_records(records)
    accuracy, fmt = AccuracyReward(), FormatReward()
    cfg = SimpleNamespace(max_completion_length=max_new_tokens, temperature=temperature, top_p=1.0, top_k=0)
    device = next(model.parameters()).device
    preds = []
    for start in tqdm(range(0, len(records), batch_size), desc="eval", disable=not progress):
        chunk = records[start:start + batch_size]
        messages, images = zip(*(prompt_fn(r) for r in chunk))
        prompts = adapter.encode_prompts(list(messages), list(images)).to(device)
        comp = sample(model, adapter, prompts, cfg, greedy=greedy)
        texts = adapter.decode(comp.ids, comp.mask)
        for record, text in zip(chunk, texts):
            reward_sample = default_reward_sample(record, text)
            think = THINK_RE.search(text)
            chosen, reference, num_options = _letters(reward_sample)
            preds.append(Prediction(
                id=str(_attr(record, "id")), modality=str(_attr(record, "modality", "unknown")),
                source=str(_attr(record, "source", "unknown")), completion=text,
                correct=accuracy.score(reward_sample) == 1.0, well_formatted=fmt.score(reward_sample) == 1.0,
                reasoning_tokens=len(adapter.tokenizer(think.group(1))["input_ids"]) if think else 0,
                difficulty=str((_attr(record, "extra", {}) or {}).get("difficulty", "n/a")),
                chosen=chosen, reference=reference, num_options=num_options,
                concluded=reasoning_conclusion(reward_sample)))
    return preds


def _predict_all(model, adapter, records, **kwargs) -> list[Prediction]:
    """``predict`` on this rank's shard (records[rank::world]) and gather, when distributed."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        rank, world = dist.get_rank(), dist.get_world_size()
        show = kwargs.pop("progress", True) and rank == 0
        mine = predict(model, adapter, list(records)[rank::world], progress=show, **kwargs)
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        return [p for part in gathered for p in part]
    return predict(model, adapter, list(records), **kwargs)


def evaluate(model, processor, records, image_ablation: bool = False, **kwargs) -> EvalResult:
    """Evaluate ``model`` on ``records`` (keyword arguments: those of ``predict``). With
    ``image_ablation`` the records are answered a second time with grey images (``blank`` and
    ``visual_reliance`` of the result). When torch.distributed is initialised each rank answers a
    shard and the results are gathered, so every rank returns the same. ``records`` may be a
    Hugging Face ``datasets.Dataset`` (converted by ``data.as_records``)."""
    records = as_records(records)
    adapter = processor if isinstance(processor, QwenVLAdapter) else QwenVLAdapter(processor)
    result = summarize(_predict_all(model, adapter, records, **kwargs))
    if image_ablation and result.accuracy == 0 and result.format_rate == 0:
        # a model that answers nothing with the images shows no reliance on them; its grey run
        # (max-length output on every item, the slowest evaluation there is) is not made
        result.visual_reliance = {"skipped": "no correct or well-formatted answer with the images"}
    elif image_ablation:
        blank_kwargs = {**kwargs, "prompt_fn": blank_prompt(kwargs.get("prompt_fn", default_prompt))}
        blank = summarize(_predict_all(model, adapter, records, **blank_kwargs))
        result.blank, result.visual_reliance = asdict(blank), visual_reliance(result, blank)
    return result
