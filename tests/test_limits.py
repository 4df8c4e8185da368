"""Per-key rate limits: bucket arithmetic on a fake clock, then both backends on real time and
under concurrency (threads, event-loop tasks, and for Redis two processes), within 5%.

Run as a script, this file is one worker process of ``test_redis_limits_hold_across_processes``.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import pytest
import redis

from distillscope.gateway.limits import (
    CONCURRENCY_RETRY_AFTER,
    Limiter,
    LimiterError,
    Limits,
    MemoryLimiter,
    RateLimited,
    RedisLimiter,
    open_limiter,
)

#: How long each concurrency test hammers a limiter, in seconds.
WINDOW = 3.0
#: The largest relative error allowed between admitted and admissible under concurrency.
TOLERANCE = 0.05


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "redis"])
def open_backend(request) -> Callable[[], Limiter]:
    """Opens one worker's limiter; all limiters it opens share their state (the same
    MemoryLimiter, or RedisLimiters on one server and prefix)."""
    if request.param == "memory":
        limiter = MemoryLimiter()
        return lambda: limiter
    url = request.getfixturevalue("redis_url")
    prefix = f"test:{uuid.uuid4().hex}:"
    return lambda: RedisLimiter(url, prefix=prefix)


def run_with(open_backend: Callable[[], Limiter], scenario) -> None:
    """Run ``scenario(limiter)`` on a fresh event loop, closing the limiter after."""

    async def main() -> None:
        limiter = open_backend()
        try:
            await scenario(limiter)
        finally:
            await limiter.close()

    asyncio.run(main())


@contextmanager
def refusing_port() -> Iterator[int]:
    """A local port that is bound but not listening, so connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def refusal(limiter: Limiter, key: str, limits: Limits, tokens: int) -> RateLimited:
    with pytest.raises(RateLimited) as refused:
        await limiter.admit(key, limits, tokens)
    return refused.value


# Bucket arithmetic, exact on a fake clock.


def test_request_bucket_starts_full_and_refills_continuously():
    clock = FakeClock()
    limiter, limits = MemoryLimiter(clock), Limits(requests_per_minute=60)

    async def scenario():
        for _ in range(60):
            await limiter.admit("k", limits, 0)
        refused = await refusal(limiter, "k", limits, 0)
        assert (refused.limit, refused.retry_after) == ("requests", 1.0)
        clock.now = 0.4
        assert (await refusal(limiter, "k", limits, 0)).retry_after == 0.6
        clock.now = 1.0
        await limiter.admit("k", limits, 0)
        assert (await refusal(limiter, "k", limits, 0)).retry_after == 1.0
        clock.now = 1000.0  # idle far longer than a minute: full again, never fuller
        for _ in range(60):
            await limiter.admit("k", limits, 0)
        await refusal(limiter, "k", limits, 0)

    asyncio.run(scenario())


def test_idle_keys_are_forgotten_but_a_debt_is_not():
    clock = FakeClock()
    limiter = MemoryLimiter(clock)
    limits = Limits(requests_per_minute=60, tokens_per_minute=600, concurrency=4)

    async def scenario():
        for n in range(500):  # one request each from many keys
            await limiter.release(await limiter.admit(f"key-{n}", limits, 10), 10)
        # "debtor" was admitted for 10 tokens and used 710: its bucket is 110 tokens in debt
        await limiter.release(await limiter.admit("debtor", limits, 10), 710)
        assert limiter.tracked == 2 * 501
        assert not limiter._in_flight  # finished requests leave no counters behind
        clock.now = 61.0  # a minute on: every bucket but the debtor's token bucket has refilled
        await limiter.admit("other", limits, 0)
        assert limiter.tracked == 1 + 2  # the debtor's tokens, and "other"'s two buckets
        # the debt is still owed: -110 + 61 s * 10/s = 500 tokens available, not 600
        refused = await refusal(limiter, "debtor", limits, 600)
        assert (refused.limit, refused.retry_after) == ("tokens", 10.0)
        assert "available 500" in str(refused)
        clock.now = 200.0
        await limiter.admit("other", limits, 0)
        assert limiter.tracked == 2  # paid up and idle: forgotten too

    asyncio.run(scenario())


def test_token_bucket_waits_for_the_deficit():
    clock = FakeClock()
    limiter, limits = MemoryLimiter(clock), Limits(tokens_per_minute=600)  # 10 tokens/s

    async def scenario():
        await limiter.admit("k", limits, 500)
        refused = await refusal(limiter, "k", limits, 200)
        assert (refused.limit, refused.retry_after) == ("tokens", 10.0)
        assert str(refused) == (
            "Rate limit reached for tokens per minute: limit 600, available 100, "
            "requested 200; try again in 10s"
        )
        clock.now = 9.95
        assert (await refusal(limiter, "k", limits, 200)).retry_after == 0.05
        clock.now = 10.0
        await limiter.admit("k", limits, 200)

    asyncio.run(scenario())


def test_retry_after_rounds_up_and_is_never_zero_while_blocked():
    clock = FakeClock()
    limiter, limits = MemoryLimiter(clock), Limits(requests_per_minute=60)

    async def scenario():
        for _ in range(60):
            await limiter.admit("k", limits, 0)
        clock.now = 1 - 1e-9
        assert (await refusal(limiter, "k", limits, 0)).retry_after == 0.001
        clock.now = 0.5 - 1e-5
        assert (await refusal(limiter, "k", limits, 0)).retry_after == 0.501

    asyncio.run(scenario())


def test_the_longest_wait_is_reported():
    clock = FakeClock()
    limiter = MemoryLimiter(clock)
    limits = Limits(requests_per_minute=60, tokens_per_minute=60, concurrency=1)

    async def scenario():
        await limiter.admit("k", limits, 30)
        refused = await refusal(limiter, "k", limits, 60)  # all three refuse
        assert (refused.limit, refused.retry_after) == ("tokens", 30.0)
        refused = await refusal(limiter, "k", limits, 0)
        assert (refused.limit, refused.retry_after) == ("concurrency", CONCURRENCY_RETRY_AFTER)
        assert str(refused) == (
            "Rate limit reached for concurrent requests: limit 1, in flight 1, "
            "requested 1; try again in 1s"
        )

    asyncio.run(scenario())


def test_limits_must_be_positive():
    with pytest.raises(LimiterError, match="tokens_per_minute must be at least 1"):
        Limits(tokens_per_minute=0)


# Both backends, real time.


def test_refill_and_retry_after_on_real_time(open_backend):
    limits = Limits(tokens_per_minute=6000)  # 100 tokens/s

    async def scenario(limiter):
        await limiter.admit("k", limits, 6000)
        refused = await refusal(limiter, "k", limits, 20)
        assert refused.retry_after == pytest.approx(0.2, abs=0.05)
        await asyncio.sleep(refused.retry_after)
        await limiter.admit("k", limits, 20)

    run_with(open_backend, scenario)


def test_admission_is_all_or_nothing(open_backend):
    limits = Limits(requests_per_minute=10, tokens_per_minute=100, concurrency=2)

    async def scenario(limiter):
        held = await limiter.admit("k", limits, 90)
        assert (await refusal(limiter, "k", limits, 50)).limit == "tokens"
        await limiter.admit("k", limits, 10)  # the refusal took no request and no slot
        assert (await refusal(limiter, "k", limits, 0)).limit == "concurrency"
        await limiter.release(held, 90)
        for _ in range(8):  # the concurrency refusal took no request either
            await limiter.release(await limiter.admit("k", limits, 0), 0)
        assert (await refusal(limiter, "k", limits, 0)).limit == "requests"

    run_with(open_backend, scenario)


def test_release_refunds_unused_tokens_but_never_above_capacity(open_backend):
    limits = Limits(tokens_per_minute=1000)

    async def scenario(limiter):
        await limiter.release(await limiter.admit("k", limits, 800), 300)
        await limiter.admit("k", limits, 700)  # 500 of the 800 came back
        assert (await refusal(limiter, "k", limits, 50)).limit == "tokens"

        await limiter.release(await limiter.admit("fresh", limits, 100), 0)
        await limiter.admit("fresh", limits, 1000)
        assert (await refusal(limiter, "fresh", limits, 50)).limit == "tokens"

    run_with(open_backend, scenario)


def test_release_charges_tokens_beyond_the_estimate(open_backend):
    limits = Limits(tokens_per_minute=1000)

    async def scenario(limiter):
        await limiter.release(await limiter.admit("k", limits, 100), 1600)
        refused = await refusal(limiter, "k", limits, 0)  # 600 tokens in debt
        assert refused.retry_after == pytest.approx(36.0, abs=0.1)

    run_with(open_backend, scenario)


def test_concurrency_cap(open_backend):
    limits = Limits(concurrency=2)

    async def scenario(limiter):
        first = await limiter.admit("k", limits, 0)
        await limiter.admit("k", limits, 0)
        refused = await refusal(limiter, "k", limits, 0)
        assert (refused.limit, refused.retry_after) == ("concurrency", CONCURRENCY_RETRY_AFTER)
        await limiter.release(first, 0)
        await limiter.admit("k", limits, 0)

    run_with(open_backend, scenario)


def test_request_larger_than_the_bucket_never_passes(open_backend):
    limits = Limits(tokens_per_minute=1000)

    async def scenario(limiter):
        refused = await refusal(limiter, "k", limits, 1001)
        assert (refused.limit, refused.retry_after) == ("tokens", None)
        assert str(refused) == (
            "Request too large for tokens per minute: limit 1000, requested 1001; "
            "lower max_tokens or shorten the prompt"
        )
        await limiter.admit("k", limits, 1000)

    run_with(open_backend, scenario)


def test_keys_are_independent(open_backend):
    limits = Limits(requests_per_minute=5)

    async def scenario(limiter):
        for _ in range(5):
            await limiter.admit("a", limits, 0)
        await refusal(limiter, "a", limits, 0)
        for _ in range(5):
            await limiter.admit("b", limits, 0)

    run_with(open_backend, scenario)


# Under concurrency: workers (threads, or processes), each an event loop of tasks that admit as
# fast as they can for WINDOW seconds. The admissible amount over a span of t seconds from the
# first attempt to the last is the full bucket plus the refill: capacity * (1 + t / 60).


@dataclass
class Tally:
    requests: int = 0
    tokens: int = 0
    first: float = math.inf  # time.monotonic() of the first attempt and of the last
    last: float = -math.inf

    def add(self, other: Tally) -> None:
        self.requests += other.requests
        self.tokens += other.tokens
        self.first = min(self.first, other.first)
        self.last = max(self.last, other.last)


async def hammer(
    limiter: Limiter, key: str, limits: Limits, max_tokens: int, seed: int, start: float
) -> Tally:
    """One worker: 32 tasks admit requests of 1..max_tokens tokens (or 0) for WINDOW s."""
    tally = Tally()

    async def task(rng: random.Random) -> None:
        await asyncio.sleep(start - time.monotonic())
        while (now := time.monotonic()) < start + WINDOW:
            tokens = rng.randint(1, max_tokens) if max_tokens else 0
            tally.first, tally.last = min(tally.first, now), now
            try:
                await limiter.admit(key, limits, tokens)
                tally.requests, tally.tokens = tally.requests + 1, tally.tokens + tokens
            except RateLimited:
                pass
            await asyncio.sleep(0)  # MemoryLimiter never yields; let the other tasks in

    await asyncio.gather(*(task(random.Random(seed * 100 + i)) for i in range(32)))
    return tally


def hammer_in_threads(open_backend, limits: Limits, max_tokens: int, workers: int = 2) -> Tally:
    """Workers as threads, each with its own event loop and its own limiter from open_backend."""
    key, start, tallies = uuid.uuid4().hex, time.monotonic() + 0.2, []

    def worker(seed: int) -> None:
        async def main() -> Tally:
            limiter = open_backend()
            try:
                return await hammer(limiter, key, limits, max_tokens, seed, start)
            finally:
                await limiter.close()

        tallies.append(asyncio.run(main()))

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = Tally()
    for tally in tallies:
        total.add(tally)
    return total


def assert_within_tolerance(admitted: int, capacity: int, tally: Tally) -> None:
    elapsed = tally.last - tally.first
    admissible = capacity * (1 + elapsed / 60)
    error = (admitted - admissible) / admissible
    print(f"admitted {admitted}, admissible {admissible:.1f} over {elapsed:.3f}s: {error:+.2%}")
    assert abs(error) <= TOLERANCE


def test_requests_per_minute_hold_under_concurrency(open_backend):
    limits = Limits(requests_per_minute=600)
    tally = hammer_in_threads(open_backend, limits, max_tokens=0)
    assert_within_tolerance(tally.requests, 600, tally)


def test_tokens_per_minute_hold_under_concurrency(open_backend):
    limits = Limits(tokens_per_minute=60_000)
    tally = hammer_in_threads(open_backend, limits, max_tokens=400)
    assert_within_tolerance(tally.tokens, 60_000, tally)


def test_concurrency_cap_is_never_exceeded(open_backend):
    limits, key, lock = Limits(concurrency=5), uuid.uuid4().hex, threading.Lock()
    in_flight = peak = 0

    async def worker(seed: int) -> None:
        nonlocal in_flight, peak
        limiter, rng, stop = open_backend(), random.Random(seed), time.monotonic() + 1
        while time.monotonic() < stop:
            try:
                admission = await limiter.admit(key, limits, 0)
            except RateLimited:
                await asyncio.sleep(0.001)
                continue
            with lock:
                in_flight += 1
                peak = max(peak, in_flight)
            await asyncio.sleep(rng.uniform(0, 0.005))
            with lock:
                in_flight -= 1  # before release, so the count never lags behind the limiter
            await limiter.release(admission, 0)
        await limiter.close()

    async def main(thread: int) -> None:
        await asyncio.gather(*(worker(thread * 100 + i) for i in range(16)))

    threads = [threading.Thread(target=asyncio.run, args=(main(i),)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak == 5


def test_redis_limits_hold_across_processes(redis_url):
    """Two worker processes with their own connections share one request bucket."""
    prefix, key = f"test:{uuid.uuid4().hex}:", uuid.uuid4().hex
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, redis_url, prefix, key, str(seed)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed in range(2)
    ]
    for worker in workers:
        assert worker.stdout.readline() == "ready\n"
    start = time.monotonic() + 0.2  # CLOCK_MONOTONIC is one clock for all processes on Linux
    total = Tally()
    for worker in workers:
        output, _ = worker.communicate(f"{start}\n", timeout=WINDOW + 30)
        total.add(Tally(**json.loads(output)))
    assert_within_tolerance(total.requests, 600, total)


def test_redis_lease_of_a_dead_worker_expires(redis_url):
    limits = Limits(concurrency=1)

    async def scenario():
        crashed = RedisLimiter(redis_url, prefix=f"test:{uuid.uuid4().hex}:", lease_ttl=0.2)
        await crashed.admit("k", limits, 0)  # never released
        assert (await refusal(crashed, "k", limits, 0)).limit == "concurrency"
        await asyncio.sleep(0.25)
        await crashed.admit("k", limits, 0)
        await crashed.close()

    asyncio.run(scenario())


def test_redis_state_expires_once_idle_and_hides_the_api_key(redis_url):
    prefix = f"test:{uuid.uuid4().hex}:"
    limits = Limits(requests_per_minute=60, tokens_per_minute=1000, concurrency=3)

    async def scenario():
        limiter = RedisLimiter(redis_url, prefix=prefix)
        await limiter.admit("sk-secret", limits, 1000)  # tokens empty: full again in 60 s
        await limiter.close()

    asyncio.run(scenario())
    with redis.Redis.from_url(redis_url) as client:
        names = sorted(name.decode() for name in client.keys(f"{prefix}*"))
        assert len(names) == 2 and not any("sk-secret" in name for name in names)
        buckets, leases = names
        assert 60_000 < client.pttl(buckets) <= 61_000
        assert 599_000 < client.pttl(leases) <= 600_000


def test_open_limiter(redis_url):
    assert isinstance(open_limiter(None), MemoryLimiter)
    assert isinstance(open_limiter("memory"), MemoryLimiter)
    limiter = open_limiter(redis_url)
    assert isinstance(limiter, RedisLimiter)
    asyncio.run(limiter.close())
    with pytest.raises(LimiterError, match=r"^unknown limiter 'mem'"):
        open_limiter("mem")
    with refusing_port() as port:
        with pytest.raises(LimiterError, match=r"^cannot reach Redis at redis://:\*\*\*@") as e:
            open_limiter(f"redis://:hunter2@127.0.0.1:{port}/0")
    assert "\n" not in str(e.value) and "hunter2" not in str(e.value)


if __name__ == "__main__":
    url, prefix, key, seed = sys.argv[1:]
    print("ready", flush=True)
    start = float(sys.stdin.readline())

    async def main() -> Tally:
        limiter = RedisLimiter(url, prefix=prefix)
        try:
            return await hammer(limiter, key, Limits(requests_per_minute=600), 0, int(seed), start)
        finally:
            await limiter.close()

    print(json.dumps(asdict(asyncio.run(main()))))
