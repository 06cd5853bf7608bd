"""FormatReward: think-then-answer layout, whitespace tolerance, strict and lenient modes."""
import pytest
from hypothesis import given, settings, strategies as st

from rewards import FormatReward, RewardSample


def fmt(completion, **kw):
    return FormatReward(**kw).score(RewardSample(question="q", completion=completion, answer="a"))


@pytest.mark.parametrize("completion", [
    "<think>r</think><answer>B</answer>", "\n  <think>\nr\n</think>\n\n<answer> B </answer>\n",
])
def test_good_layout(completion):
    assert fmt(completion) == 1.0 and fmt(completion, mode="lenient") == 1.0


@pytest.mark.parametrize("completion", [
    "<answer>B</answer><think>r</think>",             # wrong order
    "<think>r</think>",                               # no answer
    "<think>r</think><answer>B</answer><answer>C</answer>",  # two answers
    "<think>r<answer>B</answer></think>",             # nested
    "<think>r</think><answer>B",                      # unclosed
    "<think>a</think><think>b</think><answer>B</answer>",
    "<think>r</think> <answer></answer>",            # empty answer
    "<think> </think><answer>B</answer>",            # empty think
])
def test_bad_layout_scores_zero_in_both_modes(completion):
    assert fmt(completion) == 0.0 and fmt(completion, mode="lenient") == 0.0


@pytest.mark.parametrize("completion", [
    "Sure! <think>r</think><answer>B</answer>", "<think>r</think> text <answer>B</answer>",
    "<think>r</think><answer>B</answer> Hope this helps.",
])
def test_text_outside_tags(completion):
    assert fmt(completion) == 0.0
    expected = 0.0 if " text " in completion else 1.0  # lenient still needs think directly before answer
    assert fmt(completion, mode="lenient") == expected


def test_empty_blocks_allowed_when_configured():
    assert fmt("<think></think><answer>B</answer>", require_nonempty=False) == 1.0


def test_bad_mode_names_the_field():
    with pytest.raises(ValueError, match="mode must be one of"):
        FormatReward(mode="loose")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(list("ab <>/\n") + ["<think>", "</think>", "<answer>", "</answer>"]),
                max_size=40).map("".join))
def test_never_raises(completion):
    assert fmt(completion) in (0.0, 1.0) and fmt(completion, mode="lenient") in (0.0, 1.0)
