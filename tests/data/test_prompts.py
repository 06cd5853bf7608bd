"""Prompt text, chat message structure, SFT targets and the 28-multiple pixel limits."""
import pytest
from PIL import Image

from data import VQARecord
from data.prompts import (QUESTION_TEMPLATE, SYSTEM_PROMPT, build_messages, build_sft_target,
                          load_image, smart_size)


def _mc(path="/x.png"):
    return VQARecord(id="1", images=[path], question="Nuclear size?",
                     options=["small nuclei", "large nuclei"], answer="large nuclei",
                     criteria=["the nuclei are large", "option A (small nuclei) is excluded"])


def test_messages_follow_qwen_chat_format():
    messages = build_messages(_mc())
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == [{"type": "text", "text": SYSTEM_PROMPT}]
    image, text = messages[1]["content"]
    assert image == {"type": "image", "image": "/x.png"}
    assert text["text"] == ("Nuclear size?\nA. small nuclei\nB. large nuclei\nOutput the "
                            "thinking process in <think> </think> and the final answer (the "
                            "option letter) in <answer> </answer> tags.")
    assert "<think>" in SYSTEM_PROMPT and "{question}" in QUESTION_TEMPLATE


def test_sft_target_multiple_choice_and_open():
    assert build_sft_target(_mc()) == (
        "<think>The nuclei are large. Option A (small nuclei) is excluded. So the answer "
        "is B.</think><answer>B</answer>")
    open_q = VQARecord(id="2", images=["/x"], question="Organ?", answer="liver")
    assert build_sft_target(open_q) == ("<think>So the answer is liver.</think>"
                                        "<answer>liver</answer>")
    assert "a short phrase" in build_messages(open_q)[1]["content"][1]["text"]


@pytest.mark.parametrize("hw,expected", [
    ((112, 112), (112, 112)),   # already a multiple of 28 and within limits
    ((1000, 1000), (252, 252)),  # 1008^2 > 65536: scale sqrt(1e6/65536)=3.906, 256 -> 252
    ((30, 40), (56, 84)),       # 28*28 < 3136: scale sqrt(3136/1200)=1.617 -> ceil to 56, 84
    ((100, 300), (112, 308)),   # round(100/28)=4, round(300/28)=11; 34,496 px fits
])
def test_smart_size_hand_computed(hw, expected):
    assert smart_size(*hw) == expected
    h, w = smart_size(*hw)
    assert h % 28 == 0 and w % 28 == 0 and 3136 <= h * w <= 65536


def test_load_image_resizes_and_converts(tmp_path):
    path = tmp_path / "g.png"
    Image.new("L", (40, 30), 128).save(path)  # PIL size is (width, height)
    image = load_image(str(path))
    assert image.mode == "RGB" and image.size == (84, 56)


def test_extreme_aspect_ratio_is_refused():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_size(10, 3000)
