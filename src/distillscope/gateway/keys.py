"""Accounts, API keys and the block list of a gateway.

Keys live in a small SQLite file that the ``distillscope keys`` commands and a running gateway
share (SQLite is made for several processes on one file; the traffic log is elsewhere), or in a
PostgreSQL database (``postgresql://...``), which gateways on several hosts share. A key is
``dsk-<key id>-<secret>``: the id is public (it names the key in logs and listings), the secret is
256 random bits stored only as its SHA-256 (a slow password hash buys nothing for a random secret
that long). Revocations and blocks made while a gateway runs reach it within ``refresh`` seconds.

The block list has two sources: blocks in the key store (``distillscope keys block``) and a plain
text file a detector can write, one ``account:ID`` or ``key:ID`` per line, ``#`` comments.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from distillscope.errors import DistillscopeError
from distillscope.paths import is_database_url, masked_url, write_text_atomically

KEY_PREFIX = "dsk"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    tier TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    name TEXT,
    created_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS blocks (
    kind TEXT NOT NULL CHECK (kind IN ('account', 'key')),
    value TEXT NOT NULL,
    reason TEXT,
    created_at REAL NOT NULL,
    PRIMARY KEY (kind, value)
);
CREATE TABLE IF NOT EXISTS admin_audit (
    ts REAL NOT NULL,
    actor TEXT,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    status INTEGER NOT NULL,
    detail TEXT
);
"""


class KeyStoreError(DistillscopeError):
    """A key store that cannot be used as asked."""


class _Postgres:
    """The key store's tables in PostgreSQL: the SQLite statements, in its dialect."""

    def __init__(self, url: str):
        self.url = url

    def connect(self):
        import psycopg

        try:
            return psycopg.connect(self.url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise KeyStoreError(
                f"cannot open the key store {masked_url(self.url)}: {exc}"
            ) from None

    @staticmethod
    def translate(sql: str) -> str:
        sql = sql.replace("?", "%s").replace("REAL", "DOUBLE PRECISION")
        if sql.startswith("INSERT OR REPLACE INTO blocks"):
            sql = sql.replace("INSERT OR REPLACE", "INSERT") + (
                " ON CONFLICT (kind, value) DO UPDATE SET reason = EXCLUDED.reason, "
                "created_at = EXCLUDED.created_at"
            )
        return sql


@dataclass(frozen=True)
class ApiKey:
    """One key as listed: never the secret."""

    key_id: str
    account_id: str
    tier: str
    name: str | None
    created_at: float
    revoked_at: float | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True)
class Block:
    kind: str  # "account" or "key"
    value: str
    reason: str | None = None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split_key(token: str) -> tuple[str, str] | None:
    """``(key id, secret)`` of a well-formed key, else ``None``."""
    parts = token.split("-")
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


class KeyStore:
    """Accounts, keys and blocks in a SQLite file or a ``postgresql://`` database. Thread-safe;
    one connection per thread."""

    def __init__(self, path: str | os.PathLike, *, refresh: float = 1.0):
        self._postgres = _Postgres(str(path)) if is_database_url(path) else None
        self.path = str(path) if self._postgres else Path(path)
        self.where = masked_url(str(path)) if self._postgres else str(path)
        if self._postgres is None and not self.path.parent.is_dir():
            raise KeyStoreError(f"cannot create a key store in {self.path.parent}: no such folder")
        self.refresh = refresh
        self._local = threading.local()
        self._cache: dict[str, tuple[float, ApiKey | None, str | None]] = {}
        self._blocks: tuple[float, frozenset[tuple[str, str]]] = (-1e18, frozenset())
        if self._postgres is not None:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                self._execute(statement)
            return
        try:
            with self._connect() as db:
                db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise KeyStoreError(
                f"{self.path} is not a key store ({exc}): point --keys at the gateway's key "
                "store, or at a new file to start one"
            ) from None

    def _connect(self):
        db = getattr(self._local, "db", None)
        if db is None:
            if self._postgres is not None:
                db = self._postgres.connect()
            else:
                try:
                    db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
                except sqlite3.Error as exc:
                    raise KeyStoreError(f"cannot open the key store {self.path}: {exc}") from exc
                db.execute("PRAGMA journal_mode=WAL")
            self._local.db = db
        return db

    def _execute(self, sql: str, args: tuple = ()):
        """Run one statement (SQLite's dialect) on this thread's connection; its cursor."""
        db = self._connect()
        if self._postgres is None:
            return db.execute(sql, args)
        return db.execute(self._postgres.translate(sql), args)

    # --- management (the CLI) ---

    def create(self, account: str, tier: str, *, name: str | None = None) -> tuple[ApiKey, str]:
        """A new key for ``account`` at ``tier``: its listing, and the key itself (shown once)."""
        if not account.strip():
            raise KeyStoreError("an account id must not be empty")
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32).replace("-", "_")
        key = ApiKey(key_id, account, tier, name, time.time(), None)
        self._execute(
            "INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?, NULL)",
            (key_id, account, tier, _digest(secret), name, key.created_at),
        )
        return key, f"{KEY_PREFIX}-{key_id}-{secret}"

    def list(self, account: str | None = None) -> list[ApiKey]:
        query = "SELECT key_id, account_id, tier, name, created_at, revoked_at FROM keys"
        args: tuple = ()
        if account is not None:
            query, args = query + " WHERE account_id = ?", (account,)
        rows = self._execute(query + " ORDER BY created_at, key_id", args).fetchall()
        return [ApiKey(*row) for row in rows]

    def revoke(self, key_id: str) -> ApiKey:
        changed = self._execute(
            "UPDATE keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
            (time.time(), key_id),
        ).rowcount
        if not changed:
            known = self._execute("SELECT 1 FROM keys WHERE key_id = ?", (key_id,)).fetchone()
            raise KeyStoreError(
                f"key {key_id} is already revoked" if known else f"no key with id {key_id}"
            )
        self._cache.clear()
        return next(k for k in self.list() if k.key_id == key_id)

    def block(self, kind: str, value: str, *, reason: str | None = None) -> Block:
        """Block an account or a key the store knows (one with keys, or a key id)."""
        if kind not in ("account", "key"):
            raise KeyStoreError(f"can block an account or a key, not {kind!r}")
        check_block_value(kind, value)
        column = "account_id" if kind == "account" else "key_id"
        known = self._execute(f"SELECT 1 FROM keys WHERE {column} = ? LIMIT 1", (value,)).fetchone()
        if not known:
            hint = "distillscope keys list shows them" if kind == "key" else "create its key first"
            raise KeyStoreError(f"no {kind} {value!r} in {self.where} ({hint})")
        self._execute(
            "INSERT OR REPLACE INTO blocks VALUES (?, ?, ?, ?)", (kind, value, reason, time.time())
        )
        self._blocks = (-1e18, frozenset())
        return Block(kind, value, reason)

    def unblock(self, kind: str, value: str) -> None:
        gone = self._execute(
            "DELETE FROM blocks WHERE kind = ? AND value = ?", (kind, value)
        ).rowcount
        if not gone:
            raise KeyStoreError(f"{kind} {value} is not blocked")
        self._blocks = (-1e18, frozenset())

    def blocks(self) -> list[Block]:
        rows = self._execute("SELECT kind, value, reason FROM blocks ORDER BY 1, 2")
        return [Block(*row) for row in rows.fetchall()]

    # --- the admin API's trail ---

    def audit(
        self, actor: str | None, method: str, path: str, status: int, detail: str | None = None
    ) -> None:
        """Record one admin call (refused ones too)."""
        self._execute(
            "INSERT INTO admin_audit VALUES (?, ?, ?, ?, ?, ?)",
            (time.time(), actor, method, path, status, detail),
        )

    def audit_trail(self, limit: int = 100) -> list[dict]:
        """The latest ``limit`` admin calls, newest first."""
        rows = self._execute(
            "SELECT ts, actor, method, path, status, detail FROM admin_audit "
            "ORDER BY ts DESC LIMIT ?",
            (limit,),
        ).fetchall()
        names = ("ts", "actor", "method", "path", "status", "detail")
        return [dict(zip(names, row)) for row in rows]

    # --- the request path (the gateway) ---

    def authenticate(self, token: str) -> ApiKey | None:
        """The active key ``token`` is, or ``None``. Cached for ``refresh`` seconds per key id."""
        parts = split_key(token)
        if parts is None:
            return None
        key_id, secret = parts
        now = time.monotonic()
        cached = self._cache.get(key_id)
        if cached is None or now - cached[0] > self.refresh:
            row = self._execute(
                "SELECT key_id, account_id, tier, name, created_at, revoked_at, secret_sha256 "
                "FROM keys WHERE key_id = ?",
                (key_id,),
            ).fetchone()
            cached = (now, ApiKey(*row[:6]), row[6]) if row else (now, None, None)
            self._cache[key_id] = cached
        _, key, digest = cached
        if key is None or not key.active or not hmac.compare_digest(digest, _digest(secret)):
            return None
        return key

    def blocked(self) -> frozenset[tuple[str, str]]:
        """``{(kind, value)}`` blocked in the store, re-read at most every ``refresh`` seconds."""
        read_at, blocked = self._blocks
        if time.monotonic() - read_at > self.refresh:
            rows = self._execute("SELECT kind, value FROM blocks").fetchall()
            blocked = frozenset((kind, value) for kind, value in rows)
            self._blocks = (time.monotonic(), blocked)
        return blocked


class BlockListFile:
    """A block list file (``account:ID`` / ``key:ID`` lines), re-read when it changes."""

    def __init__(self, path: str | os.PathLike, *, refresh: float = 1.0):
        self.path = Path(path)
        self.refresh = refresh
        self._checked = -1e18
        self._stamp: tuple[int, int] | None = None
        self._entries: frozenset[tuple[str, str]] = frozenset()

    def entries(self) -> frozenset[tuple[str, str]]:
        now = time.monotonic()
        if now - self._checked < self.refresh:
            return self._entries
        self._checked = now
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._entries = None, frozenset()
            return self._entries
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            self._entries = parse_block_list(self.path.read_text(errors="replace"))
            self._stamp = stamp
        return self._entries


def check_block_value(kind: str, value: str) -> None:
    """Refuse a value a block list line could not hold: empty, spaces, ``:`` or ``#``."""
    if not value or value != value.strip() or any(c in value for c in ":#\n\r\t "):
        raise KeyStoreError(
            f"--{kind} {value!r}: {kind} ids are one word without spaces, ':' or '#'"
        )


def parse_block_list(text: str) -> frozenset[tuple[str, str]]:
    """The ``(kind, value)`` entries of a block list; malformed lines are ignored."""
    entries = set()
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        kind, _, value = line.partition(":")
        if kind.strip() in ("account", "key") and value.strip():
            entries.add((kind.strip(), value.strip()))
    return frozenset(entries)


def write_block_list(path: str | os.PathLike, blocks: list[Block]) -> None:
    """Write a block list file atomically (a gateway never reads half of it)."""
    path = Path(path)
    lines = [f"{b.kind}:{b.value}" + (f"  # {b.reason}" if b.reason else "") for b in blocks]
    write_text_atomically(path, "\n".join(lines) + "\n")
