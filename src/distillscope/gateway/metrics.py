"""What a gateway has served, for Prometheus: ``GET /metrics`` in the text exposition format.

Every exchange the gateway logs, served or refused, is counted once, when its row is durable, from
that row: so the counters and the traffic log never disagree. Labels are the few values a
dashboard groups by (tier, model, endpoint, status, the exposure asked and the exposure served, the
error code); never an account or a key, whose number is unbounded (the traffic log holds those).

Each app has its own registry, so several gateways in one process (tests, a notebook) count apart.
Counters reset when the process restarts; Prometheus' ``rate()`` and ``increase()`` expect that.
With ``serve --workers N`` each worker counts its own requests: scrape each, or sum by instance.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

#: latency buckets, seconds: a cached or synthetic answer in milliseconds, a local model's in
#: seconds, a long streamed one in tens of seconds
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def _label(value: object) -> str:
    return "" if value is None else str(value)


class GatewayMetrics:
    """Counters and a latency histogram over logged exchanges (``observe`` one row each)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        where = ("tier", "model", "endpoint")
        self.requests = Counter(
            "distillscope_requests",
            "Exchanges logged, by tier, model, endpoint and HTTP status (refusals included).",
            (*where, "status"),
            registry=self.registry,
        )
        self.tokens = Counter(
            "distillscope_tokens",
            "Tokens of served exchanges, by tier, model and kind (prompt or completion).",
            ("tier", "model", "kind"),
            registry=self.registry,
        )
        self.exposure = Counter(
            "distillscope_exposure",
            "Served exchanges by the exposure asked for and the exposure the tier served.",
            ("tier", "requested", "served"),
            registry=self.registry,
        )
        self.refusals = Counter(
            "distillscope_refusals",
            "Refused exchanges by tier, HTTP status and error code (rate_limit_exceeded: 429s).",
            ("tier", "status", "code"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "distillscope_request_seconds",
            "Seconds from a request's arrival to its logged answer, by tier and endpoint.",
            ("tier", "endpoint"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def observe(self, row: dict) -> None:
        """Count one logged exchange (a traffic-log row)."""
        tier, model = _label(row.get("tier")), _label(row.get("model"))
        endpoint, status = _label(row.get("endpoint")), int(row.get("status") or 0)
        self.requests.labels(tier, model, endpoint, str(status)).inc()
        if row.get("latency_ms") is not None:
            self.latency.labels(tier, endpoint).observe(float(row["latency_ms"]) / 1000)
        if status >= 400:
            self.refusals.labels(tier, str(status), _label(row.get("error_code"))).inc()
            return
        for kind in ("prompt", "completion"):
            count = row.get(f"{kind}_tokens")
            if count:
                self.tokens.labels(tier, model, kind).inc(int(count))
        self.exposure.labels(
            tier, _label(row.get("exposure_requested")), _label(row.get("exposure_served"))
        ).inc()

    def render(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)
