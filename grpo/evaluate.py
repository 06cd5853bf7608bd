"""Evaluation: answers on a split, accuracy overall / per modality / per source, format compliance,
reasoning length. Batched generation (greedy by default), sharded over ranks when distributed.

    result = evaluate(model, processor, records, batch_size=32, max_new_tokens=192)
    result.to_json("eval.json"); print(result.table())
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm.auto import tqdm

from models.adapter import QwenVLAdapter
from rewards import AccuracyReward, FormatReward

from .rollout import sample
from .samples import default_prompt, default_reward_sample

_THINK = re.compile(r"<think>(.*?)</think>", re.S)


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
        return "\n".join(lines)


def _group(preds: list[Prediction], key: str) -> dict:
    out: dict = {}
    for p in preds:
        entry = out.setdefault(getattr(p, key), {"n": 0, "correct": 0})
        entry["n"] += 1
        entry["correct"] += int(p.correct)
    return {k: {"n": v["n"], "accuracy": v["correct"] / v["n"]} for k, v in out.items()}


def summarize(preds: list[Prediction]) -> EvalResult:
    n = len(preds)
    if n == 0:
        raise ValueError("no predictions to summarize: the evaluation split is empty")
    return EvalResult(n=n, accuracy=sum(p.correct for p in preds) / n,
                      format_rate=sum(p.well_formatted for p in preds) / n,
                      mean_reasoning_tokens=sum(p.reasoning_tokens for p in preds) / n,
                      by_modality=_group(preds, "modality"), by_source=_group(preds, "source"),
                      by_difficulty=_group(preds, "difficulty"),
                      predictions=[asdict(p) for p in preds])


def _attr(item, name, default=""):
    return item.get(name, default) if isinstance(item, dict) else getattr(item, name, default)


@torch.no_grad()
def predict(model, adapter: QwenVLAdapter, records, *, batch_size: int = 32, max_new_tokens: int = 192,
            greedy: bool = True, temperature: float = 1.0, progress: bool = True,
            prompt_fn=default_prompt) -> list[Prediction]:
    """Generate one answer per record and score it (accuracy: ``rewards.AccuracyReward``, format:
    ``rewards.FormatReward``)."""
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
            think = _THINK.search(text)
            preds.append(Prediction(
                id=str(_attr(record, "id")), modality=str(_attr(record, "modality", "unknown")),
                source=str(_attr(record, "source", "unknown")), completion=text,
                correct=accuracy.score(reward_sample) == 1.0, well_formatted=fmt.score(reward_sample) == 1.0,
                reasoning_tokens=len(adapter.tokenizer(think.group(1))["input_ids"]) if think else 0,
                difficulty=str((_attr(record, "extra", {}) or {}).get("difficulty", "n/a"))))
    return preds


def evaluate(model, processor, records, **kwargs) -> EvalResult:
    """Evaluate ``model`` on ``records``. When torch.distributed is initialised each rank answers
    a shard (records[rank::world]) and the results are gathered, so every rank returns the same."""
    import torch.distributed as dist
    adapter = processor if isinstance(processor, QwenVLAdapter) else QwenVLAdapter(processor)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        rank, world = dist.get_rank(), dist.get_world_size()
        show = kwargs.pop("progress", True) and rank == 0
        mine = predict(model, adapter, list(records)[rank::world], progress=show, **kwargs)
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        preds = [p for part in gathered for p in part]
    else:
        preds = predict(model, adapter, list(records), **kwargs)
    return summarize(preds)
