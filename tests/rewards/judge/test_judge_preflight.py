"""ProcessReward.preflight, the trainer's pre-flight check of the judge, against the fault server:
one real request past the cache, its cost in the ledger (not a judgment), and on failure an error
naming the judge's settings and the cause -- the API key's variable, never the key."""
import pytest

from rewards import JudgeConfig, ProcessReward, RewardError, RewardSample

from conftest import fault_stats

pytestmark = pytest.mark.server
FAST = dict(backoff_base=0.02, backoff_max=0.1, backoff_jitter=0.0, timeout=2.0, max_retries=0)
SECRET = "sk-test-PREFLIGHT-5e6f7a8b9c"


def sample(ident, faults, scores="0.8,0.6"):
    return RewardSample(question=f"ID={ident} FAULTS={faults} SCORES={scores}",
                        completion="<think>r</think><answer>B</answer>", answer="B", options=["A", "B"])


def reward(url, cache_path=None, **cfg):
    return ProcessReward(JudgeConfig(base_url=url, cache_path=cache_path, **{**FAST, **cfg}))


@pytest.mark.parametrize("faults,cfg,expected", [
    ("401", {}, r"authentication refused \(HTTP 401\); check the API key in \$JUDGE_API_KEY .*: a key is set"),
    ("404", {}, r"HTTP 404 from http://127\.0\.0\.1:\d+/v1/chat/completions; base_url should end in /v1, and "
                r"model='rubric' must be served there"),
    ("400", {"json_mode": True}, r"refused the request with HTTP 400; check model='rubric' and json_mode=True"),
    ("delay3000", {"timeout": 0.3}, r"no reply within timeout=0\.3s at base_url="),
    ("503", {"max_retries": 1}, r"HTTP 503 after 2 attempt\(s\); the judge is overloaded"),
    ("scaled", {}, r"outside \[0, 1\] after dividing by score_scale=1\.0; set score_scale"),
    ("offformat", {"parse_retries": 1}, r"none of 2 replies was a usable verdict; check model='rubric'"),
    ("echoauth", {}, r"outside \[0, 1\]"),   # the reply quotes the Authorization header
])
def test_a_failed_probe_names_the_judge_setting_and_the_cause_never_the_key(fault_server, monkeypatch, faults,
                                                                              cfg, expected):
    monkeypatch.setenv("JUDGE_API_KEY", SECRET)
    ident = "pf" + faults
    r = reward(fault_server.url, **cfg)
    with pytest.raises(RewardError, match=expected) as info:
        r.preflight(sample(ident, faults))
    message = str(info.value)
    assert message.startswith(f"ProcessReward(judge=JudgeConfig(base_url='{fault_server.url}', model='rubric', "
                              f"api_key_env='JUDGE_API_KEY')) did not pass the pre-flight request: ")
    assert SECRET not in message and SECRET not in repr(info.value)
    sent = fault_stats(fault_server.url)[ident]
    assert set(sent["auth"]) == {f"Bearer {SECRET}"}                  # the key was really sent
    m = r.metrics()                                                   # paid, and not a judgment
    assert m["judge/requests"] == m["judge/preflight_requests"] == len(sent["times"]) >= 1
    assert m["judge/judgments"] == m["judge/failures"] == 0 and not any(k.startswith("judge/fail/") for k in m)


@pytest.mark.parametrize("group", [False, True])
def test_a_probe_reaches_the_server_even_when_the_cache_has_the_verdict(fault_server, tmp_path, group):
    r = ProcessReward(JudgeConfig(base_url=fault_server.url, cache_path=str(tmp_path / "c.sqlite"), **FAST),
                      group_judging=group)
    ident = f"pfcache{int(group)}"
    s = sample(ident, "group" if group else "ok")
    if group:
        s.completion += " CS=0.8,0.6"                                 # the fault server's grade for this chain
    assert r.score_batch([s]) == [pytest.approx(0.7)]                 # judged and cached
    assert r.score_batch([s]) == [pytest.approx(0.7)]                 # a cache hit: the server sees nothing
    assert len(fault_stats(fault_server.url)[ident]["times"]) == 1
    assert r.preflight(s) == [pytest.approx(0.7)]                     # the probe goes to the server anyway
    assert len(fault_stats(fault_server.url)[ident]["times"]) == 2
    m = r.metrics()
    assert (m["judge/requests"], m["judge/preflight_requests"], m["judge/judgments"], m["judge/cache_hits"]) \
        == (2, 1, 2, 1)
    assert m["judge/total_tokens"] == 2 * 15                          # the probe's usage is counted too
