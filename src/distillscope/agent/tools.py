"""Deterministic, sandboxed tools for agent trajectories: nothing here touches the network or the
host's files.

- ``calculator``: arithmetic on numbers (``+ - * / // % **``, parentheses, unary signs), parsed
  into Python's syntax tree and walked by hand over a fixed set of node types: no ``eval``, no
  names, no calls, no attributes; powers and lengths are bounded so no answer runs away.
- ``read_file``: a file (or a folder's listing) of the fixture repository shipped as package data
  (``agent/data/repo``); absolute paths, ``..`` and anything that resolves outside it are refused.
- ``search``: the three best matches in a small local corpus (``agent/data/corpus.jsonl``), by
  word overlap.

A ``Toolbox`` offers them in OpenAI's ``tools`` shape and answers a call from its ``arguments``
string; a bad call (arguments that are not JSON, a missing field, a path outside the repository)
is answered with ``error: ...`` as the tool's result, so a trajectory goes on.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path, PurePosixPath
from typing import Any

from distillscope.errors import DistillscopeError

#: Longest expression, longest file excerpt, and the bounds that keep arithmetic small.
MAX_EXPRESSION = 200
MAX_FILE_CHARS = 2000
MAX_EXPONENT = 64
MAX_MAGNITUDE = 1e100


class ToolError(DistillscopeError):
    """A call a tool refuses; its message is what the model reads back."""


_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression, or ToolError saying what is not arithmetic."""
    if len(expression) > MAX_EXPRESSION:
        raise ToolError(f"expression longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression.replace("^", "**").replace("×", "*"), mode="eval")
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {expression!r}") from None
    return _value(tree.body)


def _value(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ToolError(f"exponent {right} is over {MAX_EXPONENT}")
        try:
            result = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        if isinstance(result, complex) or abs(result) > MAX_MAGNITUDE:
            raise ToolError("the result is out of range")
        return result
    raise ToolError(f"only numbers and + - * / // % ** are allowed, not {type(node).__name__}")


def _format(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value) if isinstance(value, float) and math.isfinite(value) else str(value)


def _data() -> Path:
    return Path(str(files("distillscope.agent") / "data"))


def read_file(path: str, root: Path | None = None) -> str:
    """A file of the fixture repository (cut to ``MAX_FILE_CHARS``), or a folder's listing."""
    root = (root or _data() / "repo").resolve()
    pure = PurePosixPath(path.strip() or ".")
    if pure.is_absolute() or "\\" in path or ".." in pure.parts:
        raise ToolError(f"{path!r}: give a path inside the repository, without '..'")
    target = (root / pure).resolve()
    if not target.is_relative_to(root) or not target.exists():
        raise ToolError(f"{path!r} is not in the repository")
    if target.is_dir():
        entries = sorted(
            str(p.relative_to(root)) + ("/" if p.is_dir() else "")
            for p in target.iterdir()
            if not p.name.startswith((".", "__"))
        )
        return "\n".join(entries)
    text = target.read_text(encoding="utf-8")
    return text if len(text) <= MAX_FILE_CHARS else text[:MAX_FILE_CHARS] + "\n[...]"


@cache
def _corpus() -> tuple[dict[str, str], ...]:
    lines = (_data() / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    return tuple(json.loads(line) for line in lines if line.strip())


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def search(query: str, limit: int = 3) -> str:
    """The corpus documents sharing the most words with ``query``, best first (ties by id)."""
    wanted = _words(query)
    if not wanted:
        raise ToolError("the query has no words")
    scored = [
        (len(wanted & _words(doc["title"] + " " + doc["text"])), doc["id"], doc)
        for doc in _corpus()
    ]
    hits = sorted((s for s in scored if s[0] > 0), key=lambda s: (-s[0], s[1]))[:limit]
    if not hits:
        return "no results"
    return "\n".join(f"[{doc['id']}] {doc['title']}: {doc['text']}" for _, _, doc in hits)


@dataclass(frozen=True)
class Tool:
    """One function a model may call: its OpenAI definition and what answers it."""

    name: str
    description: str
    #: the string parameters it takes, each with a description; all required
    parameters: dict[str, str]
    run: Callable[..., str]

    def spec(self) -> dict[str, Any]:
        properties = {k: {"type": "string", "description": v} for k, v in self.parameters.items()}
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": {
                    "type": "object",
                    "properties": properties,
                    "required": list(self.parameters),
                },
            },
        }


class Toolbox:
    """Tools offered together; ``call`` answers one call, errors included, as result text."""

    def __init__(self, tools: list[Tool]):
        self.tools = {tool.name: tool for tool in tools}

    @property
    def specs(self) -> list[dict[str, Any]]:
        return [tool.spec() for tool in self.tools.values()]

    def call(self, name: str, arguments: str) -> str:
        try:
            return self._call(name, arguments)
        except ToolError as exc:
            return f"error: {exc}"

    def _call(self, name: str, arguments: str) -> str:
        tool = self.tools.get(name)
        if tool is None:
            raise ToolError(f"no tool named {name!r}")
        try:
            values = json.loads(arguments)
        except ValueError:
            raise ToolError(f"arguments are not a JSON object: {arguments[:80]!r}") from None
        if not isinstance(values, dict):
            raise ToolError(f"arguments are not a JSON object: {arguments[:80]!r}")
        missing = [p for p in tool.parameters if not isinstance(values.get(p), str | int | float)]
        if missing:
            raise ToolError(f"{name} needs {', '.join(missing)} (a string)")
        return tool.run(**{p: str(values[p]) for p in tool.parameters})


def default_toolbox() -> Toolbox:
    """The calculator, the file reader and the search, as shipped."""
    return Toolbox(
        [
            Tool(
                "calculator",
                "Evaluate an arithmetic expression (+ - * / // % ** and parentheses).",
                {"expression": "the expression, e.g. 17 * 23 + 4"},
                lambda expression: _format(calculate(expression)),
            ),
            Tool(
                "read_file",
                "Read a file of the repository, or list a folder ('.' is the root).",
                {"path": "a path inside the repository, e.g. src/ledger.py"},
                read_file,
            ),
            Tool(
                "search",
                "Search a small encyclopedia; returns the three best matches.",
                {"query": "words to look for"},
                search,
            ),
        ]
    )
