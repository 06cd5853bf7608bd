"""The PathVLM-R1 report: a markdown table laid out like the paper's, PNG plots, and an HTML page
of test images with every variant's reasoning and answer side by side."""
from __future__ import annotations

import base64
import html
import io
import json
import statistics
from pathlib import Path

import data

NAMES = {"base": "Base", "alpha": "Alpha (SFT)", "beta": "Beta (Alpha + GRPO acc+fmt)",
         "r1": "PathVLM-R1 (Beta + process reward)", "gamma": "Gamma (Alpha + SFT on RL split)",
         "delta": "Delta (base + SFT on RL split)", "epsilon": "Epsilon (base + GRPO on RL split)"}
OOD = ("ct", "dermoscopy", "fundus", "oct")
STAGE_ORDER = ("base", "alpha", "beta", "r1")


def _pct(result) -> str:
    return f"{100 * result.accuracy:.2f}" if result is not None else "—"


def _ood_mean(res: dict) -> float | None:
    vals = [res[m].accuracy for m in OOD if m in res]
    return sum(vals) / len(vals) if vals else None


def table(results: dict) -> str:
    head = "| Variant | In-domain (pathology) | CT | Dermoscopy | Fundus | OCT | OOD mean | Format | Reasoning tokens |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for variant, res in results.items():
        ood = _ood_mean(res)
        test = res["test"]
        cells = [_pct(res.get(m)) for m in OOD]
        lines.append(f"| {NAMES.get(variant, variant)} | {_pct(test)} | " + " | ".join(cells)
                     + f" | {'—' if ood is None else f'{100 * ood:.2f}'} | {100 * test.format_rate:.1f} %"
                     + f" | {test.mean_reasoning_tokens:.0f} |")
    return "\n".join(lines)


def difficulty_table(results: dict) -> str:
    levels = sorted({d for res in results.values() for d in res["test"].by_difficulty})
    lines = ["| Variant | " + " | ".join(levels) + " |", "|---|" + "---:|" * len(levels)]
    for variant, res in results.items():
        by = res["test"].by_difficulty
        lines.append(f"| {NAMES.get(variant, variant)} | " + " | ".join(
            f"{100 * by[d]['accuracy']:.1f} (n={by[d]['n']})" if d in by else "—" for d in levels) + " |")
    return "\n".join(lines)


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _pyplot():
    """matplotlib's pyplot on the file-only Agg back-end (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy(results: dict, path: Path) -> None:
    plt = _pyplot()
    variants = list(results)
    ind = [100 * results[v]["test"].accuracy for v in variants]
    ood = [100 * (_ood_mean(results[v]) or 0) for v in variants]
    fig, ax = plt.subplots(figsize=(9, 4))
    xs = range(len(variants))
    ax.bar([x - 0.2 for x in xs], ind, width=0.4, label="in-domain (pathology test)")
    ax.bar([x + 0.2 for x in xs], ood, width=0.4, label="out-of-domain mean")
    ax.set_xticks(list(xs), [NAMES.get(v, v).split(" (")[0] for v in variants])
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy by variant (stage-wise training, paper Fig. 3/4)")
    ax.legend()
    _save(plt, fig, path)


def plot_curves(out: Path, path: Path) -> list[str]:
    """Reward / KL / completion length per step for every GRPO stage that ran."""
    plt = _pyplot()
    keys = [("reward/mean", "mean reward"), ("kl_mean", "KL to reference"),
            ("completion/length_mean", "completion length (tokens)"), ("reward/process/mean", "process reward")]
    fig, axes = plt.subplots(1, len(keys), figsize=(16, 3.6))
    plotted = []
    for stage in ("beta", "r1", "epsilon"):
        rows = _read_metrics(out / "stages" / stage / "metrics.jsonl")
        if not rows:
            continue
        plotted.append(stage)
        for ax, (key, label) in zip(axes, keys):
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=NAMES[stage].split(" (")[0])
            ax.set_title(label)
            ax.set_xlabel("step")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=8)
    _save(plt, fig, path)
    return plotted


def _thumbnail(path: str) -> str:
    im = data.read_image(path)
    im.thumbnail((160, 160))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def samples_html(results: dict, records: list, path: Path, n: int = 12) -> None:
    """Test images with each variant's reasoning and answer side by side (self-contained HTML)."""
    by_variant = {v: {p["id"]: p for p in res["test"].predictions} for v, res in results.items()}
    rows = []
    for record in records[:n]:
        options = "".join(f"<li>{chr(65 + i)}. {html.escape(o)}</li>" for i, o in enumerate(record.options or []))
        cells = []
        for variant in results:
            pred = by_variant[variant].get(record.id)
            if pred is None:
                cells.append("<td>—</td>")
                continue
            mark = "✓" if pred["correct"] else "✗"
            cells.append(f"<td class='{'ok' if pred['correct'] else 'bad'}'><b>{mark}</b> "
                         f"<pre>{html.escape(pred['completion'])}</pre></td>")
        rows.append(f"<tr><td><img src='{_thumbnail(record.images[0])}'><br><small>{html.escape(record.id)}</small></td>"
                    f"<td>{html.escape(record.question)}<ul>{options}</ul>"
                    f"<b>reference:</b> {html.escape(record.answer)}</td>{''.join(cells)}</tr>")
    head = "".join(f"<th>{html.escape(NAMES.get(v, v))}</th>" for v in results)
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>PathVLM-R1 samples</title>
<style>body{{font-family:sans-serif}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;
padding:4px;vertical-align:top;max-width:320px}} pre{{white-space:pre-wrap;font-size:11px}}
td.ok{{background:#eefbea}} td.bad{{background:#fdeeee}} ul{{padding-left:16px;margin:4px 0}}</style></head>
<body><h1>PathVLM-R1: test answers by variant</h1><table><tr><th>image</th><th>question</th>{head}</tr>
{''.join(rows)}</table></body></html>""")


def write_report(out: Path, results: dict, parts: dict, profile: dict) -> Path:
    folder = out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    plot_accuracy(results, folder / "accuracy_by_stage.png")
    curves = plot_curves(out, folder / "training_curves.png")
    samples_html(results, list(parts["test"]), folder / "samples.html")
    stages = {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "models").glob("*/DONE.json"))}
    sizes = {k: len(v) for k, v in parts.items() if k != "ood"} | {f"ood/{m}": len(v) for m, v in parts["ood"].items()}
    text = f"""# PathVLM-R1 reproduction report

Accuracy (%) on the held-out test split (in-domain) and the out-of-domain sets, greedy decoding.
Layout as in the paper's Table 2; variants as in its Figure 3.

{table(results)}

## In-domain accuracy by question difficulty

{difficulty_table(results)}

## Plots

- `accuracy_by_stage.png`: in-domain and mean out-of-domain accuracy of every variant.
- `training_curves.png`: mean reward, KL, completion length and process reward per GRPO step
  (stages: {', '.join(curves) or 'none ran'}).
- `samples.html`: test images with every variant's reasoning and answer.

![accuracy](accuracy_by_stage.png)

![curves](training_curves.png)

## Run

Split sizes: {json.dumps(sizes)}

Hyper-parameters: `{json.dumps(profile)}`

Stages: `{json.dumps(stages)}`
"""
    (folder / "report.md").write_text(text)
    (folder / "results.json").write_text(json.dumps({
        v: {k: {"accuracy": r.accuracy, "n": r.n, "format_rate": r.format_rate} for k, r in res.items()}
        for v, res in results.items()}, indent=1))
    return folder / "report.md"


def write_seed_summary(out: Path, runs: dict) -> Path:
    """Mean and spread (min..max, std) of each variant's accuracy across seeds."""
    variants = sorted({v for res in runs.values() for v in res}, key=lambda v: list(NAMES).index(v))
    lines = ["| Variant | In-domain mean ± std | min..max | OOD mean ± std |", "|---|---:|---:|---:|"]
    summary = {}
    for v in variants:
        ind = [100 * res[v]["test"].accuracy for res in runs.values() if v in res]
        ood = [100 * (_ood_mean(res[v]) or 0) for res in runs.values() if v in res]
        sd = statistics.stdev(ind) if len(ind) > 1 else 0.0
        sd_ood = statistics.stdev(ood) if len(ood) > 1 else 0.0
        summary[v] = {"in_domain": ind, "ood": ood}
        lines.append(f"| {NAMES.get(v, v)} | {statistics.mean(ind):.2f} ± {sd:.2f} | {min(ind):.2f}..{max(ind):.2f}"
                     f" | {statistics.mean(ood):.2f} ± {sd_ood:.2f} |")
    path = out / "seed_summary.md"
    path.write_text(f"# Accuracy across seeds {sorted(runs)}\n\n" + "\n".join(lines) + "\n")
    (out / "seed_summary.json").write_text(json.dumps(summary, indent=1))
    return path
