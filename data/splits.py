"""Seeded, disjoint, image-disjoint splits and content-hash manifests.

PathVLM-R1 trains SFT on 3,000 questions, GRPO on 1,000 and tests on 1,385 (:data:`PAPER_SIZES`).
Records that share an image always land in the same split (otherwise a model could be tested on
an image it was trained on), so records are grouped by image before they are dealt out.
"""
from __future__ import annotations

import json
import math
import os
import random
from dataclasses import asdict

from .readers import file_sha256, sha256_hex
from .records import VQARecord

PAPER_SIZES = {"sft": 3000, "rl": 1000, "test": 1385}
MANIFEST_VERSION = 1


def paper_fractions() -> dict[str, float]:
    total = sum(PAPER_SIZES.values())
    return {name: size / total for name, size in PAPER_SIZES.items()}


def _as_counts(sizes, n: int) -> dict[str, int]:
    """Counts per split from counts, fractions (floats summing to <= 1) or None (paper sizes,
    or paper proportions when there are fewer than 5,385 records)."""
    if sizes is None:
        sizes = PAPER_SIZES if n >= sum(PAPER_SIZES.values()) else paper_fractions()
    if not isinstance(sizes, dict):
        names = list(PAPER_SIZES) if len(sizes) == 3 else [f"split{i}" for i in range(len(sizes))]
        sizes = dict(zip(names, sizes))
    values = list(sizes.values())
    if any(v < 0 for v in values):
        raise ValueError(f"split sizes must be non-negative, got {sizes}")
    if all(isinstance(v, float) for v in values):
        if sum(values) > 1 + 1e-9:
            raise ValueError(f"split fractions sum to {sum(values):.3f} > 1: {sizes}")
        counts = {k: math.floor(v * n) for k, v in sizes.items()}
        if abs(sum(values) - 1) < 1e-9:  # fractions covering everything: rounding leftovers
            last = list(counts)[-1]      # go to the last split so no record is lost
            counts[last] += n - sum(counts.values())
        return counts
    counts = {k: int(v) for k, v in sizes.items()}
    if sum(counts.values()) > n:
        raise ValueError(f"split sizes {counts} need {sum(counts.values())} records, only {n} "
                         "given; pass smaller sizes or fractions")
    return counts


def image_groups(records: list[VQARecord]) -> list[list[VQARecord]]:
    """Connected groups of records that share any image (union-find over image paths)."""
    parent: dict[str, str] = {}

    def find(key):
        while parent.setdefault(key, key) != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    for index, record in enumerate(records):
        keys = [f"img:{os.path.realpath(p)}" for p in record.images] or [f"rec:{index}"]
        for key in keys[1:]:
            parent[find(key)] = find(keys[0])
    groups: dict[str, list[VQARecord]] = {}
    for index, record in enumerate(records):
        first = record.images[0] if record.images else None
        root = find(f"img:{os.path.realpath(first)}" if first else f"rec:{index}")
        groups.setdefault(root, []).append(record)
    return list(groups.values())


def split_records(records: list[VQARecord], sizes=None, seed: int = 42) -> dict[str, list]:
    """Deal records into named splits, seeded and image-disjoint.

    ``records``: :class:`VQARecord` objects, or a Hugging Face ``datasets.Dataset`` (converted
    through the layouts by :func:`data.as_records`). ``sizes``: a dict ``{name: count}``, a
    tuple of counts (3 counts are named sft/rl/test), fractions summing to at most 1, or None
    (paper sizes or proportions). Records that share any image (every image of a record counts)
    form one group; groups are shuffled with ``seed`` and each is put in the first split that
    still has room for all of it; with one record per image the counts are exact. Each returned
    record is a copy with ``split`` set to its split's name; the input is not modified.
    """
    from .convert import as_records
    records = as_records(records)
    wrong = next((r for r in records if not isinstance(r, VQARecord)), None)
    if wrong is not None:
        raise TypeError(f"split_records needs data.VQARecord items (it groups them by their "
                        f"image paths), got {type(wrong).__name__}; load the data with "
                        "data.load_dataset")
    counts = _as_counts(sizes, len(records))
    groups = image_groups(sorted(records, key=lambda r: r.id))  # input order must not matter
    random.Random(seed).shuffle(groups)
    out: dict[str, list] = {name: [] for name in counts}
    for group in groups:
        for name, count in counts.items():
            if len(out[name]) + len(group) <= count:
                out[name].extend(VQARecord(**{**asdict(r), "split": name}) for r in group)
                break
    return out


def record_sha256(record: VQARecord, image_hashes: list[str]) -> str:
    """Hash of the record's content with images replaced by their bytes' hashes, so the same data
    at a different path (another machine, another cache dir) hashes the same."""
    content = {**asdict(record), "images": image_hashes}
    text = json.dumps(content, sort_keys=True, ensure_ascii=False, default=str)
    return sha256_hex(text)


def build_manifest(splits: dict[str, list]) -> dict:
    cache: dict[str, str] = {}
    out = {"version": MANIFEST_VERSION, "splits": {}}
    for name, records in splits.items():
        entries = []
        for record in records:
            hashes = [cache[p] if p in cache else cache.setdefault(p, file_sha256(p))
                      for p in record.images]
            entries.append({"id": record.id, "sha256": record_sha256(record, hashes),
                            "images": hashes})
        joined = "".join(e["sha256"] for e in entries)
        out["splits"][name] = {"n": len(entries),
                               "sha256": sha256_hex(joined),
                               "records": entries}
    joined = "".join(s["sha256"] for s in out["splits"].values())
    out["sha256"] = sha256_hex(joined)
    return out


def write_manifest(splits: dict[str, list], path: str) -> dict:
    """Write a JSON manifest: per split, each record's id, content hash and image-byte hashes,
    a hash per split and one over all; returns it. Nested dicts (e.g. ``{"ood": {...}}``) are
    flattened to ``ood/ct``-style names."""
    manifest = build_manifest(_flatten(splits))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1)
    return manifest


def verify_manifest(splits: dict[str, list], path: str) -> None:
    """Raise ValueError naming the first split/record whose content differs from the manifest."""
    with open(path, encoding="utf-8") as handle:
        expected = json.load(handle)
    actual = build_manifest(_flatten(splits))
    if actual["sha256"] == expected.get("sha256"):
        return
    for name, split in expected.get("splits", {}).items():
        have = actual["splits"].get(name, {"records": []})["records"]
        for want, got in zip(split["records"], have + [None] * len(split["records"])):
            if got is None or got["sha256"] != want["sha256"]:
                raise ValueError(f"{path}: split '{name}' record id {want['id']!r} differs from "
                                 "the manifest (content or image bytes changed)")
        if len(have) != split["n"]:
            raise ValueError(f"{path}: split '{name}' has {len(have)} records, manifest "
                             f"{split['n']}")
    raise ValueError(f"{path}: split names differ: manifest {sorted(expected.get('splits', {}))},"
                     f" data {sorted(actual['splits'])}")


def _flatten(splits: dict, prefix: str = "") -> dict[str, list]:
    flat = {}
    for name, value in splits.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{name}/"))
        else:
            flat[f"{prefix}{name}"] = list(value)
    return flat
