"""Evaluation: the summary arithmetic by hand, and a real batched run on the tiny model."""
import pytest

from data import VQARecord
from grpo.evaluate import (EvalResult, Prediction, blank_prompt, claim_balance, evaluate, letter_baselines,
                           reasoning_conclusion, summarize, visual_reliance)
from rewards import RewardSample


def _p(i, modality, correct, fmt, tokens, difficulty="easy", source="s1"):
    return Prediction(id=str(i), modality=modality, source=source, completion="", correct=correct,
                      well_formatted=fmt, reasoning_tokens=tokens, difficulty=difficulty)


def test_summary_by_hand(tmp_path):
    preds = [_p(0, "ct", True, True, 10), _p(1, "ct", False, True, 20, "hard"),
             _p(2, "oct", True, False, 0, source="s2"), _p(3, "oct", True, True, 30, "hard", "s2")]
    r = summarize(preds)
    assert (r.n, r.accuracy, r.format_rate, r.mean_reasoning_tokens) == (4, 0.75, 0.75, 15.0)
    assert r.by_modality == {"ct": {"n": 2, "accuracy": 0.5}, "oct": {"n": 2, "accuracy": 1.0}}
    assert r.by_source == {"s1": {"n": 2, "accuracy": 0.5}, "s2": {"n": 2, "accuracy": 1.0}}
    assert r.by_difficulty == {"easy": {"n": 2, "accuracy": 1.0}, "hard": {"n": 2, "accuracy": 0.5}}
    r.to_json(tmp_path / "e.json")
    assert EvalResult.from_json(tmp_path / "e.json") == r
    assert "| overall | 4 | 75.00 % |" in r.table()
    with pytest.raises(ValueError, match="empty"):
        summarize([])


def _model_and_records(ckpt, n: int, answer: str):
    """The tiny model and ``n`` two-option items on noise images whose reference is ``answer``."""
    from helpers import noise_image
    from models import ModelConfig, load_policy
    model = load_policy(ModelConfig(str(ckpt))).eval()
    records = [{"id": f"r{i}", "question": "Q?", "answer": answer, "options": ["x", "y"], "modality": "ct",
                "images": [noise_image(i)],
                "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}]}
               for i in range(n)]
    return model, records


def test_evaluate_runs_batched_greedy_on_the_tiny_model(tiny_ckpt, tiny_processor):
    model, records = _model_and_records(tiny_ckpt, 5, "A")
    first = evaluate(model, tiny_processor, records, batch_size=2, max_new_tokens=6, progress=False)
    again = evaluate(model, tiny_processor, records, batch_size=5, max_new_tokens=6, progress=False)
    assert first.n == 5 and [p["id"] for p in first.predictions] == [f"r{i}" for i in range(5)]
    # greedy decoding does not depend on how the records are batched
    assert [p["completion"] for p in first.predictions] == [p["completion"] for p in again.predictions]
    # a random model neither answers correctly nor follows the format
    assert first.accuracy == 0.0 and first.format_rate == 0.0


def _mc(i, reference, chosen, num_options, difficulty="easy"):
    return Prediction(id=str(i), modality="pathology", source="s", completion="", correct=chosen == reference,
                      well_formatted=True, reasoning_tokens=1, difficulty=difficulty, chosen=chosen,
                      reference=reference, num_options=num_options)


def test_letter_baselines_and_distributions_by_hand():
    # correct letters: A, A, B (2-option, easy) and C, A (4-option, medium); predictions all "A" but one
    preds = [_mc(0, "A", "A", 2), _mc(1, "A", "A", 2), _mc(2, "B", "A", 2),
             _mc(3, "C", "", 4, "medium"), _mc(4, "A", "A", 4, "medium")]
    r = summarize(preds)
    # chance = (1/2 + 1/2 + 1/2 + 1/4 + 1/4) / 5 = 2.0 / 5
    assert r.baselines["chance"] == pytest.approx(0.4)
    # always "A" is right on items 0, 1, 4
    assert (r.baselines["constant_letter"], r.baselines["constant_letter_accuracy"]) == ("A", pytest.approx(0.6))
    assert r.baselines["by_difficulty"]["medium"] == {"chance": 0.25, "constant_letter": "A",
                                                      "constant_letter_accuracy": 0.5}
    assert r.answer_letters == {"A": 4, "none": 1}
    assert r.reference_letters == {"A": 3, "B": 1, "C": 1}
    assert r.accuracy == pytest.approx(0.6)  # the constant-letter model's score: no evidence of reading
    # a tie between letters is broken alphabetically, so the baseline is deterministic
    assert letter_baselines([_mc(0, "B", "B", 2), _mc(1, "A", "A", 2)])["constant_letter"] == "A"


def test_reasoning_agreement_by_hand():
    def p(i, chosen, concluded, difficulty="easy", num_options=2):
        return Prediction(id=str(i), modality="pathology", source="s", completion="", correct=True,
                          well_formatted=True, reasoning_tokens=1, difficulty=difficulty, chosen=chosen,
                          reference="A", num_options=num_options, concluded=concluded)
    preds = [p(0, "A", "A"), p(1, "B", "A"), p(2, "A", ""),          # easy: 1 of 3 agree
             p(3, "C", "C", "medium", 4), p(4, "D", "D", "medium", 4),  # medium: 2 of 2
             p(5, "", "A"), p(6, "A,B", "A,B"),                          # no single answer: not counted
             p(7, "", "", "open", 0)]                                    # open question: not counted
    r = summarize(preds)
    assert r.reasoning_agreement == {"overall": pytest.approx(3 / 5), "n": 5,
                                     "by_difficulty": {"easy": pytest.approx(1 / 3), "medium": 1.0}}
    assert "reasoning concludes the answer's option in 60.0 % of 5 single-option answers" in r.table()
    assert summarize([p(0, "", "", "open", 0)]).reasoning_agreement == {}


def test_claim_balance_counts_claims_against_the_truth_by_hand():
    """Four chains about size (two records true "small", one "large") and cellularity: the counts
    below are read off the chains by hand; "both" and "none" are claims too, a negated value alone
    asserts nothing, and a record without criteria is left out."""
    size_small = ["nuclear size is small, not large", "cellularity is high, not low"]
    size_large = ["nuclear size is large, not small", "cellularity is high, not low"]
    records = [VQARecord(id="0", images=[], question="q", answer="a", criteria=size_small),
               VQARecord(id="1", images=[], question="q", answer="a", criteria=size_small),
               VQARecord(id="2", images=[], question="q", answer="a", criteria=size_large),
               VQARecord(id="3", images=[], question="q", answer="a", criteria=size_large),
               VQARecord(id="4", images=[], question="q", answer="a")]

    def p(i, think):
        return Prediction(id=str(i), modality="pathology", source="s", correct=True, well_formatted=True,
                          reasoning_tokens=1, completion=f"<think>{think}</think><answer>A</answer>")
    preds = [p(0, "Nuclear size is small, not large. Cellularity is high, not low."),   # size right, cell right
             p(1, "The nuclei are large. Cellularity is low."),                          # size wrong, cell wrong
             p(2, "Nuclear size is small and large. Cellularity is not low."),           # both; none
             p(3, "Nuclear size is large, not small. Cellularity is high."),             # right, right
             p(4, "Nuclear size is small.")]                                             # no criteria
    table = claim_balance(preds, records)
    assert table["nuclear size"] == {"truth": {"small": 2, "large": 2}, "claimed": {"small": 1, "large": 2, "both": 1},
                                     "right": 2, "n": 4}
    assert table["cellularity"] == {"truth": {"high": 4}, "claimed": {"high": 2, "low": 1, "none": 1},
                                    "right": 2, "n": 4}
    # the dicts of an evaluation JSON give the same table
    from dataclasses import asdict
    assert claim_balance([asdict(x) for x in preds], records) == table


@pytest.mark.parametrize("completion,expected", [
    ("<think>Nuclear size is small, not large. So the answer is A.</think><answer>A</answer>", "A"),
    ("<think>Nuclear size is small, not large. So the answer is A.</think><answer>B</answer>", "A"),
    ("<think>The nuclei are large, therefore large nuclei.</think><answer>A</answer>", "B"),
    ("<think>Nuclear size is small, not large.</think><answer>A</answer>", ""),       # no conclusion
    ("<answer>A</answer>", ""),
])
def test_reasoning_conclusion_reads_letters_and_option_text(completion, expected):
    sample = RewardSample(question="Size?", completion=completion, answer="small nuclei",
                          options=["small nuclei", "large nuclei"])
    assert reasoning_conclusion(sample) == expected
    assert reasoning_conclusion(RewardSample(question="Size?", completion=completion, answer="small")) == ""


def test_visual_reliance_is_accuracy_minus_blank_by_hand():
    seen = summarize([_mc(0, "A", "A", 2), _mc(1, "B", "B", 2), _mc(2, "C", "C", 4, "medium"),
                      _mc(3, "D", "A", 4, "medium")])
    blank = summarize([_mc(0, "A", "A", 2), _mc(1, "B", "A", 2), _mc(2, "C", "A", 4, "medium"),
                       _mc(3, "D", "A", 4, "medium")])
    vr = visual_reliance(seen, blank)
    assert vr["overall"] == pytest.approx(0.75 - 0.25)
    assert vr["by_difficulty"] == {"easy": pytest.approx(0.5), "medium": pytest.approx(0.5)}


def test_blank_prompt_replaces_every_image_by_uniform_grey_of_the_same_size():
    from PIL import Image
    imgs = [Image.new("RGB", (56, 84), (200, 10, 10)), Image.new("RGB", (112, 28), (0, 255, 0))]
    item = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Q?"}]}], "images": imgs}
    messages, blanked = blank_prompt()(item)
    assert messages == item["messages"]
    assert [b.size for b in blanked] == [(56, 84), (112, 28)]
    for b in blanked:
        assert set(b.getdata()) == {(128, 128, 128)}
    assert imgs[0].getpixel((0, 0)) == (200, 10, 10)  # the originals are untouched


def test_evaluate_with_image_ablation_records_the_grey_control(tiny_ckpt, tiny_processor):
    model, records = _model_and_records(tiny_ckpt, 3, "y")
    r = evaluate(model, tiny_processor, records, batch_size=3, max_new_tokens=4, progress=False,
                 image_ablation=True)
    # a random model answers nothing: its grey run would show nothing, so it is not made
    assert r.accuracy == 0 and r.format_rate == 0
    assert r.blank is None and r.visual_reliance == {"skipped": "no correct or well-formatted answer with the images"}
    # a model that does answer (here: every prediction forced to the reference) gets the control
    import sys
    ev = sys.modules["grpo.evaluate"]  # the module (grpo.evaluate is also the function's name)
    real_predict = ev.predict

    def answering(*args, **kwargs):
        preds = real_predict(*args, **kwargs)
        for p in preds:
            p.correct = p.well_formatted = True
        return preds
    ev.predict = answering
    try:
        r = evaluate(model, tiny_processor, records, batch_size=3, max_new_tokens=4, progress=False,
                     image_ablation=True)
    finally:
        ev.predict = real_predict
    assert r.blank is not None and r.blank["n"] == 3
    assert r.visual_reliance["overall"] == pytest.approx(r.accuracy - r.blank["accuracy"])
    assert r.reference_letters == {"B": 3} and r.baselines["constant_letter_accuracy"] == 1.0
    assert r.baselines["chance"] == pytest.approx(0.5)
    plain = evaluate(model, tiny_processor, records, batch_size=3, max_new_tokens=4, progress=False)
    assert plain.blank is None and plain.visual_reliance is None
