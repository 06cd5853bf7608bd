"""Loading policy/reference models from a local folder: attention, dtype, freezing, errors."""
import pytest
import torch

from models import ModelConfig, load_policy, load_reference, pick_attn_implementation, pick_dtype
from models.processor import load_processor, pixel_limits


@pytest.mark.parametrize("cuda,flash", [(False, False), (True, False), (True, True)])
def test_auto_picks_by_machine(monkeypatch, cuda, flash):
    """The choice on a CPU machine, a CUDA machine without flash-attn and one with it, whatever
    machine runs the test."""
    import models.loading as loading
    monkeypatch.setattr(loading.torch.cuda, "is_available", lambda: cuda)
    real_find_spec = loading.importlib.util.find_spec
    monkeypatch.setattr(loading.importlib.util, "find_spec",
                        lambda name, *a: (object() if flash else None) if name == "flash_attn"
                        else real_find_spec(name, *a))
    assert pick_attn_implementation("auto") == ("flash_attention_2" if flash else "sdpa")
    assert pick_dtype("auto") == (torch.bfloat16 if cuda else torch.float32)
    assert pick_dtype("bfloat16") == torch.bfloat16
    if not flash:
        with pytest.raises(ValueError, match="flash-attn"):
            pick_attn_implementation("flash_attention_2")
    with pytest.raises(ValueError, match="dtype='int8'"):
        pick_dtype("int8")


def test_policy_freezes_vision_tower_and_merger(tiny_ckpt):
    model = load_policy(ModelConfig(str(tiny_ckpt), freeze_vision=True))
    visual = model.model.visual
    assert all(not p.requires_grad for p in visual.parameters())
    assert all(not p.requires_grad for p in visual.merger.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if "visual" not in n)
    assert model.config._attn_implementation == pick_attn_implementation("auto")  # sdpa on CPU
    assert next(model.parameters()).dtype == pick_dtype("auto")  # float32 on CPU


def test_policy_gradient_checkpointing_and_reference_frozen(tiny_ckpt):
    model = load_policy(ModelConfig(str(tiny_ckpt), freeze_vision=False, gradient_checkpointing=True))
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    assert all(p.requires_grad for p in model.parameters())
    ref = load_reference(ModelConfig(str(tiny_ckpt)))
    assert not ref.training and all(not p.requires_grad for p in ref.parameters())


def test_missing_folder_and_hub_names_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        load_policy(ModelConfig(str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="hub name"):
        load_policy(ModelConfig("Qwen/Qwen2.5-VL-7B-Instruct"))


def test_processor_pixel_limits_override(tiny_ckpt):
    assert pixel_limits(load_processor(tiny_ckpt).image_processor) == (3136, 65536)
    assert pixel_limits(load_processor(tiny_ckpt, max_pixels=12544).image_processor) == (3136, 12544)
    with pytest.raises(ValueError, match="min_pixels"):
        load_processor(tiny_ckpt, min_pixels=9000, max_pixels=4000)
