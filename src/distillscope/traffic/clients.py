"""Who sends requests, and from where: address ranges, user agents, time zones, daily rhythms
(``data/clients.yaml``), and small draws from them. Addresses are invented."""

from __future__ import annotations

import itertools
import random

from distillscope.traffic.material import data

_CLIENTS = data("clients")
RESIDENTIAL: list[int] = _CLIENTS["residential"]
MOBILE: list[int] = _CLIENTS["mobile"]
CLOUD: list[int] = _CLIENTS["cloud"]
CORPORATE: list[int] = _CLIENTS["corporate"]
#: /16s of commercial proxy and VPN providers: campaigns rent pools here, some users exit here.
PROXY_16S: list[tuple[int, int]] = [tuple(pair) for pair in _CLIENTS["proxy_16s"]]
SDK_AGENTS: list[str] = _CLIENTS["sdk_agents"]
PIPELINE_AGENTS: list[str] = _CLIENTS["pipeline_agents"]
IDE_AGENTS: list[str] = _CLIENTS["ide_agents"]
FREE_MAIL: list[str] = _CLIENTS["free_mail"]
ORG_WORDS: list[list[str]] = _CLIENTS["org_words"]
#: (UTC offset in hours, weight) of people's time zones.
TIMEZONES: list[tuple[float, float]] = [tuple(pair) for pair in _CLIENTS["timezones"]]
#: Cumulative activity by local hour (0-23): individuals (evenings too) and office hours.
HOURS_PERSONAL = list(itertools.accumulate(_CLIENTS["hours_personal"]))
HOURS_OFFICE = list(itertools.accumulate(_CLIENTS["hours_office"]))
LEGIT_TIERS: list[tuple[str, float]] = [tuple(pair) for pair in _CLIENTS["legit_tiers"]]
MAX_TOKENS: list[int] = _CLIENTS["max_tokens"]
TEMPERATURES: list[float | None] = _CLIENTS["temperatures"]


def ip(r: random.Random, first: int, second: int | None = None, third: int | None = None) -> str:
    """An address in ``first.second.third.0/24`` (random where not given)."""
    second = r.randrange(256) if second is None else second
    third = r.randrange(256) if third is None else third
    return f"{first}.{second}.{third}.{r.randrange(2, 254)}"


def hex_id(r: random.Random, chars: int) -> str:
    return f"{r.getrandbits(4 * chars):0{chars}x}"


def timezone(r: random.Random) -> float:
    zones, weights = zip(*TIMEZONES)
    return r.choices(zones, weights=weights)[0]


def browser_agent(r: random.Random) -> str:
    """A current browser's user agent with its own version numbers (thousands of variants, as
    real browsers' auto-updates spread them)."""
    major = r.randint(118, 127)
    build, patch = r.randint(5900, 6500), r.randint(0, 220)
    platform = r.choice(_CLIENTS["browser_platforms"])
    roll = r.random()
    if roll < 0.6:
        return (
            f"Mozilla/5.0 ({platform}) AppleWebKit/537.36 (KHTML, like Gecko) "
            f"Chrome/{major}.0.{build}.{patch} Safari/537.36"
        )
    if roll < 0.75:
        return (
            f"Mozilla/5.0 ({platform}) AppleWebKit/537.36 (KHTML, like Gecko) "
            f"Chrome/{major}.0.{build}.{patch} Safari/537.36 Edg/{major}.0.{build - 40}.{patch}"
        )
    if roll < 0.9:
        return f"Mozilla/5.0 ({platform}; rv:{major}.0) Gecko/20100101 Firefox/{major}.0"
    minor = r.randint(0, 6)
    return (
        f"Mozilla/5.0 ({platform}) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        f"Version/17.{minor} Safari/605.1.15"
    )


def unique(draw, taken: set[str]) -> str:
    """``draw()`` until it gives a value not in ``taken``; the value is then taken."""
    value = draw()
    while value in taken:
        value = draw()
    taken.add(value)
    return value
