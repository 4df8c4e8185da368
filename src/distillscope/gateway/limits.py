"""Per-key rate limits for the gateway: requests/minute, tokens/minute and requests in flight.

Each per-minute limit is a token bucket: its capacity is the limit, it refills continuously at
limit/60 per second, and a key never seen (or idle long enough) starts full. A request is admitted
only if every limit of its key lets it through, and then all of them are charged at once::

    limiter = open_limiter(None)  # or "redis://host:6379/0" when several workers share limits
    admission = await limiter.admit(api_key, Limits(requests_per_minute=60), tokens=estimate)
    try:
        ...  # answer the request
    finally:
        await limiter.release(admission, used_tokens=usage.total_tokens)

``admit`` raises ``RateLimited`` (answer 429 with ``Retry-After``) and charges nothing when any
limit refuses. ``MemoryLimiter`` serves one worker process; ``RedisLimiter`` keeps the state in
Redis, where one Lua script per call makes each admission atomic across workers.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import redis
import redis.asyncio

from distillscope.errors import DistillscopeError

#: ``retry_after`` of a concurrency refusal: a slot frees when some request ends, which no bucket
#: can predict, so a client is told to come back after this many seconds.
CONCURRENCY_RETRY_AFTER = 1.0


class LimiterError(DistillscopeError):
    """A limiter that cannot be opened, or limits that cannot be enforced."""


@dataclass(frozen=True)
class Limits:
    """The limits of one API key; ``None`` means unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrency: int | None = None  # requests in flight at once

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value is not None and value < 1:
                raise LimiterError(
                    f"{name} must be at least 1 (or unset for no limit), not {value}"
                )


def _round_up_to_ms(seconds: float) -> float:
    """Round up to the millisecond, never to 0, ignoring float noise (0.6000000001 s is 0.6 s)."""
    return max(0.001, math.ceil(round(seconds * 1000, 6)) / 1000)


class RateLimited(DistillscopeError):
    """A request refused by one of its key's limits; nothing was charged for it.

    ``limit`` names the limit that refused: "requests", "tokens" or "concurrency" (when several
    refuse, the one with the longest wait, since no retry can pass sooner). ``retry_after`` is the
    number of seconds until a retry could pass, rounded up to the millisecond: the refill time of
    the missing requests or tokens, or ``CONCURRENCY_RETRY_AFTER`` for concurrency. It is ``None``
    when no retry ever can: a request estimated at more tokens than its whole per-minute bucket.
    """

    def __init__(
        self, limit: str, wait: float | None, *, capacity: int, available: float, requested: int
    ) -> None:
        self.limit = limit
        self.retry_after = None if wait is None else _round_up_to_ms(wait)
        super().__init__(self._message(capacity, math.floor(available), requested))

    def _message(self, capacity: int, available: int, requested: int) -> str:
        if self.retry_after is None:
            return (
                f"Request too large for tokens per minute: limit {capacity}, requested "
                f"{requested}; lower max_tokens or shorten the prompt"
            )
        if self.limit == "concurrency":
            head = f"concurrent requests: limit {capacity}, in flight {capacity - available}"
        else:
            head = f"{self.limit} per minute: limit {capacity}, available {available}"
        retry = f"try again in {self.retry_after:g}s"
        return f"Rate limit reached for {head}, requested {requested}; {retry}"


@dataclass(frozen=True)
class Admission:
    """What ``admit`` charged; pass it back to ``release`` exactly once."""

    key: str
    limits: Limits
    tokens: int  # the caller's estimate, charged to the token bucket
    lease: str | None = None  # RedisLimiter's concurrency lease, when there is a concurrency cap


class Limiter(ABC):
    """Per-key limits; ``open_limiter`` picks the implementation from a URL."""

    @abstractmethod
    async def admit(self, key: str, limits: Limits, tokens: int) -> Admission:
        """Take a concurrency slot, 1 request and ``tokens`` from ``key``'s limits, or nothing.

        ``tokens`` is the caller's estimate (prompt tokens + max_tokens). Raises ``RateLimited``,
        having charged nothing, when any limit refuses.
        """

    @abstractmethod
    async def release(self, admission: Admission, used_tokens: int) -> None:
        """Free the concurrency slot and settle the estimate against ``used_tokens``.

        Unused tokens go back to the bucket (never above its capacity); tokens used beyond the
        estimate are charged, and may leave the bucket below zero, which delays later requests.
        """

    @abstractmethod
    async def close(self) -> None:
        """Release the limiter's connections."""


def _check_tokens(tokens: int) -> None:
    if tokens < 0:
        raise ValueError(f"a token count cannot be negative, got {tokens}")


@dataclass
class _Bucket:
    """A token bucket's level at one instant."""

    level: float
    updated: float
    capacity: int = 0

    def refill(self, capacity: int, now: float) -> None:
        self.level = min(capacity, self.level + (now - self.updated) * capacity / 60)
        self.updated = now
        self.capacity = capacity

    def full_at(self, now: float) -> bool:
        """Whether the bucket has refilled to its capacity by ``now`` (and so is the same as a
        bucket never used)."""
        return self.level + (now - self.updated) * self.capacity / 60 >= self.capacity


def _longest_wait(refusal: RateLimited) -> float:
    return math.inf if refusal.retry_after is None else refusal.retry_after


class MemoryLimiter(Limiter):
    """Limits kept in this process: for a single gateway worker.

    Safe on one event loop and across threads (each call holds a lock for a few microseconds and
    never awaits). ``clock`` gives seconds; tests inject a fake one. Memory follows the keys
    active in the last minute, not every key ever seen: at most once a minute, buckets that have
    refilled to capacity (no different from a key never seen) are dropped; one still in debt (a
    request that used more tokens than it was admitted for) is kept until it has paid.
    """

    #: seconds between sweeps of refilled buckets
    sweep_every = 60.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._in_flight: Counter[str] = Counter()
        self._swept = clock()

    @property
    def tracked(self) -> int:
        """How many buckets (one per key and limit) are held now."""
        return len(self._buckets)

    def _sweep(self, now: float) -> None:
        if now - self._swept < self.sweep_every:
            return
        self._swept = now
        for name in [n for n, bucket in self._buckets.items() if bucket.full_at(now)]:
            del self._buckets[name]

    def _bucket(self, key: str, limit: str, capacity: int, now: float) -> _Bucket:
        bucket = self._buckets.setdefault((key, limit), _Bucket(capacity, now, capacity))
        bucket.refill(capacity, now)
        return bucket

    async def admit(self, key: str, limits: Limits, tokens: int) -> Admission:
        _check_tokens(tokens)
        with self._lock:
            now = self.clock()
            self._sweep(now)
            refusals, charges = [], []
            if limits.concurrency is not None and self._in_flight[key] >= limits.concurrency:
                free = limits.concurrency - self._in_flight[key]
                refusals.append(
                    RateLimited(
                        "concurrency",
                        CONCURRENCY_RETRY_AFTER,
                        capacity=limits.concurrency,
                        available=free,
                        requested=1,
                    )
                )
            for limit, capacity, amount in (
                ("requests", limits.requests_per_minute, 1),
                ("tokens", limits.tokens_per_minute, tokens),
            ):
                if capacity is None:
                    continue
                bucket = self._bucket(key, limit, capacity, now)
                if bucket.level < amount:
                    wait = None if amount > capacity else (amount - bucket.level) * 60 / capacity
                    refusals.append(
                        RateLimited(
                            limit, wait, capacity=capacity, available=bucket.level, requested=amount
                        )
                    )
                charges.append((bucket, amount))
            if refusals:
                raise max(refusals, key=_longest_wait)
            for bucket, amount in charges:
                bucket.level -= amount
            if limits.concurrency is not None:
                self._in_flight[key] += 1
        return Admission(key, limits, tokens)

    async def release(self, admission: Admission, used_tokens: int) -> None:
        _check_tokens(used_tokens)
        capacity = admission.limits.tokens_per_minute
        with self._lock:
            if admission.limits.concurrency is not None:
                self._in_flight[admission.key] -= 1
                if self._in_flight[admission.key] <= 0:
                    del self._in_flight[admission.key]
            if capacity is not None and used_tokens != admission.tokens:
                bucket = self._bucket(admission.key, "tokens", capacity, self.clock())
                bucket.level = min(capacity, bucket.level + admission.tokens - used_tokens)

    async def close(self) -> None:
        """Nothing to release: the state lives and dies with the process."""


# Shared by both scripts. KEYS[1] is a key's buckets (a hash: level and time of each), KEYS[2] its
# concurrency leases (a sorted set of lease ids scored by expiry). Times are Redis server seconds,
# so workers with skewed clocks agree. Numbers are written with %.17g: Redis would keep only 14
# significant digits, too few for a timestamp in microseconds.
_LUA_COMMON = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6

local function level(name, capacity)
  local state = redis.call('HMGET', KEYS[1], name, name .. ':at')
  if not state[1] then return capacity end
  local elapsed = math.max(0, now - tonumber(state[2]))  -- 0 if a failover turned time back
  return math.min(capacity, tonumber(state[1]) + elapsed * capacity / 60)
end

-- Store a bucket's level, and keep the hash until it would be full again (then it equals a key
-- never seen, so it can go).
local function store(name, capacity, lvl)
  redis.call('HSET', KEYS[1], name, string.format('%.17g', lvl),
             name .. ':at', string.format('%.17g', now))
  local full_ms = math.ceil((capacity - lvl) * 60000 / capacity) + 1000
  if full_ms > redis.call('PTTL', KEYS[1]) then redis.call('PEXPIRE', KEYS[1], full_ms) end
end
"""

# ARGV: requests/min, tokens/min, concurrency ('' = unlimited), tokens, lease id, lease ttl (s),
# CONCURRENCY_RETRY_AFTER. Returns {} when admitted, else the refusal with the longest wait:
# {limit, wait (-1 = never), capacity, available, requested}, floats as strings.
_ADMIT_LUA = (
    _LUA_COMMON
    + """
local rpm, tpm, concurrency = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens, lease, lease_ttl = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local worst
local function refuse(limit, wait, capacity, available, requested)
  if not worst or (worst[2] ~= -1 and (wait == -1 or wait > worst[2])) then
    worst = {limit, wait, capacity, available, requested}
  end
end

if concurrency then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  local in_flight = redis.call('ZCARD', KEYS[2])
  if in_flight >= concurrency then
    refuse('concurrency', tonumber(ARGV[7]), concurrency, concurrency - in_flight, 1)
  end
end
local charges = {}
for _, b in ipairs({{'requests', rpm, 1}, {'tokens', tpm, tokens}}) do
  local name, capacity, amount = b[1], b[2], b[3]
  if capacity then
    local lvl = level(name, capacity)
    if lvl < amount then
      local wait = -1
      if amount <= capacity then wait = (amount - lvl) * 60 / capacity end
      refuse(name, wait, capacity, lvl, amount)
    end
    charges[#charges + 1] = {name, capacity, lvl - amount}
  end
end
if worst then
  return {worst[1], tostring(worst[2]), worst[3], tostring(worst[4]), worst[5]}
end
for _, c in ipairs(charges) do store(c[1], c[2], c[3]) end
if concurrency then
  redis.call('ZADD', KEYS[2], now + lease_ttl, lease)
  redis.call('PEXPIRE', KEYS[2], math.ceil(lease_ttl * 1000))
end
return {}
"""
)

# ARGV: tokens/min ('' = unlimited), estimate - used (tokens to give back; negative charges),
# lease id ('' = none).
_RELEASE_LUA = (
    _LUA_COMMON
    + """
if ARGV[3] ~= '' then redis.call('ZREM', KEYS[2], ARGV[3]) end
local tpm, refund = tonumber(ARGV[1]), tonumber(ARGV[2])
if tpm and refund ~= 0 then store('tokens', tpm, math.min(tpm, level('tokens', tpm) + refund)) end
"""
)


def _arg(limit: int | None) -> int | str:
    return "" if limit is None else limit


class RedisLimiter(Limiter):
    """Limits kept in Redis, shared by every gateway worker that uses the same server and prefix.

    Each ``admit`` and ``release`` is one Lua script, so checks and charges are atomic across
    workers. A concurrency slot is a lease that expires after ``lease_ttl`` seconds, so a worker
    that dies mid-request frees its slots by then; keep ``lease_ttl`` above the longest request.
    A key's state expires once idle long enough to be full again. Redis key names carry a hash of
    the API key, never the key itself. Use an instance from one event loop: redis.asyncio's
    connections belong to the loop that opened them.
    """

    def __init__(
        self, url: str, *, prefix: str = "distillscope:limits:", lease_ttl: float = 600.0
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.lease_ttl = lease_ttl
        self._redis = redis.asyncio.Redis.from_url(url)
        self._admit = self._redis.register_script(_ADMIT_LUA)
        self._release = self._redis.register_script(_RELEASE_LUA)

    def _keys(self, key: str) -> list[str]:
        name = self.prefix + hashlib.sha256(key.encode()).hexdigest()[:32]
        return [name, f"{name}:leases"]

    async def admit(self, key: str, limits: Limits, tokens: int) -> Admission:
        _check_tokens(tokens)
        lease = uuid.uuid4().hex if limits.concurrency is not None else None
        args = [
            _arg(limits.requests_per_minute),
            _arg(limits.tokens_per_minute),
            _arg(limits.concurrency),
            tokens,
            lease or "",
            self.lease_ttl,
            CONCURRENCY_RETRY_AFTER,
        ]
        refusal = await self._admit(keys=self._keys(key), args=args)
        if refusal:
            limit, wait, capacity, available, requested = refusal
            raise RateLimited(
                limit.decode(),
                None if float(wait) < 0 else float(wait),
                capacity=capacity,
                available=float(available),
                requested=requested,
            )
        return Admission(key, limits, tokens, lease)

    async def release(self, admission: Admission, used_tokens: int) -> None:
        _check_tokens(used_tokens)
        args = [
            _arg(admission.limits.tokens_per_minute),
            admission.tokens - used_tokens,
            admission.lease or "",
        ]
        await self._release(keys=self._keys(admission.key), args=args)

    async def close(self) -> None:
        await self._redis.aclose()


def _redacted(url: str) -> str:
    password = urlsplit(url).password
    return url if password is None else url.replace(f":{password}@", ":***@", 1)


def open_limiter(url: str | None) -> Limiter:
    """``None`` or "memory": a ``MemoryLimiter``; a redis://, rediss:// or unix:// URL: a
    ``RedisLimiter``, once a PING shows the server answers (this blocks for up to 2 s).
    """
    if url is None or url == "memory":
        return MemoryLimiter()
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise LimiterError(f"unknown limiter {_redacted(url)!r}: use 'memory' or a redis:// URL")
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2) as client:
            client.ping()
    except (redis.RedisError, ValueError) as exc:
        raise LimiterError(f"cannot reach Redis at {_redacted(url)}: {exc}") from None
    return RedisLimiter(url)
