"""Splits are disjoint, image-disjoint, seeded; manifests prove which data was used."""
import json

import pytest

from data import VQARecord
from data.splits import paper_fractions, split_records, verify_manifest, write_manifest


def _records(tmp_path, n_images=30, per_image=(1, 2, 3)):
    records = []
    for i in range(n_images):
        path = tmp_path / f"{i}.png"
        path.write_bytes(f"image {i}".encode())
        for j in range(per_image[i % len(per_image)]):
            records.append(VQARecord(id=f"{i}-{j}", images=[str(path)], question="q", answer="a"))
    return records


def test_disjoint_image_disjoint_and_seeded(tmp_path):
    records = _records(tmp_path)  # 60 records on 30 images
    splits = split_records(records, {"sft": 30, "rl": 10, "test": 20}, seed=1)
    ids = [r.id for part in splits.values() for r in part]
    assert len(ids) == len(set(ids)) == 60
    images = {name: {p for r in part for p in r.images} for name, part in splits.items()}
    assert not (images["sft"] & images["rl"] or images["sft"] & images["test"]
                or images["rl"] & images["test"])
    assert all(r.split == name for name, part in splits.items() for r in part)
    again = split_records(list(reversed(records)), {"sft": 30, "rl": 10, "test": 20}, seed=1)
    assert {k: [r.id for r in v] for k, v in again.items()} == {
        k: [r.id for r in v] for k, v in splits.items()}
    other = split_records(records, {"sft": 30, "rl": 10, "test": 20}, seed=2)
    assert [r.id for r in other["test"]] != [r.id for r in splits["test"]]
    assert records[0].split is None  # input untouched


def test_one_record_per_image_gives_exact_sizes_and_paper_fractions(tmp_path):
    records = _records(tmp_path, 100, per_image=(1,))
    assert [len(v) for v in split_records(records, (50, 20, 30)).values()] == [50, 20, 30]
    # fractions 3000/5385, 1000/5385, 1385/5385 of 100: floor 55, 18, rest 27
    assert [len(v) for v in split_records(records, paper_fractions()).values()] == [55, 18, 27]
    assert [len(v) for v in split_records(records).values()] == [55, 18, 27]


def test_too_many_requested(tmp_path):
    with pytest.raises(ValueError, match="need 11 records, only 10"):
        split_records(_records(tmp_path, 10, (1,)), (5, 3, 3))


def test_manifest_hashes_and_detects_changes(tmp_path):
    splits = split_records(_records(tmp_path, 10, (1,)), (5, 2, 3), seed=0)
    manifest = write_manifest(splits, str(tmp_path / "m" / "manifest.json"))
    saved = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert saved == manifest and set(saved["splits"]) == {"sft", "rl", "test"}
    entry = saved["splits"]["rl"]["records"][0]
    assert len(entry["sha256"]) == 64 and len(entry["images"][0]) == 64
    verify_manifest(splits, str(tmp_path / "m" / "manifest.json"))  # unchanged: passes
    victim = splits["test"][1]
    with open(victim.images[0], "ab") as handle:
        handle.write(b"!")
    with pytest.raises(ValueError, match=f"split 'test' record id '{victim.id}'"):
        verify_manifest(splits, str(tmp_path / "m" / "manifest.json"))


def test_every_image_of_a_record_joins_its_group(tmp_path):
    """r1 holds images a and b, r2 holds b and c, r3 holds c only: all three share images through
    b and c, so they must land in one split, even though r1 and r3 share no image directly."""
    paths = {}
    for name in "abcde":
        paths[name] = str(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.png").write_bytes(name.encode())
    (tmp_path / "alias.png").symlink_to(tmp_path / "d.png")  # the same file under another name
    rec = lambda i, names: VQARecord(id=i, images=[paths.get(n, str(tmp_path / n)) for n in names],  # noqa: E731
                                     question="q", answer="a")
    records = [rec("r1", "ab"), rec("r2", "bc"), rec("r3", "c"), rec("r4", ["d"]),
               rec("r5", ["alias.png", "e"]), rec("r6", ["e"])]
    for seed in range(6):
        splits = split_records(records, {"x": 3, "y": 3}, seed=seed)
        assert sorted(sorted(r.id for r in part) for part in splits.values()) == [
            ["r1", "r2", "r3"], ["r4", "r5", "r6"]]
