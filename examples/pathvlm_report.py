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
from grpo import Prediction, claim_balance, letter_baselines

NAMES = {"base": "Base", "alpha": "Alpha (SFT)", "beta": "Beta (Alpha + GRPO acc+fmt)",
         "r1": "PathVLM-R1 (Beta + process reward)", "gamma": "Gamma (Alpha + SFT on RL split)",
         "delta": "Delta (base + SFT on RL split)", "epsilon": "Epsilon (base + GRPO on RL split)"}
OOD = ("ct", "dermoscopy", "fundus", "oct")
STAGE_ORDER = ("base", "alpha", "beta", "r1")
COLOURS = {"beta": "C0", "r1": "C1", "epsilon": "C2"}


def _pct(result) -> str:
    return f"{100 * result.accuracy:.2f}" if result is not None else "—"


def _ood_mean(res: dict) -> float | None:
    vals = [res[m].accuracy for m in OOD if m in res]
    return sum(vals) / len(vals) if vals else None


def table(results: dict, process: dict | None = None) -> str:
    head = ("| Variant | In-domain (pathology) | CT | Dermoscopy | Fundus | OCT | OOD mean | Grey images | "
            "Visual reliance | Process score | Format | Reasoning tokens |")
    lines = [head, "|---|" + "---:|" * 11]
    for variant, res in results.items():
        ood = _ood_mean(res)
        test = res["test"]
        cells = [_pct(res.get(m)) for m in OOD]
        # the grey run's format rate: a model that cannot answer at all on grey images scores 0
        # there, which inflates the gap; compare the grey accuracy with the constant-letter baseline
        blank = (f"{100 * test.blank['accuracy']:.2f} (format {100 * test.blank['format_rate']:.0f} %)"
                 if test.blank else "—")
        reliance = (f"{100 * test.visual_reliance['overall']:+.2f}" if "overall" in (test.visual_reliance or {})
                    else "— (answers nothing)" if test.visual_reliance else "—")
        score = (process or {}).get(variant, {}).get("mean")
        lines.append(f"| {NAMES.get(variant, variant)} | {_pct(test)} | " + " | ".join(cells)
                     + f" | {'—' if ood is None else f'{100 * ood:.2f}'} | {blank} | {reliance}"
                     + f" | {'—' if score is None else f'{score:.3f}'} | {100 * test.format_rate:.1f} %"
                     + f" | {test.mean_reasoning_tokens:.0f} |")
    return "\n".join(lines)


def baselines_table(results: dict) -> str:
    """Per evaluation set: what chance and a constant letter would score, and the letters' spread."""
    first = next(iter(results.values()))
    lines = ["| Set | n | Chance | Best constant letter | Correct letters |", "|---|---:|---:|---:|---|"]
    for split in ["test"] + [m for m in OOD if m in first]:
        r = first[split]
        b = r.baselines
        lines.append(f"| {split} | {r.n} | {100 * b['chance']:.2f} | {b['constant_letter']} "
                     f"{100 * b['constant_letter_accuracy']:.2f} | {r.reference_letters} |")
    return "\n".join(lines)


def reliance_table(results: dict) -> str:
    """In-domain accuracy with the images / with grey images / the gap, per difficulty."""
    levels = sorted({d for res in results.values() for d in res["test"].by_difficulty})
    lines = ["| Variant | " + " | ".join(f"{d}: image / grey / gap" for d in levels) + " | answers (letters) |",
             "|---|" + "---:|" * len(levels) + "---|"]
    for variant, res in results.items():
        test = res["test"]
        cells = []
        for d in levels:
            if test.blank is None or d not in test.by_difficulty or d not in test.blank["by_difficulty"]:
                cells.append("—")
                continue
            seen, grey = test.by_difficulty[d]["accuracy"], test.blank["by_difficulty"][d]["accuracy"]
            cells.append(f"{100 * seen:.1f} / {100 * grey:.1f} / {100 * (seen - grey):+.1f}")
        lines.append(f"| {NAMES.get(variant, variant)} | " + " | ".join(cells) + f" | {test.answer_letters} |")
    return "\n".join(lines)


def agreement_table(results: dict) -> str:
    """Per variant: the share of its single-option test answers whose reasoning concludes the same
    option (``EvalResult.reasoning_agreement``), overall and per difficulty."""
    levels = sorted({d for res in results.values() for d in (res["test"].reasoning_agreement or {}).get("by_difficulty", {})})
    lines = ["| Variant | overall | " + " | ".join(levels) + " |", "|---|---:|" + "---:|" * len(levels)]
    for variant, res in results.items():
        agree = res["test"].reasoning_agreement or {}
        if not agree:
            lines.append(f"| {NAMES.get(variant, variant)} | — |" + " — |" * len(levels))
            continue
        by = agree["by_difficulty"]
        lines.append(f"| {NAMES.get(variant, variant)} | {100 * agree['overall']:.1f} (n={agree['n']}) | "
                     + " | ".join(f"{100 * by[d]:.1f}" if d in by else "—" for d in levels) + " |")
    return "\n".join(lines)


def _short(value: str) -> str:
    return value.split(" (")[0]  # "dark (hyperchromatic)" -> "dark"


def claims_table(results: dict, records: list) -> str:
    """Per variant and attribute: what the test reasoning claims (``grpo.claim_balance``) against
    the truth, and how often the claim is right. An accuracy that moves because the claims drift to
    one value (a prior) looks different here from one that moves because the attribute is read."""
    tables = {v: claim_balance(res["test"].predictions, records) for v, res in results.items()}
    subjects = sorted({s for t in tables.values() for s in t})
    if not subjects:
        return "(no test record has criteria of the form '<attribute> is <value>, not <other>')"

    def counts(d: dict, order: list[str]) -> str:
        return " / ".join(f"{_short(k)} {d[k]}" for k in order + sorted(set(d) - set(order)) if d.get(k))

    first = next(t for t in tables.values() if t)
    truth = {s: sorted(first[s]["truth"]) if s in first else [] for s in subjects}
    lines = ["| Variant | " + " | ".join(subjects) + " |", "|---|" + "---|" * len(subjects),
             "| *truth* | " + " | ".join(counts(first[s]["truth"], truth[s]) if s in first else "—"
                                         for s in subjects) + " |"]
    for v, t in tables.items():
        lines.append(f"| {NAMES.get(v, v)} | " + " | ".join(
            f"{counts(t[s]['claimed'], truth[s])}; right {100 * t[s]['right'] / t[s]['n']:.0f} %" if s in t else "—"
            for s in subjects) + " |")
    return "\n".join(lines)


def _family(record) -> str:
    extra = record.extra or {}
    return str(extra.get("task") or extra.get("difficulty") or "all")


def family_table(results: dict, records: list) -> str:
    """Per question family (``extra["task"]``, else the difficulty): each variant's test accuracy
    with the images / with grey images, next to the best a constant letter gets in that family. A
    stage whose gain in a family also appears on grey images has learnt a prior, not the image."""
    family = {r.id: _family(r) for r in records}

    def by_family(predictions: list[dict]) -> dict[str, list[Prediction]]:
        out: dict[str, list[Prediction]] = {}
        for p in (Prediction(**d) for d in predictions):
            out.setdefault(family.get(p.id, "?"), []).append(p)
        return out

    def acc(preds: list[Prediction]) -> float:
        return sum(p.correct for p in preds) / len(preds)
    first = by_family(next(iter(results.values()))["test"].predictions)
    names = sorted(first)
    lines = ["| Variant | " + " | ".join(
                 f"{f} (n={len(first[f])}, constant {100 * letter_baselines(first[f])['constant_letter_accuracy']:.0f})"
                 for f in names) + " |",
             "|---|" + "---:|" * len(names)]
    for variant, res in results.items():
        test = res["test"]
        seen = by_family(test.predictions)
        grey = by_family(test.blank["predictions"]) if test.blank else {}
        lines.append(f"| {NAMES.get(variant, variant)} | " + " | ".join(
            f"{100 * acc(seen[f]):.0f} / " + (f"{100 * acc(grey[f]):.0f}" if f in grey else "—") if f in seen else "—"
            for f in names) + " |")
    return "\n".join(lines)


def chance_row(results: dict) -> str:
    first = next(iter(results.values()))["test"]
    levels = sorted(first.baselines.get("by_difficulty", {}))
    return ", ".join(f"{d}: chance {100 * first.baselines['by_difficulty'][d]['chance']:.1f} %, constant letter "
                     f"{100 * first.baselines['by_difficulty'][d]['constant_letter_accuracy']:.1f} %" for d in levels)


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
    """Each reward separately (accuracy, format, process), KL and completion length per step for
    every GRPO stage that ran: a rising sum says nothing about accuracy unless accuracy rises."""
    plt = _pyplot()
    keys = [("reward/accuracy/mean", "accuracy reward"), ("reward/format/mean", "format reward"),
            ("reward/process/mean", "process reward"), ("kl_mean", "KL to reference"),
            ("completion/length_mean", "completion length (tokens)")]
    fig, axes = plt.subplots(1, len(keys), figsize=(19, 3.6))
    plotted = []
    for stage in ("beta", "r1", "epsilon"):
        rows = _read_metrics(out / "stages" / stage / "metrics.jsonl")
        if not rows:
            continue
        plotted.append(stage)
        for ax, (key, label) in zip(axes, keys):
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:  # raw per-step values, faint, and a 10-step running mean
                xs, ys = zip(*pts)
                colour = COLOURS[stage]  # one colour per stage in every panel
                ax.plot(xs, ys, alpha=0.25, color=colour)
                k = min(10, len(ys))
                smooth = [sum(ys[max(0, i - k + 1):i + 1]) / len(ys[max(0, i - k + 1):i + 1]) for i in range(len(ys))]
                ax.plot(xs, smooth, color=colour, label=NAMES[stage].split(" (")[0])
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


def write_report(out: Path, results: dict, parts: dict, profile: dict, process: dict | None = None,
                 validation: bool = False, same_weights: dict | None = None) -> Path:
    """``same_weights``: {variant: earlier variant} whose weights are equal bit for bit (its
    evaluation was reused, and the report says so)."""
    folder = out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    plot_accuracy(results, folder / "accuracy_by_stage.png")
    curves = plot_curves(out, folder / "training_curves.png")
    samples_html(results, list(parts["test"]), folder / "samples.html")
    stages = {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "models").glob("*/DONE.json"))}
    sizes = {k: len(v) for k, v in parts.items() if k != "ood"} | {f"ood/{m}": len(v) for m, v in parts["ood"].items()}
    base = json.loads((out / "base.json").read_text()) if (out / "base.json").is_file() else {}
    base_line = (f"Base: {base.get('path', 'the given checkpoint')}"
                 + (f", a tiny Qwen2.5-VL pretrained on {base['items']} captioned tiles for {base['steps']} steps "
                    f"(a stream no split draws from; built in {base['seconds']} s, cached)" if base.get("steps") else "")
                 + ".")
    same = "".join(f"- {NAMES.get(v, v)}: its weights are {NAMES.get(u, u)}'s, bit for bit (the stage "
                   f"changed no weight), so its evaluation is {u}'s, reused.\n"
                   for v, u in (same_weights or {}).items())
    split_name = ("the VALIDATION slice (--validate: the last part of the SFT and RL splits, held out from "
                  "training)" if validation else "the held-out test split")
    text = f"""# PathVLM-R1 reproduction report

Accuracy (%) on {split_name} (in-domain) and the out-of-domain sets, greedy decoding.
Layout as in the paper's Table 2; variants as in its Figure 3. {base_line}

- *Grey images*: the same model on the same questions with every image replaced by a uniform grey
  image of the same size (and that run's format rate); *visual reliance* = accuracy with images
  minus with grey images (points). A model that reads the images falls to about the constant-letter
  baseline on grey images; one that falls further because it stops answering at all (format near
  0 %) has its reliance overstated by the gap.
- *Process score*: the judge (integrity + knowledge) / 2 on the variant's own test completions.
- Hyper-parameters were chosen on a validation slice carved out of the SFT and RL splits
  (`--validate`), never on the test split.
{same}
{table(results, process)}

## What a model that does not read the images would score

{baselines_table(results)}

Per difficulty (test): {chance_row(results)}.

## In-domain accuracy by question difficulty

{difficulty_table(results)}

## Visual reliance by difficulty, and the letters each variant answers

{reliance_table(results)}

## Accuracy by question family, with the images and with grey images

Per family (the record's task): test accuracy (%) with the images / with every image grey. The
header gives the family's size and the best a constant letter scores in it. A gain that the grey
run shows too comes from a prior (for example always claiming mitoses "present"), not from reading.

{family_table(results, list(parts["test"]))}

## Does the answer follow from the reasoning?

Share (%) of each variant's test answers naming one option whose reasoning concludes that same
option ("So the answer is B."). An outcome reward pays for the `<answer>` tag alone, so it can
keep accuracy while the chain stops leading to the answer; the process reward pays for both.

{agreement_table(results)}

## What the reasoning claims about each attribute

Each test chain read for its claims about the attributes the answer depends on (the rubric
judge's reading: the one value asserted, *both*, or *none*), against the truth. *right*: the
share of chains claiming the true value alone. A stage that only shifts a prior shows its claims
drifting to one value while the truth stays balanced.

{claims_table(results, list(parts["test"]))}

## Plots

- `accuracy_by_stage.png`: in-domain and mean out-of-domain accuracy of every variant.
- `training_curves.png`: accuracy, format and process reward, KL and completion length per GRPO step
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
        v: {k: {"accuracy": r.accuracy, "n": r.n, "format_rate": r.format_rate, "by_difficulty": r.by_difficulty,
                "baselines": r.baselines, "answer_letters": r.answer_letters,
                "blank_accuracy": r.blank["accuracy"] if r.blank else None,
                "visual_reliance": r.visual_reliance} for k, r in res.items()}
        | {"process": (process or {}).get(v)} for v, res in results.items()}, indent=1))
    return folder / "report.md"


def _spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def write_seed_summary(out: Path, runs: dict) -> Path:
    """Mean ± std across seeds of each variant's accuracy (in-domain, per difficulty, grey-image
    control, OOD and its change against Alpha) and process score; paired differences against
    Alpha per seed, so a gain can be held against the seed spread."""
    variants = sorted({v for res in runs.values() for v in res}, key=lambda v: list(NAMES).index(v))
    levels = sorted({d for res in runs.values() for r in res.values() for d in r["test"].by_difficulty})
    process = {seed: {v: json.loads(f.read_text()) for v in variants
                      if (f := out / f"seed-{seed}" / "eval" / f"{v}.process.json").is_file()} for seed in runs}
    lines = ["| Variant | In-domain | " + " | ".join(levels) + " | Grey images | Visual reliance (easy) | "
             "Process score | Reasoning → answer | OOD mean | OOD change vs Alpha | In-domain change vs Alpha |",
             "|---|" + "---:|" * (len(levels) + 8)]
    summary = {}
    for v in variants:
        seeds = [seed for seed, res in runs.items() if v in res]
        test = {seed: runs[seed][v]["test"] for seed in seeds}
        ind = [100 * test[s].accuracy for s in seeds]
        by = {d: [100 * test[s].by_difficulty[d]["accuracy"] for s in seeds if d in test[s].by_difficulty] for d in levels}
        grey = [100 * test[s].blank["accuracy"] for s in seeds if test[s].blank]
        easy = [100 * test[s].visual_reliance["by_difficulty"].get("easy", float("nan")) for s in seeds
                if "by_difficulty" in (test[s].visual_reliance or {})]
        proc = [process[s][v]["mean"] for s in seeds if v in process[s] and process[s][v]["mean"] is not None]
        agree = [100 * test[s].reasoning_agreement["overall"] for s in seeds if test[s].reasoning_agreement]
        ood = [100 * (_ood_mean(runs[s][v]) or 0) for s in seeds]
        paired = [s for s in seeds if "alpha" in runs[s]]
        d_ood = [100 * ((_ood_mean(runs[s][v]) or 0) - (_ood_mean(runs[s]["alpha"]) or 0)) for s in paired]
        d_ind = [100 * (test[s].accuracy - runs[s]["alpha"]["test"].accuracy) for s in paired]
        summary[v] = {"in_domain": ind, "by_difficulty": by, "grey": grey, "visual_reliance_easy": easy,
                      "process": proc, "reasoning_agreement": agree, "ood": ood, "ood_change_vs_alpha": d_ood, "in_domain_change_vs_alpha": d_ind,
                      "seeds": seeds}
        cell = lambda xs: _spread(xs) if xs else "—"  # noqa: E731
        lines.append(f"| {NAMES.get(v, v)} | {cell(ind)} | " + " | ".join(cell(by[d]) for d in levels)
                     + f" | {cell(grey)} | {cell(easy)} | {cell(proc)} | {cell(agree)}"
                     + f" | {cell(ood)} | {cell(d_ood)} | {cell(d_ind)} |")
    path = out / "seed_summary.md"
    path.write_text(f"# Across seeds {sorted(runs)} (mean ± sample std)\n\n" + "\n".join(lines) + "\n\n"
                    "Changes vs Alpha are paired: the same seed's data, base and evaluation.\n")
    (out / "seed_summary.json").write_text(json.dumps(summary, indent=1))
    return path
