"""Slow drip: many quiet accounts, each a few requests on the days it is active, every prompt a
diverse real ShareGPT prompt wrapped in a request to show the whole reasoning (worded many ways,
before or after the prompt), at human hours, from addresses spread over residential networks
and commercial proxy exits."""

from __future__ import annotations

import math
from collections.abc import Callable

from distillscope.traffic.clients import (
    MOBILE,
    PROXY_16S,
    RESIDENTIAL,
    SDK_AGENTS,
    browser_agent,
    ip,
    timezone,
)
from distillscope.traffic.grammar import reasoning_wrap
from distillscope.traffic.log import Account
from distillscope.traffic.population import ShapeCampaign


class SlowDripCot(ShapeCampaign):
    shape = "slow_drip_cot"

    def run(self, advance: Callable[[], None]) -> list[Account]:
        c, r = self.settings, self.r
        prompts = self.material.prompts["any"]
        for _ in range(self.size):
            if r.random() < c.proxy_share:
                ips = [ip(r, *r.choice(PROXY_16S))]
            else:
                ips = [ip(r, r.choice(RESIDENTIAL))]
                if r.random() < 0.3:
                    ips.append(ip(r, r.choice(MOBILE)))
            agent = browser_agent(r) if r.random() < 0.5 else r.choice(SDK_AGENTS)
            client = self.client([agent], ips)
            account = self.account(
                self.begin - r.uniform(2, 300) * 86400, tier=c.tier, profile="slow_drip_cot"
            )
            tz = timezone(r)
            for day in range(math.floor(self.begin / 86400), math.ceil(self.end / 86400)):
                if r.random() > c.active_day_share:
                    continue
                for _ in range(r.randint(*c.requests_per_active_day)):
                    t = self.local_time(day, tz)
                    if not self.begin <= t < self.end:
                        continue
                    content = reasoning_wrap(r.choice(prompts), r)
                    q = self.request(
                        account, client, t, [{"role": "user", "content": content}],
                        answer_tokens=max(50, int(r.lognormvariate(math.log(700), 0.5))),
                        content="cot_wrap", capability="cot_elicitation",
                        exposure=self.exposure(),
                    )  # fmt: skip
                    self.log.send(t, q, rate_limited=0.004, automated=False)
            advance()
        return self.accounts
