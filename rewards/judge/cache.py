"""A persistent content-hash cache of judgments (SQLite, one row per judgment).

Group judgments (one request for all chains of a GRPO group) live in their own table, one row
per group: the key covers the whole group's content and the row holds every chain's verdict.

Each row is committed before :meth:`JudgmentCache.put` returns (autocommit, ``synchronous=FULL``),
so a judgment paid for survives a crash right after it. Several training processes may share one
file: SQLite serialises the writers. Rows hold only scores, rationale, model and prompt version
-- never request headers, so never the API key.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

from data.readers import sha256_hex
from rewards.judge.parse import Verdict

_SCHEMA = """CREATE TABLE IF NOT EXISTS judgments (
    key TEXT PRIMARY KEY, integrity REAL NOT NULL, knowledge REAL NOT NULL, rationale TEXT,
    model TEXT, prompt_version TEXT, created REAL)"""
_GROUP_SCHEMA = """CREATE TABLE IF NOT EXISTS group_judgments (
    key TEXT PRIMARY KEY, verdicts TEXT NOT NULL, model TEXT, prompt_version TEXT, created REAL)"""


def cache_key(*, prompt_version: str, prompt_fingerprint: str, model: str, image_hashes: list[str],
              question: str, options: list[str] | None, completion: str, reference: str,
              criteria: list[str], scale: float = 1.0) -> str:
    """sha256 over everything that determines the verdict (the score scale only when it is not 1,
    so keys made before the scale existed stay valid)."""
    parts = ["judgment-v1", prompt_version, prompt_fingerprint, model, image_hashes,
             question, options, completion, reference, criteria]
    blob = json.dumps(parts + ([scale] if scale != 1 else []), ensure_ascii=False)
    return sha256_hex(blob)


def group_cache_key(*, prompt_version: str, prompt_fingerprint: str, model: str, image_hashes: list[str],
                    question: str, options: list[str] | None, reference: str, criteria: list[str],
                    chains: list[str], scale: float = 1.0) -> str:
    """sha256 over everything that determines a group verdict: the shared fields and every chain,
    in the order they are sent (the client sends them in a canonical order)."""
    blob = json.dumps(["group-judgment-v1", prompt_version, prompt_fingerprint, model, image_hashes,
                       question, options, reference, criteria, list(chains), scale], ensure_ascii=False)
    return sha256_hex(blob)


class JudgmentCache:
    """``get``/``put`` verdicts by key; ``path=None`` keeps them in memory for this process."""

    def __init__(self, path: str | None):
        self.path = path
        self._lock = threading.Lock()
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)  # e.g. a cache inside a new output_dir
        self._db = sqlite3.connect(path or ":memory:", timeout=30.0, isolation_level=None,
                                   check_same_thread=False)
        if path:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)
        self._db.execute(_GROUP_SCHEMA)

    def get(self, key: str) -> Verdict | None:
        with self._lock:
            row = self._db.execute("SELECT integrity, knowledge, rationale FROM judgments WHERE key=?",
                                   (key,)).fetchone()
        return Verdict(row[0], row[1], row[2] or "") if row else None

    def put(self, key: str, verdict: Verdict, *, model: str, prompt_version: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO judgments VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (key, verdict.integrity, verdict.knowledge, verdict.rationale, model,
                              prompt_version, time.time()))

    def get_group(self, key: str, n_chains: int) -> list[Verdict] | None:
        """The verdicts of a cached group judgment of ``n_chains`` chains, or None."""
        with self._lock:
            row = self._db.execute("SELECT verdicts FROM group_judgments WHERE key=?", (key,)).fetchone()
        if row is None:
            return None
        try:
            verdicts = [Verdict(float(i), float(k), str(r)) for i, k, r in json.loads(row[0])]
        except (ValueError, TypeError):
            return None  # a damaged row is a miss, never a crash
        return verdicts if len(verdicts) == n_chains else None

    def put_group(self, key: str, verdicts: list[Verdict], *, model: str, prompt_version: str) -> None:
        blob = json.dumps([[v.integrity, v.knowledge, v.rationale] for v in verdicts], ensure_ascii=False)
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO group_judgments VALUES (?, ?, ?, ?, ?)",
                             (key, blob, model, prompt_version, time.time()))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
