"""Where a run's metrics go: ``TrainingConfig.report_to`` (TRL's field, TRL's forms).

A :class:`Reporter` fans every logged step out to its backends, on the main process only:

* ``metrics.jsonl`` (:class:`grpo.metrics.MetricsLog`): always written. It is the library's own
  record: the examples' report, the tests and resume read it. ``"jsonl"`` (the default) names it
  explicitly; ``"none"`` means nothing besides it.
* ``"tensorboard"``: ``torch.utils.tensorboard`` event files in ``output_dir/tensorboard``; every
  metric as a scalar, the config as text, tables (GRPO's sample completions) as markdown text.
* ``"wandb"``: a Weights & Biases run with its files in ``output_dir/wandb``, offline unless
  ``WANDB_MODE`` says otherwise (``wandb sync output_dir/wandb/offline-run-*`` uploads it later);
  every metric at ``step=`` the optimizer step, the config as the run's config, tables as
  ``wandb.Table``.

``report_to`` is a name, a list of names, ``"all"`` (metrics.jsonl and every installed
integration) or ``"none"``. tensorboard and wandb are optional extras (``pip install
'grpo-vlm[tensorboard]'``, ``'grpo-vlm[wandb]'``), imported only when chosen.

Resume (``resume_step`` = the checkpoint's step k; None = a fresh run), so that each step is
reported once: metrics.jsonl drops its lines after k; TensorBoard opens its writer with
``purge_step = k + 1`` (a fresh run: 0), so TensorBoard hides every older event from that step on;
W&B resumes the run whose id is stored in ``output_dir/wandb/run_id`` (``resume="allow"``), a
fresh run starts a new id. W&B keeps what a killed process logged after step k (W&B has no
offline way to drop history): those steps may appear twice in it; metrics.jsonl and TensorBoard
are exact.

Only the config is sent as hyperparameters; it holds the names of the environment variables that
hold keys, never their values. The W&B run is made without console capture, system metadata,
code, git or requirements snapshots.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import re
import secrets
import sys
from pathlib import Path

from .config import REPORT_BACKENDS
from .metrics import MetricsLog

log = logging.getLogger("grpo")

INTEGRATIONS = tuple(b for b in REPORT_BACKENDS if b != "jsonl")   # optional packages
_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb"}           # backend -> import name
_PIN = {"tensorboard": "tensorboard==2.21.0", "wandb": "wandb==0.31.0"}  # as in requirements.txt
_ALLOWED = REPORT_BACKENDS + ("all", "none")


def report_to_errors(value) -> list[str]:
    """Problems with a ``report_to`` value (for the config's validation), each naming the field
    and the allowed values."""
    allowed = ", ".join(repr(v) for v in _ALLOWED)
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        return [f"report_to={value!r}: give a string or a list of strings from {allowed}"]
    bad = [n for n in names if n not in _ALLOWED]
    if bad:
        return [f"report_to={value!r}: unknown {', '.join(map(repr, bad))}; allowed: {allowed} "
                f"(metrics.jsonl is always written)"]
    if len(names) > 1 and ({"all", "none"} & set(names)):
        return [f"report_to={value!r}: 'all' and 'none' stand alone; give report_to='all', 'none' "
                f"or a list of {', '.join(map(repr, REPORT_BACKENDS))}"]
    return []


def installed(backend: str) -> bool:
    """Whether ``backend``'s package is installed (looked up, not imported)."""
    name = _PACKAGE[backend]
    if name in sys.modules:  # already imported (or None: marked missing)
        return sys.modules[name] is not None
    return importlib.util.find_spec(name) is not None


def resolve_report_to(value) -> list[str]:
    """The backends ``value`` selects, in :data:`REPORT_BACKENDS` order, always with "jsonl"."""
    errors = report_to_errors(value)
    if errors:
        raise ValueError(errors[0])
    names = {value} if isinstance(value, str) else set(value)
    if "all" in names:
        names = {"jsonl", *(b for b in INTEGRATIONS if installed(b))}
    return [b for b in REPORT_BACKENDS if b in names or b == "jsonl"]


def install_hint(backend: str) -> str:
    return (f"pip install {_PIN[backend]} (or pip install 'grpo-vlm[{backend}]'), "
            f"or remove {backend!r} from report_to")


def require_backends(value) -> list[str]:
    """The selected backends, after checking that their packages are installed (without importing
    them): an ImportError naming ``report_to`` and the ``pip install`` to run otherwise."""
    backends = resolve_report_to(value)
    for b in backends:
        if b != "jsonl" and not installed(b):
            raise ImportError(f"report_to={value!r} includes {b!r}, but the {_PACKAGE[b]} package is not "
                              f"installed: {install_hint(b)}")
    return backends


def _import(backend: str):
    try:
        if backend == "tensorboard":
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
            from torch.utils.tensorboard import SummaryWriter
            return SummaryWriter
        import wandb
        return wandb
    except ImportError as err:
        raise ImportError(f"report_to includes {backend!r}, but importing it failed ({err}): "
                          f"{install_hint(backend)}") from err


def _config_dict(config) -> dict:
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    # one JSON round trip: what is logged is exactly what a checkpoint's trainer_state holds
    return json.loads(json.dumps(dict(config or {}), default=str))


def finite_or_none(value: float):
    """A number for a JSON file: NaN/inf (an abstained reward) as None (null)."""
    return value if math.isfinite(value) else None


def prompt_text(messages) -> str:
    """The text of a prompt's last user message (images as "[image]"), for completion tables."""
    users = [m for m in messages or [] if isinstance(m, dict) and m.get("role") == "user"]
    content = users[-1].get("content", "") if users else ""
    if isinstance(content, str):
        return content
    parts = [p.get("text", "") if p.get("type") == "text" else f"[{p.get('type', 'part')}]"
             for p in content if isinstance(p, dict)]
    return " ".join(p for p in parts if p)


def markdown_table(columns: list[str], rows: list[list]) -> str:
    """A GitHub-style markdown table (TensorBoard's text plugin renders it). Each value stays in
    its cell and reads as written: HTML characters as entities, backslashes and pipes escaped,
    line breaks as <br>; floats with 4 significant digits."""
    def cell(v):
        if v is None:
            return ""
        if isinstance(v, float):
            v = "nan" if math.isnan(v) else f"{v:.4g}"
        v = str(v).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        return re.sub(r"\r\n|\r|\n", "<br>", v.replace("\\", "\\\\").replace("|", "\\|"))
    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class TensorBoardBackend:
    def __init__(self, log_dir: Path, config: dict, resume_step: int | None):
        SummaryWriter = _import("tensorboard")
        start = resume_step if resume_step is not None else -1
        # purge_step: TensorBoard hides older events of step >= purge_step (see the module doc)
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start + 1)
        self.writer.add_text("config", "```json\n" + json.dumps(config, indent=2) + "\n```", max(start, 0))

    def log_metrics(self, step: int, metrics: dict) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)):  # every metric the trainers log (NaN included)
                self.writer.add_scalar(k, float(v), step)
        self.writer.flush()

    def log_table(self, step: int, name: str, columns: list[str], rows: list[list]) -> None:
        self.writer.add_text(name, markdown_table(columns, rows), step)
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbBackend:
    def __init__(self, output_dir: Path, config: dict, resume_step: int | None):
        wandb = self.wandb = _import("wandb")
        folder = output_dir / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / "run_id"
        run_id = id_file.read_text().strip() if resume_step is not None and id_file.exists() else None
        resumed = run_id is not None
        run_id = run_id or secrets.token_hex(4)  # W&B ids: lowercase letters and digits
        id_file.write_text(run_id + "\n")
        settings = wandb.Settings(console="off", save_code=False, disable_git=True, x_disable_stats=True,
                                  x_disable_meta=True, x_save_requirements=False, silent=True)
        self.run = wandb.init(dir=str(output_dir), id=run_id, resume="allow" if resumed else None,
                              mode=os.environ.get("WANDB_MODE") or "offline",
                              project=os.environ.get("WANDB_PROJECT") or "grpo-vlm",
                              name=os.environ.get("WANDB_NAME") or output_dir.name,
                              config=config, settings=settings, reinit="create_new")

    def log_metrics(self, step: int, metrics: dict) -> None:
        self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def log_table(self, step: int, name: str, columns: list[str], rows: list[list]) -> None:
        self.run.log({name: self.wandb.Table(columns=list(columns), data=[list(r) for r in rows])}, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class Reporter:
    """Fans metrics and tables out to the backends of ``report_to``; does nothing (imports and
    writes nothing) when ``enabled`` is False (the processes other than the main one).

    ``queue_table`` keeps a table (the latest per name) until the next ``log_metrics``, which
    sends it at that step: tables thus land at the logging steps."""

    def __init__(self, output_dir: str | Path, report_to="jsonl", config=None,
                 resume_step: int | None = None, enabled: bool = True):
        self.enabled, self.backends, self._tables = enabled, [], {}
        self.names = require_backends(report_to)
        if not enabled:
            return
        output_dir = Path(output_dir)
        cfg = _config_dict(config)
        try:
            for name in self.names:
                if name == "jsonl":
                    self.backends.append(MetricsLog(output_dir / "metrics.jsonl", resume_step=resume_step))
                elif name == "tensorboard":
                    self.backends.append(TensorBoardBackend(output_dir / "tensorboard", cfg, resume_step))
                elif name == "wandb":
                    self.backends.append(WandbBackend(output_dir, cfg, resume_step))
        except BaseException:
            self.close(failed=True)
            raise

    def log_metrics(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        for b in self.backends:
            b.log_metrics(step, metrics)
        tables, self._tables = self._tables, {}
        for name, (columns, rows) in tables.items():
            for b in self.backends:
                b.log_table(step, name, columns, rows)

    def queue_table(self, name: str, columns: list[str], rows: list[list]) -> None:
        if self.enabled and self.backends:
            self._tables[name] = (list(columns), [list(r) for r in rows])

    def close(self, failed: bool = False) -> None:
        """Flush and close every backend (each one even when another fails). ``failed``: the run
        stopped on an exception; a close error is then only logged, never raised over it."""
        first = None
        backends, self.backends = self.backends, []
        for b in backends:
            try:
                b.close(failed)
            except Exception as err:
                log.warning("closing the %s report failed: %s", type(b).__name__, err)
                first = first or err
        if first is not None and not failed:
            raise first

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(failed=exc_type is not None)
        return False
