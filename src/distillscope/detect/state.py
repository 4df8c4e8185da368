"""The detector's incremental state: what each day of traffic contributes, kept per day.

``detect(..., state=FOLDER)`` reads from the log only the days the state does not hold yet (up
to the cut-off), digests them, stores each complete day's digest as a partition, and scores
every account from the stored digests plus the new ones. A daily job so reads one day of
exchanges, not the whole history, and flags what one run over the whole log would flag: every
signal is computed from the digests, in both cases (``detect`` without a state digests the
whole log the same way and keeps nothing).

Layout (Parquet, one ``day=YYYY-MM-DD/`` partition per day, readable by DuckDB and Spark)::

    FOLDER/state.json          settings the digests depend on, days held, the log
    FOLDER/prompts/day=.../    prompts first seen that day: ids, capability, elicitation, ends
    FOLDER/buckets/day=.../    their LSH buckets (MinHash bands), for prompts new that day
    FOLDER/uses/day=.../       (account, prompt): requests and first time, that day
    FOLDER/slots/day=.../      (account, prompt, hour window) co-hit keys
    FOLDER/activity/day=.../   per account: requests, first/last time, gap moments, UA, logprobs
    FOLDER/hours/day=.../      per account and hour of day: requests
    FOLDER/ips/day=.../        (account, address) pairs
    FOLDER/cats/day=.../       (account, tool catalogue) pairs
    FOLDER/pivots/day=.../     per account: requests near model releases, and on the new model

A day is stored once the cut-off (or, without one, the clock) has passed its end. Rows that
reach the log after their day was stored, and releases added to the events file for days
already stored, are seen only after ``rebuild``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from distillscope.errors import DistillscopeError

#: Bumped whenever a digest's definition changes: a state of another format is refused.
FORMAT = 1
#: The digests, each with its columns (``day`` besides).
TABLES = {
    "prompts": "qid, pid, prompt, elicits, capability, edge_a, edge_b",
    "buckets": "pid, bucket",
    "uses": "account_id, qid, n, first_ts",
    "slots": "account_id, pid, slot",
    "activity": "account_id, n, first_ts, last_ts, gaps, gap_mean, gap_m2, automation_ua, logprobs",
    "hours": "account_id, hour, n",
    "ips": "account_id, client_ip",
    "cats": "account_id, catalogue",
    "pivots": "account_id, hits, trials",
}


class StateError(DistillscopeError):
    """A state folder that cannot be used as asked."""


@dataclass
class DetectState:
    """A state folder: ``days`` held, ``settings`` (a fingerprint of what the digests depend
    on) and the ``log`` they came from."""

    folder: Path
    settings: str = ""
    days: list[date] = field(default_factory=list)
    log: str = ""

    @classmethod
    def open(cls, folder, settings: str, *, rebuild: bool = False) -> DetectState:
        """The state in ``folder`` (created when absent; emptied first with ``rebuild``).
        Refused when it was built with other settings: its digests would not match today's."""
        folder = Path(folder)
        meta = folder / "state.json"
        if folder.exists() and not folder.is_dir():
            raise StateError(f"--state {folder} is a file, not a folder")
        if rebuild and folder.exists():
            if any(folder.iterdir()) and not meta.exists():
                raise StateError(
                    f"--state {folder} holds files but no state.json: not a detector state, "
                    "so it is not emptied"
                )
            for table in TABLES:
                shutil.rmtree(folder / table, ignore_errors=True)
            meta.unlink(missing_ok=True)
        if not meta.exists():
            if folder.exists() and any(folder.iterdir()):
                raise StateError(
                    f"--state {folder} holds files but no state.json: give an empty or new folder"
                )
            return cls(folder, settings)
        try:
            held = json.loads(meta.read_text())
            days = [date.fromisoformat(d) for d in held["days"]]
            kept, fmt, log = held["settings"], held["format"], held.get("log", "")
        except (ValueError, KeyError, TypeError) as exc:
            raise StateError(f"{meta} is not a detector state ({exc}); use --rebuild") from None
        if fmt != FORMAT or kept != settings:
            raise StateError(
                f"the state in {folder} was built with other detector settings (or an older "
                "version): its digests do not match this run's; run again with --rebuild"
            )
        return cls(folder, settings, sorted(days), log)

    def usable(self, until: datetime | None) -> list[date]:
        """The held days this run can use: from the first, without gaps, each ending before
        ``until``."""
        used: list[date] = []
        for day in self.days:
            if used and day != used[-1] + timedelta(days=1):
                break
            if until is not None and _midnight(day + timedelta(days=1)) > _naive_utc(until):
                break
            used.append(day)
        return used

    def path(self, table: str) -> Path:
        return self.folder / table

    def hold(self, days: list[date], log: str) -> None:
        """Record ``days`` as held (after their partitions are written)."""
        self.days = sorted(set(self.days) | set(days))
        self.log = log
        self._save()

    def _save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT,
            "settings": self.settings,
            "days": [d.isoformat() for d in self.days],
            "log": self.log,
            "updated": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        written = self.folder / "state.json.writing"
        written.write_text(json.dumps(meta, indent=2))
        written.replace(self.folder / "state.json")


def fingerprint(values: dict) -> str:
    """A short, stable hash of ``values`` (the settings a digest depends on)."""
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def complete_days(days, until: datetime | None, start: date | None) -> list[date]:
    """Of ``days`` (those the loaded rows fall on), the ones that are over: their end is at or
    before ``until`` (without one: before now), and none before ``start``."""
    end = _naive_utc(until) if until is not None else datetime.now(UTC).replace(tzinfo=None)
    return sorted(
        d for d in days
        if _midnight(d + timedelta(days=1)) <= end and (start is None or d >= start)
    )  # fmt: skip


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day)


def _naive_utc(moment: datetime) -> datetime:
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment
