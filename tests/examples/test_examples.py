"""The examples a user copies: examples/grpo_minimal.py runs and logs what it promises, and both
examples use only what the packages export at top level."""
import ast
import json
import math
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
PACKAGES = ("grpo", "models", "rewards", "data")


def test_grpo_minimal_trains_and_logs_the_custom_reward(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRPO_VLM_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, str(EXAMPLES / "grpo_minimal.py"), "--out", str(tmp_path / "run"),
                          "--steps", "3"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        for name in ("accuracy", "format", "concise"):
            assert 0.0 <= row[f"reward/{name}/mean"] <= 1.0
        assert row["loss"] is not None and math.isfinite(row["loss"])   # null in the log = not finite
        assert math.isfinite(row["kl_mean"]) and row["skipped_step"] == 0.0
    assert "step 3: loss" in run.stdout and "concise" in run.stdout


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


@pytest.mark.parametrize("script", ["grpo_minimal.py", "pathvlm_r1.py", "pathvlm_report.py", "recipe_comparison.py"])
def test_examples_import_only_the_public_api(script):
    import importlib
    for module, names in _imports(EXAMPLES / script):
        top = module.split(".")[0]
        if top not in PACKAGES:
            continue
        assert module == top, f"{script} imports the private module {module}"
        package = importlib.import_module(top)
        for name in names:
            assert name in package.__all__, f"{script} imports {top}.{name}, which {top}.__all__ lacks"


def test_profile_fields_are_the_configs_field_names():
    """Every Profile field either is a GRPOConfig field, is sft_ + an SFTConfig field, or is one of
    the pipeline's own; the configs are built from them, so each maps one to one."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import pathvlm_r1 as p
    finally:
        sys.path.remove(str(EXAMPLES))
    from grpo import GRPOConfig, SFTConfig
    grpo_names = {f.name for f in fields(GRPOConfig)}
    sft_names = {f.name for f in fields(SFTConfig)}
    own = {"sizes", "sft_epochs", "grpo_epochs", "eval_batch", "freeze_vision", "max_pixels", "min_pixels",
           "ood_per_modality", "tiny_model", "pretrain_steps", "pretrain_items", "grpo_freeze_vision",
           "validation_fraction"}
    # pretrain_<name> is SFTConfig's <name> for the caption pretraining of the tiny base
    own |= {f"pretrain_{n}" for n in ("learning_rate",)}
    for f in fields(p.Profile):
        assert (f.name in own or f.name in grpo_names
                or (f.name.startswith("sft_") and f.name[4:] in sft_names)), f.name
    for profile in (p.PAPER, p.TINY, p.QUICK):
        grpo = p.config_fields(profile, GRPOConfig)
        sft = p.config_fields(profile, SFTConfig, prefix="sft_")
        assert grpo == {n: getattr(profile, n) for n in grpo_names if hasattr(profile, n)}
        assert sft == {n[4:]: getattr(profile, n) for n in (f.name for f in fields(profile))
                       if n.startswith("sft_") and n[4:] in sft_names}
        GRPOConfig(**grpo)   # valid as they stand
        SFTConfig(**sft)
    assert p.config_fields(p.PAPER, GRPOConfig)["learning_rate"] == 1e-6
    assert p.config_fields(p.PAPER, SFTConfig, prefix="sft_")["learning_rate"] == 1e-5


def test_same_weights_finds_a_bitwise_copy_and_nothing_else(tmp_path):
    """The pipeline reuses a variant's evaluation only for a checkpoint equal to it bit for bit: a
    copy is found, a checkpoint differing in one byte (same size) or in size is not."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import pathvlm_r1 as p
    finally:
        sys.path.remove(str(EXAMPLES))
    payload = bytes(range(256)) * 64
    for name, body in (("a", payload), ("b", payload), ("c", payload[:-1] + b"\x00"), ("d", payload + b"x")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(body)
        (tmp_path / name / "config.json").write_text(name)   # not a weight file: ignored
    earlier = {"base": tmp_path / "a"}
    assert p.same_weights(tmp_path / "b", earlier) == "base"
    assert p.same_weights(tmp_path / "c", earlier) is None
    assert p.same_weights(tmp_path / "d", earlier) is None
    assert p.same_weights(tmp_path / "b", {"alpha": tmp_path / "c", "base": tmp_path / "a"}) == "base"
    assert p.weights_fingerprint(tmp_path / "a") != p.weights_fingerprint(tmp_path / "c")


def test_seed_summary_by_hand(tmp_path):
    """Mean ± sample std across seeds and the changes against Alpha paired by seed, from
    hand-made evaluation results."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import pathvlm_report as rep
    finally:
        sys.path.remove(str(EXAMPLES))
    from grpo.evaluate import EvalResult

    def result(acc, agree):
        return {"test": EvalResult(n=10, accuracy=acc, format_rate=1.0, mean_reasoning_tokens=5.0,
                                   by_difficulty={"easy": {"n": 10, "accuracy": acc}},
                                   reasoning_agreement={"overall": agree, "n": 10, "by_difficulty": {}}),
                "ct": EvalResult(n=4, accuracy=0.5, format_rate=1.0, mean_reasoning_tokens=5.0)}
    runs = {42: {"alpha": result(0.6, 0.9), "beta": result(0.7, 0.5)},
            43: {"alpha": result(0.5, 0.8), "beta": result(0.5, 0.7)}}
    path = rep.write_seed_summary(tmp_path, runs)
    summary = json.loads((tmp_path / "seed_summary.json").read_text())
    assert summary["beta"]["in_domain"] == pytest.approx([70.0, 50.0])
    assert summary["beta"]["in_domain_change_vs_alpha"] == pytest.approx([10.0, 0.0])
    assert summary["beta"]["reasoning_agreement"] == pytest.approx([50.0, 70.0])
    row = next(line for line in path.read_text().splitlines() if line.startswith("| Beta"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # in-domain 60 ± sqrt(((70-60)^2 + (50-60)^2) / 1) = 14.14; agreement 60 ± 14.14; change 5 ± 7.07
    assert cells[1] == "60.00 ± 14.14" and cells[6] == "60.00 ± 14.14" and cells[-1] == "5.00 ± 7.07"


def test_claims_table_by_hand():
    """The report's claims table: the truth row from the records, and per variant the claim
    counts (synonyms in parentheses dropped) and the share of right claims, counted by hand."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import pathvlm_report as rep
    finally:
        sys.path.remove(str(EXAMPLES))
    from data import VQARecord
    from grpo.evaluate import EvalResult
    crit = {"dark": ["nuclear staining is dark (hyperchromatic), not pale (vesicular)"],
            "pale": ["nuclear staining is pale (vesicular), not dark (hyperchromatic)"]}
    records = [VQARecord(id=str(i), images=[], question="q", answer="a", criteria=crit[t])
               for i, t in enumerate(["dark", "dark", "pale"])]

    def result(*thinks):
        preds = [{"id": str(i), "completion": f"<think>{t}</think><answer>A</answer>"} for i, t in enumerate(thinks)]
        return {"test": EvalResult(n=3, accuracy=0.0, format_rate=1.0, mean_reasoning_tokens=1.0, predictions=preds)}
    results = {"alpha": result("Staining is dark.", "Staining is pale.", "Staining is pale."),   # 2 of 3 right
               "beta": result("Staining is dark.", "Staining is dark.", "Staining is dark.")}   # 2 of 3, a prior
    lines = rep.claims_table(results, records).splitlines()
    assert lines[2] == "| *truth* | dark 2 / pale 1 |"
    assert lines[3] == "| Alpha (SFT) | dark 1 / pale 2; right 67 % |"
    assert lines[4] == "| Beta (Alpha + GRPO acc+fmt) | dark 3; right 67 % |"


def test_family_table_by_hand():
    """The report's per-family table: accuracy with the images / with grey images per family
    (record.extra["task"]), and the best constant letter per family, all counted by hand; a
    variant without the grey run shows a dash, a family it did not answer a dash too."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import pathvlm_report as rep
    finally:
        sys.path.remove(str(EXAMPLES))
    from data import VQARecord
    from dataclasses import asdict
    from grpo.evaluate import EvalResult, Prediction
    tasks = ["size", "size", "size", "size", "mitosis", "mitosis"]
    records = [VQARecord(id=str(i), images=[], question="q", answer="a", extra={"task": t})
               for i, t in enumerate(tasks)]
    refs = ["A", "A", "A", "B", "B", "A"]     # size: A 3 of 4 -> constant 75; mitosis: 1 of 2 -> 50

    def preds(correct):
        return [asdict(Prediction(id=str(i), modality="pathology", source="s", completion="", correct=bool(c),
                                  well_formatted=True, reasoning_tokens=1, reference=r, num_options=2))
                for i, (r, c) in enumerate(zip(refs, correct))]
    alpha = EvalResult(n=6, accuracy=0.5, format_rate=1.0, mean_reasoning_tokens=1.0,
                       predictions=preds([1, 1, 0, 0, 0, 1]),             # size 2/4, mitosis 1/2
                       blank={"predictions": preds([1, 0, 0, 0, 0, 0])})  # grey: size 1/4, mitosis 0/2
    beta = EvalResult(n=6, accuracy=0.5, format_rate=1.0, mean_reasoning_tokens=1.0,
                      predictions=preds([1, 1, 1, 1, 1, 1]))              # no grey run
    lines = rep.family_table({"alpha": {"test": alpha}, "beta": {"test": beta}}, records).splitlines()
    assert lines[0] == "| Variant | mitosis (n=2, constant 50) | size (n=4, constant 75) |"
    assert lines[2] == "| Alpha (SFT) | 50 / 0 | 50 / 25 |"
    assert lines[3] == "| Beta (Alpha + GRPO acc+fmt) | 100 / — | 100 / — |"


def test_recipe_comparison_runs_every_recipe_on_the_same_alpha(tmp_path):
    """examples/recipe_comparison.py on the quick profile: each recipe trains the same number of
    steps from the same Alpha; DAPO's dynamic sampling generates extra rounds, the others exactly
    steps x B x G completions; the summary holds every recipe."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRPO_VLM_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, str(EXAMPLES / "recipe_comparison.py"), "--profile", "quick", "--seeds", "42",
                          "--out", str(tmp_path / "out"), "--no-progress"],
                         capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    runs = {r["recipe"]: r for r in summary["runs"]}
    assert sorted(runs) == ["dapo", "dr_grpo", "grpo"]
    sys.path.insert(0, str(EXAMPLES))
    import pathvlm_r1
    quick = pathvlm_r1.QUICK
    steps = round(quick.grpo_epochs * quick.sizes[1] / quick.prompts_per_step)
    per_round = quick.prompts_per_step * quick.num_generations
    for name, r in runs.items():
        assert r["steps"] == steps and len(r["curve"]["reward/accuracy/mean"]) == steps
        assert 0.0 <= r["test_accuracy"] <= 1.0
        extra = sum(r["curve"]["dynamic_sampling/extra_rounds"]) if name == "dapo" else 0
        assert r["completions_generated"] == (steps + extra) * per_round
    assert all(v is None for v in runs["grpo"]["curve"]["dynamic_sampling/extra_rounds"])
    table = (tmp_path / "out" / "summary.md").read_text()
    assert all(f"| {name} |" in table for name in runs)
