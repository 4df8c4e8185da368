"""People whose traffic looks unusual and is legitimate.

``coding_agents``: IDE coding-agent users: human sessions, an IDE's user agent, a system prompt
listing the agent's tools, coding tasks over several requests with tool calls and results; they
never ask to narrate reasoning. ``logprob_researchers``: people asking for logprobs and top-k
alternatives on diverse prompts. ``corporate_nat``: one organisation whose employees all leave
through one or two NAT addresses, in office hours, through the corporate browser or the SDK.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

from distillscope.traffic.campaigns.tool_trajectory import tool_step
from distillscope.traffic.clients import (
    CORPORATE,
    IDE_AGENTS,
    MOBILE,
    RESIDENTIAL,
    SDK_AGENTS,
    browser_agent,
    hex_id,
    ip,
    timezone,
)
from distillscope.traffic.grammar import fill
from distillscope.traffic.legit.pipelines import domain_of, org_name
from distillscope.traffic.log import Account
from distillscope.traffic.material import data
from distillscope.traffic.population import Client, Counted, chat_client


def _home(r) -> list[str]:
    ips = [ip(r, r.choice(RESIDENTIAL))]
    if r.random() < 0.3:
        ips.append(ip(r, r.choice(MOBILE)))
    return ips


class CodingAgents(Counted):
    shape = "coding_agents"

    def run(self, advance: Callable[[], None]) -> list[Account]:
        c, r = self.settings, self.r
        for _ in range(self.size):
            client = chat_client([r.choice(IDE_AGENTS)], _home(r), switch=self.adoption(),
                                 temperature=r.choice((None, 0.0, 0.2)), stream=True,
                                 max_tokens=r.choice((2048, 4096)))  # fmt: skip
            account = self.account(-r.uniform(10, 600) * 86400, tier="text", profile="ide")
            language = r.choice(data("legit")["languages"])
            self.human_activity(
                account, rate=c.median_daily * r.lognormvariate(0, 0.7),
                active=c.active_day_share, tz=timezone(r), office=r.random() < 0.6,
                weekend=0.3,
                session=lambda t, n, a=account, k=client, x=language: self._task(a, k, t, n, x),
            )  # fmt: skip
            advance()
        return self.accounts

    def _task(self, account: Account, client: Client, t: float, budget: int, language: str):
        """One coding task: the user's ask, then the agent's tool calls and their results."""
        c, r, log, legit = self.settings, self.r, self.log, data("legit")
        tools = [tool["name"] for tool in legit["ide_tools"]]
        system = r.choice(legit["ide_systems"]).format(
            tools=json.dumps(legit["ide_tools"]), language=language
        )
        task = fill(r.choice(legit["coding_tasks"]), r, {"thing": legit["things"]})
        messages = [{"role": "system", "content": system}, {"role": "user", "content": task}]
        sent, steps = 0, r.randint(*c.steps)
        while True:
            q = self.request(
                account, client, t, messages,
                answer_tokens=max(20, int(r.lognormvariate(math.log(300), 0.7))),
            )  # fmt: skip
            _, t = log.send(t, q, rate_limited=self.s.legit.rate_limited_share, automated=True)
            sent += 1
            if sent >= min(budget, steps):
                return t, sent
            messages = [*messages, *tool_step(tools, sent, r, log)]
            t += r.uniform(1, 12)  # the tool runs, the agent sends the result back


class LogprobResearchers(Counted):
    shape = "logprob_researchers"

    def run(self, advance: Callable[[], None]) -> list[Account]:
        c, r = self.settings, self.r
        prompts = self.material.prompts["any"]
        for _ in range(self.size):
            ips = [ip(r, r.choice(CORPORATE))] if r.random() < 0.5 else _home(r)
            client = chat_client([r.choice(SDK_AGENTS[:3])], ips, switch=self.adoption(),
                                 temperature=r.choice((0.0, 1.0)),
                                 max_tokens=r.choice((1, 16, 64)))  # fmt: skip
            account = self.account(-r.uniform(10, 900) * 86400, tier="top20", profile="research")
            exposures = r.sample(("logprobs", "top5", "top20"), r.randint(1, 3))

            def session(t: float, budget: int, a=account, k=client, asks=exposures):
                for _ in range(min(budget, r.randint(1, 6))):
                    q = self.request(
                        a, k, t, [{"role": "user", "content": r.choice(prompts)}],
                        answer_tokens=k.max_tokens, exposure=r.choice(asks),
                    )  # fmt: skip
                    _, t = self.log.send(t, q, rate_limited=0.004, automated=False)
                    t += r.lognormvariate(math.log(20), 1.0)
                return t, min(budget, 6)

            self.human_activity(
                account, rate=c.median_daily * r.lognormvariate(0, 0.6),
                active=c.active_day_share, tz=timezone(r), office=True, weekend=0.3,
                session=session,
            )  # fmt: skip
            advance()
        return self.accounts


class CorporateNat(Counted):
    shape = "corporate_nat"

    def run(self, advance: Callable[[], None]) -> list[Account]:
        c, r = self.settings, self.r
        name = org_name(r)
        subnet = (r.choice(CORPORATE), r.randrange(256), r.randrange(256))
        nat = [ip(r, *subnet) for _ in range(r.randint(*c.nat_addresses))]
        browser, card, tz = browser_agent(r), f"pm_{hex_id(r, 14)}", timezone(r)
        g = self.s.legit
        for _ in range(self.size):
            sdk = r.random() < c.sdk_share
            client = chat_client([r.choice(SDK_AGENTS) if sdk else browser], nat,
                                 switch=self.adoption(), stream=not sdk)  # fmt: skip
            account = self.account(
                -r.uniform(5, 700) * 86400, tier=r.choice(("text", "top5")), profile="employee",
                card=card if r.random() < 0.9 else None, email=domain_of(name), org=name,
            )  # fmt: skip
            self.human_activity(
                account, rate=c.median_daily * r.lognormvariate(0, 1.0),
                active=c.active_day_share, tz=tz, office=True, weekend=0.1,
                session=lambda t, n, a=account, k=client: self.conversation(
                    a, k, t, n, single=False, follow_up=g.follow_up,
                    rate_limited=g.rate_limited_share,
                ),
            )  # fmt: skip
            advance()
        return self.accounts
