"""examples/pathvlm_r1.py end to end on the quick profile (tiny model, embedded data, local rubric
judge): every stage, evaluation and the report; a second run skips finished stages."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "pathvlm_r1.py"
pytestmark = [pytest.mark.slow, pytest.mark.server]
_STAGES = ("alpha", "beta", "r1", "gamma", "delta", "epsilon")


def _run(*args, cache):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRPO_VLM_CACHE": str(cache)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=900, cwd=ROOT)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    out = root / "run"
    first = _run("--profile", "quick", "--out", str(out), "--no-progress", "--jobs", "2", cache=root / "cache")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return out, first, root


def test_every_stage_and_variant_is_trained_and_evaluated(quick_run):
    out, first, _ = quick_run
    for stage in ("alpha", "beta", "r1", "gamma", "delta", "epsilon"):
        done = json.loads((out / "models" / stage / "DONE.json").read_text())
        assert done["steps"] >= 1
        assert (out / "models" / stage / "model.safetensors").is_file()
        assert (out / "models" / stage / "preprocessor_config.json").is_file()
    manifest = json.loads((out / "data_manifest.json").read_text())
    assert manifest  # the run records which data it used
    sizes = {"test": 24, "ct": 4, "dermoscopy": 4, "fundus": 4, "oct": 4}
    for variant in ("base", "alpha", "beta", "r1", "gamma", "delta", "epsilon"):
        result = json.loads((out / "eval" / f"{variant}.json").read_text())
        assert {k: v["n"] for k, v in result.items()} == sizes
        for split in result.values():
            assert 0.0 <= split["accuracy"] <= 1.0
            assert split["accuracy"] == sum(p["correct"] for p in split["predictions"]) / split["n"]
    # an evaluation is reused exactly where a variant's weights equal an earlier one's (compared
    # here tensor by tensor, not by the pipeline's file hash)
    from safetensors.torch import load_file
    import torch
    tensors = {v: load_file(str(out / "models" / v / "model.safetensors")) for v in _STAGES}
    tensors["base"] = load_file(str(Path(json.loads((out / "base.json").read_text())["path"]) / "model.safetensors"))
    order = ("base",) + _STAGES
    for i, v in enumerate(order):
        twins = [u for u in order[:i] if tensors[u].keys() == tensors[v].keys()
                 and all(torch.equal(tensors[u][k], tensors[v][k]) for k in tensors[v])]
        said = first.stdout + "".join(f.read_text() for f in (out / "logs").glob("*.log"))
        reused = re.findall(rf"eval {v}: weights identical to (\w+)'s", said)
        # reused only from a true twin (with jobs side by side the twin may still be evaluating,
        # and the variant is then evaluated itself); twins' evaluations are equal either way
        assert set(reused) <= set(twins), (v, reused, twins)
        for u in twins:
            assert json.loads((out / "eval" / f"{v}.json").read_text()) == \
                json.loads((out / "eval" / f"{u}.json").read_text()), (v, u)
    # the process-reward stage talked to the judge and logged its reward
    rows = [json.loads(x) for x in (out / "stages" / "r1" / "metrics.jsonl").read_text().splitlines()]
    assert all("reward/process/mean" in r and "judge/requests" in r for r in rows)
    assert rows[-1]["judge/requests"] > 0


def test_report_table_plots_and_html(quick_run):
    out, _, _ = quick_run
    report = (out / "report" / "report.md").read_text()
    for name in ("Base", "Alpha (SFT)", "PathVLM-R1", "Gamma", "Delta", "Epsilon"):
        assert name in report
    header = next(line for line in report.splitlines() if line.startswith("| Variant | In-domain"))
    assert [c.strip() for c in header.strip("|").split("|")][1:6] == ["In-domain (pathology)", "CT", "Dermoscopy",
                                                                      "Fundus", "OCT"]
    # every variant's reasoning/answer agreement, as stored in its evaluation JSON
    assert "## Does the answer follow from the reasoning?" in report
    for variant, name in (("alpha", "Alpha (SFT)"), ("r1", "PathVLM-R1 (Beta + process reward)")):
        agree = json.loads((out / "eval" / f"{variant}.json").read_text())["test"]["reasoning_agreement"]
        row = f"| {name} | {100 * agree['overall']:.1f} (n={agree['n']}) |" if agree else f"| {name} | — |"
        assert row in report, row
    for png in ("accuracy_by_stage.png", "training_curves.png"):
        with Image.open(out / "report" / png) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 200
    page = (out / "report" / "samples.html").read_text()
    assert page.count("data:image/png;base64,") == 12 and "PathVLM-R1 (Beta + process reward)" in page


def test_second_run_skips_finished_stages(quick_run):
    out, _, root = quick_run
    again = _run("--profile", "quick", "--out", str(out), "--no-progress", cache=root / "cache")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done already") == 6 and "starting" not in again.stdout
    assert "started" not in again.stdout   # nothing left to run: no job started


def test_stages_side_by_side_give_the_sequential_results(quick_run):
    """The fixture ran the stages as parallel jobs (--jobs 2); one process running them in turn
    gives the same trained weights and the same answers, evaluation by evaluation."""
    out, first, root = quick_run
    assert "alpha: started" in first.stdout and (out / "logs" / "alpha.log").is_file()
    seq = root / "sequential"
    again = _run("--profile", "quick", "--out", str(seq), "--no-progress", "--jobs", "1", cache=root / "cache")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "started (log" not in again.stdout
    for stage in _STAGES:
        assert (seq / "models" / stage / "model.safetensors").read_bytes() == \
            (out / "models" / stage / "model.safetensors").read_bytes(), stage
    for variant in ("base",) + _STAGES:
        a = json.loads((out / "eval" / f"{variant}.json").read_text())
        b = json.loads((seq / "eval" / f"{variant}.json").read_text())
        assert a == b, variant
    assert (seq / "report" / "results.json").read_text() == (out / "report" / "results.json").read_text()


def test_a_stage_without_its_parent_is_refused(tmp_path):
    result = _run("--profile", "quick", "--out", str(tmp_path / "x"), "--stages", "beta", cache=tmp_path / "c")
    assert result.returncode != 0 and "needs stage alpha first" in result.stderr
