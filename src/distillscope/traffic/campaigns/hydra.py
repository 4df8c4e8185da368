"""Hydra clusters, after the brief's table scaled down by ``campaign_scale``: accounts that each
look modest (tens of requests a day) on a shared proxy pool, driven by one scheduler
(synchronised waves around the clock, with outages), sending templated prompts with slot
variation and paraphrase concentrated on a few capabilities, with chain-of-thought elicitation
and a share of ordinary prompts as camouflage. The provider bans some accounts mid-run (their
next requests get 403) and the operator replaces them with fresh ones; when a new model is
released the campaign moves most of its traffic to it within a day.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np

from distillscope.traffic.clients import PROXY_16S, hex_id, ip
from distillscope.traffic.log import CHAT, Account, Request
from distillscope.traffic.population import Population
from distillscope.traffic.templates import TEMPLATES, Template, render


class Hydra(Population):
    """One operator: a scheduler driving account slots on a proxy pool, bans and replacements."""

    shape = "hydra"

    def __init__(self, *args):
        super().__init__(*args)
        s, c, r = self.s, self.settings, self.r
        self.c = c
        self.begin = c.start_day * 86400
        end_day = s.days if c.end_day is None else min(c.end_day, s.days)
        self.end = end_day * 86400
        self.slots = max(2, round(c.accounts * s.campaign_scale * s.scale))
        subnets = [(a, b, r.randrange(256)) for a, b in r.choices(PROXY_16S, k=c.ip_subnets)]
        size = max(1, math.ceil(self.slots / c.accounts_per_ip))
        self.pool = [ip(r, *r.choice(subnets)) for _ in range(size)]
        self.cards = [f"pm_{hex_id(r, 14)}" for _ in range(c.shared_fingerprints)]
        #: One main card, the others less used; ``_phase`` spreads the sharing accounts evenly.
        self.card_weights = list(itertools.accumulate(1 / (i + 1) for i in range(len(self.cards))))
        self._phase = r.random()
        self.batch_hour = r.uniform(0, 24)  # when the operator registers accounts
        self.templates, self.template_weights = self._templates()
        self.exposures = list(c.exposure_mix)
        self.exposure_weights = list(itertools.accumulate(c.exposure_mix.values()))
        #: Each account's own pool address and client.
        self.sticky: dict[str, str] = {}
        self.agent: dict[str, str] = {}

    @property
    def size(self) -> int:
        return self.slots

    @property
    def campaign_id(self) -> str:
        return self.c.name

    def _templates(self) -> tuple[list[Template], list[float]]:
        """The operator's few templates; within a capability the first carries the most."""
        c, r = self.c, self.r
        total = sum(c.focus.values())
        chosen, weights = [], []
        for capability, weight in c.focus.items():
            if weight <= 0:
                continue
            bank = [t for t in TEMPLATES if t.capability == capability]
            picked = r.sample(bank, min(len(bank), max(1, round(c.templates * weight / total))))
            zipf = [1 / (rank + 1) for rank in range(len(picked))]
            chosen += picked
            weights += [weight * z / sum(zipf) for z in zipf]
        return chosen, list(itertools.accumulate(weights))

    def _waves(self) -> tuple[np.ndarray, np.ndarray]:
        """The scheduler's wave times, and which of them ran (outages silence the cluster)."""
        c, rng, r = self.c, self.rng, self.r
        interval = c.wave_minutes * 60
        waves = np.arange(self.begin + r.uniform(0, interval), self.end, interval)
        waves = waves + rng.normal(0, 0.01 * interval, len(waves))
        running = np.ones(len(waves), dtype=bool)
        span_weeks = (self.end - self.begin) / (7 * 86400)
        for _ in range(int(rng.poisson(c.outages_per_week * span_weeks))):
            down = r.uniform(self.begin, self.end)
            running &= ~((waves >= down) & (waves < down + r.uniform(1, 6) * 3600))
        return waves, running

    def run(self, advance: Callable[[], None]) -> list[Account]:
        if self.begin >= self.end:
            for _ in range(self.slots):
                advance()
            return []
        waves, running = self._waves()
        for _ in range(self.slots):
            self._slot(waves, running)
            advance()
        return self.accounts

    def _slot(self, waves: np.ndarray, running: np.ndarray) -> None:
        """One account slot: its account fires every few waves; banned, it is replaced."""
        c, r, rng = self.c, self.r, self.rng
        interval = c.wave_minutes * 60
        every = max(
            1, round(86400 / c.requests_per_account_day / interval * r.lognormvariate(0, 0.2))
        )
        index = np.arange(r.randrange(every), len(waves), every)
        # Jitter moves a request to a neighbouring wave (the account stays on the cluster's
        # clock) and off the wave by a little; large jitter dissolves both the period and waves.
        shift = np.rint(rng.normal(0, c.timing_jitter * every, len(index))).astype(int)
        index = np.clip(index + shift, 0, len(waves) - 1)
        index = index[running[index]]
        times = waves[index] + rng.uniform(0, c.sync_spread_s, len(index))
        times = times + rng.normal(0, c.timing_jitter * interval / 2, len(index))
        times = np.sort(times[(times >= self.begin) & (times < self.end)]).tolist()
        span = self.end - self.begin
        bans = sorted(
            r.uniform(self.begin + 0.1 * span, self.end)
            for _ in range(int(rng.poisson(c.ban_rate)))
        )
        first_use = times[0] if times else self.begin
        aged = r.random() < c.aged_share
        created = (
            first_use - r.uniform(60, 700) * 86400
            if aged
            else self._registered(self.begin - r.uniform(0.5, 7) * 86400)
        )
        account = self._account(min(created, first_use - 60), "campaign")
        i, resume = 0, -math.inf
        for ban in bans:
            if ban < resume:  # the replacement is not in use yet
                continue
            while i < len(times) and times[i] < ban:
                self._send(account, times[i])
                i += 1
            account.banned_at = ban
            for t in times[i : i + 1 + int(rng.poisson(1.5))]:  # until the operator notices
                self.log.blocked(
                    t, account, self._ip(account), self.agent[account.account_id], c.name
                )
                i += 1
                resume = t
            resume = max(resume + 1, ban + r.expovariate(1 / max(c.replacement_delay_h * 3600, 1)))
            while i < len(times) and times[i] < resume:
                i += 1
            if i >= len(times):
                return
            created = self._registered(times[i] - r.uniform(1800, 2 * 86400))
            account = self._account(min(created, times[i] - 60), "replacement", account.account_id)
        for t in times[i:]:
            self._send(account, t)

    def _registered(self, t: float) -> float:
        """Registration happens in daily batches at the operator's hour: the batch before ``t``."""
        batch = math.floor(t / 86400) * 86400 + self.batch_hour * 3600 + self.r.uniform(0, 1200)
        return batch - 86400 if batch > t else batch

    def _account(self, created: float, role: str, replaces: str | None = None) -> Account:
        c, r = self.c, self.r
        # Exactly ``shared_fingerprint_share`` of the accounts pay with the operator's cards.
        n, share = len(self.accounts), c.shared_fingerprint_share
        shared = math.floor((n + 1) * share + self._phase) > math.floor(n * share + self._phase)
        card = r.choices(self.cards, cum_weights=self.card_weights)[0]
        account = Account(
            account_id=f"acct-{hex_id(r, 12)}",
            key_id=hex_id(r, 12),
            tier=c.tier,
            created_at=created,
            payment_fingerprint=card if shared else f"pm_{hex_id(r, 14)}",
            email_domain=r.choice(c.email_domains),
            org=None,
            shape=self.shape,
            role=role,
            profile="hydra",
            campaign_id=c.name,
            replaces=replaces,
        )
        self.accounts.append(account)
        self.sticky[account.account_id] = r.choice(self.pool)
        self.agent[account.account_id] = r.choice(c.user_agents)
        return account

    def _ip(self, account: Account) -> str:
        if self.r.random() < self.c.ip_rotation:
            return self.r.choice(self.pool)
        return self.sticky[account.account_id]

    def _model(self, t: float) -> str:
        c = self.c
        moved = (t - self.world.release - c.pivot_delay_h * 3600) / (
            (c.pivot_hours - c.pivot_delay_h) * 3600
        )
        share = c.pivot_share * min(1.0, max(0.0, moved))
        return self.s.new_model if self.r.random() < share else self.s.base_model

    def _send(self, account: Account, t: float) -> None:
        c, r = self.c, self.r
        template = None
        if r.random() < c.mixing_share:  # camouflage: an ordinary prompt
            messages = [{"role": "user", "content": r.choice(self.material.prompts["any"])}]
            answer_tokens = max(5, int(r.lognormvariate(math.log(220), 0.8)))
        else:
            template = r.choices(self.templates, cum_weights=self.template_weights)[0]
            messages = render(
                template,
                r,
                self.material,
                self.log.filler,
                paraphrase_rate=c.paraphrase_rate,
                cot_rate=c.cot_rate,
            )
            answer_tokens = max(20, int(r.lognormvariate(math.log(650), 0.5)))
        q = Request(
            account=account,
            ip=self._ip(account),
            user_agent=self.agent[account.account_id],
            endpoint=CHAT,
            model=self._model(t),
            messages=messages,
            stream=r.random() < c.stream_share,
            temperature=c.temperature,
            max_tokens=c.max_tokens,
            seed=None,
            exposure=r.choices(self.exposures, cum_weights=self.exposure_weights)[0],
            answer_tokens=answer_tokens,
            campaign_id=c.name,
            content="template" if template else "ordinary",
            template_id=template.id if template else None,
        )
        self.log.send(t, q, rate_limited=c.rate_limited_share, automated=True)
