"""Tool calls between OpenAI's wire format and a local model's text: the JSON convention.

OpenAI's API carries tools as data (``tools``, ``tool_choice``, ``tool_calls``, ``role: "tool"``);
a local model only reads and writes text. The default teacher's chat template (SmolLM2's ChatML)
has no notion of tools, so every local teacher speaks this documented convention:

- the tools offered are listed in a system message (``tools_prompt``), one JSON object per line;
- an assistant turn that calls tools is the JSON object
  ``{"tool_calls": [{"name": "calculator", "arguments": {"expression": "2+3"}}]}`` and nothing
  else (``assistant_text`` renders one, ``parse_tool_calls`` reads one back);
- a tool's result is a message of role ``tool`` whose content is the result text.

``tool_choice`` forcing a call (``required``, or a named function) is constrained decoding of a
prefix: the teacher must draw ``{"tool_calls": [{"name": "NAME", "arguments": {`` token by token
(``forced_prefixes``: one alternative per allowed name) and the opening brace of its arguments,
then continues freely. Its arguments are
its own and may not be valid JSON; as with OpenAI's API, the caller validates them.

``render_chat_ids`` is the one way a conversation becomes prompt ids, for the gateway's local
backend, the local and remote teachers' ``chat`` and the records a trajectory harvest writes.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Sequence
from typing import Any

#: What ``tool_choice`` may be, besides ``{"type": "function", "function": {"name": ...}}``.
CHOICES = ("none", "auto", "required")

_TOOLS_PROMPT = (
    "You can call tools. To call one or more, answer with only a JSON object of the form "
    '{"tool_calls": [{"name": "<tool name>", "arguments": {<arguments>}}]}. '
    "Each result comes back in a message from the tool. The tools:"
)
_HEAD = re.compile(r'\s*\{\s*"tool_calls"\s*:\s*\[')
_CALL = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"\\]*)"\s*,\s*"arguments"\s*:\s*')
_CALL_END = re.compile(r"\s*\}\s*,?")


def function_of(tool: dict[str, Any]) -> dict[str, Any]:
    """The function a tool offers, name first then parameters (the order the log stores)."""
    function = tool.get("function", tool)
    ordered = {"name": function["name"], "parameters": function.get("parameters") or {}}
    if function.get("description"):
        ordered["description"] = function["description"]
    return ordered


def tool_names(tools: Sequence[dict[str, Any]] | None) -> list[str]:
    return [function_of(tool)["name"] for tool in tools or ()]


def choice_names(tools: Sequence[dict[str, Any]] | None, tool_choice: Any) -> list[str] | None:
    """The names a call is forced among (``None``: nothing is forced)."""
    if not tools or tool_choice in (None, "none", "auto"):
        return None
    if tool_choice == "required":
        return tool_names(tools)
    return [tool_choice["function"]["name"]]


def tools_prompt(tools: Sequence[dict[str, Any]]) -> str:
    lines = [json.dumps(function_of(tool), ensure_ascii=False) for tool in tools]
    return "\n".join([_TOOLS_PROMPT, *lines])


def arguments_value(arguments: str) -> Any:
    """A call's ``arguments`` string as the object it spells, or the string when it is not JSON."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def assistant_text(message: dict[str, Any]) -> str:
    """An assistant message as the model writes it: its content, or its calls in the convention."""
    calls = message.get("tool_calls")
    if not calls:
        return message.get("content") or ""
    spelled = [
        {"name": c["function"]["name"], "arguments": arguments_value(c["function"]["arguments"])}
        for c in calls
    ]
    return json.dumps({"tool_calls": spelled}, ensure_ascii=False)


def plain_messages(
    messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None, tool_choice: Any
) -> list[dict[str, str]]:
    """The conversation as role/content pairs any chat template takes: calls spelled in the
    convention, and the tools listed in the system message (not when ``tool_choice`` is none)."""
    plain = [
        {"role": m["role"], "content": assistant_text(m) if m["role"] == "assistant" else
         _content(m)}
        for m in messages
    ]  # fmt: skip
    if tools and tool_choice != "none":
        listing = tools_prompt(tools)
        if plain and plain[0]["role"] in ("system", "developer"):
            plain[0] = {"role": "system", "content": f"{plain[0]['content']}\n\n{listing}"}
        else:
            plain.insert(0, {"role": "system", "content": listing})
    return plain


def _content(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content)
    return content or ""


def needs_convention(messages: Sequence[dict[str, Any]], tools) -> bool:
    """Whether the conversation speaks of tools at all (else the template's plain path serves)."""
    return bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


def render_chat_ids(
    tokenizer,
    messages: Sequence[dict[str, Any]],
    tools: Sequence[dict[str, Any]] | None = None,
    tool_choice: Any = "auto",
) -> list[int]:
    """The exact prompt ids of a conversation, ready for the assistant's next turn."""
    plain = plain_messages(messages, tools, tool_choice)
    if getattr(tokenizer, "chat_template", None):
        templated = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(templated, add_special_tokens=False)["input_ids"])
    text = "\n".join(f"{m['role']}: {m['content']}" for m in plain)
    return list(tokenizer(text + "\nassistant:")["input_ids"])


def call_prefix(name: str) -> str:
    return f'{{"tool_calls": [{{"name": {json.dumps(name)}, "arguments": {{'


def forced_prefixes(tokenizer, tools, tool_choice) -> list[list[int]] | None:
    """Token sequences one of which the answer must start with (``None``: a free answer)."""
    names = choice_names(tools, tool_choice)
    if names is None:
        return None
    return [list(tokenizer(call_prefix(n), add_special_tokens=False)["input_ids"]) for n in names]


def new_call_id(derived_from: str | None = None) -> str:
    """A call id: random, or derived from a text (the same answer to the same conversation gets
    the same ids, so a trajectory replays exactly)."""
    if derived_from is None:
        return f"call_{uuid.uuid4().hex[:24]}"
    return f"call_{hashlib.sha256(derived_from.encode()).hexdigest()[:24]}"


def tool_call(name: str, arguments: str, call_id: str) -> dict[str, Any]:
    """One call in OpenAI's shape (``arguments`` a JSON string, as OpenAI sends it)."""
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def parse_tool_calls(
    text: str, names: Sequence[str], *, ids_from: str | None = None
) -> list[dict[str, Any]] | None:
    """The calls a convention answer makes, in OpenAI's shape; ``None`` when it makes none.
    ``ids_from`` derives the calls' ids (with the answer and each call's place) instead of
    drawing them.

    Lenient where a small model is sloppy: text after the object is ignored, and arguments that
    are not JSON are passed on as the model wrote them (up to the end of the answer), as OpenAI
    passes on what its model wrote. Calls to tools not offered are dropped.
    """
    head = _HEAD.match(text)
    if head is None:
        return None
    rest = text[head.end() :]
    calls = []
    decoder = json.JSONDecoder()
    while (found := _CALL.match(rest)) is not None:
        name, rest = found.group(1), rest[found.end() :]
        try:
            value, end = decoder.raw_decode(rest)
        except ValueError:
            arguments, rest = _unclosed(rest), ""
        else:
            arguments, rest = json.dumps(value, ensure_ascii=False), rest[end:]
        if name in names:
            derived = None if ids_from is None else f"{ids_from}\x00{text}\x00{len(calls)}"
            calls.append(tool_call(name, arguments, new_call_id(derived)))
        closing = _CALL_END.match(rest)
        rest = rest[closing.end() :] if closing else ""
    return calls or None


def _unclosed(rest: str) -> str:
    """Arguments that are not JSON: what the model wrote, less the object's own closing."""
    return re.sub(r"\s*\}\s*\]\s*\}\s*$", "", rest.strip())


def gather_call_deltas(calls: dict[int, dict[str, Any]], deltas) -> None:
    """Streamed tool-call deltas (the ``openai`` client's objects) added to the calls they
    continue, by index: the first names the call, later ones add to its arguments."""
    for delta in deltas or ():
        call = calls.setdefault(
            delta.index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
        )
        call["id"] = delta.id or call["id"]
        if delta.function is not None:
            call["function"]["name"] += delta.function.name or ""
            call["function"]["arguments"] += delta.function.arguments or ""


def plain_calls(calls) -> list[dict[str, Any]] | None:
    """The ``openai`` client's tool-call objects as plain dicts in OpenAI's shape."""
    return [c.model_dump(include={"id", "type", "function"}) for c in calls or ()] or None
