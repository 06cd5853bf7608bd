"""JudgeConfig: where the judge lives and how politely to talk to it.

The API key is *never* a field: the config names the environment variables to read it from
(``api_key_env``, then ``api_key_fallback_env``), so a config can be logged, pickled, saved next
to a checkpoint or put in an exception message without leaking the key.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from urllib.parse import urlsplit

ON_FAILURE = ("abstain", "zero", "raise")


@dataclass(frozen=True)
class JudgeConfig:
    """Configuration of :class:`rewards.JudgeClient` (OpenAI chat-completions protocol).

    Attributes:
        base_url: server root including ``/v1`` (e.g. ``https://api.openai.com/v1``).
        model: model name sent in each request.
        api_key_env / api_key_fallback_env: environment variables holding the key; no key is
            fine for local servers (no ``Authorization`` header is sent).
        timeout: seconds for one HTTP attempt, end to end (connect + wait + body).
        max_concurrency: requests in flight at once.
        requests_per_minute: at most this many requests (attempts) start in any 60 s window;
            None = unlimited.
        max_retries: retries after the first attempt on 408/409/425/429/500/502/503/504/529,
            connection errors, timeouts and unreadable bodies.
        backoff_base / backoff_max / backoff_jitter: retry ``k`` waits
            ``min(backoff_max, backoff_base * 2**k)`` scaled by a random factor in
            ``[1 - backoff_jitter, 1]``; at least ``Retry-After`` when the server sends it.
        max_retry_after: a ``Retry-After`` longer than this is not waited for (the judgment
            fails at once) -- a training step should not stall for an hour.
        parse_retries: extra requests when the reply arrives but is not a valid verdict.
        cache_path: SQLite file of past judgments; None keeps them in memory only.
        on_failure: a judgment that still fails scores ``None`` ("abstain"), ``0.0`` ("zero"),
            or raises :class:`rewards.JudgeError` ("raise").
        temperature / max_tokens: sampling settings sent to the judge.
        json_mode: send ``response_format={"type": "json_object"}`` (OpenAI, vLLM, llama.cpp
            support it; some servers reject it).
        send_images / image_max_side: attach images as base64 ``image_url`` parts, downscaled
            so the longer side is at most ``image_max_side`` pixels.
        max_response_bytes: a larger body fails the judgment at once (not retried: the same
            request would get the same reply); counted as ``judge/fail/body_too_large``.
        score_scale: the judge grades on ``0..score_scale`` (e.g. 10); scores are divided by it.
            A score outside ``[0, 1]`` after the division (by more than 0.005) is refused.
        group_max_tokens: ``max_tokens`` sent with a group judgment (one verdict per chain).
    """

    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "rubric"
    api_key_env: str = "JUDGE_API_KEY"
    api_key_fallback_env: str | None = "OPENAI_API_KEY"
    timeout: float = 60.0
    max_concurrency: int = 16
    requests_per_minute: float | None = None
    max_retries: int = 4
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    backoff_jitter: float = 0.5
    max_retry_after: float = 120.0
    parse_retries: int = 1
    cache_path: str | None = None
    on_failure: str = "abstain"
    temperature: float = 0.0
    max_tokens: int = 512
    json_mode: bool = False
    send_images: bool = True
    image_max_side: int = 768
    max_response_bytes: int = 4_000_000
    score_scale: float = 1.0
    group_max_tokens: int = 4096

    def __post_init__(self) -> None:
        self._check_url()
        if self.on_failure not in ON_FAILURE:
            raise ValueError(f"JudgeConfig.on_failure must be one of {ON_FAILURE}, got {self.on_failure!r}")
        self._check_positive("timeout", "max_concurrency", "image_max_side", "max_tokens",
                             "max_response_bytes", "score_scale", "group_max_tokens")
        self._check_nonnegative("max_retries", "parse_retries", "backoff_base", "backoff_max",
                                "max_retry_after", "temperature")
        if not 0.0 <= self.backoff_jitter <= 1.0:
            raise ValueError(f"JudgeConfig.backoff_jitter must be in [0, 1], got {self.backoff_jitter!r}")
        rpm = self.requests_per_minute
        if rpm is not None and not (isinstance(rpm, (int, float)) and math.isfinite(rpm) and rpm >= 1):
            raise ValueError(f"JudgeConfig.requests_per_minute must be None (unlimited) or >= 1, got {rpm!r}")

    def _check_url(self) -> None:
        url = self.base_url
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"JudgeConfig.base_url must be an http:// or https:// URL with a host, got "
                             f"{url!r} (e.g. 'http://127.0.0.1:8000/v1')")
        if parts.username or parts.password:
            # The URL is logged and saved; a key inside it would leak. Do not echo the URL here.
            raise ValueError(f"JudgeConfig.base_url must not contain credentials (user:key@host); put the "
                             f"key in ${self.api_key_env} instead")

    def _check_positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"JudgeConfig.{name} must be a positive number, got {value!r}")

    def _check_nonnegative(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"JudgeConfig.{name} must be a number >= 0, got {value!r}")

    @property
    def chat_url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def resolve_api_key(self) -> str | None:
        """The key from the environment, or None.

        ``api_key_env`` (``JUDGE_API_KEY``) is sent to whatever judge the user configured. The
        fallback (``OPENAI_API_KEY``) is an OpenAI credential, so it is sent only to OpenAI's
        own host: a local rubric server or a vLLM box never receives it by accident."""
        if self.api_key_env and os.environ.get(self.api_key_env):
            return os.environ[self.api_key_env]
        fallback = self.api_key_fallback_env
        if fallback and os.environ.get(fallback) and urlsplit(self.base_url).hostname == "api.openai.com":
            return os.environ[fallback]
        return None
