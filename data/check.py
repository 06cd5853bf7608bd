"""Check a dataset before training: ``python -m data.check FILE [--layout L] [--image-root DIR]``.

Loads FILE the way training would (every layout and format of :func:`data.load_dataset`), with
bad records skipped and counted rather than fatal, and prints the load report: records read and
kept, each skip reason with its count and first messages, what the filters removed, the modality
and source counts, the balance of correct answer letters, and the image sizes (min / median /
max by pixel count) with the number of image tokens each gives Qwen2.5-VL at the pixel limits
(``--min-pixels`` / ``--max-pixels``, the paper's 3,136 / 65,536 by default).

Exit status: 0 when at least one valid record remains, 1 when none does, 2 when FILE cannot be
read at all (the message names the file and the record).
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
from collections import Counter

from .loaders import load_dataset
from .prompts import IMAGE_FACTOR, MAX_PIXELS, MIN_PIXELS, smart_size
from .readers import image_size
from .records import DataError, VQADataset

# Qwen2.5-VL: 14-px patches merged 2x2, so each 28x28 block of the resized image is one token.
TOKEN_BLOCK = IMAGE_FACTOR


def image_tokens(width: int, height: int, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int, int]:
    """(resized width, resized height, image tokens) of a width x height image under Qwen2.5-VL's
    resize rule (:func:`data.prompts.smart_size`): one token per 28x28 block."""
    h, w = smart_size(height, width, min_pixels, max_pixels)
    return w, h, (h // TOKEN_BLOCK) * (w // TOKEN_BLOCK)


def _share(counter: Counter, total: int) -> str:
    return ", ".join(f"{key}={n} ({100 * n / total:.1f}%)" for key, n in
                     sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0]))))


def _median_item(items: list, key):
    ordered = sorted(items, key=key)
    return ordered[(len(ordered) - 1) // 2]


def report_lines(dataset: VQADataset, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> list[str]:
    """The printed report, line by line."""
    report = dataset.report
    lines = [f"data.check: {report.source}",
             f"records: read {report.n_read}, kept {report.n_kept}, skipped "
             f"{report.n_skipped}, filtered out {sum(report.filtered.values())}"]
    if report.skipped:
        lines.append("skipped, by reason:")
        for reason, n in sorted(report.skipped.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {reason}: {n}")
            lines += [f"    e.g. {message}" for message in report.examples_by_reason.get(reason, [])]
    if report.filtered:
        lines.append("filtered out: " + ", ".join(f"{k}={v}" for k, v in
                                                  sorted(report.filtered.items())))
    n = len(dataset)
    if not n:
        lines.append("no valid record remains")
        return lines
    lines.append("modality: " + _share(Counter(r.modality for r in dataset), n))
    lines.append("source: " + _share(Counter(r.source for r in dataset), n))
    choice = [r for r in dataset if r.options]
    if choice:
        letters = Counter(r.answer_letter or "none" for r in choice)
        options = Counter(len(r.options) for r in choice)
        lines.append(f"answer letters ({len(choice)} multiple-choice): "
                     + _share(letters, len(choice)))
        lines.append("options per question: " + ", ".join(f"{k}: {v}" for k, v in
                                                         sorted(options.items())))
    lines.append(f"open questions: {n - len(choice)}")
    lines += _image_lines(dataset, min_pixels, max_pixels)
    return lines


def _image_lines(dataset: VQADataset, min_pixels: int, max_pixels: int) -> list[str]:
    sizes: dict[str, tuple[int, int]] = {}
    unreadable = 0
    for record in dataset:
        for path in record.images:
            if path not in sizes:
                try:
                    sizes[path] = image_size(path)
                except (OSError, ValueError, SyntaxError):
                    unreadable += 1
    per_record = Counter(len(r.images) for r in dataset)
    lines = [f"images: {len(sizes)} distinct; per record: "
             + ", ".join(f"{k}: {v}" for k, v in sorted(per_record.items()))]
    if unreadable:
        lines.append(f"images whose size could not be read: {unreadable} (load with "
                     "--check-images open to name them)")
    if not sizes:
        return lines
    lines.append(f"image sizes (width x height) -> resized -> tokens, at min_pixels="
                 f"{min_pixels}, max_pixels={max_pixels}:")
    tokens = {}
    for path, (w, h) in sizes.items():
        try:
            tokens[path] = image_tokens(w, h, min_pixels, max_pixels)
        except ValueError as exc:  # aspect ratio beyond Qwen2.5-VL's limit
            lines.append(f"  {path}: {w}x{h}: {exc}")
    area = lambda path: (sizes[path][0] * sizes[path][1], path)  # noqa: E731
    ordered = sorted(tokens, key=area)
    if not ordered:
        return lines
    for name, path in (("min", ordered[0]), ("median", _median_item(ordered, area)),
                       ("max", ordered[-1])):
        (w, h), (rw, rh, t) = sizes[path], tokens[path]
        lines.append(f"  {name:<6} {w}x{h} -> {rw}x{rh} = {t} tokens")
    per = [sum(tokens[p][2] for p in r.images if p in tokens) for r in dataset]
    lines.append(f"image tokens per record: min {min(per)}, median "
                 f"{statistics.median(per):g}, max {max(per)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.check", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="data file, OmniMedVQA root, or folder of JSON files")
    parser.add_argument("--layout", default="auto", help="layout (default: auto-detect)")
    parser.add_argument("--image-root", default=None, help="folder relative image paths "
                        "start from (default: the layout's usual root)")
    parser.add_argument("--min-pixels", type=int, default=MIN_PIXELS,
                        help=f"Qwen2.5-VL min_pixels (default {MIN_PIXELS})")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                        help=f"Qwen2.5-VL max_pixels (default {MAX_PIXELS})")
    parser.add_argument("--check-images", default="open", choices=("open", "exists", "none"))
    parser.add_argument("--unknown-columns", default="error", choices=("error", "extra",
                                                                       "ignore"))
    parser.add_argument("--allow-outside-root", action="store_true",
                        help="follow relative image paths that leave --image-root")
    parser.add_argument("--split", default=None, help="keep only this split")
    parser.add_argument("--modality", action="append", default=None,
                        help="keep only this modality (repeatable)")
    parser.add_argument("--source", action="append", default=None,
                        help="keep only this source dataset (repeatable)")
    args = parser.parse_args(argv)
    logging.getLogger("data.loaders").setLevel(logging.ERROR)  # the report below says it all
    try:
        smart_size(28, 28, args.min_pixels, args.max_pixels)  # refuse impossible limits early
        dataset = load_dataset(args.file, layout=args.layout, image_root=args.image_root,
                               skip_invalid=True, check_images=args.check_images,
                               unknown_columns=args.unknown_columns,
                               allow_outside_root=args.allow_outside_root, split=args.split,
                               modality=args.modality, source=args.source, allow_empty=True)
    except (DataError, FileNotFoundError, ValueError) as exc:
        print(f"data.check: cannot load {args.file}: {exc}", file=sys.stderr)
        return 2
    print("\n".join(report_lines(dataset, args.min_pixels, args.max_pixels)))
    return 0 if len(dataset) else 1


if __name__ == "__main__":
    sys.exit(main())
