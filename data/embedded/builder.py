"""Builds the embedded default dataset: procedural pathology tiles, OOD sets, real package images.

Everything is generated offline, deterministically for a seed, and cached as PNG files plus one
JSONL per part under ``<cache>/<EMBEDDED_VERSION>-<seed>/``. ``<cache>`` is ``cache_dir`` if
given, else ``$GRPO_VLM_CACHE/embedded``, else ``~/.cache/grpo-vlm/embedded``. A cache holding
fewer items than asked is extended (items are generated independently per index, so the first n
never change).
"""
from __future__ import annotations

import json
import logging
import os

from ..records import LoadReport, VQADataset, VQARecord
from ..splits import PAPER_SIZES, split_records
from .assets import ASSETS, AssetMissingError, export_image, locate
from .ood import OOD_MODALITIES, generate_ood_item
from .tiles import GENERATOR_VERSION, PathologyConfig, generate_caption_item, generate_item

log = logging.getLogger(__name__)
EMBEDDED_VERSION = f"v1{GENERATOR_VERSION}"
DEFAULT_OOD_N = 100  # procedural items per OOD modality
PARTS = ("pathology", "ood", "real")


def cache_path(seed: int = 42, cache_dir: str | None = None) -> str:
    base = cache_dir or os.path.join(os.environ.get("GRPO_VLM_CACHE") or
                                     os.path.join("~", ".cache", "grpo-vlm"), "embedded")
    return os.path.join(os.path.abspath(os.path.expanduser(base)), f"{EMBEDDED_VERSION}-{seed}")


def _cached(folder: str, name: str, n: int, make) -> list[VQARecord]:
    """First ``n`` records of part ``name``: read from ``<folder>/<name>.jsonl`` and extended with
    ``make(index, folder) -> VQARecord`` (image paths stored relative to ``folder``)."""
    os.makedirs(os.path.join(folder, name), exist_ok=True)
    index_file = os.path.join(folder, f"{name}.jsonl")
    rows = []
    if os.path.exists(index_file):
        with open(index_file, encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
    rows = [r for r in rows if all(os.path.isfile(os.path.join(folder, p)) for p in r["images"])]
    if len(rows) < n:
        rows += [json.loads(make(i, folder).to_json()) for i in range(len(rows), n)]
        with open(index_file + ".tmp", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        os.replace(index_file + ".tmp", index_file)  # atomic: a reader never sees half a file
    records = []
    for row in rows[:n]:
        record = VQARecord.from_dict(row)
        record.images = [os.path.join(folder, p) for p in record.images]
        records.append(record)
    return records


def _save(image, folder: str, relative: str) -> str:
    target = os.path.join(folder, relative)
    image.save(target + ".tmp.png", compress_level=1)  # fast; these are small tiles
    os.replace(target + ".tmp.png", target)
    return relative


def _pathology_maker(seed: int, config: PathologyConfig):
    def make(index: int, folder: str) -> VQARecord:
        image, item, truth, meta = generate_item(seed, index, config)
        relative = _save(image, folder, f"pathology/{index:05d}.png")
        return VQARecord(id=f"emb-path-{seed}-{index:05d}", images=[relative], modality="pathology",
                         source="embedded-pathology", **item,
                         extra={"synthetic": True, **meta, "truth": truth,
                                "generator": GENERATOR_VERSION, "seed": seed})
    return make


def _ood_maker(seed: int, modality: str):
    def make(index: int, folder: str) -> VQARecord:
        image, item, truth = generate_ood_item(modality, seed, index)
        relative = _save(image, folder, f"ood-{modality}/{index:04d}.png")
        return VQARecord(id=f"emb-{modality}-{seed}-{index:04d}", images=[relative],
                         modality=modality, source=f"embedded-{modality}", **item,
                         extra={"synthetic": True, **truth, "seed": seed})
    return make


def real_records(folder: str, modalities=None, report: LoadReport | None = None):
    """Records for the package-shipped images (optionally only some modalities).

    A missing package raises :class:`AssetMissingError`, or, when ``report`` is given, its
    questions are counted in ``report.skipped["asset_missing"]`` and a warning names the
    package to install."""
    os.makedirs(os.path.join(folder, "real"), exist_ok=True)
    records = []
    for asset in ASSETS:
        if modalities is not None and asset.modality not in modalities:
            continue
        relative = f"real/{asset.key}.png"
        facts = {"package": asset.package, "version": asset.version, "file": asset.file}
        try:
            locate(asset)  # also when cached: the data must stay reproducible from the package
            if not os.path.isfile(os.path.join(folder, relative)):
                facts = {**facts, **export_image(asset, os.path.join(folder, relative))}
        except AssetMissingError as error:
            if report is None:
                raise
            report.skipped["asset_missing"] += len(asset.questions)
            log.warning("embedded: %d real-image question(s) left out: %s",
                        len(asset.questions), error)
            continue
        for number, (question, options, answer, criteria) in enumerate(asset.questions):
            records.append(VQARecord(
                id=f"emb-real-{asset.key}-{number}", images=[os.path.join(folder, relative)],
                question=question, options=list(options), answer=answer,
                modality=asset.modality, source=f"{asset.package}:{asset.key}",
                criteria=list(criteria), extra={"synthetic": False, "asset": facts}))
    return records


def load_embedded(part: str = "pathology", seed: int = 42, cache_dir: str | None = None,
                  n: int | None = None, config: PathologyConfig = PathologyConfig(),
                  include_real: bool = True) -> VQADataset:
    """One part of the embedded dataset.

    * ``"pathology"``: ``n`` procedural tiles (default 5,385 = the paper's 3,000 + 1,000 + 1,385);
    * ``"ood"``: ``n`` procedural items per modality (default 100) for CT, dermoscopy, fundus and
      OCT, plus the real CT and fundus images when their packages are installed (if not, the
      report counts them under ``skipped["asset_missing"]`` and a warning names the package);
    * ``"real"``: only the package-shipped images (pathology, fundus, CT, MRI, ultrasound);
      raises :class:`data.embedded.AssetMissingError` if a package is missing.
    """
    if part not in PARTS:
        raise ValueError(f"unknown embedded part {part!r}; choose one of {PARTS}")
    folder = cache_path(seed, cache_dir)
    report = LoadReport(source=f"embedded:{part} ({folder})")
    if part == "pathology":
        records = _cached(folder, "pathology", sum(PAPER_SIZES.values()) if n is None else n,
                          _pathology_maker(seed, config))
    elif part == "real":
        records = real_records(folder)
    else:
        records = []
        for modality in OOD_MODALITIES:
            records += _cached(folder, f"ood-{modality}", DEFAULT_OOD_N if n is None else n,
                               _ood_maker(seed, modality))
        if include_real:
            records += real_records(folder, OOD_MODALITIES, report)
    report.n_read = report.n_kept = len(records)
    report.n_read += report.n_skipped
    return VQADataset(records, report)


def embedded_splits(seed: int = 42, sizes=None, cache_dir: str | None = None,
                    ood_n: int | None = None, include_real: bool = True) -> dict:
    """{"sft", "rl", "test": pathology splits, "ood": {modality: records}}.

    ``sizes``: counts per split (default the paper's 3,000 / 1,000 / 1,385), e.g. ``(30, 10,
    14)`` for a quick run; exactly ``sum(sizes)`` tiles are generated, so the splits partition
    them (one question per image, hence image-disjoint)."""
    counts = dict(zip(PAPER_SIZES, sizes)) if sizes is not None else dict(PAPER_SIZES)
    pathology = load_embedded("pathology", seed, cache_dir, n=sum(counts.values()))
    splits = split_records(pathology, counts, seed)
    ood = load_embedded("ood", seed, cache_dir, n=ood_n, include_real=include_real)
    by_modality = {m: [] for m in OOD_MODALITIES}
    for record in ood:
        by_modality[record.modality].append(VQARecord(**{**record.__dict__, "split": "ood"}))
    return {**splits, "ood": by_modality}


CAPTION_PROMPT = "Describe the nuclei in this H&E tile."


def caption_items(seed: int = 42, n: int = 2400, config: PathologyConfig = PathologyConfig()) -> list[dict]:
    """``n`` image-caption pairs for pretraining a base model to see, as trainer items
    (``{"messages", "images", "target"}``): a tile from the pretraining stream
    (:func:`~data.embedded.tiles.generate_caption_item`, disjoint from every split's tiles) and a
    plain description of it. No system prompt, no options, no ``<think>``/``<answer>`` format: what
    a pretrained VLM knows before the paper's SFT stage, not the task itself."""
    items = []
    for index in range(n):
        image, text, _ = generate_caption_item(seed, index, config)
        items.append({"messages": [{"role": "user", "content": [{"type": "image"},
                                                               {"type": "text", "text": CAPTION_PROMPT}]}],
                      "images": [image], "target": text, "id": f"caption-{seed}-{index:05d}"})
    return items
