"""Resellers: a few accounts each fronting an app's worth of end users (ordinary ShareGPT
conversations, follow-up turns included) around the clock in their users' rhythm, from cloud
addresses through an HTTP library, with ``distill_share`` of the traffic a hidden buyer's
distillation prompts (the template bank with chain-of-thought requests, or the narrated-trace
grammar)."""

from __future__ import annotations

import math
from collections.abc import Callable

from distillscope.traffic.clients import (
    CLOUD,
    PIPELINE_AGENTS,
    SDK_AGENTS,
    hex_id,
    ip,
    timezone,
)
from distillscope.traffic.grammar import narrated_task
from distillscope.traffic.log import Account
from distillscope.traffic.population import Client, ShapeCampaign
from distillscope.traffic.templates import TEMPLATES, render


class Reseller(ShapeCampaign):
    shape = "reseller"

    def run(self, advance: Callable[[], None]) -> list[Account]:
        c, r = self.settings, self.r
        bank = [t for t in TEMPLATES if t.capability in c.focus]
        weights = [c.focus[t.capability] for t in bank]
        for _ in range(self.size):
            ips = [ip(r, r.choice(CLOUD)) for _ in range(r.randint(*c.ips_per_account))]
            client = self.client([r.choice(PIPELINE_AGENTS + SDK_AGENTS[:3])], ips)
            account = self.account(
                self.begin - r.uniform(30, 400) * 86400, tier=c.tier, profile="reseller",
                email=f"{hex_id(r, 6)}.io",
            )  # fmt: skip
            for t in self._times(r.uniform(*c.requests_per_day)):
                if r.random() < c.distill_share:
                    self._distill(account, client, t, bank, weights)
                else:
                    self._end_user(account, client, t)
            advance()
        return self.accounts

    def _times(self, per_day: float) -> list[float]:
        """A day's requests follow the end users' hours, summed over their time zones."""
        r, times = self.r, []
        for day in range(math.floor(self.begin / 86400), math.ceil(self.end / 86400)):
            for _ in range(int(self.rng.poisson(per_day))):
                t = self.local_time(day, timezone(r))
                if self.begin <= t < self.end:
                    times.append(t)
        return sorted(times)

    def _end_user(self, account: Account, client: Client, t: float) -> None:
        """One end user's turn: a ShareGPT conversation at some turn, earlier turns included."""
        r, log = self.r, self.log
        _, humans = r.choice(self.material.conversations)
        turn = 0 if r.random() < 0.6 else r.randrange(len(humans))
        messages = []
        for text in humans[:turn]:
            messages += [
                {"role": "user", "content": text},
                {"role": "assistant", "content": log.filler(self.answer_tokens())},
            ]
        messages.append({"role": "user", "content": humans[turn]})
        q = self.request(
            account, client, t, messages, answer_tokens=self.answer_tokens(), content="ordinary",
            exposure=self.exposure(),
        )  # fmt: skip
        log.send(t, q, rate_limited=0.01, automated=True)

    def _distill(self, account, client, t, bank, weights) -> None:
        c, r = self.settings, self.r
        if r.random() < c.grammar_share:
            messages, template = [{"role": "user", "content": narrated_task(r)}], None
        else:
            template = r.choices(bank, weights=weights)[0]
            messages = render(
                template, r, self.material, self.log.filler, paraphrase_rate=0.3,
                cot_rate=c.cot_rate,
            )  # fmt: skip
        q = self.request(
            account, client, t, messages,
            answer_tokens=max(20, int(r.lognormvariate(math.log(650), 0.5))),
            content="template" if template else "grammar",
            template_id=template.id if template else None,
            capability=None if template else "agentic_coding", exposure=self.exposure(),
        )  # fmt: skip
        self.log.send(t, q, rate_limited=0.01, automated=True)
