"""PathVLM-R1 (Wu et al., 2025), end to end, written with the library as a user would.

Stages and variants (paper, Fig. 3), on disjoint splits of 3,000 (SFT) / 1,000 (RL) / 1,385 (test):

    Alpha      base + SFT on the SFT split
    Beta       Alpha + GRPO (accuracy + format rewards) on the RL split
    PathVLM-R1 Beta + GRPO adding the cross-modal process reward (LLM judge)
    Gamma      Alpha + SFT on the RL split            (control: more SFT instead of RL)
    Delta      base + SFT on the RL split             (control)
    Epsilon    base + GRPO on the RL split            (control: RL without SFT)

then every variant (and the base) is evaluated on the test split and on the out-of-domain sets
(CT, dermoscopy, fundus, OCT), and a report is written (table, plots, HTML of sample answers).

With no arguments it runs the embedded default: a tiny Qwen2.5-VL built offline, the embedded
dataset, and the local rubric judge (started and stopped here). With a real checkpoint:

    deepspeed --num_gpus 8 examples/pathvlm_r1.py --model /ckpt/Qwen2.5-VL-7B-Instruct \\
        --data pathmmu.json --layout pathmmu --image-root images/ \\
        --ood-data OmniMedVQA/qa.json --ood-image-root OmniMedVQA/ \\
        --judge-url https://api.openai.com/v1 --judge-model gpt-4o \\
        --deepspeed examples/configs/zero3_offload.json

Every stage writes <out>/models/<stage>/ and a DONE.json; a finished stage is skipped, an
interrupted one resumes from its last checkpoint. ``--stages alpha,beta`` runs a subset.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout

import torch  # noqa: E402

import data  # noqa: E402
from grpo import (EvalResult, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer, default_device,  # noqa: E402
                  default_reward_sample, evaluate, init_distributed)
from models import ModelConfig, TinySpec, default_corpus, ensure_tiny_checkpoint, load_policy, load_processor  # noqa: E402
from rewards import AccuracyReward, FormatReward, JudgeConfig, ProcessReward, start_local_judge  # noqa: E402

from pathvlm_report import write_report, write_seed_summary  # noqa: E402  (examples/, next to this file)

STAGES = ("alpha", "beta", "r1", "gamma", "delta", "epsilon")
VARIANTS = ("base",) + STAGES
PARENT = {"alpha": "base", "beta": "alpha", "r1": "beta", "gamma": "alpha", "delta": "base", "epsilon": "base"}
OOD_SOURCES = {"ct": "Chest CT Scan", "dermoscopy": "ISIC2020", "oct": "Retinal OCT-C8", "fundus": "Diabetic Retinopathy"}


@dataclass(frozen=True)
class Profile:
    """Hyper-parameters of one run. PAPER reproduces PathVLM-R1 §4; TINY fits a 2-core CPU.

    Fields named like a GRPOConfig field are that field; ``sft_<name>`` is SFTConfig's ``<name>``
    (``config_fields`` builds the configs from them). The rest belong to the pipeline."""
    sizes: tuple[int, int, int] = (3000, 1000, 1385)   # SFT / RL / test records
    # --- pretraining of the tiny base to see (SFTConfig, on captions); 0 steps = none ---
    pretrain_steps: int = 0               # the paper starts from pretrained Qwen2.5-VL: nothing to do
    pretrain_learning_rate: float = 5e-4
    pretrain_items: int = 2400            # captioned tiles from a stream no split draws from
    # --- SFT stages (SFTConfig) ---
    sft_learning_rate: float = 1e-5
    sft_lr_scheduler_type: str = "cosine"
    sft_per_device_train_batch_size: int = 4
    sft_gradient_accumulation_steps: int = 4   # 16 examples per step
    sft_max_target_length: int = 192
    sft_epochs: float = 1.0               # -> SFTConfig.max_steps
    # --- GRPO stages (GRPOConfig) ---
    learning_rate: float = 1e-6           # paper
    num_generations: int = 4              # paper: G = 4
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 2  # 8 completions = 2 prompts x G per step
    max_completion_length: int = 192      # paper
    beta: float = 0.04                    # paper
    temperature: float = 1.0
    top_p: float = 1.0                    # sampling nucleus; 1.0 = the full distribution
    grpo_epochs: float = 1.0              # -> GRPOConfig.max_steps
    entropy_top_k: int = 20               # the top-k entropy metric (GRPOConfig); 0 = off
    # --- model, evaluation, data ---
    eval_batch: int = 16
    freeze_vision: bool = True            # paper
    grpo_freeze_vision: bool | None = None  # GRPO stages; None: as freeze_vision
    max_pixels: int = 65536               # paper
    min_pixels: int = 3136                # paper
    ood_per_modality: int | None = None   # None: everything the OOD source holds
    validation_fraction: float = 0.1      # --validate: the tail of the SFT and RL splits held out
    tiny_model: tuple[tuple[str, int], ...] = ()  # TinySpec overrides when no --model is given

    @property
    def sft_batch_size(self) -> int:
        """SFT examples per process per step."""
        return self.sft_per_device_train_batch_size * self.sft_gradient_accumulation_steps

    @property
    def prompts_per_step(self) -> int:
        """GRPO prompts per process per step."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps // self.num_generations


def config_fields(profile: Profile, config_cls, prefix: str = "") -> dict:
    """The profile's values of ``config_cls``'s fields: ``<prefix><name>`` -> ``<name>``."""
    names = {f.name for f in fields(config_cls)}
    return {f.name[len(prefix):]: getattr(profile, f.name) for f in fields(profile)
            if f.name.startswith(prefix) and f.name[len(prefix):] in names}


PAPER = Profile()
# The CPU default, chosen with --validate (docs/quickstart.md has the measurements):
# - a caption-pretrained base (300 steps at 5e-4, vision tower trained), so SFT starts from a model
#   that sees;
# - then the vision tower frozen in every stage, as in the paper: a linear probe on the base's pooled
#   image features separates nuclear size (94-98 %), cellularity (100 %) and staining (95-99 %), so
#   what SFT must learn is the decoder reading them. Trained by SFT at 5e-4 the tower only got worse
#   (size 0.97 -> 0.93 on the probe), and by GRPO's noisy gradient it lost 4-7 points of accuracy;
#   frozen, Alpha rose 63.5 -> 67.0 % on seed 42's validation slice;
# - SFT for 2 epochs at 5e-4 (at 1e-3 and above the tower collapsed while it was trainable): after one
#   epoch seed 43's Alpha still answered "large" to every nuclear-size question (validation 53.25 %),
#   after two it read them (62.0 %, size 42 -> 73 %);
# - targets of ~20 tokens that state what the image shows (data.build_sft_target);
# - GRPO at lr 3e-5 sampling from the top-0.9 nucleus: from the frozen-tower Alphas Beta gained
#   +2.5 / +2.75 points (seeds 42 / 43, one SFT epoch) and +1.75 (seed 43, two epochs); at 5e-5
#   +4.5 / +1.75 but -4.5 from the two-epoch Alpha, and at 1e-4 it fell 16.5 points (answers drift
#   to "A", 7 % malformed).
TINY = Profile(pretrain_steps=300, pretrain_learning_rate=5e-4, pretrain_items=2400,
               sft_learning_rate=5e-4, sft_per_device_train_batch_size=16, sft_gradient_accumulation_steps=1,
               sft_max_target_length=64, sft_epochs=2.0,
               learning_rate=3e-5, top_p=0.9, grpo_epochs=0.75, per_device_train_batch_size=32,
               entropy_top_k=0,  # the top-20 entropy metric cost 5 % of a GRPO step
               gradient_accumulation_steps=1,  # 8 prompts x G=4
               max_completion_length=64, eval_batch=128,
               ood_per_modality=50,  # 25 with the finding, 25 without, per modality
               # vision 128 / text 256 wide (2.6M parameters): the 0.85M-parameter default plateaus at
               # chance on the nuclei-size questions for 500+ SFT steps; this one learns them
               tiny_model=(("vision_hidden", 128), ("vision_intermediate", 256), ("text_hidden", 256),
                           ("text_intermediate", 512)))
QUICK = replace(TINY, sizes=(48, 16, 24), pretrain_steps=3, pretrain_items=24, sft_epochs=2.0, grpo_epochs=1.0,
                per_device_train_batch_size=16, gradient_accumulation_steps=1, max_completion_length=48, sft_max_target_length=48,
                ood_per_modality=4, tiny_model=())


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def log(msg: str) -> None:
    if is_main():
        print(f"[pathvlm-r1] {msg}", flush=True)


def write_json(path: Path, obj, indent: int | None = 1) -> None:
    """Write JSON whole or not at all (a temporary file renamed over ``path``): a job stopped while
    writing leaves no truncated cache for the next run to trip on."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ data
def load_splits(args, profile: Profile, out: Path) -> dict:
    """{"sft", "rl", "test": lists of VQARecord, "ood": {modality: records}}, image-disjoint."""
    if args.data:
        records = data.load_dataset(args.data, layout=args.layout, image_root=args.image_root,
                                    skip_invalid=args.skip_invalid)
        log(records.report.summary())
        parts = data.split_records(records, dict(zip(("sft", "rl", "test"), profile.sizes)), args.seed)
    else:
        # OOD: the procedural sets only. The package images' questions (which modality? which eye?)
        # have one answer per set or need outside knowledge, so they would measure a letter prior.
        parts = data.embedded_splits(seed=args.seed, sizes=profile.sizes, ood_n=profile.ood_per_modality,
                                     include_real=False)
        parts = {k: parts[k] for k in ("sft", "rl", "test")} | {"ood": parts["ood"]}
    for name in ("sft", "rl", "test"):
        if not parts[name]:
            raise SystemExit(f"the {name} split is empty: the dataset has too few valid records for "
                             f"sizes {profile.sizes} (see the load report above)")
    if args.ood_data:
        ood_all = data.load_dataset(args.ood_data, layout="omnimedvqa", image_root=args.ood_image_root,
                                    skip_invalid=args.skip_invalid)
        parts["ood"] = {m: [r for r in ood_all if r.source == src] for m, src in OOD_SOURCES.items()}
    elif "ood" not in parts:
        parts["ood"] = {}
    if profile.ood_per_modality:
        parts["ood"] = {m: list(v)[:profile.ood_per_modality] for m, v in parts["ood"].items()}
    if args.validate:  # tune here, never on the test split: the tails of SFT and RL stand in for it
        cut = {k: max(1, round(profile.validation_fraction * len(parts[k]))) for k in ("sft", "rl")}
        parts["test"] = list(parts["sft"])[-cut["sft"]:] + list(parts["rl"])[-cut["rl"]:]
        parts["sft"], parts["rl"] = list(parts["sft"])[:-cut["sft"]], list(parts["rl"])[:-cut["rl"]]
        log(f"--validate: evaluating on the last {cut['sft']} SFT and {cut['rl']} RL records, trained on the rest")
    if is_main():
        data.write_manifest({k: v for k, v in parts.items() if k != "ood"}
                            | {f"ood-{m}": v for m, v in parts["ood"].items()}, out / "data_manifest.json")
    log("splits: " + ", ".join(f"{k}={len(v)}" for k, v in parts.items() if k != "ood")
        + " | ood: " + ", ".join(f"{m}={len(v)}" for m, v in parts["ood"].items()))
    return parts


def base_model(args, parts: dict, out: Path, profile: Profile) -> Path:
    """The starting checkpoint: --model, or a tiny Qwen2.5-VL built here (its BPE trained on the
    SFT split's prompts and targets) and, with ``profile.pretrain_steps``, taught to see first.

    The paper starts from Qwen2.5-VL-7B-Instruct, a model pretrained on image-text pairs; a randomly
    initialised tiny model is not comparable. So the tiny base gets a short vision-language
    pretraining: captions (plain descriptions of each tile's nuclei, no options, no answer format)
    of tiles from a generator stream that no split draws from. It is built once per seed and
    setting, cached under ``$GRPO_VLM_CACHE/base/`` like the embedded data, and its build time is
    recorded in ``<out>/base.json``."""
    if args.model:
        return Path(args.model)
    spec = TinySpec(seed=args.seed, **dict(profile.tiny_model))
    texts = [data.SYSTEM_PROMPT, data.CAPTION_PROMPT] + [
        data.build_messages(r)[1]["content"][-1]["text"] + " " + data.build_sft_target(r) for r in parts["sft"]]
    setting = {"spec": asdict(spec), "data": data.EMBEDDED_VERSION, "steps": profile.pretrain_steps,
               "lr": profile.pretrain_learning_rate, "items": profile.pretrain_items, "batch": profile.sft_batch_size,
               "corpus": hashlib.sha256("\n".join(texts).encode()).hexdigest()}
    key = hashlib.sha256(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_root() / "base" / f"{key}-seed{args.seed}"
    if is_main() and not (folder / "BASE.json").is_file():  # one rank builds, the others wait
        t0 = time.time()
        captions = data.caption_items(args.seed, profile.pretrain_items) if profile.pretrain_steps else []
        tmp = folder.with_name(folder.name + ".tmp")
        ensure_tiny_checkpoint(tmp / "init", spec, corpus=default_corpus() + texts + [c["target"] for c in captions])
        if profile.pretrain_steps:
            log(f"base: caption pretraining, {profile.pretrain_steps} steps on {len(captions)} tiles")
            pretrain_profile = replace(profile, sft_learning_rate=profile.pretrain_learning_rate, freeze_vision=False)
            model, processor = load(tmp / "init", pretrain_profile, args)
            cfg = SFTConfig(**config_fields(pretrain_profile, SFTConfig, prefix="sft_"), max_steps=profile.pretrain_steps,
                            warmup_steps=max(1, profile.pretrain_steps // 20),
                            **run_fields("pretrain", args, tmp) | {"save_steps": 0})
            trainer = SFTTrainer(model, cfg, train_dataset=captions, processing_class=processor)
            trainer.train()
            trainer.save_model(tmp / "model")
        else:
            (tmp / "init").rename(tmp / "model")
        (tmp / "model" / "BASE.json").write_text(json.dumps({**setting, "seconds": round(time.time() - t0, 1)}))
        if folder.exists():
            shutil.rmtree(folder)
        (tmp / "model").rename(folder)
        shutil.rmtree(tmp)
    barrier()
    info = json.loads((folder / "BASE.json").read_text())
    if is_main():
        write_json(out / "base.json", {**info, "path": str(folder)})
    log(f"base: {folder} (built in {info['seconds']} s{'' if profile.pretrain_steps else ', no pretraining'})")
    return folder


def cache_root() -> Path:
    """``$GRPO_VLM_CACHE`` or ``~/.cache/grpo-vlm`` (as the embedded dataset)."""
    return Path(os.environ.get("GRPO_VLM_CACHE") or Path.home() / ".cache" / "grpo-vlm")


# ------------------------------------------------------------------------------------------ stages
def model_config(path: Path, profile: Profile) -> ModelConfig:
    return ModelConfig(str(path), freeze_vision=profile.freeze_vision, min_pixels=profile.min_pixels,
                       max_pixels=profile.max_pixels)


def load(path: Path, profile: Profile, args):
    """(model or its ModelConfig, processor). With DeepSpeed the trainer loads the model itself,
    so that under ZeRO-3 it is partitioned while loading (a 7B model is never whole on a rank)."""
    processor = load_processor(path, profile.min_pixels, profile.max_pixels)
    if args.deepspeed:
        return model_config(path, profile), processor
    return load_policy(model_config(path, profile)), processor


def run_fields(name: str, args, out: Path) -> dict:
    """What every stage's config takes from the command line rather than the profile."""
    return dict(seed=args.seed, output_dir=str(out / "stages" / name), save_steps=args.save_steps,
                resume_from_checkpoint="auto", deepspeed=args.deepspeed, disable_tqdm=args.no_progress)


def sft_stage(name, parent: Path, records, profile: Profile, args, out: Path) -> dict:
    model, processor = load(parent, profile, args)
    steps = max(1, round(profile.sft_epochs * len(records) / profile.sft_batch_size / world_size()))
    cfg = SFTConfig(**config_fields(profile, SFTConfig, prefix="sft_"), max_steps=steps,
                    warmup_steps=max(1, steps // 20), **run_fields(name, args, out))
    trainer = SFTTrainer(model, cfg, train_dataset=records, processing_class=processor)
    history = trainer.train()
    trainer.save_model(out / "models" / name)
    return {"steps": steps, "final_loss": history[-1]["loss"] if history else None}


def grpo_stage(name, parent: Path, records, rewards, profile: Profile, args, out: Path) -> dict:
    if profile.grpo_freeze_vision is not None:
        profile = replace(profile, freeze_vision=profile.grpo_freeze_vision)
    model, processor = load(parent, profile, args)
    steps = max(1, round(profile.grpo_epochs * len(records) / profile.prompts_per_step / world_size()))
    cfg = GRPOConfig(**config_fields(profile, GRPOConfig), max_steps=steps, log_completions=True, num_completions_to_print=2,
                     **run_fields(name, args, out))
    trainer = GRPOTrainer(model, rewards, args=cfg, train_dataset=records, processing_class=processor)
    history = trainer.train()
    trainer.save_model(out / "models" / name)
    last = history[-min(10, len(history)):] if history else []
    return {"steps": steps, "final_reward_mean": sum(h["reward/mean"] for h in last) / max(1, len(last))}


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def barrier() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def run_stage(name: str, out: Path, fn) -> None:
    done = out / "models" / name / "DONE.json"
    if done.is_file():
        log(f"stage {name}: done already ({done}), skipped")
        return
    log(f"stage {name}: starting")
    t0 = time.time()
    summary = fn()
    summary["seconds"] = round(time.time() - t0, 1)
    if is_main():
        write_json(done, summary)
    barrier()  # no rank may look for DONE.json before rank 0 wrote it
    log(f"stage {name}: finished in {summary['seconds']} s {summary}")


# ------------------------------------------------------------------------------------------ eval
def weights_fingerprint(path: Path) -> str:
    """sha256 over a checkpoint's weight files (names and bytes): equal fingerprints, equal models."""
    digest = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        digest.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def same_weights(path: Path, earlier: dict) -> str | None:
    """The earlier variant (``{variant: path}``) whose weights equal ``path``'s bit for bit, if any.
    Files are hashed only when their sizes match, so distinct checkpoints cost a stat each."""
    def sizes(p: Path) -> list:
        return sorted((f.name, f.stat().st_size) for f in list(p.glob("*.safetensors")) + list(p.glob("*.bin")))
    mine = sizes(path)
    for variant, other in earlier.items():
        if mine and sizes(other) == mine and weights_fingerprint(other) == weights_fingerprint(path):
            return variant
    return None


def evaluate_variant(variant: str, path: Path, parts: dict, profile: Profile, out: Path,
                     same_as: str | None = None) -> dict:
    """{"test": EvalResult, "<modality>": EvalResult ...}, cached as <out>/eval/<variant>.json.
    ``same_as``: an evaluated variant with the same weights, whose results (greedy decoding is
    deterministic) are this one's; they are copied, not recomputed."""
    cache = out / "eval" / f"{variant}.json"
    if same_as and not cache.is_file() and is_main():
        shutil.copyfile(out / "eval" / f"{same_as}.json", cache)
        log(f"eval {variant}: weights identical to {same_as}'s, bit for bit; its evaluation is reused")
    barrier()
    if cache.is_file():
        raw = json.loads(cache.read_text())
        return {k: EvalResult(**v) for k, v in raw.items()}
    t0 = time.time()
    processor = load_processor(path, profile.min_pixels, profile.max_pixels)
    model = load_policy(model_config(path, profile)).to(default_device()).eval()
    results = {}
    for split, records in [("test", parts["test"])] + sorted(parts["ood"].items()):
        if records:  # the grey-image control on the test split: how much of the score needs the image
            results[split] = evaluate(model, processor, records, batch_size=profile.eval_batch,
                                      max_new_tokens=profile.max_completion_length, progress=False,
                                      image_ablation=split == "test")
    if is_main():
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache, {k: asdict(v) for k, v in results.items()}, indent=None)
    barrier()
    log(f"eval {variant}: " + ", ".join(f"{k} {100 * v.accuracy:.2f} %" for k, v in results.items())
        + f" ({time.time() - t0:.0f} s)")
    return results


def judge_predictions(variant: str, result: EvalResult, records, judge, out: Path) -> dict:
    """The process reward of a variant's test completions: the judge that scored R1's training
    chains now scores every variant's answers, so a rise of the process reward can be checked
    against accuracy on the same items. ``judge()`` gives the JudgeConfig (the local judge is started
    only when something is left to score). Cached as <out>/eval/<variant>.process.json."""
    cache = out / "eval" / f"{variant}.process.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    by_id = {r.id: r for r in records}
    preds = [p for p in result.predictions if p["id"] in by_id]
    samples = [default_reward_sample(by_id[p["id"]], p["completion"]) for p in preds]  # as in training
    scores = ProcessReward(judge()).score_batch(samples)
    by_level: dict = {}
    for p, score in zip(preds, scores):
        if score is not None:
            by_level.setdefault(p["difficulty"], []).append(score)
    kept = [x for x in scores if x is not None]
    summary = {"mean": sum(kept) / len(kept) if kept else None, "n": len(kept), "abstained": len(scores) - len(kept),
               "by_difficulty": {d: sum(v) / len(v) for d, v in sorted(by_level.items())}}
    write_json(cache, summary)
    log(f"judge {variant}: mean process score {summary['mean']} on {len(kept)} test completions")
    return summary


# ------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local Qwen2.5-VL checkpoint folder (default: a tiny one built offline)")
    p.add_argument("--data", help="dataset file (default: the embedded dataset)")
    p.add_argument("--layout", default="auto", help="dataset layout (see docs/data.md)")
    p.add_argument("--image-root", help="folder the dataset's image paths are relative to")
    p.add_argument("--ood-data", help="OmniMedVQA JSON for the out-of-domain sets")
    p.add_argument("--ood-image-root")
    p.add_argument("--skip-invalid", action="store_true", help="skip (and count) invalid records")
    p.add_argument("--judge-url", help="OpenAI-compatible judge, e.g. https://api.openai.com/v1 "
                                       "(key from $JUDGE_API_KEY or $OPENAI_API_KEY); default: local rubric judge")
    p.add_argument("--judge-model", default="gpt-4o")
    p.add_argument("--deepspeed", help="DeepSpeed JSON config (e.g. examples/configs/zero3.json)")
    p.add_argument("--out", default="runs/pathvlm_r1", help="output folder")
    p.add_argument("--stages", default="all", help=f"comma-separated subset of {','.join(STAGES)},eval,report; "
                                                    "eval:<variant> evaluates one variant")
    p.add_argument("--seed", type=int, default=42, help="paper: 42")
    p.add_argument("--seeds", help="comma-separated seeds: run the pipeline once per seed and summarise the spread")
    p.add_argument("--profile", choices=("auto", "paper", "tiny", "quick"), default="auto",
                   help="hyper-parameters: paper (real checkpoints), tiny (CPU default), quick (smoke test)")
    p.add_argument("--save-steps", type=int, default=50, help="checkpoint every N steps inside a stage")
    p.add_argument("--local-rank", "--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--validate", action="store_true",
                   help="hold out the last validation_fraction of the SFT and RL splits and evaluate on them "
                        "instead of the test split (for choosing hyper-parameters)")
    p.add_argument("--jobs", default="auto",
                   help="stages run side by side as separate processes (auto: the CPU cores, at most 2, on a "
                        "one-process CPU run; 1 under DeepSpeed/torchrun or with CUDA)")
    p.add_argument("--judge-predictions", choices=("auto", "yes", "no"), default="auto",
                   help="score every variant's test completions with the judge (auto: only with the local judge)")
    return p.parse_args(argv)


def pick_profile(args) -> Profile:
    name = args.profile if args.profile != "auto" else ("paper" if args.model else "tiny")
    return {"paper": PAPER, "tiny": TINY, "quick": QUICK}[name]


def wanted_stages(args) -> tuple[set, set]:
    """(stages and "eval"/"report" asked for, variants to evaluate): ``--stages`` is "all" or a
    comma list of stage names, "eval" (every trained variant), "eval:<variant>" and "report"."""
    if args.stages == "all":
        return set(STAGES + ("eval", "report")), set(VARIANTS)
    tokens = set(args.stages.split(","))
    evals = {t.split(":", 1)[1] for t in tokens if t.startswith("eval:")}
    wanted = {t for t in tokens if not t.startswith("eval:")} | ({"eval"} if evals else set())
    unknown = (wanted - set(STAGES + ("eval", "report"))) | {f"eval:{v}" for v in evals - set(VARIANTS)}
    if unknown:
        raise SystemExit(f"--stages: unknown stage(s) {sorted(unknown)}; choose from "
                         f"{STAGES + ('eval', 'report')} or eval:<variant> with a variant of {VARIANTS}")
    return wanted, (set(VARIANTS) if "eval" in tokens else evals)


def run(args, out: Path) -> dict:
    profile = pick_profile(args)
    wanted, to_evaluate = wanted_stages(args)
    init_distributed()  # no-op in one process; evaluation alone also shards over the ranks
    out.mkdir(parents=True, exist_ok=True)
    if is_main():
        (out / "profile.json").write_text(json.dumps(asdict(profile), indent=1))
    torch.manual_seed(args.seed)
    parts = load_splits(args, profile, out)
    if not wanted & set(STAGES) and (out / "base.json").is_file():  # evaluation / report only: reuse
        base = Path(json.loads((out / "base.json").read_text())["path"])
    else:
        base = base_model(args, parts, out, profile)
    paths = {"base": base} | {s: out / "models" / s for s in STAGES}
    outcome = [AccuracyReward(), FormatReward()]
    with ExitStack() as stack:
        judges = []

        def judge() -> JudgeConfig:  # started on first use, stopped when the run ends
            if not judges:
                url = args.judge_url
                if url is None:
                    url = stack.enter_context(start_local_judge("rubric")).url
                    log(f"local rubric judge at {url}")
                judges.append(JudgeConfig(base_url=url, model=args.judge_model if args.judge_url else "rubric",
                                          cache_path=str(out / "judge_cache.sqlite")))
            return judges[0]
        plan = {
            "alpha": lambda: sft_stage("alpha", paths["base"], parts["sft"], profile, args, out),
            "beta": lambda: grpo_stage("beta", paths["alpha"], parts["rl"], outcome, profile, args, out),
            "r1": lambda: grpo_stage("r1", paths["beta"], parts["rl"], outcome + [ProcessReward(judge())],
                                     profile, args, out),
            "gamma": lambda: sft_stage("gamma", paths["alpha"], parts["rl"], profile, args, out),
            "delta": lambda: sft_stage("delta", paths["base"], parts["rl"], profile, args, out),
            "epsilon": lambda: grpo_stage("epsilon", paths["base"], parts["rl"], outcome, profile, args, out),
        }
        for stage in STAGES:
            if stage in wanted:
                if PARENT[stage] != "base" and not (paths[PARENT[stage]] / "DONE.json").is_file():
                    raise SystemExit(f"stage {stage} needs stage {PARENT[stage]} first (run --stages {PARENT[stage]},{stage})")
                run_stage(stage, out, plan[stage])
        results, process, same_as = {}, {}, {}
        if "eval" in wanted:
            score_chains = args.judge_predictions == "yes" or (args.judge_predictions == "auto" and not args.judge_url)
            for v in VARIANTS:
                if v in to_evaluate and (v == "base" or (paths[v] / "DONE.json").is_file()):
                    # any variant evaluated before, here or by another job of a parallel run
                    done = {u: paths[u] for u in VARIANTS[:VARIANTS.index(v)]
                            if u in results or (out / "eval" / f"{u}.json").is_file()}
                    same_as[v] = same_weights(paths[v], done)
                    results[v] = evaluate_variant(v, paths[v], parts, profile, out, same_as=same_as[v])
                    if score_chains and is_main():
                        process[v] = judge_predictions(v, results[v]["test"], parts["test"], judge, out)
    if "report" in wanted and results and is_main():
        report = write_report(out, results, parts, profile=asdict(profile), process=process,
                              validation=args.validate, same_weights={v: u for v, u in same_as.items() if u})
        log(f"report: {report}")
    return results


# ------------------------------------------------------------------------ stages side by side
# Critical path first (base -> alpha -> beta -> r1 -> its evaluation), then what fits beside it.
JOB_PRIORITY = ("alpha", "beta", "r1", "epsilon", "gamma", "delta") + tuple(f"eval:{v}" for v in VARIANTS)


def pick_jobs(args) -> int:
    """How many stages run side by side: ``--jobs``, or with "auto" the CPU cores available (at
    most 2) on a single-process CPU run, else 1. Each job is a process with one thread
    (OMP_NUM_THREADS=1), so on the embedded default two jobs use the two cores a run otherwise
    leaves half idle."""
    if args.jobs != "auto":
        n = int(args.jobs)
        if n < 1:
            raise SystemExit(f"--jobs {args.jobs}: must be >= 1 or auto")
        return n
    if world_size() > 1 or args.deepspeed or torch.cuda.is_available():
        return 1
    return max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def child_argv(argv: list[str]) -> list[str]:
    """The command line minus the options a job sets itself (--stages, --jobs, --seed(s), --out,
    --judge-predictions, --no-progress)."""
    valued = {"--stages", "--jobs", "--seed", "--seeds", "--out", "--judge-predictions"}
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in valued:
            skip = True
        elif not (a.split("=", 1)[0] in valued or a == "--no-progress"):
            out.append(a)
    return out


def stage_jobs(wanted: set, to_evaluate: set, paths: dict, evals: Path) -> dict:
    """{job: the jobs it waits for} for the stages not done yet and the evaluations asked for and
    not yet in ``evals`` (the cached ones are read by the final pass)."""
    done = {s for s in STAGES if (paths[s] / "DONE.json").is_file()}
    jobs = {}
    for stage in STAGES:
        if stage in wanted and stage in done:
            log(f"stage {stage}: done already ({paths[stage] / 'DONE.json'}), skipped")
        elif stage in wanted:
            parent = PARENT[stage]
            if parent != "base" and parent not in done and parent not in jobs:
                raise SystemExit(f"stage {stage} needs stage {parent} first (run --stages {parent},{stage})")
            jobs[stage] = {parent} - {"base"} - done
    if "eval" in wanted:
        for v in VARIANTS:
            if v in to_evaluate and (v == "base" or v in done or v in jobs) and not (evals / f"{v}.json").is_file():
                jobs[f"eval:{v}"] = {v} - {"base"} - done
    return jobs


def run_parallel(args, out: Path, jobs: int, argv: list[str]) -> dict:
    """``run`` with the stages and evaluations as separate processes, up to ``jobs`` at a time,
    each started when the stages it needs are done. Data and the base model are made here first;
    an evaluation job also has the judge score its variant's test answers (the judge cache is a
    WAL-mode SQLite file that processes share); the report comes last, here, once everything is
    evaluated. Every job is the same script with ``--stages <job>`` and one thread, so its
    results equal a sequential run's at one thread (each stage seeds itself;
    tests/examples/test_pipeline.py checks it; more threads sum in another order). A job's
    output goes to ``<out>/logs/<job>.log``; if one fails the others are stopped."""
    profile = pick_profile(args)
    wanted, to_evaluate = wanted_stages(args)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(asdict(profile), indent=1))
    parts = load_splits(args, profile, out)
    paths = {"base": base_model(args, parts, out, profile)} | {s: out / "models" / s for s in STAGES}
    todo = stage_jobs(wanted, to_evaluate, paths, out / "eval")
    (out / "logs").mkdir(exist_ok=True)
    base_cmd = [sys.executable, str(Path(__file__).resolve()), *child_argv(argv), "--out", str(out),
                "--seed", str(args.seed), "--jobs", "1", "--judge-predictions", args.judge_predictions, "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    running: dict = {}   # job -> (process, log file, start time)
    finished: set = set()
    log(f"{len(todo)} jobs, {jobs} at a time: {', '.join(j for j in JOB_PRIORITY if j in todo)}")
    try:
        while todo or running:
            for job in [j for j in JOB_PRIORITY if j in todo and todo[j] <= finished][:max(0, jobs - len(running))]:
                del todo[job]
                handle = open(out / "logs" / f"{job.replace(':', '-')}.log", "w")
                proc = subprocess.Popen(base_cmd + ["--stages", job], stdout=handle, stderr=subprocess.STDOUT, env=env)
                running[job] = (proc, handle, time.time())
                log(f"{job}: started (log {handle.name})")
            if not running:
                raise SystemExit(f"jobs {sorted(todo)} wait for jobs that never ran")
            time.sleep(0.5)
            for job, (proc, handle, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                handle.close()
                del running[job]
                if proc.returncode != 0:
                    tail = Path(handle.name).read_text()[-3000:]
                    raise SystemExit(f"job {job} failed (exit {proc.returncode}); its log {handle.name} ends:\n{tail}")
                finished.add(job)
                log(f"{job}: finished in {time.time() - t0:.1f} s")
    finally:
        for proc, handle, _ in running.values():
            proc.terminate()
        for proc, handle, _ in running.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            handle.close()
    rest = sorted(wanted & {"eval", "report"})
    if not rest:
        return {}
    final = argparse.Namespace(**{**vars(args), "stages": ",".join(
        rest if "eval" not in rest or to_evaluate == set(VARIANTS) else
        [r for r in rest if r != "eval"] + [f"eval:{v}" for v in sorted(to_evaluate)])})
    return run(final, out)   # every evaluation and judgment is cached now: write the report


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    jobs = pick_jobs(args)

    def one(out: Path) -> dict:
        return run_parallel(args, out, jobs, argv) if jobs > 1 else run(args, out)
    if args.seeds:
        runs = {}
        for seed in [int(s) for s in args.seeds.split(",")]:
            args.seed = seed
            runs[seed] = one(Path(args.out) / f"seed-{seed}")
        if is_main():
            log(f"seed summary: {write_seed_summary(Path(args.out), runs)}")
    else:
        one(Path(args.out))


if __name__ == "__main__":
    # a parallel run stops its other jobs with SIGTERM when one fails: exit through the context
    # managers, so a job's local judge server is stopped with it
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    main()
