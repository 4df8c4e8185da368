"""Stealth: a campaign with no shared infrastructure. Every account looks like one careful person:
its own residential address (sometimes a phone's too), its own browser build, its own time zone
and human sessions, its own signup date and card. ``camouflage_share`` of its requests are
ordinary ShareGPT conversations; the rest come from a grammar asking for agentic coding and tool
use with the reasoning and the tool trace narrated, worded many ways."""

from __future__ import annotations

import math
from collections.abc import Callable

from distillscope.traffic.clients import MOBILE, RESIDENTIAL, browser_agent, ip, timezone, unique
from distillscope.traffic.grammar import follow_up, narrated_task
from distillscope.traffic.log import Account
from distillscope.traffic.population import Client, ShapeCampaign


class Stealth(ShapeCampaign):
    shape = "stealth"

    def run(self, advance: Callable[[], None]) -> list[Account]:
        c, r = self.settings, self.r
        addresses: set[str] = set()
        agents: set[str] = set()
        for _ in range(self.size):
            created = self.begin - r.uniform(1, c.signup_spread_days) * 86400
            ips = [unique(lambda: ip(r, r.choice(RESIDENTIAL)), addresses)]
            if r.random() < c.second_ip_share:
                ips.append(unique(lambda: ip(r, r.choice(MOBILE)), addresses))
            client = self.client([unique(lambda: browser_agent(r), agents)], ips)
            client.stream = True
            account = self.account(created, tier=c.tier, profile="stealth")
            active = min(0.95, c.active_day_share * r.uniform(0.6, 1.4))
            self.human_activity(
                account, rate=r.uniform(*c.requests_per_active_day), active=active,
                tz=timezone(r), office=False, weekend=r.uniform(0.5, 1.0),
                session=lambda t, budget, a=account, k=client: self._session(a, k, t, budget),
                begin=self.begin, end=self.end,
            )  # fmt: skip
            advance()
        return self.accounts

    def _session(self, account: Account, client: Client, t: float, budget: int):
        c, r = self.settings, self.r
        if not self.begin <= t < self.end:
            return t, budget
        limited = self.s.legit.rate_limited_share
        if r.random() < c.camouflage_share:
            return self.conversation(
                account, client, t, budget, single=False, follow_up=0.5, rate_limited=limited,
                content="ordinary",
            )  # fmt: skip
        messages = [{"role": "user", "content": narrated_task(r)}]
        sent = 0
        while True:
            q = self.request(
                account, client, t, messages,
                answer_tokens=max(50, int(r.lognormvariate(math.log(900), 0.5))),
                content="grammar", capability="agentic_coding", exposure=self.exposure(),
            )  # fmt: skip
            answer, t = self.log.send(t, q, rate_limited=limited, automated=False)
            sent += 1
            if sent >= budget or r.random() > c.follow_up:
                return t, sent
            messages = [
                *messages,
                {"role": "assistant", "content": answer},
                {"role": "user", "content": follow_up(r)},
            ]
            t += r.lognormvariate(math.log(90), 0.8)  # reading the trace, then asking on
