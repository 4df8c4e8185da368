"""Multi-turn agent trajectories harvested as records: teacher -> tool call -> tool result ->
teacher ... until the teacher answers without a call or ``max_turns`` turns have been taken.

The teacher is any teacher with a ``chat`` method: a local one (``TransformersTeacher``, tools
in the ``toolcalls`` convention) or one reached over HTTP with the official ``openai`` client
(``OpenAITeacher``, streamed or not), such as a distillscope gateway.

Records: one per assistant turn (``records.completion_row``): ``prompt_ids`` are the whole
conversation before the turn, the completion is the turn itself, and ``messages``, ``tools``,
``tool_calls`` and ``turn`` say what it answered. Training on them (``distill``) therefore puts
every assistant turn in the loss once, and nothing else: the system message, the user's task,
tool results and earlier turns are prompt, outside the loss mask.

``tool_choice`` applies to the first turn (``required`` by default: the teacher must call one of
the tools, by constrained decoding on a local teacher); later turns are ``auto``, so a trajectory
ends when the teacher answers in words. A call whose arguments are not valid is answered with
the tool's ``error: ...`` and the loop goes on.

A harvest folder holds ``plan.parquet`` (the tasks), ``records/part-NNNNNN.parquet`` (one part
per trajectory, written atomically) and ``manifest.json``; rerunning the same command skips the
trajectories already written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from distillscope import __version__
from distillscope.agent.tools import Toolbox, default_toolbox
from distillscope.errors import HarvestError
from distillscope.exposure import is_at_least
from distillscope.harvest import ensure_writable, load_plan
from distillscope.paths import write_text_atomically
from distillscope.prompts import Prompt
from distillscope.records import (
    RECORDS_DIR,
    RecordSet,
    completion_row,
    provenance_for,
    write_part,
)
from distillscope.teachers.base import Completion, SamplingConfig

MANIFEST = "manifest.json"
SYSTEM = "You are an agent. Use the tools when they help, then answer the user briefly."


@dataclass(frozen=True)
class Task:
    id: str
    prompt: str
    category: str = "other"


def load_tasks(spec: str = "builtin", n: int | None = None) -> list[Task]:
    """Tasks from ``builtin`` (12 shipped tasks over the three tools) or a ``.jsonl`` file of
    ``{"prompt", "id"?, "category"?}``; the first ``n``."""
    if spec == "builtin":
        path = Path(str(files("distillscope.agent") / "data" / "tasks.jsonl"))
    else:
        path = Path(spec)
        if not path.is_file():
            raise HarvestError(f"--tasks {spec}: no such file (give builtin or a .jsonl file)")
    tasks = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            tasks.append(
                Task(str(item.get("id", number)), item["prompt"], item.get("category", "other"))
            )
        except (ValueError, KeyError, TypeError):
            raise HarvestError(f'{path} line {number + 1}: expected {{"prompt": ...}}') from None
    if not tasks:
        raise HarvestError(f"{path} holds no tasks")
    return tasks[:n] if n else tasks


def parse_tool_choice(text: str, toolbox: Toolbox | None = None) -> Any:
    """``--tool-choice``: none, auto, required, or a tool's name (forcing that tool)."""
    toolbox = toolbox or default_toolbox()
    if text in ("none", "auto", "required"):
        return text
    if text in toolbox.tools:
        return {"type": "function", "function": {"name": text}}
    names = ", ".join(toolbox.tools)
    raise HarvestError(f"--tool-choice {text!r}: use none, auto, required or a tool ({names})")


@dataclass
class Turn:
    """One assistant turn: the conversation it answered and the teacher's answer."""

    messages: list[dict[str, Any]]
    completion: Completion
    #: the tool results its calls got, in call order
    results: list[str] = field(default_factory=list)


def run_trajectory(
    teacher,
    task: Task,
    sampling: SamplingConfig,
    *,
    toolbox: Toolbox | None = None,
    max_turns: int = 4,
    tool_choice: Any = "required",
    stream: bool = False,
) -> list[Turn]:
    """Run one task to its end (an answer without calls, or ``max_turns`` turns)."""
    toolbox = toolbox or default_toolbox()
    tools = toolbox.specs
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": task.prompt},
    ]
    turns = []
    for number in range(max_turns):
        choice = tool_choice if number == 0 else "auto"
        options = {"stream": stream} if stream else {}
        completion = teacher.chat(messages, sampling, tools=tools, tool_choice=choice, **options)
        turn = Turn(list(messages), completion)
        turns.append(turn)
        messages.append(completion.message())
        for call in completion.tool_calls or ():
            result = toolbox.call(call["function"]["name"], call["function"]["arguments"])
            turn.results.append(result)
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
        if not completion.tool_calls:
            break
    return turns


@dataclass
class TrajectoryManifest:
    """What a trajectory harvest folder holds: settings, progress, and what the tools saw."""

    out: str
    teacher: str
    tasks: str
    sampling: dict
    max_turns: int
    tool_choice: Any
    stream: bool
    tools: list[str]
    status: str = "running"
    planned: int = 0
    trajectories: int = 0
    records: int = 0
    tool_calls: int = 0
    #: calls the tool answered without ``error:`` (arguments that parse and fit)
    tool_calls_accepted: int = 0
    completion_tokens: int = 0
    distillscope_version: str = __version__

    def settings(self) -> dict:
        return {k: getattr(self, k) for k in ("teacher", "sampling", "max_turns", "tool_choice")}

    def write(self) -> None:
        write_text_atomically(Path(self.out) / MANIFEST, json.dumps(asdict(self), indent=2) + "\n")


def check_settings(out: str | os.PathLike, settings: dict) -> None:
    """Refuse to resume a folder harvested with other settings (those ``settings`` names)."""
    before = Path(out) / MANIFEST
    if not before.is_file():
        return
    held = json.loads(before.read_text())
    changed = [k for k, v in settings.items() if held.get(k) != v]
    if changed:
        detail = "; ".join(f"{k}: was {held.get(k)!r}, now {settings[k]!r}" for k in changed)
        raise HarvestError(
            f"{out} holds trajectories with other settings ({detail}); use a new --out"
        )


def harvest_trajectories(
    teacher,
    tasks: Sequence[Task],
    out: str | os.PathLike,
    *,
    sampling: SamplingConfig,
    toolbox: Toolbox | None = None,
    max_turns: int = 4,
    tool_choice: Any = "required",
    stream: bool = False,
    tasks_label: str = "",
    progress: bool = True,
) -> TrajectoryManifest:
    """Run every task's trajectory once and store its turns as records in ``out``; resumable."""
    if max_turns < 1:
        raise HarvestError(f"--max-turns must be at least 1, not {max_turns}")
    if not hasattr(teacher, "chat"):
        raise HarvestError(f"{teacher.id} cannot hold a conversation with tools")
    toolbox = toolbox or default_toolbox()
    out = Path(out)
    ensure_writable(out)
    manifest = TrajectoryManifest(
        out=str(out),
        teacher=teacher.id,
        tasks=tasks_label,
        sampling=sampling.as_dict(),
        max_turns=max_turns,
        tool_choice=tool_choice,
        stream=stream,
        tools=list(toolbox.tools),
        planned=len(tasks),
    )
    check_settings(out, manifest.settings())
    plan = load_plan(out, [Prompt(t.id, t.prompt, t.category, tasks_label) for t in tasks])
    records_dir = out / RECORDS_DIR
    provenance = provenance_for(teacher, sampling)
    manifest.write()

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    bar = Progress(
        TextColumn("[bold]trajectories[/]"), BarColumn(), MofNCompleteColumn(), disable=not progress
    )
    try:
        with bar:
            job = bar.add_task("", total=len(plan))
            for index, prompt in enumerate(plan):
                part = records_dir / f"part-{index:06d}.parquet"
                if not part.is_file():
                    task = Task(prompt.id, prompt.text, prompt.category)
                    turns = run_trajectory(
                        teacher, task, sampling, toolbox=toolbox, max_turns=max_turns,
                        tool_choice=tool_choice, stream=stream,
                    )  # fmt: skip
                    rows = [
                        _row(prompt, n, turn, toolbox, provenance) for n, turn in enumerate(turns)
                    ]
                    write_part(part, rows, provenance)
                bar.advance(job)
        manifest.status = "complete"
    except BaseException:
        manifest.status = "interrupted"
        raise
    finally:
        if any(records_dir.glob("part-*.parquet")):
            _count(manifest, RecordSet(out))
        manifest.write()
    return manifest


def _row(prompt: Prompt, number: int, turn: Turn, toolbox: Toolbox, provenance) -> dict:
    served = turn.completion.signal.exposure
    if not is_at_least(served, provenance.exposure):
        raise HarvestError(
            f"the teacher served {served} exposure where {provenance.exposure} was asked: ask for "
            "no more than its tier allows"
        )
    return completion_row(
        prompt, turn.completion, provenance, messages=turn.messages, tools=toolbox.specs,
        turn=number,
    )  # fmt: skip


def _count(manifest: TrajectoryManifest, records: RecordSet) -> None:
    """Counts from what is on disk: the truth after a resume or an interruption."""
    exchanges = list(records.exchanges())
    manifest.records = len(exchanges)
    manifest.trajectories = len({e.prompt_id for e in exchanges})
    manifest.completion_tokens = records.completion_tokens
    calls = [c for e in exchanges for c in e.tool_calls or ()]
    manifest.tool_calls = len(calls)
    results = {
        m["tool_call_id"]: m["content"]
        for e in exchanges
        for m in e.messages or ()
        if m["role"] == "tool"
    }
    manifest.tool_calls_accepted = sum(
        not results.get(c["id"], "").startswith("error:") for c in calls if c["id"] in results
    )
