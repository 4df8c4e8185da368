"""Customers' automation, which is not distillation.

``integration_fleet``: organisations each running a few pipeline keys, every key one fixed
template of its organisation wrapping its users' text, machine-regular around the clock (a
jittered fixed interval, or a queue's bursts), an HTTP library, the organisation's own cloud
addresses. ``shared_template_customers``: unrelated customers (own organisations, addresses,
cards) each wrapping their users' text in one popular framework's default prompt, so several
customers share each template frame.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from distillscope.traffic.clients import CLOUD, ORG_WORDS, PIPELINE_AGENTS, SDK_AGENTS, hex_id, ip
from distillscope.traffic.log import Account
from distillscope.traffic.material import data
from distillscope.traffic.population import Client, Counted, Population, chat_client


def org_name(r) -> str:
    """A company name, with a number that keeps it apart from the background's."""
    words = f"{r.choice(ORG_WORDS[0])}{r.choice(ORG_WORDS[1])} {r.choice(ORG_WORDS[2])}"
    return f"{words} {r.randint(100, 999)}"


def domain_of(name: str) -> str:
    return name.lower().replace(" ", "") + ".com"


class _Pipelines(Population):
    """Shared by both shapes: one pipeline's requests, each a template around a user's text."""

    def pipeline(
        self, account: Account, client: Client, times, frame: str, template_id: str
    ) -> None:
        r, log = self.r, self.log
        prompts = self.material.prompts["any"]
        for t in times:
            text = frame.replace("{text}", r.choice(prompts))
            q = self.request(
                account, client, float(t), [{"role": "user", "content": text}],
                answer_tokens=max(3, int(r.lognormvariate(math.log(90), 0.6))),
                template_id=template_id,
            )  # fmt: skip
            log.send(float(t), q, rate_limited=self.s.legit.rate_limited_share, automated=True)

    def machine_times(self, begin: float, per_day: float, queue: bool) -> np.ndarray:
        """Around the clock: a jittered fixed interval, or a queue's bursts of work."""
        end, rng = self.world.end, self.rng
        if not queue:
            times = self.clock(begin, end, 86400 / per_day, self.r.uniform(0.02, 0.15))
        else:  # batches arrive at random; each is worked off at a steady pace
            starts = np.sort(rng.uniform(begin, end, int(rng.poisson(per_day / 25 * self.s.days))))
            sizes = rng.geometric(1 / 25, len(starts))
            times = np.concatenate(
                [s + np.cumsum(rng.exponential(2.0, n)) for s, n in zip(starts, sizes)] or [[]]
            )
        return np.sort(times[(times >= begin) & (times < end)])

    def pipeline_client(self, ips: list[str]) -> Client:
        r = self.r
        client = chat_client([r.choice(PIPELINE_AGENTS + SDK_AGENTS[:3])], ips,
                             switch=self.adoption(), temperature=r.choice((0.0, 0.0, 0.2, None)),
                             max_tokens=r.choice((256, 512, 1024)))  # fmt: skip
        client.exposure = r.choice(("text", "text", "text", "top5"))
        return client


class IntegrationFleet(_Pipelines):
    shape = "integration_fleet"

    @property
    def size(self) -> int:
        return max(1, round(self.settings.orgs * self.s.scale))

    def run(self, advance: Callable[[], None]) -> list[Account]:
        c, r = self.settings, self.r
        templates = data("legit")["fleet_templates"]
        for _ in range(self.size):
            name = org_name(r)
            frame = r.choice(templates).replace("{org}", name.rsplit(" ", 1)[0])
            ips = [ip(r, r.choice(CLOUD)) for _ in range(r.randint(*c.addresses_per_org))]
            card, tier = f"pm_{hex_id(r, 14)}", r.choice(("text", "top5", "top20"))
            for _ in range(r.randint(*c.accounts_per_org)):
                created = -r.uniform(30, 700) * 86400
                account = self.account(
                    created, tier=tier, profile="pipeline", card=card, email=domain_of(name),
                    org=name,
                )  # fmt: skip
                times = self.machine_times(
                    0.0, r.uniform(*c.requests_per_day), r.random() < c.queue_share
                )
                self.pipeline(account, self.pipeline_client(ips), times, frame, "fleet/" + name)
            advance()
        return self.accounts


class SharedTemplateCustomers(_Pipelines, Counted):
    shape = "shared_template_customers"

    def run(self, advance: Callable[[], None]) -> list[Account]:
        c, r = self.settings, self.r
        bank = data("legit")["framework_templates"]
        templates = r.sample(bank, min(c.templates, len(bank)))
        for i in range(self.size):
            template = templates[i % len(templates)]  # several customers per template
            name = org_name(r)
            ips = [ip(r, r.choice(CLOUD)) for _ in range(r.randint(1, 2))]
            account = self.account(
                -r.uniform(10, 500) * 86400, tier=r.choice(("text", "top5")),
                profile="framework", email=domain_of(name), org=name,
            )  # fmt: skip
            times = self.machine_times(0.0, r.uniform(*c.requests_per_day), r.random() < 0.5)
            self.pipeline(
                account, self.pipeline_client(ips), times, template["text"],
                "framework/" + template["id"],
            )  # fmt: skip
            advance()
        return self.accounts
