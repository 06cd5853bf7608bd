"""Plain reward functions (TRL's ``f(prompts, completions, **columns)``) beside Reward objects, and
dataset items in TRL's vision format: what the functions receive, the contract they keep, and that
their scores reach the trainer's metrics with the values computed by hand."""
import json
import math
import re
import threading

import pytest
import torch
from PIL import Image

from grpo.samples import (default_prompt, default_reward_sample, prepare_messages, prompt_text,
                          reward_field_problems)
from rewards import (AccuracyReward, FormatReward, FunctionReward, OverlongPenalty, Reward, RewardError,
                     RewardSample, TrainerState, as_rewards, score_all)


# ---------------------------------------------------------------- TRL-style reward functions
def think_format(completions, **kwargs):
    """TRL's think-format check: the whole completion is <think>...</think><answer>...</answer>."""
    pattern = r"^<think>.*?</think>\s*<answer>.*?</answer>$"
    return [1.0 if re.match(pattern, c[0]["content"], re.DOTALL) else 0.0 for c in completions]


def answer_match(completions, solution, **kwargs):
    """1 when the <answer> equals the solution column; None (abstain) for rows without a solution."""
    out = []
    for completion, sol in zip(completions, solution):
        if sol is None:
            out.append(None)
            continue
        m = re.search(r"<answer>(.*?)</answer>", completion[0]["content"], re.DOTALL)
        out.append(1.0 if m and m.group(1).strip() == sol else 0.0)
    return out


RED, BLUE = (220, 30, 30), (30, 30, 220)


def trl_item(i, solution, colour=RED, parts=False):
    """A row in TRL's vision format: conversational prompt, one PIL image, extra columns. Content as
    strings, or (``parts``) as lists of parts with an image placeholder."""
    system, content = "Think, then answer.", "Which colour is the image?"
    if parts:
        system, content = [{"type": "text", "text": system}], [{"type": "image"}, {"type": "text", "text": content}]
    return {"prompt": [{"role": "system", "content": system}, {"role": "user", "content": content}],
            "image": Image.new("RGB", (56, 56), colour), "solution": solution, "id": f"r{i}"}


GOOD = "<think>it is red</think><answer>red</answer>"
WRONG = "<think>hmm</think><answer>blue</answer>"
UNTAGGED = "red"


def test_function_scores_and_abstentions_reach_score_all_metrics():
    items = [trl_item(0, "red"), trl_item(1, None, parts=True)]
    texts = [GOOD, WRONG, UNTAGGED, GOOD]
    samples = [default_reward_sample(items[i // 2], t) for i, t in enumerate(texts)]
    scores, metrics = score_all(as_rewards([think_format, answer_match]), samples)
    # think_format: GOOD 1, WRONG 1, UNTAGGED 0, GOOD 1; answer_match: red==red 1, blue 0, then no solution
    expected = [[1.0, 1.0], [1.0, 0.0], [0.0, math.nan], [1.0, math.nan]]
    assert torch.equal(scores.isnan(), torch.tensor(expected).isnan())
    assert scores.nan_to_num(-7).tolist() == torch.tensor(expected).nan_to_num(-7).tolist()
    assert metrics["reward/think_format/mean"] == pytest.approx(3 / 4)
    assert metrics["reward/think_format/abstain_rate"] == 0.0
    assert metrics["reward/answer_match/mean"] == pytest.approx(1 / 2)
    assert metrics["reward/answer_match/abstain_rate"] == pytest.approx(1 / 2)


def test_the_arguments_follow_trl():
    seen = {}

    def spy(prompts, completions, completion_ids=None, **columns):
        seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, columns=columns)
        return [0.0] * len(completions)

    item = trl_item(0, "red")
    s = default_reward_sample(item, GOOD)
    s.extra = {**s.extra, "completion_ids": [5, 6, 7], "trainer_state": TrainerState(global_step=3, max_steps=10)}
    score_all([FunctionReward(spy)], [s])
    prompt = seen["prompts"][0]
    # TRL's prepare_multimodal_messages: content as parts, the image before the first user text
    assert prompt[0] == {"role": "system", "content": [{"type": "text", "text": "Think, then answer."}]}
    assert [p["type"] for p in prompt[1]["content"]] == ["image", "text"]
    assert prompt[1]["content"][0]["image"] is item["image"]
    assert seen["completions"] == [[{"role": "assistant", "content": GOOD}]]
    assert seen["completion_ids"] == [[5, 6, 7]]
    cols = seen["columns"]
    assert cols["solution"] == ["red"] and cols["id"] == ["r0"] and cols["image"][0] is item["image"]
    assert cols["images"] == [[item["image"]]] and cols["answer"] == ["red"]
    assert cols["question"] == ["Which colour is the image?"]
    assert cols["trainer_state"] == TrainerState(3, 10)          # one per batch, not a list
    assert "prompt" not in cols and callable(cols["log_metric"])

    # a string prompt (not conversational): completions are plain strings, as in TRL
    seen.clear()
    s = default_reward_sample({"prompt": "2+2?", "solution": "4"}, "4")
    score_all([FunctionReward(spy)], [s])
    assert seen["prompts"] == ["2+2?"] and seen["completions"] == ["4"]


def test_a_function_without_kwargs_gets_only_its_parameters_and_missing_ones_are_named():
    def only_completions(completions):
        return [float(len(c[0]["content"])) for c in completions]

    s = default_reward_sample(trl_item(0, "red"), "abc")
    scores, _ = score_all([FunctionReward(only_completions)], [s])
    assert scores.tolist() == [[3.0]]      # a length: outside [0, 1], fine for a function reward

    def needs_difficulty(completions, difficulty, **kw):
        return [1.0] * len(completions)
    with pytest.raises(RewardError, match=r"needs_difficulty.*\['difficulty'\].*add the column"):
        score_all([FunctionReward(needs_difficulty)], [s])


def test_async_functions_run_on_the_background_loop():
    threads = []

    async def slow_judge(prompts, completions, solution, **kw):
        threads.append(threading.current_thread().name)
        return [0.5 if sol else None for sol in solution]

    reward = FunctionReward(slow_judge, weight=2.0)
    assert reward.is_async and reward.name == "slow_judge" and reward.weight == 2.0
    samples = [default_reward_sample(trl_item(0, "red"), GOOD), default_reward_sample(trl_item(1, None), GOOD)]
    scores, metrics = score_all([reward, FunctionReward(think_format)], samples)
    assert threads == ["rewards-loop"]
    assert scores[:, 0].nan_to_num(-1).tolist() == [0.5, -1.0] and scores[:, 1].tolist() == [1.0, 1.0]
    assert metrics["reward/slow_judge/abstain_rate"] == 0.5
    assert reward.score_batch(samples[:1]) == [0.5]   # also callable from plain sync code


def test_range_any_finite_number_by_default_nan_refused():
    s = [default_reward_sample(trl_item(0, "red"), GOOD)] * 2

    def signed(completions, **kw):
        return [-1.0, 7.5]

    assert score_all([FunctionReward(signed)], s)[0].tolist() == [[-1.0], [7.5]]
    with pytest.raises(RewardError, match=r"outside its declared range \[-1.0, 1.0\]"):
        score_all([FunctionReward(signed, range=(-1, 1))], s)

    def nan(completions, **kw):
        return [float("nan"), 1.0]
    with pytest.raises(RewardError, match="return None to abstain instead of NaN"):
        score_all([FunctionReward(nan)], s)

    def short(completions, **kw):
        return [1.0]
    with pytest.raises(RewardError, match="returned 1 values for 2 samples"):
        score_all([FunctionReward(short)], s)

    def bools_and_tensor(completions, **kw):
        return torch.tensor([True, False])
    assert score_all([FunctionReward(bools_and_tensor)], s)[0].tolist() == [[1.0], [0.0]]
    with pytest.raises(ValueError, match="low <= high"):
        FunctionReward(signed, range=(1, -1))


def test_log_metric_is_averaged_under_the_reward_name():
    def logging_reward(completions, log_metric, **kw):
        log_metric("length", sum(len(c[0]["content"]) for c in completions) / len(completions))
        return [0.0] * len(completions)

    s = [default_reward_sample(trl_item(0, "red"), "ab"), default_reward_sample(trl_item(0, "red"), "abcd")]
    _, metrics = score_all([FunctionReward(logging_reward, name="lr")], s)
    assert metrics["reward/lr/length"] == 3.0
    assert "reward/lr/length" not in score_all([FunctionReward(think_format)], s)[1]


def test_as_rewards_wraps_callables_and_refuses_what_it_cannot_run():
    fmt = FormatReward()
    out = as_rewards([think_format, fmt])
    assert isinstance(out[0], FunctionReward) and out[0].name == "think_format" and out[1] is fmt
    assert [r.name for r in as_rewards(think_format)] == ["think_format"]     # a single function
    with pytest.raises(TypeError, match=r"class AccuracyReward; pass an instance"):
        as_rewards([AccuracyReward])
    with pytest.raises(TypeError, match="reward models are not supported"):
        as_rewards(["org/reward-model"])
    with pytest.raises(TypeError, match="pass a function"):
        as_rewards([3])
    with pytest.raises(TypeError, match="already a rewards.Reward"):
        FunctionReward(fmt)
    # two lambdas share a name: score_all says how to tell them apart
    with pytest.raises(RewardError, match="pass name="):
        score_all(as_rewards([lambda completions, **k: [0.0], lambda completions, **k: [1.0]]),
                  [RewardSample(question="q", completion="c", answer="a")])


def test_outside_the_trainer_the_prompt_defaults_to_the_question():
    seen = []

    def spy(prompts, completions, **kw):
        seen.append((prompts, completions))
        return [None]

    score_all([FunctionReward(spy)], [RewardSample(question="q?", completion="c", answer="a")])
    assert seen == [([[{"role": "user", "content": "q?"}]], [[{"role": "assistant", "content": "c"}]])]


# ---------------------------------------------------------------- TRL-format items
def test_prepare_messages_places_and_counts_images():
    a, b = Image.new("RGB", (28, 28)), Image.new("RGB", (28, 28))
    msgs, imgs = prepare_messages([{"role": "user", "content": "two?"}], [a, b])
    assert msgs == [{"role": "user", "content": [{"type": "image", "image": a}, {"type": "image", "image": b},
                                                 {"type": "text", "text": "two?"}]}]
    assert imgs == [a, b]
    # parts as a datasets struct column gives them (None in the keys a part does not use)
    parts = [{"type": "text", "text": "first", "image": None}, {"type": "image", "text": None, "image": None}]
    msgs, imgs = prepare_messages([{"role": "user", "content": parts}], [a])
    assert msgs[0]["content"] == [{"type": "text", "text": "first"}, {"type": "image", "image": a}]
    with pytest.raises(ValueError, match=r"item 'x7': the prompt has 1 image placeholder\(s\).* 2 image\(s\)"):
        prepare_messages([{"role": "user", "content": parts}], [a, b], "dataset item 'x7'")
    with pytest.raises(ValueError, match="'prompt' must be a string or a non-empty list of chat messages"):
        prepare_messages([{"content": "no role"}], [])
    assert prompt_text([{"role": "user", "content": parts}]) == "first"


def test_default_prompt_and_reward_sample_of_trl_items():
    item = trl_item(0, "red", BLUE, parts=True)
    messages, images = default_prompt(item)
    assert len(images) == 1 and images[0].getpixel((0, 0)) == BLUE
    assert [p["type"] for p in messages[1]["content"]] == ["image", "text"]
    s = default_reward_sample(item, GOOD)
    assert (s.question, s.answer, s.images) == ("Which colour is the image?", "red", [item["image"]])
    assert AccuracyReward().score(s) == 1.0        # `solution` is the built-in rewards' answer
    # `images` (a list) and `answer` win over `image` and `solution`
    two = {"prompt": [{"role": "user", "content": "?"}], "images": [item["image"]] * 2, "answer": "A",
           "solution": "B", "question": "Q"}
    assert len(default_prompt(two)[1]) == 2
    assert (default_reward_sample(two, "").answer, default_reward_sample(two, "").question) == ("A", "Q")
    with pytest.raises(KeyError, match="no 'messages' or 'prompt' field"):
        default_prompt({"question": "q"})


def test_built_in_rewards_that_need_the_answer_are_refused_clearly():
    no_answer = {"prompt": [{"role": "user", "content": "?"}], "image": Image.new("RGB", (28, 28))}
    problems = reward_field_problems(no_answer, as_rewards([think_format, AccuracyReward(), FormatReward()]))
    assert len(problems) == 1 and "['accuracy']" in problems[0] and "no 'answer' or 'solution'" in problems[0]
    assert reward_field_problems(no_answer, as_rewards([think_format, FormatReward(), OverlongPenalty(buffer=4)])) == []
    assert reward_field_problems(trl_item(0, "red"), [AccuracyReward()]) == []


def test_a_datasets_dataset_of_trl_rows_passes_through_as_rows():
    import datasets
    from data.convert import as_records
    rows = [trl_item(0, "red", parts=True), {**trl_item(1, None, BLUE, parts=True)}]
    ds = datasets.Dataset.from_list(rows)
    items = as_records(ds)
    assert len(items) == 2 and items[0]["solution"] == "red" and items[1]["solution"] is None
    messages, images = default_prompt(items[1])
    assert images[0].getpixel((0, 0)) == BLUE
    assert messages[1]["content"][1] == {"type": "text", "text": "Which colour is the image?"}
    texts = [GOOD, WRONG]
    samples = [default_reward_sample(items[i], t) for i, t in enumerate(texts)]
    scores, _ = score_all(as_rewards([think_format, answer_match]), samples)
    assert scores[:, 0].tolist() == [1.0, 1.0] and scores[0, 1] == 1.0 and scores[1, 1].isnan()


class Constant(Reward):
    name = "constant"

    def score(self, sample):
        return 0.25


# ---------------------------------------------------------------- in the trainer
class TextSampler:
    """Forced completions: row r of every generation batch is ``texts[r % G]`` then EOS, whatever
    the prompt (so each group of G holds the same G texts)."""

    def __init__(self, texts):
        self.texts = texts

    def __call__(self, model, adapter, prompts, cfg, chunk=None):
        from grpo.rollout import Completions, mask_after_eos
        rows = []
        for r in range(len(prompts)):
            ids = adapter.tokenizer(self.texts[r % cfg.num_generations], add_special_tokens=False)["input_ids"]
            ids = ids + [adapter.eos_token_ids[0]] * (cfg.max_completion_length - len(ids))
            assert len(ids) == cfg.max_completion_length and ids[-1] in adapter.eos_token_ids
            rows.append(torch.tensor(ids))
        ids = torch.stack(rows)
        mask, truncated = mask_after_eos(ids, adapter.eos_token_ids)
        return Completions(ids, mask, truncated)


def _trainer(ckpt, tmp_path, reward_funcs, items, **cfg):
    from grpo import GRPOConfig, GRPOTrainer
    from models import ModelConfig, load_policy, load_processor
    args = GRPOConfig(num_generations=4, per_device_train_batch_size=8, gradient_accumulation_steps=1, max_steps=1,
                      max_completion_length=24, beta=0.0, learning_rate=1e-3, output_dir=str(tmp_path),
                      disable_tqdm=True, **cfg)
    return GRPOTrainer(model=load_policy(ModelConfig(str(ckpt), freeze_vision=True)), reward_funcs=reward_funcs,
                       args=args, train_dataset=items, processing_class=load_processor(ckpt))


def test_trl_functions_and_reward_objects_reach_the_trainer_metrics(tiny_ckpt, tmp_path):
    texts = [GOOD, WRONG, UNTAGGED, "<think>x</think> <answer>red</answer>"]
    calls = []

    def spy(prompts, completions, completion_ids, trainer_state, **columns):
        calls.append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids,
                          trainer_state=trainer_state, columns=columns))
        return [0.0] * len(completions)

    items = [trl_item(0, "red", RED), trl_item(1, None, BLUE, parts=True)]
    trainer = _trainer(tiny_ckpt, tmp_path, [think_format, answer_match, Constant(), spy], items,
                       reward_weights=(1.0, 2.0, 4.0, 0.0))
    assert [type(r).__name__ for r in trainer.rewards] == ["FunctionReward", "FunctionReward", "Constant",
                                                          "FunctionReward"]
    trainer.sampler = TextSampler(texts)
    with pytest.warns(RuntimeWarning, match="'answer_match' abstained on 50.0% of samples"):
        (m,) = trainer.train()
    # by hand: think_format per group [1, 1, 0, 1]; answer_match [1, 0, 0, 1] for the red item, None
    # (abstain) x 4 for the item without a solution; the Reward object 0.25 everywhere
    assert m["reward/think_format/mean"] == pytest.approx(6 / 8)
    assert m["reward/think_format/abstain_rate"] == 0.0
    assert m["reward/answer_match/mean"] == pytest.approx(2 / 4)
    assert m["reward/answer_match/abstain_rate"] == pytest.approx(0.5)
    assert m["reward/constant/mean"] == pytest.approx(0.25)
    # weights (1, 2, 4, 0), an abstention adds nothing: red rows 4, 2, 1, 4; the other rows 2, 2, 1, 2
    assert m["reward/mean"] == pytest.approx(18 / 8)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["reward/answer_match/abstain_rate"] == pytest.approx(0.5)

    preflight, rollout = calls                      # the pre-flight check's one sample, then the batch
    assert len(preflight["completions"]) == 1 and preflight["trainer_state"] == TrainerState(0, 1)
    assert rollout["trainer_state"] == TrainerState(global_step=0, max_steps=1)
    tok, eos = trainer.adapter.tokenizer, trainer.adapter.eos_token_ids[0]
    assert rollout["completion_ids"] == [tok(texts[r % 4], add_special_tokens=False)["input_ids"] + [eos]
                                         for r in range(8)]
    assert [c[0]["content"] for c in rollout["completions"]] == texts * 2
    by_solution = {sol: p for sol, p in zip(rollout["columns"]["solution"], rollout["prompts"])}
    blue_prompt = by_solution[None]                  # the item given with an explicit placeholder
    assert [p["type"] for p in blue_prompt[1]["content"]] == ["image", "text"]
    assert blue_prompt[1]["content"][0]["image"] is items[1]["image"]
    assert rollout["columns"]["id"].count("r0") == 4 and rollout["columns"]["completion_tokens"][0] == 18


def test_messages_items_get_the_encoded_prompt_and_records_work_too(tiny_ckpt, tmp_path):
    seen = []

    def spy(prompts, completions, **kw):
        seen.append(prompts)
        return [1.0] * len(completions)

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
    items = [{"id": "m0", "messages": messages, "images": [Image.new("RGB", (56, 56), RED)], "question": "Colour?",
              "answer": "red"}] * 2
    trainer = _trainer(tiny_ckpt, tmp_path, spy, items)          # a single function, as TRL allows
    trainer.sampler = TextSampler([GOOD] * 4)
    trainer.rollout(0)
    assert seen[-1] == [messages] * 8


def test_a_built_in_reward_without_a_reference_answer_is_refused_at_construction(tiny_ckpt, tmp_path):
    items = [{"prompt": [{"role": "user", "content": "Colour?"}], "image": Image.new("RGB", (56, 56), RED)}] * 2
    with pytest.raises(ValueError, match=r"\['accuracy'\] compare with the reference answer.*no 'answer' or "
                                         r"'solution' column"):
        _trainer(tiny_ckpt, tmp_path, [think_format, AccuracyReward()], items)


def test_docs_plain_functions_example_runs():
    from pathlib import Path
    doc = (Path(__file__).resolve().parents[2] / "docs" / "rewards.md").read_text()
    block = re.search(r"<!-- example: plain-functions -->\n```python\n(.*?)```", doc, re.DOTALL).group(1)
    namespace: dict = {}
    exec(compile(block, "docs/rewards.md", "exec"), namespace)
    scores, metrics = namespace["scores"], namespace["metrics"]
    assert scores.nan_to_num(-1).tolist() == [[1.0, 1.0], [1.0, 0.0], [0.0, -1.0]]
    assert metrics["reward/answer_match/mean"] == 0.5
    assert metrics["reward/answer_match/abstain_rate"] == pytest.approx(1 / 3)
