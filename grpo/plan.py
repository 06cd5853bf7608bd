"""Size a GRPO run before renting GPUs: memory per GPU of one training process.

    python -m grpo.plan --config /ckpt/Qwen2.5-VL-7B-Instruct/config.json \\
        --deepspeed examples/configs/zero3_offload.json --gpus 8 --num-generations 4 \\
        --max-completion-length 192 --max-pixels 65536 [--json]

Reads a Qwen2.5-VL ``config.json`` (or a checkpoint folder holding one) and a run's shape
(``GRPOConfig`` names: ``num_generations``, ``per_device_train_batch_size``, ``gradient_accumulation_steps``,
``max_completion_length``, ``logprob_chunk_size``, ``beta``, ``reuse_prompts``) and estimates,
per GPU, in bytes:

* **model states**: parameters, gradients and Adam state under DeepSpeed's bf16 mixed precision
  (bf16 weights and gradients; fp32 master weights, fp32 gradients and two fp32 moments in the
  optimizer), partitioned by ZeRO stage 0-3, the optimizer optionally offloaded to the CPU; or a
  plain one-process PyTorch run (``backend="torch"``: AdamW on the weights' own dtype, fp32 or
  bf16). The per-stage bytes follow the accounting of DeepSpeed's own estimators
  (``estimate_zero2/3_model_states_mem_needs``), which the tests compare against;
* the **reference model** (beta > 0): frozen, in the weights' dtype, ZeRO-3 partitioned under
  stage 3 (``grpo.engine.DeepSpeedEngine``), a full copy per GPU otherwise;
* **activations** of one micro-batch's policy forward/backward, with and without activation
  checkpointing (``activation_bytes`` states the per-layer formula and its source);
* the **KV cache** of generation (grouped-query attention: ``num_key_value_heads``);
* the **log-prob chunk** (``grpo.core.token_logprobs_from_hidden``: rows of the output projection
  at a time, never more than ``grpo.core.MAX_CHUNK_LOGITS`` fp32 logits);
* transients: the optimizer step's temporaries, ZeRO-3's gathered layer and gathered model.

Memory is not the sum of all of these: each is live in some phases of a step (generation, the
no-grad log-prob passes, the policy's forward/backward, the optimizer step). The estimate is the
largest phase total (``Plan.peak``); the table shows which rows count in which phase.

Not modelled: the CUDA context and caching-allocator fragmentation (budget 1-3 GB per GPU),
DeepSpeed's communication buckets (about ``hidden_size**2`` elements each with this library's
"auto" settings: tens of MB), a trainable vision tower's merger activations, video inputs.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

# Bytes per element of each dtype name.
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# Groups of parameters that can be frozen (``Setup.freeze``). With tied word embeddings the
# output projection is the embedding matrix: "embed" holds it, "lm_head" is empty, and freezing
# either freezes the shared matrix.
PARAM_GROUPS = ("vision", "embed", "attention", "mlp", "norms", "lm_head")
PHASES = ("generate", "logprobs", "train", "step")
PHASE_HELP = {
    "generate": "sampling: KV cache, prefill, decode logits",
    "logprobs": "no-grad log-prob passes (reference, old policy)",
    "train": "policy forward + backward of one micro-batch",
    "step": "optimizer step",
}
# Qwen2.5-VL: 14-pixel patches merged 2x2, so one image token per 28 x 28 pixels.
PATCH_PIXELS = 28
# DeepSpeed ZeRO-3 runs the optimizer per sub-group of at most this many elements (its default
# ``sub_group_size``); the step's temporaries scale with one sub-group.
ZERO3_SUB_GROUP = 10 ** 9
# Peak working set of one log-prob chunk, in units of one fp32 (rows x vocab) logits buffer,
# measured on CPU (tests/grpo/test_plan.py re-measures it): the no-grad pass holds the logits and
# one work buffer; the checkpointed backward recomputes the logits and holds the gradient of the
# gather, softmax's exp and the difference it takes (about 5 at once).
CHUNK_BUFFERS_NO_GRAD = 2
CHUNK_BUFFERS_GRAD = 5


# ===================================================================== the model
@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Qwen2.5-VL checkpoint that memory depends on (from its config.json)."""
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool
    vision_depth: int
    vision_hidden: int
    vision_heads: int
    vision_intermediate: int
    vision_out_hidden: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """``config``: a ``config.json`` path, a checkpoint folder, or the parsed dict. Both layouts
        are read: text fields at the top level (the published Qwen2.5-VL checkpoints) or under
        ``text_config`` (what transformers 5 writes)."""
        if not isinstance(config, dict):
            path = Path(config)
            path = path / "config.json" if path.is_dir() else path
            config = json.loads(path.read_text())
        model_type = config.get("model_type")
        if model_type not in ("qwen2_5_vl", None):
            raise ValueError(f"model_type={model_type!r}: grpo.plan knows Qwen2.5-VL (qwen2_5_vl) only")
        text = {**config, **config.get("text_config", {})}
        vision = config.get("vision_config")
        if not vision:
            raise ValueError("config has no vision_config: expected a Qwen2.5-VL config.json")
        hidden, heads = int(text["hidden_size"]), int(text["num_attention_heads"])
        tie = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        return cls(vocab_size=int(text["vocab_size"]), hidden_size=hidden, num_layers=int(text["num_hidden_layers"]),
                   num_heads=heads, num_kv_heads=int(text.get("num_key_value_heads", heads)),
                   head_dim=int(text.get("head_dim") or hidden // heads),
                   intermediate_size=int(text["intermediate_size"]), tie_word_embeddings=bool(tie),
                   vision_depth=int(vision["depth"]), vision_hidden=int(vision["hidden_size"]),
                   vision_heads=int(vision["num_heads"]), vision_intermediate=int(vision["intermediate_size"]),
                   vision_out_hidden=int(vision.get("out_hidden_size", hidden)),
                   patch_size=int(vision.get("patch_size", 14)),
                   temporal_patch_size=int(vision.get("temporal_patch_size", 2)),
                   spatial_merge_size=int(vision.get("spatial_merge_size", 2)),
                   in_channels=int(vision.get("in_channels", vision.get("in_chans", 3))))

    # ---------------------------------------------------------------- parameter counts
    def tensors(self) -> dict[str, list[tuple[str, int]]]:
        """Every parameter tensor as (name, elements), by group; repeated layers listed once per
        layer. Qwen2.5-VL: q/k/v projections with bias, o_proj and the SwiGLU MLP without; RMSNorm
        weights only; vision blocks with biases everywhere, a Conv3d patch embedding without."""
        h, d, a, kv, i, v = (self.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads,
                             self.intermediate_size, self.vocab_size)
        hv, iv, m2 = self.vision_hidden, self.vision_intermediate, self.spatial_merge_size ** 2
        vision = [("patch_embed", self.in_channels * self.temporal_patch_size * self.patch_size ** 2 * hv)]
        for _ in range(self.vision_depth):
            vision += [("norm1", hv), ("norm2", hv), ("qkv.weight", hv * 3 * hv), ("qkv.bias", 3 * hv),
                       ("proj.weight", hv * hv), ("proj.bias", hv)]
            vision += [(f"{p}.weight", hv * iv) for p in ("gate", "up", "down")]
            vision += [("gate.bias", iv), ("up.bias", iv), ("down.bias", hv)]
        vision += [("merger.ln_q", hv), ("merger.fc1.weight", (hv * m2) ** 2), ("merger.fc1.bias", hv * m2),
                   ("merger.fc2.weight", hv * m2 * self.vision_out_hidden), ("merger.fc2.bias", self.vision_out_hidden)]
        attention, mlp, norms = [], [], []
        for _ in range(self.num_layers):
            attention += [("q.weight", h * a * d), ("q.bias", a * d), ("k.weight", h * kv * d), ("k.bias", kv * d),
                          ("v.weight", h * kv * d), ("v.bias", kv * d), ("o.weight", a * d * h)]
            mlp += [("gate", h * i), ("up", h * i), ("down", i * h)]
            norms += [("input_layernorm", h), ("post_attention_layernorm", h)]
        norms.append(("final_norm", h))
        return {"vision": vision, "embed": [("embed_tokens", v * h)], "attention": attention, "mlp": mlp,
                "norms": norms, "lm_head": [] if self.tie_word_embeddings else [("lm_head", v * h)]}

    def param_groups(self) -> dict[str, int]:
        return {g: sum(n for _, n in ts) for g, ts in self.tensors().items()}

    @property
    def num_params(self) -> int:
        return sum(self.param_groups().values())

    def frozen_groups(self, freeze) -> set[str]:
        bad = set(freeze) - set(PARAM_GROUPS)
        if bad:
            raise ValueError(f"freeze={sorted(bad)}: choose among {', '.join(PARAM_GROUPS)}")
        frozen = set(freeze)
        if self.tie_word_embeddings and frozen & {"embed", "lm_head"}:
            frozen |= {"embed", "lm_head"}  # one shared matrix
        return frozen

    def trainable_params(self, freeze=()) -> int:
        frozen = self.frozen_groups(freeze)
        return sum(n for g, n in self.param_groups().items() if g not in frozen)

    def largest_tensor(self, freeze=()) -> int:
        """Elements of the largest trainable parameter tensor (0 when everything is frozen)."""
        frozen = self.frozen_groups(freeze)
        return max((n for g, ts in self.tensors().items() if g not in frozen for _, n in ts), default=0)

    def largest_module(self) -> int:
        """Parameters held directly by the largest module (weight + bias of one layer): the unit
        ZeRO-3 gathers at a time (DeepSpeed's "largest layer")."""
        h, d, a, kv, i = self.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads, self.intermediate_size
        hv, iv, m2 = self.vision_hidden, self.vision_intermediate, self.spatial_merge_size ** 2
        return max(self.vocab_size * h, h * a * d + a * d, h * kv * d + kv * d, a * d * h, h * i,
                   self.in_channels * self.temporal_patch_size * self.patch_size ** 2 * hv,
                   hv * 3 * hv + 3 * hv, hv * hv + hv, hv * iv + iv, iv * hv + hv,
                   (hv * m2) ** 2 + hv * m2, hv * m2 * self.vision_out_hidden + self.vision_out_hidden)

    def reduced(self, num_layers: int, vision_depth: int) -> "ModelShape":
        """The same widths with fewer text layers and vision blocks."""
        return replace(self, num_layers=num_layers, vision_depth=vision_depth)


# ===================================================================== images
def image_tokens(max_pixels: int = 65536, min_pixels: int = 3136, size: tuple[int, int] | None = None) -> int:
    """Image tokens of one image after Qwen2.5-VL's resize (``data.prompts.smart_size``: sides
    multiples of 28, pixels within [min_pixels, max_pixels]), one token per 28 x 28 pixels.
    ``size`` (height, width): that image; None: a square image larger than the cap (the most a
    square image can get: 81 tokens at the paper's 65,536 pixels)."""
    from data.prompts import smart_size
    if size is None:
        side = 4 * math.isqrt(max_pixels) + PATCH_PIXELS
        size = (side, side)
    h, w = smart_size(size[0], size[1], min_pixels, max_pixels)
    return (h // PATCH_PIXELS) * (w // PATCH_PIXELS)


def max_image_tokens(max_pixels: int = 65536) -> int:
    """The most tokens any aspect ratio can reach under ``max_pixels`` (sides multiples of 28,
    aspect ratio at most 200, as ``smart_size`` enforces)."""
    budget = max_pixels // PATCH_PIXELS ** 2
    return max(a * b for a in range(1, budget + 1) for b in range(a, min(200 * a, budget // a) + 1)
               if a * b <= budget)


# ===================================================================== the run
@dataclass(frozen=True)
class Setup:
    """How the run trains. Field names of ``GRPOConfig`` mean the same here."""
    backend: str = "deepspeed"          # "deepspeed" (ZeRO, bf16 mixed precision) or "torch" (TorchEngine)
    zero_stage: int = 3                 # DeepSpeed only
    offload_optimizer: str = "none"     # "none" or "cpu" (DeepSpeed, stage >= 1)
    dtype: str = "bf16"                 # weights and activations: "bf16" (DeepSpeed) or "fp32"/"bf16" (torch)
    device: str = "cuda"                # "cuda" or "cpu": decides how AdamW runs (foreach on CUDA)
    gpus: int = 1
    gpus_per_node: int | None = None    # None: min(gpus, 8)
    attn_implementation: str = "flash_attention_2"  # or "sdpa", "eager" (what they save differs)
    gradient_checkpointing: bool = False
    freeze: tuple[str, ...] = ("vision",)  # the paper freezes the vision tower and projector
    # --- GRPOConfig ---
    num_generations: int = 4
    per_device_train_batch_size: int = 4   # completions per forward/backward
    gradient_accumulation_steps: int = 2   # x per_device = completions per GPU per step = prompts x G
    generation_chunk_size: int | None = None
    max_completion_length: int = 192
    logprob_chunk_size: int = 1024
    beta: float = 0.04
    num_iterations: int = 1
    reuse_prompts: bool = True
    # --- prompts ---
    prompt_text_tokens: int = 176       # R1 system prompt + a 4-option question, chat markup included
    images_per_prompt: int = 1
    image_tokens: int = 81              # per image: image_tokens(65536) for the paper's max_pixels

    @property
    def prompts_per_step(self) -> int:
        """Prompts per GPU per optimizer step (as ``GRPOConfig.prompts_per_step``)."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps // self.num_generations

    def errors(self) -> list[str]:
        e = []
        if self.backend not in ("deepspeed", "torch"):
            e.append(f"backend={self.backend!r}: use 'deepspeed' or 'torch'")
        if self.dtype not in DTYPE_BYTES:
            e.append(f"dtype={self.dtype!r}: use one of {', '.join(DTYPE_BYTES)}")
        if self.backend == "deepspeed":
            if self.zero_stage not in (0, 1, 2, 3):
                e.append(f"zero_stage={self.zero_stage}: use 0, 1, 2 or 3")
            if self.dtype == "fp32":
                e.append("backend='deepspeed' with dtype='fp32' is not modelled: the planner follows "
                         "DeepSpeed's bf16 mixed precision (bf16 weights, fp32 optimizer state)")
            if self.offload_optimizer == "cpu" and self.zero_stage == 0:
                e.append("offload_optimizer='cpu' needs ZeRO stage 1, 2 or 3")
        elif self.offload_optimizer != "none" or self.gpus != 1:
            e.append("backend='torch' is one process without ZeRO: use gpus=1, offload_optimizer='none'")
        if self.offload_optimizer not in ("none", "cpu"):
            e.append(f"offload_optimizer={self.offload_optimizer!r}: use 'none' or 'cpu'")
        if self.device not in ("cuda", "cpu"):
            e.append(f"device={self.device!r}: use 'cuda' or 'cpu'")
        if self.attn_implementation not in ("flash_attention_2", "sdpa", "eager"):
            e.append(f"attn_implementation={self.attn_implementation!r}: use flash_attention_2, sdpa or eager")
        for name in ("gpus", "num_generations", "per_device_train_batch_size", "gradient_accumulation_steps",
                     "max_completion_length",
                     "logprob_chunk_size", "num_iterations"):
            if getattr(self, name) < 1:
                e.append(f"{name}={getattr(self, name)}: must be >= 1")
        n = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if self.num_generations >= 1 and n % self.num_generations:
            e.append(f"per_device_train_batch_size * gradient_accumulation_steps = {n} is not a multiple of "
                     f"num_generations={self.num_generations}")
        gcs = self.generation_chunk_size
        if gcs is not None and (gcs < 1 or n % gcs):
            e.append(f"generation_chunk_size={gcs}: must divide the {n} completions per step")
        if self.beta < 0 or min(self.prompt_text_tokens, self.images_per_prompt, self.image_tokens) < 0:
            e.append("beta, prompt_text_tokens, images_per_prompt and image_tokens must be >= 0")
        return e

    @property
    def prompt_tokens(self) -> int:
        return self.prompt_text_tokens + self.images_per_prompt * self.image_tokens

    @property
    def stage(self) -> int:
        """ZeRO stage, -1 for the plain PyTorch back-end."""
        return self.zero_stage if self.backend == "deepspeed" else -1

    @property
    def nodes(self) -> int:
        return math.ceil(self.gpus / (self.gpus_per_node or min(self.gpus, 8)))


@dataclass
class Row:
    name: str
    bytes: float
    phases: tuple[str, ...]             # the phases in which it is live
    detail: str = ""


@dataclass
class Plan:
    model: ModelShape
    setup: Setup
    rows: list[Row]
    numbers: dict = field(default_factory=dict)   # derived sizes the rows use (params, tokens, ...)
    host_bytes_per_node: float = 0.0
    host_detail: str = ""

    def phase_bytes(self) -> dict[str, float]:
        return {p: sum(r.bytes for r in self.rows if p in r.phases) for p in PHASES}

    @property
    def peak_phase(self) -> str:
        totals = self.phase_bytes()
        return max(PHASES, key=lambda p: totals[p])

    @property
    def peak(self) -> float:
        """Estimated peak memory per GPU (bytes): the largest phase total."""
        return self.phase_bytes()[self.peak_phase]

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)

    def to_dict(self) -> dict:
        return {"model": asdict(self.model), "setup": asdict(self.setup), "numbers": self.numbers,
                "rows": [asdict(r) for r in self.rows], "phases": self.phase_bytes(),
                "peak_phase": self.peak_phase, "peak_bytes": self.peak,
                "host_bytes_per_node": self.host_bytes_per_node, "host_detail": self.host_detail}

    def table(self) -> str:
        s, n = self.setup, self.numbers
        back = (f"DeepSpeed ZeRO-{s.zero_stage}, optimizer offload {s.offload_optimizer}, {s.gpus} GPU(s)"
                if s.backend == "deepspeed" else f"PyTorch, one process on {s.device}")
        lines = [f"model: {n['params'] / 1e9:.3f}B parameters ({n['trainable'] / 1e9:.3f}B trainable; frozen: "
                 f"{', '.join(sorted(s.freeze)) or 'none'}), {s.dtype}; {back}",
                 f"batch: {s.prompts_per_step} prompts x G={s.num_generations} = {n['rows']} completions per GPU, "
                 f"micro-batch {s.per_device_train_batch_size}; prompt {s.prompt_tokens} tokens ({s.prompt_text_tokens} text + "
                 f"{s.images_per_prompt} x {s.image_tokens} image), completion {s.max_completion_length}",
                 "", f"{'':<44}{'GiB':>9}  {' '.join(x.center(3) for x in ('gen', 'lp', 'trn', 'stp')):<16}  how", "-" * 100]
        for r in self.rows:
            marks = " ".join(("x" if p in r.phases else ".").center(3) for p in PHASES)
            lines.append(f"{r.name:<44}{r.bytes / 2 ** 30:>9.2f}  {marks:<16}  {r.detail}")
        lines.append("-" * 100)
        for p, b in self.phase_bytes().items():
            lines.append(f"{'phase ' + p:<44}{b / 2 ** 30:>9.2f}  {PHASE_HELP[p]}")
        lines.append(f"{'TOTAL (peak over phases, per GPU)':<44}{self.peak / 2 ** 30:>9.2f}  in phase {self.peak_phase}; "
                     f"add 1-3 GiB for the CUDA context and allocator fragmentation")
        if self.host_bytes_per_node:
            lines.append(f"{'host RAM per node (offloaded optimizer)':<44}{self.host_bytes_per_node / 2 ** 30:>9.2f}  "
                         f"{self.host_detail}")
        return "\n".join(lines)


# ===================================================================== model states
def model_state_bytes(model: ModelShape, setup: Setup) -> dict[str, float]:
    """Per-GPU bytes of parameters, gradients, optimizer state and ZeRO-3's gathered-layer
    allowance. DeepSpeed bf16 mixed precision (bytes per parameter, P all, Pt trainable,
    N GPUs): bf16 weights 2 P (stage 3: / N); gradients bf16 2 Pt + fp32 4 Pt (stage 1: fp32 part
    / N; stage 2: both / N; stage 3: fp32 / N, the bf16 copies being reduce-scatter buffers);
    Adam fp32 master + 2 moments 12 Pt (/ N for stage >= 1). Offload moves the fp32 gradients
    and Adam state to the CPU (stage 2/3: no gradient on the GPU, as DeepSpeed counts it).
    Stage 3 adds 4 bytes x the largest module (one gathered layer: bf16 weights + gradient).
    PyTorch back-end: weights, gradients and both Adam moments in the weights' dtype."""
    p, pt = model.num_params, model.trainable_params(setup.freeze)
    n, stage = setup.gpus, setup.stage
    if stage < 0:
        e = DTYPE_BYTES[setup.dtype]
        return {"params": e * p, "grads": e * pt, "optimizer": 2 * e * pt, "gathered_layer": 0.0}
    offload = setup.offload_optimizer == "cpu"
    params = 2 * p / n if stage == 3 else 2 * p
    if stage == 0:
        grads = 6 * pt
    elif stage == 1:
        grads = 2 * pt + (0 if offload else 4 * pt / n)
    elif stage == 2:
        grads = 0 if offload else 6 * pt / n
    else:
        grads = 0 if offload else 4 * pt / n
    optimizer = 0 if offload else (12 * pt if stage == 0 else 12 * pt / n)
    gathered = 4 * model.largest_module() if stage == 3 else 0
    return {"params": params, "grads": grads, "optimizer": optimizer, "gathered_layer": gathered}


def optimizer_step_temp(model: ModelShape, setup: Setup) -> tuple[float, float, str]:
    """(GPU bytes, host bytes per process, how) of the optimizer step's temporaries. This library
    hands ``torch.optim.AdamW`` to DeepSpeed (``grpo.engine``). On CUDA it runs "foreach": one
    temporary (sqrt of the second moment) the size of all the tensors it steps; on the CPU it
    steps tensor by tensor, with two temporaries of one tensor. DeepSpeed steps flat fp32
    partitions (stage 3: per sub-group of at most 1e9 elements)."""
    pt, n, stage = model.trainable_params(setup.freeze), setup.gpus, setup.stage
    if stage < 0:
        e = DTYPE_BYTES[setup.dtype]
        if setup.device == "cpu":
            return 2 * e * model.largest_tensor(setup.freeze), 0.0, "2 x largest trainable tensor (AdamW, per tensor)"
        return e * pt, 0.0, "AdamW foreach: sqrt of every second moment"
    flat = pt if stage == 0 else pt / n
    if stage == 3:
        flat = min(flat, ZERO3_SUB_GROUP)
    if setup.offload_optimizer == "cpu":
        return 0.0, 2 * 4 * flat, "on the host"
    return 4 * flat, 0.0, "AdamW foreach on the fp32 partition"


# ===================================================================== activations
def layer_activation_bytes(model: ModelShape, tokens: float, dtype: str, attn: str = "flash_attention_2",
                           seq_len: float = 0.0) -> float:
    """Bytes one decoder layer saves for backward over ``tokens`` tokens.

    Method of Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
    Models" (arXiv:2205.05198, section 4.1): count every tensor a layer keeps for its backward
    pass. Their GPT layer (LayerNorm, 4h GeLU MLP, dropout) saves sbh(34 + 5as/h) bytes in 16-bit.
    For Qwen2.5-VL's layer as transformers runs it, per token (e = bytes of the dtype, h hidden,
    h_kv = kv heads x head dim, I intermediate, a heads):

    * each RMSNorm (two): its input upcast to fp32 (4h), the normalised input (e h), the scaled
      output that the next projections keep (e h), 1/rms (4): 2 x (4h + 2e h + 4);
    * attention: Q after RoPE (e h), K and V (e 2 h_kv; repeated to e 2h by transformers' SDPA path
      when it passes a mask, and by eager), the output that o_proj keeps (e h), flash/SDPA's
      log-sum-exp (4a); eager also keeps the fp32 softmax (4 a s) and, in bf16, its cast (e a s);
    * SwiGLU MLP: gate output (SiLU's input), SiLU output, up output, their product (down_proj's
      input): 4 e I.

    No dropout (Qwen2.5-VL has none). Checked against the saved tensors of a real forward pass
    (tests/grpo/test_plan.py)."""
    e, h, i, a = DTYPE_BYTES[dtype], model.hidden_size, model.intermediate_size, model.num_heads
    q_width, kv_width = a * model.head_dim, model.num_kv_heads * model.head_dim
    if attn != "flash_attention_2":
        kv_width = q_width
    per_token = 2 * (4 * h + 2 * e * h + 4) + e * (q_width + 2 * kv_width + q_width) + 4 * a + 4 * e * i
    if attn == "eager":  # the fp32 softmax, and its cast to the weights' dtype when that is narrower
        per_token += a * seq_len * (4 + (e if e < 4 else 0))
    return per_token * tokens


def activation_bytes(model: ModelShape, setup: Setup, checkpointing: bool | None = None) -> tuple[float, dict]:
    """Saved activations (bytes) of one micro-batch's policy forward, and the numbers behind them.

    Without checkpointing: every layer's ``layer_activation_bytes``. With it (transformers
    recomputes each decoder layer in backward): each layer keeps only its input (e h per token,
    Korthikanti et al.'s 2sbhL for full recomputation), plus one layer's full activations while
    it is recomputed; with prompt sharing also every layer's cached prompt keys and values (the
    completion pass reads them again when it is replayed). Both: the final norm (4h + e h per token), the completion rows' hidden
    states that the log-prob chunks read (e h), and, when the vision tower trains, its blocks on
    the images' patches (same formula, full-width K/V, vision widths)."""
    s = setup
    checkpointing = s.gradient_checkpointing if checkpointing is None else checkpointing
    e, h = DTYPE_BYTES[s.dtype], model.hidden_size
    p, t, mb = s.prompt_tokens, s.max_completion_length, s.per_device_train_batch_size
    frozen = model.frozen_groups(s.freeze)
    text_grad = bool({"embed", "attention", "mlp", "norms"} - frozen)
    shared = shares_prefix(s, checkpointing)
    prompts = distinct_prompts_per_micro_batch(s) if shared else mb
    tokens = prompts * p + mb * t
    seq = p + t
    numbers = {"tokens": tokens, "distinct_prompts": prompts, "shared_prefix": shared}
    total = 0.0
    if text_grad:
        layer = layer_activation_bytes(model, tokens, s.dtype, s.attn_implementation, seq)
        if shared:  # the prompt's cached K/V indexed to every row, kept by attention over the completion
            kv_width = model.num_kv_heads * model.head_dim if s.attn_implementation == "flash_attention_2" \
                else model.num_heads * model.head_dim
            layer += e * 2 * kv_width * mb * p
        if checkpointing:
            total += model.num_layers * e * h * tokens + layer
            if shared:  # every layer's cached prompt K/V (KV-head width), read again by the completions' replay
                total += model.num_layers * e * 2 * model.num_kv_heads * model.head_dim * prompts * p
        else:
            total += model.num_layers * layer
        total += (4 * h + e * h) * tokens
    total += e * h * mb * t
    if "vision" not in frozen:
        hv = model.vision_hidden
        vshape = replace(model, hidden_size=hv, num_heads=model.vision_heads, num_kv_heads=model.vision_heads,
                         head_dim=hv // model.vision_heads, intermediate_size=model.vision_intermediate)
        patches = prompts * s.images_per_prompt * s.image_tokens * model.spatial_merge_size ** 2
        per_block = layer_activation_bytes(vshape, patches, s.dtype, "sdpa", patches)
        total += per_block if checkpointing else model.vision_depth * per_block
        numbers["vision_patches"] = patches
    return total, numbers


def distinct_prompts_per_micro_batch(s: Setup) -> int:
    """Most distinct prompts among a micro-batch's rows (row r belongs to prompt r // G)."""
    n, mb, g = s.prompts_per_step * s.num_generations, s.per_device_train_batch_size, s.num_generations
    return max((start + mb - 1) // g - start // g + 1 for start in range(0, n, mb))


def shares_prefix(s: Setup, checkpointing: bool) -> bool:
    """Whether the log-prob passes run each distinct prompt once: with ``reuse_prompts``, under every
    ZeRO stage and with or without activation checkpointing (``models.forward.can_share_prefix``;
    ``checkpointing`` is kept for callers that ask about either case)."""
    del checkpointing
    return s.reuse_prompts


def inference_layer_bytes(model: ModelShape, tokens: float, dtype: str) -> float:
    """Working set of one decoder layer without gradient: the residual stream, the normed input and
    the MLP's gate, up and product buffers (e (3h + 3I) per token)."""
    return DTYPE_BYTES[dtype] * (3 * model.hidden_size + 3 * model.intermediate_size) * tokens


# ===================================================================== the plan
def estimate(model: ModelShape, setup: Setup) -> Plan:
    """Memory per GPU of one GRPO training process; see the module docstring."""
    errors = setup.errors()
    if errors:
        raise ValueError("grpo.plan setup is invalid:\n  - " + "\n  - ".join(errors))
    s, e = setup, DTYPE_BYTES[setup.dtype]
    h, v, layers = model.hidden_size, model.vocab_size, model.num_layers
    p, t = s.prompt_tokens, s.max_completion_length
    rows_per_gpu = s.prompts_per_step * s.num_generations
    states = model_state_bytes(model, s)
    ds = s.backend == "deepspeed"
    all_phases, grad_phases = PHASES, (PHASES if ds else ("train", "step"))
    n_params, n_train = model.num_params, model.trainable_params(s.freeze)
    numbers = {"params": n_params, "trainable": n_train, "largest_module": model.largest_module(),
               "largest_trainable_tensor": model.largest_tensor(s.freeze), "rows": rows_per_gpu,
               "prompt_tokens": p}
    out = []
    if ds:
        pdet = "bf16 weights" + (f" / {s.gpus} GPUs (ZeRO-3)" if s.stage == 3 else ", full copy")
        gdet = {0: "bf16 + fp32 accumulation", 1: "bf16 full + fp32 / N", 2: "(bf16 + fp32) / N",
                3: "fp32 partition / N"}[s.stage]
        if s.offload_optimizer == "cpu":
            gdet = {1: "bf16 full (fp32 on the host)", 2: "on the host", 3: "on the host"}[s.stage]
        odet = ("on the host" if s.offload_optimizer == "cpu"
                else "fp32 master + 2 moments" + ("" if s.stage == 0 else " / N"))
    else:
        pdet, gdet, odet = f"{s.dtype} weights", f"{s.dtype}, trainable only", f"2 AdamW moments, {s.dtype}"
    out.append(Row("parameters", states["params"], all_phases, pdet))
    out.append(Row("gradients", states["grads"], grad_phases, gdet))
    out.append(Row("optimizer state (Adam)", states["optimizer"], all_phases, odet))
    if s.stage == 3:
        # generation gathers the whole model instead (hooks lifted); the step gathers nothing
        out.append(Row("ZeRO-3 gathered layer", states["gathered_layer"], ("logprobs", "train"),
                       f"4 B x largest module ({model.largest_module() / 1e6:.0f}M)"))
        out.append(Row("ZeRO-3 gathered model (generation)", 2 * n_params, ("generate",),
                       "engine.generation_model() gathers every weight"))
    gpu_temp, host_temp, how = optimizer_step_temp(model, s)
    out.append(Row("optimizer step temporaries", gpu_temp, ("step",), how))
    if s.beta > 0:
        if ds and s.stage == 3:
            ref, rdet = 2 * n_params / s.gpus, f"bf16 / {s.gpus} GPUs (ZeRO-3 inference engine)"
        else:
            ref, rdet = e * n_params, f"frozen {s.dtype} copy"
        out.append(Row("reference model (beta > 0)", ref, all_phases, rdet))
    act_full, info = activation_bytes(model, s, checkpointing=False)
    act_ckpt, info_ckpt = activation_bytes(model, s, checkpointing=True)
    used = "with" if s.gradient_checkpointing else "without"
    numbers.update(train_tokens=(info_ckpt if s.gradient_checkpointing else info)["tokens"],
                   shared_prefix=(info_ckpt if s.gradient_checkpointing else info)["shared_prefix"])
    out.append(Row("activations, no checkpointing", act_full, () if s.gradient_checkpointing else ("train",),
                   f"{info['tokens']:.0f} tokens x {layers} layers" + (" (used)" if used == "without" else "")))
    out.append(Row("activations, with checkpointing", act_ckpt, ("train",) if s.gradient_checkpointing else (),
                   f"{info_ckpt['tokens']:.0f} tokens, layer inputs + 1 layer" + (" (used)" if used == "with" else "")))
    # generation: one generate() call of gen rows, prompt + completion cached
    gen_rows = s.generation_chunk_size or rows_per_gpu
    kv_token = layers * 2 * model.num_kv_heads * model.head_dim * e
    kv = kv_token * gen_rows * (p + t)
    out.append(Row("KV cache (generation)", kv, ("generate",),
                   f"{gen_rows} rows x {p + t} tokens x {kv_token / 1024:.0f} KiB"))
    g_prompts = math.ceil(gen_rows / s.num_generations) if s.reuse_prompts else gen_rows
    prefill = (inference_layer_bytes(model, g_prompts * p, s.dtype)
               + kv_token * gen_rows * p              # the prompt cache copied to the rows, then reserved
               + 3 * 4 * gen_rows * v)                # decode logits, fp32: logits, scaled, softmax
    out.append(Row("generation working set", prefill, ("generate",),
                   f"prefill of {g_prompts * p} tokens, cache copy, decode logits"))
    # log-prob passes
    rows_lp = s.per_device_train_batch_size * t
    chunk_rows = max(1, min(s.logprob_chunk_size, (1 << 26) // v, rows_lp))
    chunk = chunk_rows * v * 4
    bf16_head = chunk_rows * v * e if e < 4 else 0   # the head's own output before .float()
    numbers.update(chunk_rows=chunk_rows, logits_chunk_bytes=chunk)
    out.append(Row("log-prob chunk, backward", CHUNK_BUFFERS_GRAD * chunk + bf16_head, ("train",),
                   f"{CHUNK_BUFFERS_GRAD} x {chunk_rows} rows x {v} x 4 B"))
    no_grad_passes = s.beta > 0 or s.num_iterations > 1
    if no_grad_passes:
        lp_tokens = (distinct_prompts_per_micro_batch(s) * p if shares_prefix(s, s.gradient_checkpointing)
                     else s.per_device_train_batch_size * p) + rows_lp
        ref_layer = 2 * model.largest_module() if (ds and s.stage == 3 and s.beta > 0) else 0
        out.append(Row("log-prob pass working set (no grad)",
                       CHUNK_BUFFERS_NO_GRAD * chunk + bf16_head + inference_layer_bytes(model, lp_tokens, s.dtype)
                       + ref_layer, ("logprobs",),
                       f"{CHUNK_BUFFERS_NO_GRAD} x logits chunk + one layer of {lp_tokens:.0f} tokens"
                       + (" + the reference's gathered layer" if ref_layer else "")))
    host, host_detail = 0.0, ""
    if ds and s.offload_optimizer == "cpu":
        per_gpu = 16 * n_train / s.gpus + host_temp
        gpn = s.gpus_per_node or min(s.gpus, 8)
        host = per_gpu * gpn
        host_detail = f"{gpn} x (fp32 grads + master + 2 moments = 16 B x Pt / N, + step temporaries)"
        numbers["host_states_per_node"] = 16 * n_train / s.gpus * gpn
    return Plan(model, s, out, numbers, host, host_detail)


# ===================================================================== command line
def _setup_from_args(args) -> Setup:
    stage, offload, backend = args.zero, args.offload, args.backend
    if args.deepspeed:
        ds = json.loads(Path(args.deepspeed).read_text())
        zero = ds.get("zero_optimization", {})
        stage = zero.get("stage", 0) if stage is None else stage
        if offload is None:
            offload = zero.get("offload_optimizer", {}).get("device", "none") or "none"
        backend = "deepspeed"
    freeze = tuple(x for x in args.freeze.split(",") if x and x != "none")
    size = None
    if args.image_size:
        h, w = args.image_size.lower().split("x")
        size = (int(h), int(w))
    tokens = args.image_tokens if args.image_tokens is not None else image_tokens(args.max_pixels, args.min_pixels, size)
    return Setup(backend=backend, zero_stage=3 if stage is None else stage, offload_optimizer=offload or "none",
                 dtype=args.dtype or ("bf16" if backend == "deepspeed" else "fp32"), device=args.device,
                 gpus=args.gpus, gpus_per_node=args.gpus_per_node, attn_implementation=args.attn,
                 gradient_checkpointing=args.gradient_checkpointing, freeze=freeze,
                 num_generations=args.num_generations, per_device_train_batch_size=args.per_device_train_batch_size,
                 gradient_accumulation_steps=args.gradient_accumulation_steps,
                 generation_chunk_size=args.generation_chunk_size,
                 max_completion_length=args.max_completion_length, logprob_chunk_size=args.logprob_chunk_size,
                 beta=args.beta, num_iterations=args.num_iterations, reuse_prompts=args.reuse_prompts,
                 prompt_text_tokens=args.prompt_tokens, images_per_prompt=args.images_per_prompt,
                 image_tokens=tokens)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m grpo.plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="a Qwen2.5-VL config.json or checkpoint folder")
    ap.add_argument("--deepspeed", help="a DeepSpeed JSON (e.g. examples/configs/zero3_offload.json): "
                                        "stage and optimizer offload are read from it")
    ap.add_argument("--backend", choices=("deepspeed", "torch"), default="deepspeed")
    ap.add_argument("--zero", type=int, choices=(0, 1, 2, 3), help="ZeRO stage (default 3, or the --deepspeed file's)")
    ap.add_argument("--offload", choices=("none", "cpu"), help="optimizer offload (default none, or the file's)")
    ap.add_argument("--dtype", choices=tuple(DTYPE_BYTES), help="default bf16 (deepspeed), fp32 (torch)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--gpus", type=int, default=1, help="GPUs in the job (data-parallel processes)")
    ap.add_argument("--gpus-per-node", type=int)
    ap.add_argument("--attn", choices=("flash_attention_2", "sdpa", "eager"), default="flash_attention_2")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--freeze", default="vision", help=f"comma list of {', '.join(PARAM_GROUPS)}, or none")
    ap.add_argument("--num-generations", "-G", type=int, default=4)
    ap.add_argument("--per-device-train-batch-size", type=int, default=4, help="completions per forward/backward")
    ap.add_argument("--gradient-accumulation-steps", type=int, default=2,
                    help="x per-device batch = completions per GPU per step (prompts x G)")
    ap.add_argument("--generation-chunk-size", type=int)
    ap.add_argument("--max-completion-length", type=int, default=192)
    ap.add_argument("--logprob-chunk-size", type=int, default=1024)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--num-iterations", type=int, default=1)
    ap.add_argument("--reuse-prompts", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--prompt-tokens", type=int, default=176, help="text tokens of a prompt, chat markup included")
    ap.add_argument("--images-per-prompt", type=int, default=1)
    ap.add_argument("--max-pixels", type=int, default=65536)
    ap.add_argument("--min-pixels", type=int, default=3136)
    ap.add_argument("--image-size", help="HxW of a typical image (default: a square one above --max-pixels)")
    ap.add_argument("--image-tokens", type=int, help="tokens per image (overrides the pixel options)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = ap.parse_args(argv)
    try:
        plan = estimate(ModelShape.from_config(args.config), _setup_from_args(args))
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"grpo.plan: {err}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
