"""LoRA adapters through peft: only the adapters train, the base weights never change.

``GRPOTrainer(..., peft_config=LoraConfig(...))`` and ``SFTTrainer(..., peft_config=...)`` hand the
policy to :class:`LoraPolicy`, which

* injects the adapters into the Hugging Face model in place (``peft.get_peft_model``; the model
  object the trainer, the adapter and the back-end use stays the same, now with LoRA layers),
  and freezes every other weight;
* serves as the reference model of the KL term: the same network with the adapters disabled
  (:meth:`LoraPolicy.reference`), so no second copy of the weights is kept;
* saves the adapters (``adapter_config.json`` + ``adapter_model.safetensors``, what
  ``peft.PeftModel.from_pretrained`` reads) or the merged model, a plain Hugging Face folder that
  ``models.load_policy`` and ``grpo.evaluate`` load like any checkpoint (:meth:`LoraPolicy.save`);
* loads the adapters back from a checkpoint (:meth:`LoraPolicy.load_adapters`).

Under DeepSpeed ZeRO-3 each method gathers the partitioned parameters it reads (every rank calls
it; rank 0 writes). peft is imported only here, and this module only when ``peft_config`` is given
(``pip install -e .[lora]``).
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from pathlib import Path

import torch

# Qwen2.5-VL (and Qwen2-VL): the language model's attention and MLP projections. Matched by
# regular expression (peft: ``re.fullmatch`` on the module's name) because the vision tower's
# blocks also hold modules named gate_proj / up_proj / down_proj, and the tower stays frozen.
QWEN_VL_TARGET_MODULES = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _peft():
    try:
        import peft
    except ImportError as err:
        raise ImportError("peft_config= needs the peft package: pip install -e .[lora] "
                          "(requirements.txt pins the tested version)") from err
    return peft


def default_lora_config(r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.0, **kw):
    """A ``peft.LoraConfig`` for Qwen2.5-VL: rank ``r`` adapters on the language model's q, k, v,
    o, gate, up and down projections; vision tower and merger frozen.

    ``lora_dropout`` defaults to 0: dropout would make every log-prob pass of the policy random,
    so GRPO's ratio to the old log-probs would differ from 1 at an unchanged policy. Other
    ``LoraConfig`` fields pass through ``kw``."""
    return _peft().LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                              target_modules=kw.pop("target_modules", QWEN_VL_TARGET_MODULES), **kw)


def _zero3(params) -> bool:
    return any(hasattr(p, "ds_id") for p in params)


@contextlib.contextmanager
def _gathered(params):
    """Every rank holds the full ``params`` inside (a collective under ZeRO-3; else a no-op)."""
    params = list(params)
    if not _zero3(params):
        yield
        return
    import deepspeed
    with deepspeed.zero.GatheredParameters(params):
        yield


class LoraPolicy:
    """The policy's LoRA adapters (see the module's docstring).

    ``model``: a Hugging Face model; ``peft_config``: a ``peft.LoraConfig``, used as given except
    that ``target_modules=None`` (and no ``target_parameters``) means :data:`QWEN_VL_TARGET_MODULES`.
    The user's object is never modified. ``self.model`` is ``model``, adapters injected in place;
    ``self.peft_model`` the ``peft.PeftModel`` around it (saving, disabling)."""

    def __init__(self, model: torch.nn.Module, peft_config, needs_reference: bool = False):
        peft = _peft()
        if not isinstance(peft_config, peft.LoraConfig):
            raise TypeError(f"peft_config must be a peft.LoraConfig, got {type(peft_config).__name__}; other "
                            f"peft methods are not supported (the reference model and the merged save are LoRA's)")
        if getattr(model, "peft_config", None) is not None or isinstance(model, peft.PeftModel):
            raise ValueError("the model already holds peft adapters; pass the plain model with peft_config=, "
                             "or merge the adapters first (PeftModel.merge_and_unload())")
        if needs_reference and peft_config.bias != "none":
            raise ValueError(f"peft_config.bias={peft_config.bias!r} trains the base model's biases, so the "
                             f"policy with adapters disabled is not the starting model and cannot serve as the "
                             f"reference (beta > 0); use bias='none', or pass ref_model=")
        config = copy.deepcopy(peft_config)
        if config.target_modules is None and not getattr(config, "target_parameters", None):
            config.target_modules = QWEN_VL_TARGET_MODULES
        self.config = config
        try:
            with warnings.catch_warnings():  # peft 0.21 reads transformers 5's deprecated alias: noise
                warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                        category=FutureWarning)
                self.peft_model = peft.get_peft_model(model, config)
        except ValueError as err:  # e.g. target_modules matching nothing: name the field
            raise ValueError(f"peft_config: {err}") from err
        self.model = self.peft_model.get_base_model()
        if self.model is not model:
            raise RuntimeError("peft returned a different model object; adapters must be injected in place")

    # ------------------------------------------------------------------ parameters
    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------ reference
    @contextlib.contextmanager
    def adapters_disabled(self):
        """The base model inside: every adapter layer is bypassed (peft's ``disable_adapter``).
        ``requires_grad`` of every parameter is kept as it was (peft clears the adapters' flags
        while disabled): the optimizer and ZeRO's gradient hooks rely on them, and so does
        ``models.reuse.vision_frozen``, which decides whether image features may be shared."""
        flags = [(p, p.requires_grad) for p in self.model.parameters()]

        def restore():
            for p, flag in flags:
                if p.requires_grad != flag:
                    p.requires_grad_(flag)

        try:
            with self.peft_model.disable_adapter():
                restore()
                yield self.model
        finally:
            restore()  # peft's enable marks the active adapters trainable again; keep the user's choice

    def reference(self, forward):
        """A callable for the back-end's ``ref_module``: ``forward(**kw)`` (the policy's forward,
        through the back-end) with the adapters disabled and no gradient."""
        return AdaptersDisabled(self, forward)

    # ------------------------------------------------------------------ saving
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """peft's adapter state dict (the keys ``adapter_model.safetensors`` holds), on CPU. Every
        rank calls it under ZeRO-3 (the trainable parameters are gathered)."""
        peft = _peft()
        with _gathered(p for _, p in self.trainable_parameters()):
            sd = peft.get_peft_model_state_dict(self.peft_model)
            return {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}

    def save_adapters(self, folder: str | Path, is_main: bool = True) -> Path:
        """``adapter_config.json`` + ``adapter_model.safetensors`` in ``folder`` (peft's
        ``save_pretrained``; rank 0 writes, every rank calls this under ZeRO-3)."""
        folder = Path(folder)
        with _gathered(p for _, p in self.trainable_parameters()):
            if is_main:
                self.peft_model.save_pretrained(folder)
        if is_main:
            missing = [f for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (folder / f).is_file()]
            if missing:
                raise RuntimeError(f"{folder}: peft did not write {missing}")
        return folder

    def merged_state_dict(self, is_main: bool = True) -> dict[str, torch.Tensor]:
        """The weights of the plain model (no LoRA layers, the keys of the model before
        ``get_peft_model``) with every active adapter merged in: W + scale * B A (peft's own
        merge, so DoRA and LoRA biases are merged as peft does). Out of place: the live base
        weights are restored bit for bit. Every rank calls it under ZeRO-3 (all weights gathered,
        copied to CPU on rank 0 only; the other ranks get {})."""
        params = list(self.model.parameters())
        clone = _zero3(params)  # gathered storage is freed when the context ends
        out: dict[str, torch.Tensor] = {}
        with _gathered(params), torch.no_grad():
            if is_main:
                _emit(self.model, "", out, clone)
        return out

    def save_merged(self, folder: str | Path, is_main: bool = True) -> Path:
        """The merged model as a plain Hugging Face folder (config + safetensors weights)."""
        folder = Path(folder)
        state = self.merged_state_dict(is_main)
        if is_main:
            self.model.save_pretrained(folder, state_dict=state)
        return folder

    def save(self, folder: str | Path, merged: bool = False, is_main: bool = True) -> Path:
        return self.save_merged(folder, is_main) if merged else self.save_adapters(folder, is_main)

    def load_adapters(self, folder: str | Path) -> None:
        """Load the adapter weights ``save_adapters`` wrote into the live adapters (not under
        ZeRO-3: DeepSpeed restores its partitions from its own checkpoint)."""
        from safetensors.torch import load_file
        peft = _peft()
        path = Path(folder) / ADAPTER_WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no LoRA adapter weights; this checkpoint was not written by a "
                                    f"run with peft_config= (resume it without peft_config, or start over)")
        state = load_file(str(path))
        expected = {k: tuple(v.shape) for k, v in self.adapter_state_dict().items()}
        found = {k: tuple(v.shape) for k, v in state.items()}
        if found != expected:
            extra, missing = sorted(set(found) - set(expected))[:3], sorted(set(expected) - set(found))[:3]
            shapes = [f"{k}: {found[k]} saved, {expected[k]} now" for k in sorted(set(found) & set(expected))
                      if found[k] != expected[k]][:3]
            raise ValueError(f"{path}: the saved adapters do not match peft_config (target_modules, r, ...): "
                             f"unexpected {extra}, missing {missing}, shapes {shapes}; resume with the run's "
                             f"own peft_config")
        device = next(p.device for _, p in self.trainable_parameters())
        result = peft.set_peft_model_state_dict(self.peft_model, {k: v.to(device) for k, v in state.items()})
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"{path}: peft did not load {unexpected[:3]}")


class AdaptersDisabled:
    """The back-end's ``ref_module`` of a LoRA run: the policy forward, adapters off, no grad."""

    def __init__(self, lora: LoraPolicy, forward):
        self.lora, self.forward = lora, forward

    def __call__(self, **kw):
        with torch.no_grad(), self.lora.adapters_disabled():
            return self.forward(**kw)


def _emit(module: torch.nn.Module, prefix: str, out: dict, clone: bool) -> None:
    """Fill ``out`` with the plain model's state dict under ``module``: LoRA layers as their
    merged base layer, modules_to_save wrappers as their trained copy."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper
    if isinstance(module, LoraLayer):
        base = module.get_base_layer()
        saved = {n: p.data for n, p in base.named_parameters(recurse=False)}
        merged_before = list(module.merged_adapters)
        if merged_before:
            raise RuntimeError(f"{prefix[:-1]}: adapters are merged into the live weights; unmerge them first")
        try:
            module.merge(safe_merge=True)   # safe: writes new tensors, the originals are kept in `saved`
            state = {n: t.detach() for n, t in base.state_dict().items()}
            out.update({prefix + n: (t.clone().cpu() if clone else t) for n, t in state.items()})
        finally:
            for n, p in base.named_parameters(recurse=False):
                p.data = saved[n]
            module.merged_adapters.clear()
        return
    if isinstance(module, ModulesToSaveWrapper):
        inner = (module.original_module if module.disable_adapters or not module.active_adapters
                 else module.modules_to_save[module.active_adapters[0]])
        _emit(inner, prefix, out, clone)
        return
    if type(module).__module__.startswith("peft."):
        raise NotImplementedError(f"{prefix[:-1]}: merging a {type(module).__name__} is not supported; save "
                                  f"the adapters (merged=False) and merge them with peft")
    for name, p in module.named_parameters(recurse=False):
        out[prefix + name] = p.detach().clone().cpu() if clone else p.detach()
    for name, b in module.named_buffers(recurse=False):
        if name not in module._non_persistent_buffers_set:
            out[prefix + name] = b.detach().clone().cpu() if clone else b.detach()
    for name, child in module.named_children():
        _emit(child, prefix + name + ".", out, clone)
