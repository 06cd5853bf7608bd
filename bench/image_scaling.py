"""Rollout cost as prompt images grow: step time with and without prompt/image reuse.

Image tokens per prompt 64 -> 1,024 (square images of 224, 448, 672, 896 px; Qwen2.5-VL gives one
token per 28x28 px), 4 prompts x G = 4, 192 completion tokens (the paper's length), beta 0.04,
frozen vision tower. "without reuse" is the same trainer with ``GRPOConfig(reuse_prompts=False)``:
every sample encodes its image and reads its prompt in generation and in every log-prob pass.
Target: at 1,024 image tokens, with / without <= 0.5.

    python bench/image_scaling.py [--model PATH] [--out bench/results/image_scaling.json]
"""
from __future__ import annotations

from harness import DEFAULTS, bench_parser, run_worker, versions, write

TARGET = 0.5
SIZES = {64: 224, 256: 448, 576: 672, 1024: 896}


def main(argv=None):
    p = bench_parser(__doc__, steps=3, warmup=1)
    p.add_argument("--tokens", type=int, default=192)
    a = p.parse_args(argv)
    rows = []
    for image_tokens, px in SIZES.items():
        cfg = {**DEFAULTS, "tokens": a.tokens, "image_px": px, "steps": a.steps, "warmup": a.warmup, "model": a.model}
        with_reuse, without = run_worker("ours", cfg), run_worker("ours", {**cfg, "reuse": False})
        row = {"image_tokens": image_tokens, "image_px": px, "with_reuse": with_reuse, "without_reuse": without}
        if "error" not in with_reuse and "error" not in without:
            row.update(step_s=with_reuse["step_s"], step_s_without_reuse=without["step_s"],
                       ratio=with_reuse["step_s"] / without["step_s"])
        rows.append(row)
        print(image_tokens, {k: row.get(k) for k in ("step_s", "step_s_without_reuse", "ratio")}, flush=True)
    last = rows[-1].get("ratio")
    report = {"benchmark": "image_scaling", "rows": rows, "ratio": last, "target": f"with/without at 1024 <= {TARGET}",
              "target_met": last is not None and last <= TARGET, "versions": versions()}
    write("image_scaling", report, a.out)


if __name__ == "__main__":
    main()
