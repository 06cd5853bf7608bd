"""grpo.probe: the logistic-regression probe against data whose answer is known by construction,
the pooled features against a per-image computation, the pixel statistics against numpy by hand."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from grpo.probe import fit_probe, image_features, main, pixel_statistics, probe_image_features


def blobs(n_per_class: int, centres, spread: float, seed: int):
    """Gaussian blobs, rows shuffled: (features (n, d), labels)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.tensor(c, dtype=torch.float32) + spread * torch.randn(n_per_class, len(c), generator=g)
                   for c in centres])
    y = [k for k in range(len(centres)) for _ in range(n_per_class)]
    order = torch.randperm(len(y), generator=g)
    return x[order], [f"class{y[i]}" for i in order.tolist()]


def test_separable_blobs_are_read_and_random_labels_stay_at_chance():
    x, y = blobs(400, [[2, 0, 0, 0], [-2, 0, 0, 0]], 0.5, seed=0)  # 4 sigma apart along one axis
    assert fit_probe(x, y)["accuracy"] >= 0.99
    three = fit_probe(*blobs(300, [[3, 0], [0, 3], [-3, -3]], 0.6, seed=1))  # multinomial, 3 classes
    assert three["accuracy"] >= 0.97 and three["classes"] == ["class0", "class1", "class2"]
    g = np.random.default_rng(2)
    noise = fit_probe(torch.tensor(g.normal(size=(2000, 8)), dtype=torch.float32), g.integers(0, 2, 2000).tolist())
    assert 0.42 <= noise["accuracy"] <= 0.58                          # 500 held-out rows: sd 0.022


def test_majority_baseline_and_split_sizes_by_hand():
    x = torch.arange(20, dtype=torch.float32)[:, None]
    labels = ["a"] * 10 + ["b"] * 5 + ["a", "b", "b", "a", "b"]      # training rows 0-14: a 10, b 5
    r = fit_probe(x, labels, train_fraction=0.75)
    assert (r["n_train"], r["n_test"]) == (15, 5)
    assert r["majority"] == pytest.approx(2 / 5)                      # "a" is right on 2 of the 5 held out


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="one class"):
        fit_probe(torch.zeros(4, 2), ["x"] * 4)
    with pytest.raises(ValueError, match="3 feature rows but 2 labels"):
        fit_probe(torch.zeros(3, 2), ["x", "y"])
    with pytest.raises(ValueError, match="no training or no test rows"):
        fit_probe(torch.zeros(4, 2), ["x", "y", "x", "y"], train_fraction=1.0)


def test_pixel_statistics_by_hand():
    px = np.array([[[0, 10, 20], [100, 110, 120]], [[200, 210, 220], [50, 60, 70]]], np.uint8)
    stats = pixel_statistics([Image.fromarray(px, "RGB")])[0].numpy()
    red = np.array([0, 100, 200, 50], float)
    assert stats[0] == pytest.approx(87.5) and stats[3] == pytest.approx(red.std())
    assert stats[12] == pytest.approx(75.0)                           # median red: (50 + 100) / 2
    # layout: [mean rgb, std rgb, p2 rgb, p10 rgb, p50 rgb]
    for k, q in enumerate((2, 10, 50)):
        for c in range(3):
            assert stats[6 + 3 * k + c] == pytest.approx(np.percentile(px[..., c].ravel().astype(float), q))


def test_pooled_features_equal_one_image_at_a_time(tiny_ckpt, tiny_processor):
    from models import ModelConfig, load_policy
    model = load_policy(ModelConfig(str(tiny_ckpt), freeze_vision=True)).eval()
    g = np.random.default_rng(0)
    images = [Image.fromarray(g.integers(0, 256, (56 * (1 + i % 2), 56, 3), dtype=np.uint8), "RGB") for i in range(5)]
    batched = image_features(model, tiny_processor, images, batch_size=3)   # batches of 3 and 2, mixed sizes
    assert batched.shape == (5, 2 * model.config.text_config.hidden_size)
    with torch.no_grad():
        for i, image in enumerate(images):
            enc = tiny_processor.image_processor(images=[image], return_tensors="pt")
            tokens = model.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"],
                                                    return_dict=True).pooler_output[0]
            alone = torch.cat([tokens.mean(0), tokens.std(0, unbiased=False)])
            assert torch.allclose(batched[i], alone, atol=1e-5)
    result = probe_image_features(model, tiny_processor, images * 4, {"tall": [im.height > 56 for im in images] * 4})
    assert set(result["tall"]) == {"accuracy", "majority", "n_train", "n_test", "classes"}


def test_cli_probes_the_embedded_tiles(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "probe.json"
    main(["--model", str(tiny_ckpt), "--n", "48", "--json", str(out)])
    results = json.loads(out.read_text())
    assert set(results) == {"pixel statistics", str(tiny_ckpt)}
    attributes = {"size", "density", "stain", "pleomorphism", "mitosis"}
    assert set(results["pixel statistics"]) == attributes and set(results[str(tiny_ckpt)]) == attributes
    # cellularity is the share of the tile covered by cells: colour statistics alone separate it
    assert results["pixel statistics"]["density"]["accuracy"] >= 0.9
    assert "| pixel statistics |" in capsys.readouterr().out
