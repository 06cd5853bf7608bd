"""JudgeClient: an async OpenAI-chat-completions client built for thousands of small judgments.

Works with anything that serves ``POST {base_url}/chat/completions`` (OpenAI, vLLM, SGLang,
llama.cpp server, the local judge in :mod:`rewards.judge.server`). Per judgment:

1. look the content hash up in the cache (and join an identical judgment already in flight:
   GRPO groups often contain identical completions);
2. otherwise send the request under a concurrency limit and a per-minute rate limit, retrying
   408/429/5xx (529 "overloaded" included), timeouts, connection errors and unreadable bodies
   with exponential backoff and jitter (at least ``Retry-After`` when given); a body over
   ``max_response_bytes`` fails at once (the same request would get the same reply);
3. parse the verdict (re-asking ``parse_retries`` times if it is unusable), store it, return it.
   A score outside ``[0, 1]`` (after ``score_scale``) is not re-asked: the judgment fails with
   reason ``out_of_range`` and a warning names the model and shows an example reply.

:meth:`JudgeClient.judge_group` judges all chains of a GRPO group in one request (a group
template, one verdict per chain); the same cache, dedup, retry and failure rules apply, and a
reply that does not grade every chain fails the whole group.

:meth:`JudgeClient.probe` sends one request past the cache: the trainer's pre-flight check that
the judge answers, before the first rollout.

Every failure becomes a :class:`JudgeError` with a short reason; the caller decides the policy.
The API key is read from the environment once, sent only in the ``Authorization`` header, and
appears in no repr, log line, exception, cache row or metric.
"""
from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import time
import weakref
from dataclasses import dataclass, field

import httpx

from data.readers import sha256_hex
from rewards.base import RewardSample
from rewards.judge.images import encode_image
from rewards.judge.cache import JudgmentCache, cache_key, group_cache_key
from rewards.judge.config import JudgeConfig
from rewards.judge.ledger import Ledger
from rewards.judge.ratelimit import RateLimiter
from rewards.judge.parse import (IncompleteGroupVerdict, ScoreOutOfRange, Verdict, VerdictError,
                                  parse_group_verdict, parse_verdict)
from rewards.judge.prompt import (PromptTemplate, default_group_template, default_template, render_group_text,
                                  render_user_text)

log = logging.getLogger("rewards.judge")

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 529})
EXAMPLE_REPLY_CHARS = 300   # how much of a refused reply a warning shows


class JudgeError(RuntimeError):
    """A judgment failed; ``reason`` is a short machine-readable tag (e.g. ``http_429``)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"judge failed ({reason}){': ' + detail if detail else ''}")
        self.reason = reason


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


@dataclass
class _Request:
    """One judgment to make: the cache key and the JSON payload. ``n_chains`` is None for a
    single-chain judgment (the result is a :class:`Verdict`), else the number of chains of a
    group judgment (the result is a list of that many verdicts)."""
    key: str
    payload: dict
    prompt_version: str
    n_chains: int | None = None


@dataclass
class _LoopState:
    """Objects bound to one event loop (httpx pools and asyncio primitives cannot cross loops).

    ``slots`` is the concurrency limit: a queue holding ``max_concurrency`` tokens, each naming
    the httpx client (shard) its holder must use. Why shards: httpcore's pool rescans every
    connection for every queued request (quadratic); with 32 connections in one pool that costs
    more CPU than the requests themselves. Each shard holds at most SHARD_SIZE connections and
    never more requests than connections, so no request waits inside httpcore.
    """
    clients: list[httpx.AsyncClient]
    slots: asyncio.Queue
    inflight: dict = field(default_factory=dict)


SHARD_SIZE = 8


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP-date); None if absent/invalid."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


class JudgeClient:
    """Async judge client; see the module docstring. One instance per judge endpoint."""

    def __init__(self, config: JudgeConfig, *, rng: random.Random | None = None):
        self.config = config
        self.ledger = Ledger()
        self.cache = JudgmentCache(config.cache_path)
        self._limiter = RateLimiter(config.requests_per_minute)
        self._rng = rng or random.Random()
        self.__api_key = config.resolve_api_key()  # name-mangled: not a public attribute
        self._states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @property
    def has_api_key(self) -> bool:
        """Whether a key was found in the environment (never the key itself)."""
        return bool(self.__api_key)

    def _redact(self, text: str) -> str:
        return text.replace(self.__api_key, "[redacted]") if self.__api_key else text

    def __repr__(self) -> str:
        key = "set" if self.__api_key else "unset"
        return f"JudgeClient(base_url={self.config.base_url!r}, model={self.config.model!r}, api_key={key})"

    # -- public API -------------------------------------------------------------------------

    async def judge(self, sample: RewardSample, template: PromptTemplate | None = None) -> Verdict:
        """Judge one sample; returns a :class:`Verdict` or raises :class:`JudgeError`."""
        template = template or default_template()
        if template.is_group:
            raise ValueError(f"template {template.version!r} is a group template; use judge_group()")
        self.ledger.add(judgments=1)
        try:
            request = await self._build(sample, template)
            return await self._judge_once(request, 1)
        except JudgeError as err:
            self._failed(err, 1)
            raise
        except Exception as err:  # never let a bug in a corner case crash the training step
            self._failed_internal(err, 1)
            raise JudgeError("internal", type(err).__name__) from None

    async def judge_group(self, samples, template: PromptTemplate | None = None) -> list[Verdict]:
        """Judge all chains of one GRPO group in one request; one :class:`Verdict` per sample, in
        order, or :class:`JudgeError` for the whole group.

        The samples must share the question, options, reference and criteria (the images of the
        first sample are sent). Identical completions are sent once and share their verdict;
        the distinct ones are sent in a canonical order (by content hash), so the same group in
        another order is the same request and hits the cache."""
        samples = list(samples)
        template = template or default_group_template()
        if not template.is_group:
            raise ValueError(f"template {template.version!r} has no $chains placeholder; judge_group() "
                             "needs a group template (e.g. default_group_template())")
        if not samples:
            return []
        first = samples[0]
        for s in samples[1:]:
            if (s.question, s.options, s.answer, list(s.criteria)) != \
                    (first.question, first.options, first.answer, list(first.criteria)):
                raise ValueError("judge_group(): every sample of a group must share question, options, "
                                 "answer and criteria")
        n = len(samples)
        self.ledger.add(judgments=n, groups=1)
        try:
            request, index_of = await self._build_group(samples, template)
            self.ledger.add(group_duplicates=n - request.n_chains)
            verdicts = await self._judge_once(request, n)
            return [verdicts[k] for k in index_of]
        except JudgeError as err:
            self._failed(err, n)
            raise
        except Exception as err:
            self._failed_internal(err, n)
            raise JudgeError("internal", type(err).__name__) from None

    async def probe(self, sample: RewardSample, template: PromptTemplate | None = None):
        """One real request for ``sample``, to check that the judge answers before training starts.

        Unlike :meth:`judge`, the cache is neither read (a cached verdict would prove nothing
        about the server) nor written, no identical request in flight is joined, and no
        judgment is counted: only what was paid (``requests``, ``retries``, tokens, and
        ``preflight_requests``). Retries and re-asks follow the config, as for a judgment.
        Returns the :class:`Verdict` (a list of one per distinct chain for a group template);
        raises :class:`JudgeError` with the reason, as :meth:`judge` does."""
        template = template or default_template()
        try:
            if template.is_group:
                request, _ = await self._build_group([sample], template)
            else:
                request = await self._build(sample, template)
            state = self._state()
            for _ in range(self.config.parse_retries + 1):
                content = await self._chat_with_retries(request.payload, state, preflight=True)
                try:
                    return self._parse(request, content)
                except ScoreOutOfRange as err:
                    raise JudgeError("out_of_range", self._redact(str(err))) from None
                except VerdictError as err:
                    log.info("pre-flight: unusable verdict: %s", self._redact(str(err)))
            raise JudgeError("unparseable_verdict", f"no usable verdict in {self.config.parse_retries + 1} replies")
        except JudgeError:
            raise
        except Exception as err:
            raise JudgeError("internal", type(err).__name__) from None

    def _failed(self, err: JudgeError, n: int) -> None:
        self.ledger.fail(err.reason, n)
        log.warning("judgment failed%s: %s", f" for a group of {n}" if n > 1 else "", err)

    def _failed_internal(self, err: Exception, n: int) -> None:
        self.ledger.fail("internal", n)
        log.warning("judgment failed with an internal error: %s", type(err).__name__)

    async def aclose(self) -> None:
        """Close the HTTP pool bound to the running loop."""
        state = self._states.pop(asyncio.get_running_loop(), None)
        for http in state.clients if state is not None else []:
            await http.aclose()

    def close(self) -> None:
        """Close the cache (HTTP pools are released with their loops)."""
        self.cache.close()

    # -- building ---------------------------------------------------------------------------

    async def _images(self, sample: RewardSample) -> list[tuple[str, str]]:
        if not (self.config.send_images and sample.images):
            return []
        try:
            return await asyncio.to_thread(
                lambda: [encode_image(im, self.config.image_max_side) for im in sample.images])
        except Exception as err:  # unreadable file, not an image, wrong type
            raise JudgeError("image_error", type(err).__name__) from None

    def _payload(self, template: PromptTemplate, text: str, images: list[tuple[str, str]],
                 max_tokens: int) -> dict:
        content: str | list = text
        if images:
            content = [{"type": "text", "text": text}] + [
                {"type": "image_url", "image_url": {"url": url}} for url, _ in images]
        payload = {"model": self.config.model, "temperature": self.config.temperature,
                   "max_tokens": max_tokens,
                   "messages": [{"role": "system", "content": template.system},
                                {"role": "user", "content": content}]}
        if self.config.json_mode:
            payload["response_format"] = {"type": "json_object"}
        return payload

    async def _build(self, sample: RewardSample, template: PromptTemplate) -> _Request:
        images = await self._images(sample)
        text = render_user_text(template, question=sample.question, options=sample.options,
                                reference=sample.answer, criteria=list(sample.criteria),
                                completion=sample.completion)
        key = cache_key(prompt_version=template.version, prompt_fingerprint=template.fingerprint,
                        model=self.config.model, image_hashes=[h for _, h in images],
                        question=sample.question, options=sample.options, completion=sample.completion,
                        reference=sample.answer, criteria=list(sample.criteria), scale=self.config.score_scale)
        return _Request(key, self._payload(template, text, images, self.config.max_tokens), template.version)

    async def _build_group(self, samples: list[RewardSample], template: PromptTemplate) -> tuple[_Request, list[int]]:
        """The group request and, per sample, the index of its chain among the distinct ones."""
        first = samples[0]
        images = await self._images(first)
        chains = sorted({s.completion for s in samples}, key=lambda c: (sha256_hex(c), c))
        position = {c: k for k, c in enumerate(chains)}
        text = render_group_text(template, question=first.question, options=first.options,
                                 reference=first.answer, criteria=list(first.criteria), chains=chains)
        key = group_cache_key(prompt_version=template.version, prompt_fingerprint=template.fingerprint,
                              model=self.config.model, image_hashes=[h for _, h in images],
                              question=first.question, options=first.options, reference=first.answer,
                              criteria=list(first.criteria), chains=chains, scale=self.config.score_scale)
        payload = self._payload(template, text, images, self.config.group_max_tokens)
        return _Request(key, payload, template.version, len(chains)), [position[s.completion] for s in samples]

    # -- judging ----------------------------------------------------------------------------

    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._states.get(loop)
        if state is None:
            state = self._new_state()
            self._states[loop] = state
        return state

    def _new_state(self) -> _LoopState:
        n = self.config.max_concurrency
        shards = -(-n // SHARD_SIZE)
        slots: asyncio.Queue = asyncio.Queue()
        for i in range(n):
            slots.put_nowait(i % shards)
        clients = []
        for shard in range(shards):
            size = len(range(shard, n, shards))
            clients.append(httpx.AsyncClient(
                timeout=httpx.Timeout(self.config.timeout), follow_redirects=False,  # key stays here
                limits=httpx.Limits(max_connections=size, max_keepalive_connections=size)))
        return _LoopState(clients, slots)

    async def _judge_once(self, request: _Request, count: int):
        """The verdict (or list of verdicts) of ``request``; ``count`` chains wait for it."""
        cached = (self.cache.get(request.key) if request.n_chains is None
                  else self.cache.get_group(request.key, request.n_chains))
        if cached is not None:
            self.ledger.add(cache_hits=count)
            return cached
        state = self._state()
        pending = state.inflight.get(request.key)
        if pending is not None:  # identical judgment already being paid for: wait for it
            self.ledger.add(inflight_dedup=count)
            return await asyncio.shield(pending)
        task = asyncio.ensure_future(self._judge_uncached(request, state, count))
        state.inflight[request.key] = task
        task.add_done_callback(lambda _: state.inflight.pop(request.key, None))
        return await asyncio.shield(task)

    def _parse(self, request: _Request, content):
        if request.n_chains is None:
            return parse_verdict(content, scale=self.config.score_scale)
        return parse_group_verdict(content, request.n_chains, scale=self.config.score_scale)

    async def _judge_uncached(self, request: _Request, state: _LoopState, count: int):
        start = time.monotonic()
        for attempt in range(self.config.parse_retries + 1):
            content = await self._chat_with_retries(request.payload, state)
            try:
                result = self._parse(request, content)
            except ScoreOutOfRange as err:
                # A judge grading on another scale does so again: re-asking only costs money.
                self.ledger.add(out_of_range=1)
                self._warn_out_of_range(content, err)
                raise JudgeError("out_of_range", str(err)) from None
            except VerdictError as err:
                self.ledger.add(parse_failures=1)
                if isinstance(err, IncompleteGroupVerdict):
                    self.ledger.add(group_incomplete=1)
                log.info("unusable verdict (attempt %d): %s", attempt + 1, err)
                continue
            if request.n_chains is None:
                self.cache.put(request.key, result, model=self.config.model, prompt_version=request.prompt_version)
            else:
                self.cache.put_group(request.key, result, model=self.config.model,
                                     prompt_version=request.prompt_version)
            self.ledger.add(successes=count)
            self.ledger.latency(time.monotonic() - start)
            return result
        raise JudgeError("unparseable_verdict", f"no usable verdict in {self.config.parse_retries + 1} replies")

    def _warn_out_of_range(self, content: str, err: ScoreOutOfRange) -> None:
        """Warn on the first refused reply and every 100th after it (not once per sample)."""
        n = self.ledger.count("out_of_range")
        if n != 1 and n % 100:
            return
        example = content.replace(self.__api_key, "[redacted]") if self.__api_key else content
        if len(example) > EXAMPLE_REPLY_CHARS:
            example = example[:EXAMPLE_REPLY_CHARS] + "..."
        log.warning("judge model %r gave a score outside [0, 1] (%s); the judgment abstains "
                    "(judge/out_of_range = %d so far). Example reply: %r", self.config.model, err, n, example)

    async def _chat_with_retries(self, payload: dict, state: _LoopState, preflight: bool = False) -> str:
        """The reply's message content, after up to ``max_retries`` retries."""
        cfg = self.config
        for attempt in range(cfg.max_retries + 1):
            try:
                return await self._chat_once(payload, state, preflight)
            except _Retryable as err:
                if attempt == cfg.max_retries:
                    raise JudgeError(err.reason, f"gave up after {attempt + 1} attempts") from None
                if err.retry_after is not None and err.retry_after > cfg.max_retry_after:
                    raise JudgeError("retry_after_too_long",
                                     f"server asked to wait {err.retry_after:.0f}s > max_retry_after") from None
                delay = self._backoff(attempt, err.retry_after)
                log.info("judge request failed (%s); retry %d in %.2fs", err.reason, attempt + 1, delay)
                self.ledger.add(retries=1)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        cfg = self.config
        delay = min(cfg.backoff_max, cfg.backoff_base * 2 ** attempt)
        delay *= 1.0 - cfg.backoff_jitter * self._rng.random()
        return max(delay, retry_after) if retry_after is not None else delay

    async def _chat_once(self, payload: dict, state: _LoopState, preflight: bool = False) -> str:
        """One HTTP attempt. Raises _Retryable or JudgeError; returns the message content."""
        await self._limiter.acquire()
        shard = await state.slots.get()
        try:
            self.ledger.add(requests=1, **({"preflight_requests": 1} if preflight else {}))
            try:
                async with asyncio.timeout(self.config.timeout):
                    status, headers, body = await self._post(payload, state.clients[shard])
            except TimeoutError:
                raise _Retryable("timeout") from None
            except httpx.TimeoutException:
                raise _Retryable("timeout") from None
            except (httpx.RemoteProtocolError, httpx.DecodingError):
                raise _Retryable("protocol_error") from None
            except httpx.TransportError:
                raise _Retryable("connect_error") from None
        finally:
            state.slots.put_nowait(shard)
        if status in RETRYABLE_STATUS:
            raise _Retryable(f"http_{status}", parse_retry_after(headers.get("retry-after")))
        if status != 200:
            raise JudgeError(f"http_{status}", self._status_hint(status))
        return self._content(body)

    async def _post(self, payload: dict, http: httpx.AsyncClient) -> tuple[int, httpx.Headers, bytes]:
        headers = {"Content-Type": "application/json"}
        if self.__api_key:
            headers["Authorization"] = f"Bearer {self.__api_key}"
        limit = self.config.max_response_bytes
        async with http.stream("POST", self.config.chat_url, json=payload, headers=headers) as resp:
            declared = resp.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise self._too_large(f"{declared} bytes announced")
            body = bytearray()
            async for chunk in resp.aiter_bytes():
                body += chunk
                if len(body) > limit:
                    raise self._too_large(f"over {limit} bytes received")
            return resp.status_code, resp.headers, bytes(body)

    def _too_large(self, detail: str) -> JudgeError:
        # Deterministic: the same request would get the same oversized reply, so no retry.
        return JudgeError("body_too_large", f"reply {detail}, more than max_response_bytes="
                                            f"{self.config.max_response_bytes}; not retried")

    def _status_hint(self, status: int) -> str:
        if status in (401, 403):
            return (f"authentication refused; check the key in ${self.config.api_key_env}"
                    f" (or ${self.config.api_key_fallback_env})")
        if status == 404:
            return f"no chat endpoint at {self.config.chat_url}; base_url should end in /v1"
        return "non-retryable status"

    def _content(self, body: bytes) -> str:
        """``choices[0].message.content`` of a chat-completion body; token usage is recorded."""
        try:
            data = json.loads(body)
            message = data["choices"][0]["message"]
            content = message["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retryable("malformed_body") from None
        usage = data.get("usage") if isinstance(data, dict) else None
        if isinstance(usage, dict):
            self.ledger.add(**{k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")
                               if isinstance(usage.get(k), int) and not isinstance(usage.get(k), bool)
                               and usage[k] >= 0})
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise _Retryable("malformed_body")
        return content
