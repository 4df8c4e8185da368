"""Tool-trajectory harvesting: accounts that sweep tasks over a tool catalogue in order
(``data/tools.yaml``), each task a trajectory of requests. The first request
of a trajectory holds a system prompt listing the tools and the task; each later one adds the
model's previous tool call and the ``tool`` result, so the ``prompt`` column holds the tool result
(the last message, as a gateway logs it). Automation timing, optionally a shared proxy pool."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

from distillscope.traffic.clients import PROXY_16S, hex_id, ip
from distillscope.traffic.grammar import fill
from distillscope.traffic.log import Account
from distillscope.traffic.material import data
from distillscope.traffic.population import Client, ShapeCampaign


def tools_system(tools: list[str], r) -> str:
    """A system prompt declaring ``tools`` as JSON function specs."""
    specs = [
        {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
        for name in tools
    ]
    lead = r.choice(data("tools")["system_leads"])
    return f"{lead}\n{json.dumps(specs)}\nCall a tool with a JSON object; answer when done."


def tool_step(tools: list[str], step: int, r, log) -> list[dict[str, str]]:
    """One step of a trajectory: the assistant's tool call and the tool's JSON result."""
    name = r.choice(tools)
    call = {"tool_calls": [{"id": f"call_{hex_id(r, 8)}", "name": name,
                            "arguments": {"step": step, "query": log.filler(6)}}]}  # fmt: skip
    result = {"status": "ok", "items": [log.filler(12) for _ in range(r.randint(1, 3))]}
    return [
        {"role": "assistant", "content": json.dumps(call)},
        {"role": "tool", "content": json.dumps(result)},
    ]


class ToolTrajectory(ShapeCampaign):
    shape = "tool_trajectory"

    def run(self, advance: Callable[[], None]) -> list[Account]:
        c, r = self.settings, self.r
        catalogue = data("tools")
        grid = [
            (domain, task) for domain, spec in catalogue["tool_domains"].items()
            for task in spec["tasks"]
        ]  # fmt: skip
        subnets = [(a, b, r.randrange(256)) for a, b in r.sample(PROXY_16S, 3)]
        pool = [ip(r, *r.choice(subnets)) for _ in range(math.ceil(self.size / c.accounts_per_ip))]
        for i in range(self.size):
            client = self.client([r.choice(c.user_agents)], [pool[i % len(pool)]])
            account = self.account(
                self.begin - r.uniform(1, 60) * 86400, tier=c.tier, profile="tool_trajectory"
            )
            period = 86400 / c.requests_per_account_day
            times = sorted(self.clock(self.begin, self.end, period, c.timing_jitter).tolist())
            self._sweep(account, client, times, grid, r.randrange(len(grid)), catalogue)
            advance()
        return self.accounts

    def _sweep(self, account: Account, client: Client, times, grid, at: int, catalogue) -> None:
        c, r, log = self.settings, self.r, self.log
        messages: list[dict[str, str]] = []
        steps_left = 0
        for t in times:
            if not self.begin <= t < self.end:
                continue
            if steps_left == 0:  # the next task of the sweep
                domain, task = grid[at % len(grid)]
                at += 1
                tools = catalogue["tool_domains"][domain]["tools"]
                messages = [
                    {"role": "system", "content": tools_system(tools, r)},
                    {"role": "user", "content": fill(task, r, catalogue)},
                ]
                steps_left = r.randint(*c.steps)
            else:
                messages = [*messages, *tool_step(tools, len(messages), r, log)]
            q = self.request(
                account, client, t, messages,
                answer_tokens=max(20, int(r.lognormvariate(math.log(250), 0.6))),
                content="trajectory", template_id=f"trajectory/{domain}",
                capability="tool_use", exposure=self.exposure(),
            )  # fmt: skip
            log.send(t, q, rate_limited=0.01, automated=True)
            steps_left -= 1
