"""What every shape is built on: a ``Population`` of accounts drawn from its own seed, with the
clients, model choice, human rhythms and machine clocks the shapes share.

A shape subclasses ``Population`` and implements ``run``: create its accounts (``account``),
then log their requests through ``self.log``. Legitimate shapes live in ``traffic/legit/``,
campaign shapes in ``traffic/campaigns/``.
"""

from __future__ import annotations

import bisect
import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np

from distillscope.traffic.clients import FREE_MAIL, HOURS_OFFICE, HOURS_PERSONAL, hex_id
from distillscope.traffic.log import CHAT, Account, Log, Request
from distillscope.traffic.material import Material, data
from distillscope.traffic.scenario import Scenario

#: How a later sender of a prompt rephrases it (``data/phrases.yaml``).
_REPHRASE: dict[str, list[str]] = data("phrases")["rephrase"]


@dataclass(frozen=True)
class World:
    """What every population of one simulation shares."""

    scenario: Scenario
    material: Material
    start: datetime
    #: The window's end and the new model's release, in seconds from the start (inf: none).
    end: float
    release: float


@dataclass
class Client:
    """An account's client: user agents, addresses, endpoint and request defaults."""

    agents: list[str]
    ips: list[str]
    endpoint: str
    stream: bool
    temperature: float | None
    max_tokens: int
    seed: int | None
    exposure: str
    #: When the account moves to the new model (inf: never).
    switch: float


class Population:
    """Accounts of one shape. ``size`` is its share of the progress bar (accounts)."""

    #: The truth's ``shape`` of this population's accounts.
    shape: str = ""

    def __init__(self, world: World, settings, log: Log, seed: np.random.SeedSequence):
        self.world, self.settings, self.log = world, settings, log
        self.s, self.material = world.scenario, world.material
        self.rng = np.random.default_rng(seed)
        self.r = random.Random(int(self.rng.integers(2**63)))
        self.accounts: list[Account] = []
        #: How often each (conversation, turn) was sent, to vary a reused prompt a little.
        self.uses: Counter = Counter()

    @property
    def size(self) -> int:
        return 1

    @property
    def name(self) -> str:
        return getattr(self.settings, "name", self.shape)

    @property
    def campaign_id(self) -> str | None:
        """The campaign this population is (None: legitimate)."""
        return None

    def run(self, advance: Callable[[], None]) -> list[Account]:
        raise NotImplementedError

    # -- accounts and clients

    def account(
        self,
        created: float,
        *,
        tier: str,
        profile: str,
        role: str | None = None,
        card: str | None = None,
        email: str | None = None,
        org: str | None = None,
        replaces: str | None = None,
    ) -> Account:
        r = self.r
        campaign = self.campaign_id
        account = Account(
            account_id=f"acct-{hex_id(r, 12)}",
            key_id=hex_id(r, 12),
            tier=tier,
            created_at=created,
            payment_fingerprint=card or f"pm_{hex_id(r, 14)}",
            email_domain=email or r.choice(FREE_MAIL),
            org=org,
            shape=self.shape,
            role=role or ("campaign" if campaign else "legitimate"),
            profile=profile,
            campaign_id=campaign,
            replaces=replaces,
        )
        self.accounts.append(account)
        return account

    def adoption(self) -> float:
        """When a customer moves to the new model: some never, most within a week or two."""
        g = self.s.legit
        if self.r.random() < g.adoption:
            return self.world.release + self.r.gammavariate(2, g.adoption_days * 86400 / 2)
        return math.inf

    def pivot(self, share: float, hours: float) -> float:
        """When a campaign account moves to the new model: with chance ``share``, within
        ``hours`` of the release."""
        if self.r.random() < share:
            return self.world.release + self.r.uniform(0, hours * 3600)
        return math.inf

    def model(self, t: float, client: Client) -> str:
        if t >= client.switch and self.r.random() < 0.9:
            return self.s.new_model
        return self.s.base_model

    def request(
        self,
        account: Account,
        client: Client,
        t: float,
        messages: list[dict[str, str]],
        *,
        answer_tokens: int,
        content: str = "legitimate",
        template_id: str | None = None,
        capability: str | None = None,
        exposure: str | None = None,
    ) -> Request:
        """What ``client`` sends: its main address and agent most of the time, at ``exposure``
        (default: the client's, most of the time)."""
        r = self.r
        ips = client.ips
        ip = ips[0] if len(ips) == 1 or r.random() < 0.7 else r.choice(ips)
        if exposure is None:
            exposure = client.exposure if r.random() < 0.7 else "text"
        return Request(
            account=account,
            ip=ip,
            user_agent=client.agents[0] if r.random() < 0.8 else r.choice(client.agents),
            endpoint=client.endpoint,
            model=self.model(t, client),
            messages=messages,
            stream=client.stream,
            temperature=client.temperature,
            max_tokens=client.max_tokens,
            seed=client.seed,
            exposure=exposure,
            answer_tokens=answer_tokens,
            campaign_id=self.campaign_id,
            content=content,
            template_id=template_id,
            capability=capability,
        )

    def answer_tokens(self) -> int:
        return max(5, int(self.r.lognormvariate(math.log(220), 0.8)))

    # -- content shared by shapes

    def conversation(
        self,
        account: Account,
        client: Client,
        t: float,
        budget: int,
        *,
        single: bool,
        follow_up: float,
        rate_limited: float,
        content: str = "legitimate",
    ) -> tuple[float, int]:
        """Consecutive turns of one ShareGPT conversation; (time after, requests sent)."""
        r, log = self.r, self.log
        index = r.randrange(len(self.material.conversations))
        _, humans = self.material.conversations[index]
        first = 0 if single or len(humans) == 1 or r.random() < 0.75 else r.randrange(len(humans))
        messages: list[dict[str, str]] = []
        for turn in humans[:first]:  # the conversation began before this session
            messages.append({"role": "user", "content": turn})
            messages.append({"role": "assistant", "content": log.filler(self.answer_tokens())})
        sent = 0
        for j in range(first, len(humans)):
            text = self.vary(humans[j], (index, j))
            messages = [*messages, {"role": "user", "content": text}]
            q = self.request(
                account, client, t, messages, answer_tokens=self.answer_tokens(), content=content
            )
            answer, t = log.send(t, q, rate_limited=rate_limited, automated=False)
            sent += 1
            if single or sent >= budget or r.random() > follow_up:
                break
            messages.append({"role": "assistant", "content": answer})
            t += r.lognormvariate(math.log(40), 0.9)  # reading, then typing the follow-up
        return t, sent

    def vary(self, text: str, key: tuple[int, int]) -> str:
        """A prompt as a different user writes it: the first sender's verbatim, later ones a
        little different (a greeting, a request framing, casing), as people phrase alike asks."""
        self.uses[key] += 1
        if self.uses[key] == 1:
            return text
        r = self.r
        roll = r.random()
        if roll < 0.25:
            return f"{r.choice(_REPHRASE['greetings'])}{text}"
        if roll < 0.5:
            return f"{r.choice(_REPHRASE['asks'])}{text}"
        if roll < 0.65:
            return text.lower()
        if roll < 0.8:
            return f"{text}{r.choice(_REPHRASE['endings'])}"
        return text

    # -- time

    def human_activity(
        self,
        account: Account,
        *,
        rate: float,
        active: float,
        tz: float,
        office: bool,
        weekend: float,
        session: Callable[[float, int], tuple[float, int]],
        begin: float = 0.0,
        end: float | None = None,
    ) -> None:
        """A person's days: active on some (``active``, ``weekend`` x that on Saturdays and
        Sundays), about ``rate`` requests on each, in sessions at local day or office hours;
        ``session(t, budget)`` sends from ``t`` and returns (time after, requests sent)."""
        r = self.r
        hours = HOURS_OFFICE if office else HOURS_PERSONAL
        end = self.world.end if end is None else end
        for day in range(math.ceil(self.s.days)):
            day_start = day * 86400
            if day_start + 86400 < max(begin, account.created_at) or day_start >= end:
                continue
            weekday = (self.world.start + timedelta(days=day)).weekday()
            if r.random() > active * (weekend if weekday >= 5 else 1.0):
                continue
            remaining = max(1, int(self.rng.poisson(rate)))
            while remaining > 0:
                t = max(self.local_time(day, tz, hours), account.created_at)
                while remaining > 0:
                    t, sent = session(t, remaining)
                    remaining -= sent
                    if r.random() > 0.45:
                        break
                    t += r.lognormvariate(math.log(150), 1.0)  # to the next conversation

    def local_time(self, day: int, tz: float, hours: list[float] = HOURS_PERSONAL) -> float:
        """A moment of ``day`` at an hour drawn from the cumulative local-hour weights
        ``hours`` (personal by default), in time zone ``tz``."""
        hour = bisect.bisect(hours, self.r.random() * hours[-1])
        return day * 86400 + (hour - tz) * 3600 + self.r.random() * 3600

    def clock(self, begin: float, end: float, period: float, jitter: float) -> np.ndarray:
        """A machine's schedule: every ``period`` seconds from a random phase, each tick off by
        ``jitter x period`` (std)."""
        grid = np.arange(begin + self.r.uniform(0, period), end, period)
        return grid + self.rng.normal(0, jitter * period, len(grid))


class Counted(Population):
    """A population of ``settings.accounts`` accounts (times the scenario's ``scale``)."""

    @property
    def size(self) -> int:
        return max(1, round(self.settings.accounts * self.s.scale))


class ShapeCampaign(Counted):
    """A campaign shape other than hydra: its name is the truth's ``campaign_id``; it runs from
    ``start_day`` to ``end_day``, asks for exposures from ``exposure_mix`` and moves to a new
    model per ``pivot_share`` and ``pivot_hours``."""

    def __init__(self, *args):
        super().__init__(*args)
        c = self.settings
        self.begin = c.start_day * 86400
        self.end = min(self.s.days if c.end_day is None else c.end_day, self.s.days) * 86400

    @property
    def campaign_id(self) -> str:
        return self.settings.name

    def exposure(self) -> str:
        return weighted(self.r, self.settings.exposure_mix)

    def client(self, agents: list[str], ips: list[str], *, max_tokens: int = 4096) -> Client:
        c = self.settings
        return chat_client(
            agents, ips, switch=self.pivot(c.pivot_share, c.pivot_hours),
            temperature=c.temperature, max_tokens=max_tokens,
        )  # fmt: skip


def chat_client(
    agents: list[str],
    ips: list[str],
    *,
    switch: float,
    exposure: str = "text",
    temperature: float | None = None,
    max_tokens: int = 1024,
    stream: bool = False,
) -> Client:
    """A chat client with the given agents and addresses, no fixed seed."""
    return Client(
        agents=agents, ips=ips, endpoint=CHAT, stream=stream, temperature=temperature,
        max_tokens=max_tokens, seed=None, exposure=exposure, switch=switch,
    )  # fmt: skip


def weighted(r: random.Random, weights: dict[str, float]) -> str:
    """A key of ``weights``, drawn by weight."""
    return r.choices(list(weights), weights=list(weights.values()))[0]
