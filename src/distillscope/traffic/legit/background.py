"""The background: the provider's ordinary customers (the scenario's ``legit:``).

Real ShareGPT conversations (follow-up turns carry the earlier ones in ``messages``), at
heavy-tailed volumes (lognormal: most send a few requests a day, power users far more than any
campaign account), in diurnal and bursty sessions in their own time zones, many of them behind
shared corporate NAT addresses; a few run pipelines of their own (templated prompts, regular
timing) and a few sit behind the same commercial proxy ranges campaigns rent.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from datetime import timedelta

import numpy as np

from distillscope.traffic.clients import (
    CLOUD,
    CORPORATE,
    FREE_MAIL,
    LEGIT_TIERS,
    MAX_TOKENS,
    MOBILE,
    ORG_WORDS,
    PIPELINE_AGENTS,
    PROXY_16S,
    RESIDENTIAL,
    SDK_AGENTS,
    TEMPERATURES,
    browser_agent,
    hex_id,
    ip,
    timezone,
)
from distillscope.traffic.log import CHAT, COMPLETIONS, Account
from distillscope.traffic.population import Client, Population
from distillscope.traffic.templates import PIPELINE_TEMPLATES, render


class Background(Population):
    shape = "background"

    def __init__(self, *args):
        super().__init__(*args)
        self.g = self.settings
        self.people = self._accounts()

    @property
    def size(self) -> int:
        return len(self.people)

    def run(self, advance: Callable[[], None]) -> list[Account]:
        for account, behaviour in self.people:
            if account.profile == "integration":
                self._pipeline(account, behaviour)
            else:
                self._person(account, behaviour)
            advance()
        return self.accounts

    def _accounts(self) -> list[tuple[Account, dict]]:
        """Every account with its behaviour."""
        g, r = self.g, self.r
        n = round(g.accounts * self.s.scale)
        counts = {
            "integration": round(n * g.integration_share),
            "corporate": round(n * g.corporate_share),
            "vpn": round(n * g.vpn_share),
        }
        profiles = [p for p, k in counts.items() for _ in range(k)]
        profiles += ["individual"] * (n - len(profiles))
        r.shuffle(profiles)
        orgs: list[dict] = []
        for i in range(max(1, round(g.orgs * min(1.0, self.s.scale)))):
            orgs.append(self._org(i, {org["name"] for org in orgs}))
        org_weights = list(itertools.accumulate(1 / (i + 1) for i in range(len(orgs))))
        people = []
        for profile in profiles:
            org = r.choices(orgs, cum_weights=org_weights)[0] if profile == "corporate" else None
            behaviour = {
                "tz": org["tz"] if org else timezone(r),
                "rate": g.median_daily * r.lognormvariate(0, g.volume_sigma),
                "org": org,
            }
            created = -r.uniform(20, 900) * 86400
            if r.random() < g.signup_share:
                created = r.uniform(0, self.s.days) * 86400
            card = f"pm_{hex_id(r, 14)}"
            email = r.choice(FREE_MAIL)
            if org:
                email = org["domain"] if r.random() < 0.9 else email
                card = org["card"] if r.random() < 0.8 else card
            elif profile == "integration":
                email = f"{hex_id(r, 6)}.dev" if r.random() < 0.5 else email
            tier = r.choices(*zip(*LEGIT_TIERS))[0]
            account = self.account(
                created, tier=tier, profile=profile, card=card, email=email,
                org=org["name"] if org else None,
            )  # fmt: skip
            people.append((account, behaviour))
        return people

    def _org(self, i: int, taken: set[str]) -> dict:
        r = self.r
        name = f"{r.choice(ORG_WORDS[0])}{r.choice(ORG_WORDS[1])} {r.choice(ORG_WORDS[2])}"
        name = f"{name} {i}" if name in taken else name
        subnet = (r.choice(CORPORATE), r.randrange(256), r.randrange(256))
        return {
            "name": name,
            "domain": name.lower().replace(" ", "") + ".com",
            "tz": timezone(r),
            "nat": [ip(r, *subnet) for _ in range(r.randint(1, 3))],
            "card": f"pm_{hex_id(r, 14)}",
        }

    def _client(self, account: Account, behaviour: dict) -> Client:
        r, g = self.r, self.g
        browser = r.random() < 0.35
        agents = [browser_agent(r) if browser else r.choice(SDK_AGENTS)]
        if r.random() < 0.25:
            agents.append(r.choice(SDK_AGENTS))
        if behaviour["org"]:
            ips = behaviour["org"]["nat"]
        elif account.profile == "vpn":
            ips = [ip(r, *r.choice(PROXY_16S)) for _ in range(6)]
        else:
            ips = [ip(r, r.choice(RESIDENTIAL))]
            if r.random() < 0.3:
                ips.append(ip(r, r.choice(MOBILE)))
        exposure = "text"
        if r.random() < g.logprobs_share:
            exposure = r.choice(("logprobs", "top5", "top20"))
        switch = self.adoption()
        return Client(
            agents=agents,
            ips=ips,
            endpoint=COMPLETIONS if r.random() < g.completions_share else CHAT,
            stream=browser or r.random() < 0.3,
            temperature=r.choice(TEMPERATURES),
            max_tokens=r.choice(MAX_TOKENS),
            seed=42 if r.random() < 0.02 else None,
            exposure=exposure,
            switch=switch,
        )

    def _person(self, account: Account, behaviour: dict) -> None:
        """A human: active on some days, in sessions of conversations, in local daytime."""
        r, g = self.r, self.g
        client = self._client(account, behaviour)
        corporate = account.profile == "corporate"
        rate = behaviour["rate"]
        # Heavier users come back on more days.
        active = min(
            0.98,
            max(
                0.03,
                r.betavariate(2, 2) * 2 * g.active_day_share
                + 0.08 * math.log(rate / g.median_daily),
            ),
        )
        single = client.endpoint == COMPLETIONS

        def session(t: float, budget: int) -> tuple[float, int]:
            return self.conversation(
                account, client, t, budget, single=single, follow_up=g.follow_up,
                rate_limited=g.rate_limited_share,
            )  # fmt: skip

        self.human_activity(
            account, rate=rate, active=active, tz=behaviour["tz"], office=corporate,
            weekend=g.weekend_factor / 3 if corporate else g.weekend_factor, session=session,
        )  # fmt: skip

    def _pipeline(self, account: Account, behaviour: dict) -> None:
        """A customer's own automation: one or two templates, a cloud address, cron timing."""
        r, rng, log = self.r, self.rng, self.log
        client = self._client(account, behaviour)
        client.agents = [r.choice(PIPELINE_AGENTS)]
        client.ips = [ip(r, r.choice(CLOUD))]
        client.stream = False
        client.temperature = 0.0
        client.max_tokens = r.choice((256, 512))
        client.exposure = r.choice(("text", "text", "top5", "logprobs"))
        templates = r.sample(PIPELINE_TEMPLATES, r.randint(1, 2))
        rate = self.g.integration_median_daily * r.lognormvariate(0, 0.5)
        kind = r.choice(("office", "around-the-clock", "nightly"))
        begin = max(0.0, account.created_at)
        end = self.world.end
        if kind == "nightly":  # one batch a night, fast
            times = []
            for day in range(math.ceil(self.s.days)):
                at = day * 86400 + (2 - behaviour["tz"]) % 24 * 3600 + r.uniform(0, 600)
                times.extend(at + np.cumsum(rng.exponential(1.5, int(rng.poisson(rate)))))
        else:
            hours = 10 if kind == "office" else 24
            times = self.clock(begin, end, hours * 3600 / rate, 0.15)
            if kind == "office":
                local = (times / 3600 + behaviour["tz"]) % 24
                start = self.world.start
                weekday = np.array(
                    [(start + timedelta(seconds=float(t))).weekday() < 5 for t in times],
                    dtype=bool,
                )
                times = times[(local >= 8) & (local < 18) & weekday]
        for t in sorted(float(t) for t in times if t >= begin):
            template = r.choice(templates)
            messages = render(template, r, self.material, log.filler)
            q = self.request(
                account,
                client,
                t,
                messages,
                answer_tokens=max(3, int(r.lognormvariate(math.log(80), 0.5))),
                template_id=template.id,
            )
            log.send(t, q, rate_limited=self.g.rate_limited_share, automated=True)
