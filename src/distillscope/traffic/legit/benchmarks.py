"""Benchmark runners: each account sends one public test set once, fast (a run of a few hours),
at temperature 0, often wrapped as ``Q: ... A: Let's think step by step.``. The test set is
generated from a fixed seed: every runner in every world sends the same questions."""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable

from distillscope.traffic.clients import CLOUD, CORPORATE, PIPELINE_AGENTS, SDK_AGENTS, ip
from distillscope.traffic.log import Account
from distillscope.traffic.material import data
from distillscope.traffic.population import Counted, chat_client


@functools.cache
def question_set(questions: int) -> tuple[str, ...]:
    """``questions`` grade-school maths and multiple-choice questions, the same on every call."""
    r, legit = random.Random(1_000_003), data("legit")
    out = []
    for i in range(questions):
        kind = i % 3
        if kind < 2:
            a, b, c = r.randint(12, 480), r.randint(2, 12), r.randint(2, 9)
            out.append(r.choice(legit["math_questions"]).format(a=a, b=b, c=c))
        else:
            question, options, _ = r.choice(legit["choice_questions"])
            if r.random() < 0.5:  # an arithmetic item, to keep the set large and varied
                x, y = r.randint(3, 40), r.randint(3, 40)
                answer = x * y
                options = [str(answer + d) for d in r.sample((-2, 0, 2, 10), 4)]
                question = f"What is {x} x {y}?"
            letters = "ABCD"
            choices = "\n".join(f"{letters[j]}. {o}" for j, o in enumerate(options))
            out.append(f"{question}\n{choices}\nAnswer:")
    return tuple(out)


class BenchmarkRunners(Counted):
    shape = "benchmark_runners"

    def run(self, advance: Callable[[], None]) -> list[Account]:
        c, r = self.settings, self.r
        questions = question_set(c.questions)
        for _ in range(self.size):
            ips = [ip(r, r.choice(CLOUD if r.random() < 0.6 else CORPORATE))]
            client = chat_client([r.choice(PIPELINE_AGENTS + SDK_AGENTS[:3])], ips,
                                 switch=self.adoption(), temperature=0.0,
                                 max_tokens=r.choice((256, 512)))  # fmt: skip
            client.exposure = "logprobs" if r.random() < 0.4 else "text"
            account = self.account(-r.uniform(5, 400) * 86400, tier="top5", profile="eval")
            wrap = r.random() < c.cot_wrap_share
            hours = r.uniform(*c.run_hours)
            start = r.uniform(0, max(0.0, self.world.end - hours * 3600))
            gaps = self.rng.exponential(hours * 3600 / len(questions), len(questions))
            for t, question in zip(start + gaps.cumsum(), questions):
                text = f"Q: {question}\nA: Let's think step by step." if wrap else question
                q = self.request(
                    account, client, float(t), [{"role": "user", "content": text}],
                    answer_tokens=max(5, int(r.lognormvariate(math.log(120), 0.6))),
                    exposure=client.exposure,
                )  # fmt: skip
                self.log.send(float(t), q, rate_limited=0.01, automated=True)
            advance()
        return self.accounts
