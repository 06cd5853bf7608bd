"""Linear probes on a VLM's image features: does the vision tower encode what the questions ask?

A model can fail a visual question for two reasons: its vision tower does not encode the attribute,
or its decoder does not read it. The first is fixed by training (or unfreezing) the tower, the
second by training the decoder; the blank-image control of :mod:`grpo.evaluate` cannot tell them
apart. A probe can: each image's features (the tower's merged output tokens, pooled to their mean
and standard deviation) feed a multinomial logistic regression fitted on part of the images and
scored on the rest. High held-out accuracy means the information is in the features.

    from grpo.probe import probe_image_features
    result = probe_image_features(model, processor, images, {"size": sizes, "stain": stains})
    result["size"]["accuracy"], result["size"]["majority"]

On the embedded pathology tiles (attributes known by construction):

    python -m grpo.probe --model runs/pathvlm_r1/models/alpha [--model OTHER ...] [--n 1200] [--seed 777]

prints, per checkpoint, each attribute's held-out probe accuracy, next to the same probe on
plain pixel statistics of the images (a reference that needs no model) and the majority class.

When the tower encodes an attribute, :func:`decoder_probe` asks whether the decoder reads it: the
answer is forced to begin with a prefix ("<think>Nuclear size is ") and the log-odds of the values
("small" / "large") that come next are read with each image. Its AUC says how well the decoder
separates the classes whatever its threshold; ``claimed`` says where the threshold sits. A stage
that moves ``claimed`` but not the AUC has moved a prior, not taught the model to read.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch


@torch.no_grad()
def image_features(model, processor, images, batch_size: int = 64) -> torch.Tensor:
    """(n, 2H) float32: per image, the mean and the standard deviation over its merged vision tokens
    (``get_image_features``' pooled output, H = the decoder width)."""
    base = getattr(model, "model", model)
    device = next(base.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        enc = processor.image_processor(images=list(images[start:start + batch_size]), return_tensors="pt")
        feats = base.get_image_features(enc["pixel_values"].to(device), enc["image_grid_thw"].to(device),
                                        return_dict=True).pooler_output
        out += [torch.cat([f.float().mean(0), f.float().std(0, unbiased=False)]).cpu() for f in feats]
    return torch.stack(out)


def pixel_statistics(images) -> torch.Tensor:
    """(n, 15) float32: per RGB channel the mean, the standard deviation and the 2nd, 10th and 50th
    percentiles of the image's pixels; a model-free reference for what simple colour statistics
    already separate."""
    rows = []
    for image in images:
        px = np.asarray(image.convert("RGB"), np.float64).reshape(-1, 3)
        rows.append(np.concatenate([px.mean(0), px.std(0), np.percentile(px, [2, 10, 50], axis=0).ravel()]))
    return torch.tensor(np.stack(rows), dtype=torch.float32)


def fit_probe(features: torch.Tensor, labels, train_fraction: float = 0.75, l2: float = 1e-3) -> dict:
    """Held-out accuracy of a multinomial logistic regression on ``features`` (n, d) for ``labels``
    (n hashable values): fitted (L-BFGS, L2 penalty ``l2``) on the first ``train_fraction`` of the
    rows, scored on the rest. Features are standardised with the training rows' statistics.

    Returns ``{"accuracy", "majority", "n_train", "n_test", "classes"}``; ``majority`` is the
    held-out accuracy of always answering the training rows' most frequent class."""
    labels = list(labels)
    if len(labels) != len(features):
        raise ValueError(f"fit_probe: {len(features)} feature rows but {len(labels)} labels")
    classes = sorted(set(labels), key=str)
    if len(classes) < 2:
        raise ValueError(f"fit_probe: the labels hold one class ({classes}); a probe needs two or more")
    n_train = int(round(train_fraction * len(labels)))
    if not 0 < n_train < len(labels):
        raise ValueError(f"fit_probe: train_fraction={train_fraction} leaves no training or no test rows "
                         f"of {len(labels)}")
    y = torch.tensor([classes.index(v) for v in labels])
    x = features.float()
    mean, std = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
    x = (x - mean) / std
    w = torch.zeros(x.shape[1], len(classes), requires_grad=True)
    b = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x[:n_train] @ w + b, y[:n_train]) + l2 * (w ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        pred = (x[n_train:] @ w + b).argmax(1)
    majority = int(torch.bincount(y[:n_train], minlength=len(classes)).argmax())
    return {"accuracy": float((pred == y[n_train:]).float().mean()),
            "majority": float((y[n_train:] == majority).float().mean()),
            "n_train": n_train, "n_test": len(labels) - n_train, "classes": [str(c) for c in classes]}


def probe_image_features(model, processor, images, labels: dict, **kwargs) -> dict:
    """``{name: fit_probe(...)}`` for each label list in ``labels`` (one value per image), all on
    the same image features. ``kwargs`` go to :func:`fit_probe`."""
    features = image_features(model, processor, images)
    return {name: fit_probe(features, values, **kwargs) for name, values in labels.items()}


def _auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties counting half."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())


@torch.no_grad()
def decoder_probe(model, processor, records, prefix: str, values, labels, batch_size: int = 32,
                  prompt_fn=None) -> dict:
    """Does the *decoder* read an attribute, and where is its threshold? Each record's answer is
    forced to begin with ``prefix`` ("<think>Nuclear size is "), and the log-probabilities of the
    first token of each of ``values`` (("small", "large")) come next are read, with the image.

    Returns ``accuracy`` (the likelier value is ``labels[i]``), ``claimed`` and ``truth`` (value ->
    count), ``margin`` (mean of log p(values[-1]) - log p(values[0]) per true value) and, for two
    values, ``auc``: how well the margin separates the two classes whatever the threshold. A training
    stage that raises the AUC has taught the decoder to read the attribute; one that moves only
    ``claimed`` (and the margins together) has moved a prior. ``records``: items ``prompt_fn`` turns
    into (messages, images); default ``grpo.samples.default_prompt``."""
    from models.adapter import QwenVLAdapter
    from .samples import default_prompt
    prompt_fn = prompt_fn or default_prompt
    adapter = processor if isinstance(processor, QwenVLAdapter) else QwenVLAdapter(processor)
    values, labels = list(values), list(labels)
    if len(labels) != len(records):
        raise ValueError(f"decoder_probe: {len(labels)} labels for {len(records)} records; give one per record")
    unknown = sorted({str(x) for x in labels} - set(values))
    if unknown:
        raise ValueError(f"decoder_probe: labels {unknown} are not among values {values}")
    # the forced context is what the values' tokenizations share ("<think>Nuclear size is" when the
    # BPE glues the space to the value, " small"), and each value is read at its first own token
    full = [adapter.tokenizer(prefix + v, add_special_tokens=False)["input_ids"] for v in values]
    k = 0
    while all(len(ids) > k for ids in full) and len({ids[k] for ids in full}) == 1:
        k += 1
    head = full[0][:k]
    if not head:
        raise ValueError("decoder_probe: the prefix gives no shared context; give the text the answer starts "
                         "with, e.g. '<think>Nuclear size is '")
    if any(len(ids) == k for ids in full):
        raise ValueError(f"decoder_probe: values {values} cannot be told apart after the prefix (one is a "
                         "prefix of another)")
    firsts = [ids[k] for ids in full]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logps = []
    try:
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            messages, images = zip(*(prompt_fn(r) for r in chunk))
            prompts = adapter.encode_prompts(list(messages), list(images)).to(device)
            ids = torch.tensor([head + [firsts[0]]] * len(chunk), device=device)
            hidden = adapter.completion_hidden(model, ids, **adapter.forward_inputs(prompts, ids, torch.ones_like(ids)))
            logits = adapter.output_head(model)(hidden[:, len(head)]).float()      # predicts the value token
            logps.append(torch.log_softmax(logits, -1)[:, firsts].cpu())
    finally:
        model.train(was_training)
    logp = torch.cat(logps)                                  # (n, len(values))
    truth = torch.tensor([values.index(str(x)) for x in labels])
    chosen = logp.argmax(1)
    margin = logp[:, -1] - logp[:, 0]
    out = {"n": len(labels), "accuracy": float((chosen == truth).double().mean()),
           "claimed": {v: int((chosen == i).sum()) for i, v in enumerate(values)},
           "truth": {v: int((truth == i).sum()) for i, v in enumerate(values)},
           "margin": {v: float(margin[truth == i].mean()) if (truth == i).any() else float("nan")
                      for i, v in enumerate(values)}}
    if len(values) == 2:
        out["auc"] = _auc(margin, truth == 1)
    return out


def embedded_tiles(n: int, seed: int):
    """(images, {attribute: values}) of ``n`` tiles of the embedded pathology generator's
    pretraining stream for ``seed`` (use a seed no run trains on: the default 777)."""
    from data.embedded.tiles import CLAIMS, generate_caption_item
    items = [generate_caption_item(seed, i) for i in range(n)]
    return [image for image, _, _ in items], {a: [truth[a] for _, _, truth in items] for a in CLAIMS}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="checkpoint folder (repeat for several)")
    p.add_argument("--n", type=int, default=1200, help="tiles (a quarter held out)")
    p.add_argument("--seed", type=int, default=777, help="generator seed of the tiles")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    from models import ModelConfig, load_policy, load_processor
    images, labels = embedded_tiles(args.n, args.seed)
    results = {"pixel statistics": {a: fit_probe(pixel_statistics(images), v) for a, v in labels.items()}}
    for path in args.model:
        model = load_policy(ModelConfig(path, freeze_vision=True)).eval()
        results[path] = probe_image_features(model, load_processor(path), images, labels)
    names = list(labels)
    print("held-out probe accuracy (majority class in brackets), " + f"{args.n} tiles, seed {args.seed}")
    print("| features | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names))
    for source, res in results.items():
        print(f"| {source} | " + " | ".join(f"{res[a]['accuracy']:.3f} ({res[a]['majority']:.2f})" for a in names) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
