"""AccuracyReward: answer forms, normalisation, reward-hacking cases, property tests."""
import pytest
from hypothesis import given, settings, strategies as st

from rewards import AccuracyReward, RewardSample

OPTS = ["Adenoma", "Adenocarcinoma", "Lymphoma", "Carcinoma in situ", "Carcinoma"]


def acc(completion, answer="B", options=OPTS, **kw):
    sample = RewardSample(question="Which lesion?", completion=completion, answer=answer, options=options)
    return AccuracyReward(**kw).score(sample)


@pytest.mark.parametrize("answer", [
    "B", "b", "(B)", "B.", "B)", "Option B", "The answer is B", "**B**", "B) Adenocarcinoma",
    "(B) Adenocarcinoma", "B. adenocarcinoma", "Adenocarcinoma", "adenocarcinoma.", "  B  ",
    "Answer: B", "The final answer is: B) Adenocarcinoma",
])
def test_multiple_choice_forms_score_one(answer):
    assert acc(f"<think>r</think><answer>{answer}</answer>") == 1.0


@pytest.mark.parametrize("answer", [
    "", "   ", "C", "F", "Adenoma", "A or B", "B, C", "B/C", "A and B", "B) Adenocarcinoma C) Lymphoma",
    "B) Lymphoma", "Adenocarcinoma or lymphoma", "I am not sure", "Z",
])
def test_wrong_empty_or_hedged_answers_score_zero(answer):
    assert acc(f"<think>r</think><answer>{answer}</answer>") == 0.0


def test_longest_option_text_wins_over_contained_option():
    assert acc("<answer>carcinoma in situ</answer>", answer="D") == 1.0
    assert acc("<answer>carcinoma in situ</answer>", answer="E") == 0.0
    assert acc("<answer>Carcinoma</answer>", answer="E") == 1.0


def test_reads_last_answer_block_and_rejects_contradicting_blocks():
    assert acc("<answer>B</answer> <answer>B) Adenocarcinoma</answer>") == 1.0
    assert acc("<answer>C</answer> <answer>B</answer>") == 0.0
    assert acc("<answer>B</answer> <answer>C</answer>") == 0.0


def test_text_outside_tags_that_contradicts_scores_zero():
    assert acc("<think>r</think><answer>B</answer> Actually, the final answer is C.") == 0.0
    assert acc("So the answer is C. <answer>B</answer>") == 0.0
    assert acc("So the answer is B. <answer>B</answer>") == 1.0
    assert acc("<answer>B</answer> the answer is C", check_outside_text=False) == 1.0


def test_reasoning_may_discuss_other_options():
    assert acc("<think>The answer is not C; the answer is C only if lymphoid.</think><answer>B</answer>") == 1.0


def test_no_answer_block_or_unclosed_block_scores_zero():
    assert acc("B") == 0.0
    assert acc("<think>r</think><answer>B") == 0.0


def test_reference_given_as_option_text_or_letter_with_text():
    assert acc("<answer>B</answer>", answer="Adenocarcinoma") == 1.0
    assert acc("<answer>B</answer>", answer="B) Adenocarcinoma") == 1.0
    assert acc("<answer>A</answer>", answer="Adenocarcinoma") == 0.0


@pytest.mark.parametrize("answer,ref,expected", [
    ("Yes", "yes", 1.0), ("yes, the margins are involved", "Yes", 1.0), ("No.", "no", 1.0),
    ("no", "yes", 0.0), ("yes or no", "yes", 0.0), ("maybe", "yes", 0.0), ("", "no", 0.0),
])
def test_yes_no(answer, ref, expected):
    assert acc(f"<answer>{answer}</answer>", answer=ref, options=None) == expected


def test_yes_no_outside_contradiction():
    assert acc("<answer>yes</answer> Final answer: no", answer="yes", options=None) == 0.0


@pytest.mark.parametrize("answer,ref,expected", [
    ("The Nucleus.", "nucleus", 1.0), ("  HEMATOXYLIN  and eosin", "hematoxylin and eosin", 1.0),
    ("3.0", "3", 1.0), ("1,000", "1000", 1.0), ("mitochondria", "nucleus", 0.0),
    ("nucleus or mitochondria", "nucleus", 0.0), ("", "nucleus", 0.0),
])
def test_open_answers_with_normalisation(answer, ref, expected):
    assert acc(f"<answer>{answer}</answer>", answer=ref, options=None) == expected


text = st.text(alphabet=st.characters(codec="utf-8"), max_size=300)
tagged = st.builds(lambda a, b, c: f"{a}<answer>{b}</answer>{c}", text, text, text)


@settings(max_examples=300, deadline=None)
@given(completion=st.one_of(text, tagged), answer=text,
       options=st.one_of(st.none(), st.lists(text, max_size=30)))
def test_never_raises_and_stays_in_unit_interval(completion, answer, options):
    score = acc(completion, answer=answer, options=options)
    assert score in (0.0, 1.0)
