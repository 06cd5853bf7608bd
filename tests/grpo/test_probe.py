"""grpo.probe: the logistic-regression probe against data whose answer is known by construction,
the pooled features against a per-image computation, the pixel statistics against numpy by hand,
the decoder probe against a plain Hugging Face forward of the whole text."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from grpo.probe import _auc, decoder_probe, fit_probe, image_features, main, pixel_statistics, probe_image_features


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


def test_auc_by_hand():
    # positives 0.4, 0.2 against negatives 0.1, 0.4: win, tie (1/2), win, loss -> 2.5 / 4
    assert _auc(torch.tensor([0.4, 0.1, 0.2, 0.4]), torch.tensor([True, False, True, False])) == pytest.approx(0.625)
    assert _auc(torch.tensor([1.0, 0.0]), torch.tensor([True, False])) == 1.0


def test_decoder_probe_equals_a_plain_forward_of_the_whole_text(tiny_ckpt, tiny_processor):
    """The log-probabilities the probe reads equal those of one Hugging Face forward over the
    chat-templated prompt + prefix (tokenized by the processor together, images in place), and
    accuracy, counts, margins and AUC follow from them as computed here by hand."""
    from models import ModelConfig, QwenVLAdapter, load_policy
    model = load_policy(ModelConfig(str(tiny_ckpt), freeze_vision=True)).eval()
    adapter = QwenVLAdapter(tiny_processor)
    g = np.random.default_rng(3)
    items = [([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Size of the nuclei {i}?"}]}],
              [Image.fromarray(g.integers(0, 256, (56, 56 + 28 * (i % 2), 3), dtype=np.uint8), "RGB")])
             for i in range(6)]
    labels = ["small", "large", "large", "small", "large", "small"]
    prefix, values = "<think>The nuclei are ", ("small", "large")
    r = decoder_probe(model, tiny_processor, items, prefix, values, labels, batch_size=4, prompt_fn=lambda it: it)
    tok = tiny_processor.tokenizer
    full = [tok(prefix + v, add_special_tokens=False)["input_ids"] for v in values]
    k = next(i for i in range(min(map(len, full))) if full[0][i] != full[1][i])
    context = tok.decode(full[0][:k])
    ref = []
    with torch.no_grad():
        for messages, images in items:
            enc = tiny_processor(text=[adapter.prompt_text(messages) + context], images=images, return_tensors="pt")
            logits = model(**enc).logits[0, -1].float()
            ref.append(torch.log_softmax(logits, -1)[[full[0][k], full[1][k]]])
    ref = torch.stack(ref)
    margin = ref[:, 1] - ref[:, 0]
    truth = torch.tensor([lab == "large" for lab in labels])
    said_large = margin > 0
    assert r["accuracy"] == pytest.approx(float((said_large == truth).double().mean()))
    assert r["claimed"] == {"small": int((~said_large).sum()), "large": int(said_large.sum())}
    assert r["truth"] == {"small": 3, "large": 3}
    assert r["margin"]["large"] == pytest.approx(float(margin[truth].mean()), abs=1e-4)
    assert r["margin"]["small"] == pytest.approx(float(margin[~truth].mean()), abs=1e-4)
    pairs = [(a > b) + 0.5 * (a == b) for a in margin[truth].tolist() for b in margin[~truth].tolist()]
    assert r["auc"] == pytest.approx(sum(pairs) / 9)


def test_decoder_probe_names_bad_input(tiny_ckpt, tiny_processor):
    items = [([{"role": "user", "content": [{"type": "text", "text": "q"}]}], [])]
    with pytest.raises(ValueError, match="1 records"):
        decoder_probe(None, tiny_processor, items, "<think>", ("a", "b"), ["a", "b"], prompt_fn=lambda it: it)
    with pytest.raises(ValueError, match="not among values"):
        decoder_probe(None, tiny_processor, items, "<think>", ("a", "b"), ["c"], prompt_fn=lambda it: it)
