"""JudgeClient against a fault-injecting HTTP server process: retries, backoff, Retry-After,
abstain policy, cache, in-flight dedup, ledger, secrets. No exception reaches the caller."""
import asyncio
import logging
import math
import time

import pytest
from PIL import Image

from rewards import JudgeClient, JudgeConfig, JudgeError, ProcessReward, RewardError, RewardSample, score_all

from conftest import fault_stats

pytestmark = pytest.mark.server
FAST = dict(backoff_base=0.02, backoff_max=0.1, backoff_jitter=0.0, timeout=2.0)


def sample(ident, faults, scores="0.8,0.6", completion="<think>r</think><answer>B</answer>", **kw):
    return RewardSample(question=f"ID={ident} FAULTS={faults} SCORES={scores}", completion=completion,
                        answer="B", options=["A", "B"], **kw)


def reward(url, **cfg):
    return ProcessReward(JudgeConfig(base_url=url, **{**FAST, **cfg}))


def run(reward_, samples):
    return asyncio.run(reward_.ascore_batch(samples))


@pytest.mark.parametrize("faults", [
    "500,502,503,ok", "malformed,truncated,drop,ok", "emptychoices,nullcontent,ok", "429,ok",
    "fenced", "prose", "529,529,ok", "authorkeys",
])
def test_transient_faults_are_retried_until_success(fault_server, faults):
    r = reward(fault_server.url)
    ident = "t" + faults.replace(",", "_")
    assert run(r, [sample(ident, faults)]) == [pytest.approx(0.7)]
    expected_requests = len(faults.split(",")) if faults.endswith("ok") else 1
    m = r.metrics()
    assert m["judge/requests"] == expected_requests and m["judge/retries"] == expected_requests - 1
    assert m["judge/successes"] == 1 and m["judge/failures"] == 0
    paid = sum(step in ("ok", "nullcontent", "fenced", "prose", "authorkeys") for step in faults.split(","))
    assert (m["judge/prompt_tokens"], m["judge/completion_tokens"]) == (10 * paid, 5 * paid)  # usage of 200s
    assert len(fault_stats(fault_server.url)[ident]["times"]) == expected_requests


def test_retry_after_seconds_and_http_date_are_honoured(fault_server):
    r = reward(fault_server.url)
    assert run(r, [sample("ra", "429ra1,ok"), sample("rdate", "429date,ok")]) == [pytest.approx(0.7)] * 2
    stats = fault_stats(fault_server.url)
    assert stats["ra"]["times"][1] - stats["ra"]["times"][0] >= 1.0
    assert stats["rdate"]["times"][1] - stats["rdate"]["times"][0] >= 0.9  # date has 1 s resolution


def test_exponential_backoff_between_attempts(fault_server):
    r = reward(fault_server.url, backoff_base=0.2, backoff_max=5.0)
    assert run(r, [sample("bo", "503,503,ok")]) == [pytest.approx(0.7)]
    t = fault_stats(fault_server.url)["bo"]["times"]
    assert t[1] - t[0] >= 0.2 and t[2] - t[1] >= 0.4


def test_timeouts_including_a_trickling_body_are_retried(fault_server):
    r = reward(fault_server.url, timeout=0.5)
    assert run(r, [sample("slow", "delay1500,ok"), sample("trickle", "trickle,ok")]) == [pytest.approx(0.7)] * 2
    assert r.metrics()["judge/retries"] == 2


@pytest.mark.parametrize("policy,expected", [("abstain", None), ("zero", 0.0)])
def test_persistent_failure_follows_policy(fault_server, policy, expected):
    r = reward(fault_server.url, max_retries=2, on_failure=policy)
    assert run(r, [sample(f"dead{policy}", "503")]) == [expected]
    m = r.metrics()
    assert (m["judge/requests"], m["judge/retries"], m["judge/failures"], m["judge/fail/http_503"]) == (3, 2, 1, 1)


def test_raise_policy_surfaces_through_score_all_naming_the_reward(fault_server):
    r = reward(fault_server.url, max_retries=1, on_failure="raise")
    with pytest.raises(RewardError, match=r"reward 'process' raised JudgeError: judge failed \(http_500\)"):
        score_all([r], [sample("raise", "500")])


def test_client_errors_are_not_retried_and_huge_retry_after_gives_up(fault_server):
    r = reward(fault_server.url, max_retry_after=5)
    assert run(r, [sample("c400", "400"), sample("c404", "404"), sample("huge", "429ra9999")]) == [None] * 3
    m = r.metrics()
    assert m["judge/requests"] == 3 and m["judge/retries"] == 0
    assert m["judge/fail/http_400"] == m["judge/fail/http_404"] == m["judge/fail/retry_after_too_long"] == 1


@pytest.mark.parametrize("faults,parse_retries,expected,requests", [
    ("offformat,ok", 1, 0.7, 2), ("offformat", 1, None, 2), ("nan", 0, None, 1), ("twoobj", 0, None, 1),
    ("clip,ok", 1, None, 1), ("slightlyover,ok", 1, None, 1), ("rounding", 0, 0.5, 1),
])
def test_unusable_verdicts(fault_server, faults, parse_retries, expected, requests):
    r = reward(fault_server.url, parse_retries=parse_retries)
    out = run(r, [sample("v" + faults.replace(",", "_") + str(parse_retries), faults)])
    assert out == [expected if expected is None else pytest.approx(expected)]
    assert r.metrics()["judge/requests"] == requests


def test_out_of_range_score_abstains_at_once_with_its_own_metric_and_a_warning(fault_server, caplog, monkeypatch):
    # A judge grading 0..10 replies {"integrity": 8, "knowledge": 6}: refused, not clipped to
    # full reward, and not re-asked (it would answer on the same scale again).
    secret = "sk-OUTOFRANGE-77aa"
    monkeypatch.setenv("JUDGE_API_KEY", secret)
    caplog.set_level(logging.WARNING, logger="rewards.judge")
    r = reward(fault_server.url, model="grader-0to10", parse_retries=2)
    assert run(r, [sample("oor1", "echoauth")]) == [None]   # replies {"integrity": 8, "knowledge": 6, ...}
    assert run(r, [sample("oor2", "clip")]) == [None]       # replies {"integrity": 7, "knowledge": -2}
    m = r.metrics()
    assert (m["judge/requests"], m["judge/out_of_range"], m["judge/fail/out_of_range"]) == (2, 2, 2)
    assert m["judge/parse_failures"] == 0 and m["judge/retries"] == 0
    warnings = [rec.getMessage() for rec in caplog.records if "Example reply" in rec.getMessage()]
    assert len(warnings) == 1  # the first refusal warns; later ones only count (every 100th warns again)
    assert "'grader-0to10'" in warnings[0] and "score_scale" in warnings[0]
    assert '{"integrity": 8, "knowledge": 6, "rationale": "seen Bearer [redacted] yyy' in warnings[0]
    # the example is truncated (the reply has 1000 y's) and the echoed key never reaches the log
    assert "y" * 400 not in caplog.text and secret not in caplog.text
    # the same judge declared with its scale is read correctly: 8/10 and 6/10
    scaled = reward(fault_server.url, score_scale=10)
    assert run(scaled, [sample("oor3", "scaled"), sample("oor4", "echoauth")]) == [pytest.approx(0.7)] * 2
    assert scaled.metrics()["judge/out_of_range"] == 0


def test_529_overloaded_is_retried_like_503(fault_server):
    r = reward(fault_server.url, max_retries=1)
    assert run(r, [sample("o529", "529")]) == [None]
    m = r.metrics()
    assert (m["judge/requests"], m["judge/retries"], m["judge/fail/http_529"]) == (2, 1, 1)


@pytest.mark.parametrize("faults", ["huge,ok", "hugestream,ok"])  # announced / found while reading
def test_oversize_reply_is_not_retried(fault_server, faults, caplog):
    ident = "big" + faults.split(",")[0]
    r = reward(fault_server.url, max_response_bytes=20_000, max_retries=3, parse_retries=2)
    assert run(r, [sample(ident, faults)]) == [None]
    how = "bytes announced" if faults.startswith("huge,") else "over 20000 bytes received"
    assert f"judge failed (body_too_large): reply " in caplog.text and how in caplog.text
    m = r.metrics()
    assert (m["judge/requests"], m["judge/retries"], m["judge/fail/body_too_large"]) == (1, 0, 1)
    assert len(fault_stats(fault_server.url)[ident]["times"]) == 1   # the server saw one request
    # the same reply under a limit it fits in is a valid verdict
    roomy = reward(fault_server.url, max_response_bytes=200_000)
    assert run(roomy, [sample("ok" + ident, faults.split(",")[0])]) == [pytest.approx(0.7)]


def test_cache_and_inflight_dedup(fault_server, tmp_path):
    path = str(tmp_path / "cache.sqlite")
    r = reward(fault_server.url, cache_path=path)
    same = [sample("dup", "delay100")] * 8
    assert run(r, same) == [pytest.approx(0.7)] * 8
    assert run(r, same[:1]) == [pytest.approx(0.7)]
    m = r.metrics()
    assert (m["judge/requests"], m["judge/inflight_dedup"], m["judge/cache_hits"]) == (1, 7, 1)
    fresh = reward(fault_server.url, cache_path=path)  # a new process would see the same file
    assert run(fresh, same[:1] + [sample("dup", "delay100", completion="other")]) == [pytest.approx(0.7)] * 2
    assert fresh.metrics()["judge/cache_hits"] == 1 and fresh.metrics()["judge/requests"] == 1
    assert len(fault_stats(fault_server.url)["dup"]["times"]) == 2
    failed = reward(fault_server.url, cache_path=path, max_retries=0)
    run(failed, [sample("nocache", "500,ok")])
    assert run(failed, [sample("nocache", "500,ok")]) == [pytest.approx(0.7)]  # failures are not cached


def test_concurrency_limit(fault_server):
    r = reward(fault_server.url, max_concurrency=4)
    start = time.perf_counter()
    run(r, [sample(f"conc{i}", "delay300") for i in range(12)])
    assert 0.9 <= time.perf_counter() - start < 2.5  # three waves of four


def test_mixed_faults_batch_never_raises_never_nan(fault_server):
    plans = ["ok", "500,ok", "drop,ok", "malformed", "offformat", "429ra1,ok", "truncated", "503", "twoobj", "clip"]
    samples = [sample(f"mix{i}", plans[i % len(plans)]) for i in range(40)]
    r = reward(fault_server.url, max_retries=2)
    scores, metrics = score_all([r], samples)
    values = r.client.ledger.snapshot()
    col = scores[:, 0].tolist()
    abstained = [i for i, v in enumerate(col) if math.isnan(v)]
    plan_of = [plans[i % len(plans)] for i in range(40)]
    assert {plan_of[i] for i in abstained} == {"malformed", "offformat", "truncated", "503", "twoobj", "clip"}
    assert all(0.0 <= v <= 1.0 for v in col if not math.isnan(v))
    assert metrics["reward/process/abstain_rate"] == 0.6 and values["judge/failures"] == 24
    assert values["judge/out_of_range"] == 4 and values["judge/fail/out_of_range"] == 4
    assert metrics["reward/process/mean"] == pytest.approx(0.7)  # the 16 kept: ok and retried-to-ok


def test_images_are_sent_downscaled(fault_server):
    import base64
    import io
    big = Image.new("RGB", (1200, 600), (10, 120, 200))
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    r = reward(fault_server.url, image_max_side=300)
    assert run(r, [sample("img", "ok", images=[big, buf.getvalue()])]) == [pytest.approx(0.7)]
    urls = fault_stats(fault_server.url)["img"]["images"][0]
    sizes = [Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).size for u in urls]
    assert sizes == [(300, 150), (300, 150)]
    bad = reward(fault_server.url)
    assert run(bad, [sample("badimg", "ok", images=["/nonexistent.png"])]) == [None]
    assert bad.metrics()["judge/fail/image_error"] == 1


def test_api_key_is_sent_but_never_leaks(fault_server, tmp_path, monkeypatch, caplog):
    secret = "sk-SECRET-4f1e2d3c"
    monkeypatch.setenv("JUDGE_API_KEY", secret)
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "cache.sqlite"
    r = reward(fault_server.url, cache_path=str(path), max_retries=1)
    run(r, [sample("key_ok", "ok"), sample("key_401", "401"), sample("key_500", "500")])
    raising = reward(fault_server.url, on_failure="raise", max_retries=0)
    with pytest.raises(JudgeError) as info:
        run(raising, [sample("key_raise", "401")])
    assert "JUDGE_API_KEY" in str(info.value)  # the hint names the variable, not the value
    stats = fault_stats(fault_server.url)
    assert stats["key_ok"]["auth"] == [f"Bearer {secret}"]
    leaks = [caplog.text, repr(r), repr(r.client), repr(r.client.config), str(info.value), repr(info.value),
             str(r.metrics()), path.read_bytes().decode("latin-1"), str(vars(r.client.config))]
    assert not [text for text in leaks if secret in text]
    monkeypatch.delenv("JUDGE_API_KEY")
    # OPENAI_API_KEY is an OpenAI credential: never sent to another host (this local server) ...
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fallback")
    run(reward(fault_server.url), [sample("key_fallback", "ok")])
    assert fault_stats(fault_server.url)["key_fallback"]["auth"] == [None]
    # ... but used for OpenAI itself when JUDGE_API_KEY is unset
    assert JudgeConfig(base_url="https://api.openai.com/v1").resolve_api_key() == "sk-fallback"
    monkeypatch.delenv("OPENAI_API_KEY")
    run(reward(fault_server.url), [sample("key_none", "ok")])
    assert fault_stats(fault_server.url)["key_none"]["auth"] == [None]


def test_unreachable_server_abstains(tmp_path):
    r = ProcessReward(JudgeConfig(base_url="http://127.0.0.1:9/v1", max_retries=1, **{**FAST, "timeout": 1.0}))
    assert run(r, [sample("x", "ok")]) == [None]
    assert r.metrics()["judge/fail/connect_error"] == 1
    assert isinstance(r.client, JudgeClient)
