"""report_to: every metric of metrics.jsonl reaches TensorBoard and W&B (read back with
TensorBoard's own reader and by decoding W&B's offline run file), sample completions as tables,
resume without duplicated steps, writers closed on errors, nothing written off the main process,
clear errors for bad values and missing packages, and no secret in any file a run writes."""
import json
import math
import re
import struct
import sys
import zlib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from ds_common import LengthReward, dataset, make_config, tiny_model  # noqa: E402

from grpo import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer
from grpo.metrics import read_metrics
from grpo.reporting import Reporter, markdown_table, resolve_report_to
from rewards import Reward

SECRET = "sk-test-3b1f-DO-NOT-LOG-7c9e"


class VowelReward(Reward):
    """A second reward, so the completions table has one column per reward function."""
    name = "vowels"

    def score(self, sample):
        return sum(c in "aeiou" for c in sample.completion) / max(1, len(sample.completion))


class FailOnSecondRound(Reward):
    name = "fails"

    def __init__(self):
        super().__init__()
        self.calls = 0

    def score_batch(self, samples):
        self.calls += 1
        if self.calls > 1:  # round 0 scores, round 1 fails (no pre-flight check in this test)
            raise RuntimeError("reward backend went away")
        return [0.5] * len(samples)

    def score(self, sample):
        return 0.5


@pytest.fixture(autouse=True)
def wandb_env(monkeypatch, tmp_path):
    """W&B's own folders under tmp_path, its default mode (report_to's offline default), and a
    secret in the environment that no written file may contain."""
    for var in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_NAME", "WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)


# ---------------------------------------------------------------- readers (independent of grpo)
def tb_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} as TensorBoard shows them (purged events hidden)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


def tb_texts(acc, tag) -> dict[int, str]:
    return {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(f"{tag}/text_summary")}


def wandb_records(path: Path):
    """Decode a W&B run file: a 7-byte header (":W&B", 0xBEE1, version 0), then LevelDB-log
    records (crc32, length, type) in 32 KiB blocks holding protobuf ``Record`` messages. The CRC
    of every chunk is checked."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0)
    pos, pending, block = 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:            # a block's tail too short for a header: padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        body = data[pos + 7:pos + 7 + length]
        assert crc == zlib.crc32(body, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF, f"bad CRC at {pos}"
        pos += 7 + length
        pending += body
        if kind in (1, 4):                     # FULL or LAST: a whole record
            rec = pb.Record()
            rec.ParseFromString(pending)
            pending = b""
            yield rec


def wandb_run(run_dir: Path) -> dict:
    """{"id", "resume", "config", "history": {step: {key: value}}, "exit_code"} of one offline run folder."""
    (file,) = run_dir.glob("run-*.wandb")
    out = {"history": {}, "config": {}, "exit_code": None}
    for rec in wandb_records(file):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["id"], out["resume"] = rec.run.run_id, rec.run.resume  # resume: wandb sync resumes the run
            out["config"] = {u.key: json.loads(u.value_json) for u in rec.run.config.update}
        elif kind == "history":
            row = {}
            for item in rec.history.item:
                keys = list(item.nested_key) or [item.key]
                node = row
                for k in keys[:-1]:
                    node = node.setdefault(k, {})
                node[keys[-1]] = json.loads(item.value_json)
            out["history"][row["_step"]] = row
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
    return out


def md_rows(text: str) -> list[list[str]]:
    """The cells of a markdown table, unescaped (\\| -> |, \\\\ -> \\, <br> -> newline, entities)."""
    rows = []
    for line in text.split("\n"):     # (not splitlines: a completion may hold \x1c, \u2028, ...)
        cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]  # the unescaped pipes
        cells = [re.sub(r"\\(.)", r"\1", c[1:-1]).replace("<br>", "\n") for c in cells]  # "| a | b |"
        rows.append([c.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&") for c in cells])
    return [rows[0]] + rows[2:]          # drop the |---| line


def same(a, b) -> bool:
    """jsonl value (None = NaN/inf) vs a reported one."""
    if a is None:
        return b is None or not math.isfinite(b)
    return b is not None and (a == b or (math.isnan(a) and math.isnan(b)))


def assert_no_secret(folder: Path):
    for f in folder.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f


# ---------------------------------------------------------------- runs
def grpo(ckpt, out, steps, report_to, rewards=None, **kw):
    cfg = make_config(str(out), max_steps=steps, logging_steps=1, report_to=report_to, log_completions=True,
                      num_completions_to_print=3, **kw)
    trainer = GRPOTrainer(tiny_model(ckpt), rewards or [LengthReward(), VowelReward()], args=cfg,
                          train_dataset=dataset(), processing_class=tiny_model.processor)
    return trainer


def check_tensorboard(out: Path, rows: list[dict], completions: list[dict]):
    scalars, acc = tb_scalars(out / "tensorboard")
    keys = set().union(*(set(r) - {"step"} for r in rows))
    assert set(scalars) == keys                                  # every metric, nothing else
    for tag, events in scalars.items():
        assert [s for s, _ in events] == [r["step"] for r in rows], tag   # each step once
        for (step, value), row in zip(events, rows):
            want = row[tag]
            if want is None:
                assert not math.isfinite(value), (tag, step)
            else:   # TensorBoard keeps float32
                assert value == pytest.approx(want, rel=2 ** -23, abs=1e-37), (tag, step, value, want)
    tables = tb_texts(acc, "completions")
    assert sorted(tables) == [r["step"] for r in rows]
    for step, text in tables.items():
        header, *cells = md_rows(text)
        assert header == ["round", "id", "prompt", "completion", "reward", "reward/length", "reward/vowels",
                          "advantage"]
        mine = [c for c in completions if c["round"] == step - 1]  # mu = 1: round = step - 1
        assert len(cells) == len(mine) == 3
        for got, want in zip(cells, mine):
            assert got[3] == want["completion"].replace("\r\n", "\n").replace("\r", "\n")
            assert got[1] == want["id"] and got[2] == want["prompt"]
            assert float(got[4]) == pytest.approx(want["reward"], rel=1e-3, abs=1e-4)
            assert float(got[5]) == pytest.approx(want["rewards"]["length"], rel=1e-3, abs=1e-4)
            assert float(got[7]) == pytest.approx(want["advantage"], rel=1e-3, abs=1e-4)
    assert "learning_rate" in tb_texts(acc, "config")[0]


def check_wandb_history(run: dict, rows: list[dict], completions: list[dict], run_dir: Path):
    assert sorted(run["history"]) == [r["step"] for r in rows]
    for row in rows:
        got = run["history"][row["step"]]
        for k, v in row.items():
            if k != "step":
                assert same(v, got[k]), (row["step"], k, v, got.get(k))
        table = got["completions"]
        data = json.loads((run_dir / "files" / table["path"]).read_text())
        mine = [c for c in completions if c["round"] == row["step"] - 1]
        assert data["columns"][:5] == ["round", "id", "prompt", "completion", "reward"]
        assert [d[3] for d in data["data"]] == [c["completion"] for c in mine]
        assert [d[5] for d in data["data"]] == pytest.approx([c["rewards"]["length"] for c in mine])
        assert [d[7] for d in data["data"]] == pytest.approx([c["advantage"] for c in mine])


def test_grpo_reports_every_metric_to_tensorboard_and_wandb_and_resumes_without_duplicates(tiny_ckpt, tmp_path):
    out = tmp_path / "run"
    grpo(tiny_ckpt, out, 2, ["jsonl", "tensorboard", "wandb"], save_steps=1).train()
    rows = read_metrics(out / "metrics.jsonl")
    completions = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and {"loss", "reward/mean", "grad_norm"} <= set(rows[0])
    check_tensorboard(out, rows, completions)
    (run_dir,) = (out / "wandb").glob("offline-run-*")        # offline by default
    run = wandb_run(run_dir)
    assert run["exit_code"] == 0 and run["id"] == (out / "wandb" / "run_id").read_text().strip() and not run["resume"]
    assert run["config"]["learning_rate"] == 1e-2 and run["config"]["report_to"] == ["jsonl", "tensorboard", "wandb"]
    check_wandb_history(run, rows, completions, run_dir)
    assert_no_secret(out)

    # Crash after checkpoint-1: step 2 is re-run by a resumed process.
    import shutil
    shutil.rmtree(out / "checkpoint-2")
    first_rows = rows
    grpo(tiny_ckpt, out, 2, ["jsonl", "tensorboard", "wandb"], save_steps=1, resume_from_checkpoint="auto").train()
    rows = read_metrics(out / "metrics.jsonl")
    completions = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0] == first_rows[0]
    assert rows[1]["time/step"] != first_rows[1]["time/step"]   # the resumed run's own line
    check_tensorboard(out, rows, completions)                 # step 2 once, with the resumed values
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    resumed = wandb_run(runs[1])
    assert resumed["id"] == run["id"] and resumed["resume"] and resumed["exit_code"] == 0  # the same W&B run, resumed
    check_wandb_history(resumed, rows[1:], completions, runs[1])
    assert_no_secret(out)


def test_sft_reports_its_metrics_to_tensorboard(tiny_ckpt, tmp_path):
    cfg = SFTConfig(per_device_train_batch_size=2, max_steps=2, learning_rate=1e-3, output_dir=str(tmp_path),
                    disable_tqdm=True, report_to="tensorboard", preflight=False)
    items = [{**it, "target": "<answer>A</answer>"} for it in dataset()]
    SFTTrainer(tiny_model(tiny_ckpt), cfg, items, tiny_model.processor).train()
    rows = read_metrics(tmp_path / "metrics.jsonl")      # always written
    scalars, _ = tb_scalars(tmp_path / "tensorboard")
    assert set(scalars) == set(rows[0]) - {"step"} and "loss" in scalars
    for tag, events in scalars.items():
        assert events == [(r["step"], pytest.approx(r[tag], rel=2 ** -23)) for r in rows], tag
    assert not (tmp_path / "wandb").exists()


def test_writers_are_closed_when_a_step_raises(tiny_ckpt, tmp_path):
    trainer = grpo(tiny_ckpt, tmp_path, 3, ["tensorboard", "wandb"], rewards=[FailOnSecondRound()],
                   preflight=False)
    with pytest.raises(RuntimeError, match="reward backend went away"):
        trainer.train()
    import wandb
    assert wandb.run is None                                   # finished, not left open
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    run = wandb_run(run_dir)
    assert run["exit_code"] == 1 and sorted(run["history"]) == [1]
    scalars, _ = tb_scalars(tmp_path / "tensorboard")
    assert scalars["loss"][0][0] == 1 and len(scalars["loss"]) == 1
    assert scalars["loss"][0][1] == pytest.approx(read_metrics(tmp_path / "metrics.jsonl")[0]["loss"], rel=2 ** -23)


def test_nothing_is_reported_off_the_main_process(tiny_ckpt, tmp_path):
    trainer = grpo(tiny_ckpt, tmp_path, 1, "all", preflight=False)
    trainer.engine.is_main = False            # what every rank but 0 sees
    trainer.save = lambda: None               # (checkpoints are rank 0's to publish)
    assert len(trainer.train()) == 1
    assert not tmp_path.exists() or sorted(p.name for p in tmp_path.iterdir()) == []


def test_report_to_forms_and_errors():
    assert resolve_report_to("jsonl") == ["jsonl"]
    assert resolve_report_to("none") == ["jsonl"]                       # metrics.jsonl is always kept
    assert resolve_report_to(["wandb", "tensorboard"]) == ["jsonl", "tensorboard", "wandb"]
    assert resolve_report_to("all") == ["jsonl", "tensorboard", "wandb"]  # both installed (requirements.txt)
    GRPOConfig(report_to=["tensorboard", "wandb"])
    SFTConfig(report_to="none")
    for bad, why in [("tensorbord", "unknown 'tensorbord'"), (["none", "wandb"], "stand alone"),
                     (3, "a string or a list of strings")]:
        for cls in (GRPOConfig, SFTConfig):
            with pytest.raises(ValueError, match=why) as err:
                cls(report_to=bad)
            assert "report_to=" in str(err.value) and "'tensorboard', 'wandb'" in str(err.value)


@pytest.mark.parametrize("backend,module", [("wandb", "wandb"), ("tensorboard", "tensorboard")])
def test_a_missing_package_names_report_to_and_the_install(backend, module, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, module, None)           # as if not installed
    with pytest.raises(ImportError, match=rf"report_to=.*{backend}.*pip install {backend}==[0-9.]+ "
                                          rf"\(or pip install 'grpo-vlm\[{backend}\]'\)"):
        Reporter(tmp_path, ["jsonl", backend])
    with pytest.raises(ImportError, match="pip install"):
        Reporter(tmp_path, backend, enabled=False)           # every rank raises, not only rank 0
    assert backend not in resolve_report_to("all")           # "all" = the installed ones
    assert not any(tmp_path.iterdir())


def test_markdown_table_keeps_each_value_in_its_cell():
    text = markdown_table(["a", "b"], [["x | y", "1\n2 <b> \\"], [0.123456, float("nan")]])
    assert md_rows(text) == [["a", "b"], ["x | y", "1\n2 <b> \\"], ["0.1235", "nan"]]
