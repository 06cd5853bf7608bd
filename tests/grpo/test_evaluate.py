"""Evaluation: the summary arithmetic by hand, and a real batched run on the tiny model."""
import pytest

from grpo.evaluate import EvalResult, Prediction, evaluate, summarize


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


def test_evaluate_runs_batched_greedy_on_the_tiny_model(tiny_ckpt, tiny_processor):
    from helpers import noise_image
    from models import ModelConfig, load_policy
    model = load_policy(ModelConfig(str(tiny_ckpt))).eval()
    records = [{"id": f"r{i}", "question": "Q?", "answer": "A", "options": ["x", "y"], "modality": "ct",
                "images": [noise_image(i)],
                "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}]}
               for i in range(5)]
    first = evaluate(model, tiny_processor, records, batch_size=2, max_new_tokens=6, progress=False)
    again = evaluate(model, tiny_processor, records, batch_size=5, max_new_tokens=6, progress=False)
    assert first.n == 5 and [p["id"] for p in first.predictions] == [f"r{i}" for i in range(5)]
    # greedy decoding does not depend on how the records are batched
    assert [p["completion"] for p in first.predictions] == [p["completion"] for p in again.predictions]
    # a random model neither answers correctly nor follows the format
    assert first.accuracy == 0.0 and first.format_rate == 0.0
