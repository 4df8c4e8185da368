"""Tool calls end to end: the JSON convention, the sandboxed tools, the gateway's OpenAI shape
(the official ``openai`` client against a real uvicorn server, streamed and not, and through an
``--upstream`` proxy), agent trajectories harvested through it, stored, exported and trained on.

The tiny random Llama (the default teacher's tokenizer) answers: its calls are forced by
``tool_choice``, so no test depends on a model writing a valid call by luck.
"""

from __future__ import annotations

import json

import numpy as np
import openai
import pyarrow.json as pajson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import one_line_error
from distillscope import toolcalls
from distillscope.agent import Task, default_toolbox, harvest_trajectories, load_tasks
from distillscope.agent.tools import ToolError, calculate, read_file, search
from distillscope.distill.students import build_student
from distillscope.distill.train import DistillConfig, collate, distill, examples_from_records
from distillscope.gateway import ProxyBackend, create_app, serve_in_thread
from distillscope.gateway.traffic import open_traffic_log
from distillscope.records import RecordSet, export_jsonl
from distillscope.teachers.base import SamplingConfig
from distillscope.teachers.openai_http import OpenAITeacher

MODEL = "distillscope-tiny"
TOOLS = default_toolbox().specs
ASK = [{"role": "user", "content": "What is 17 * 23?"}]
CALCULATOR = {"type": "function", "function": {"name": "calculator"}}


# --- the convention and the tools ----------------------------------------------------------------

names = st.sampled_from(["calculator", "read_file", "search"])
arguments = st.dictionaries(st.sampled_from(["expression", "path", "query"]), st.text(max_size=12))


@given(st.lists(st.tuples(names, arguments), min_size=1, max_size=3))
def test_calls_round_trip_through_the_convention(calls):
    message = {
        "tool_calls": [
            toolcalls.tool_call(n, json.dumps(a), f"call_{i}") for i, (n, a) in enumerate(calls)
        ]
    }
    parsed = toolcalls.parse_tool_calls(
        toolcalls.assistant_text(message), toolcalls.tool_names(TOOLS)
    )
    assert [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed
    ] == calls
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in parsed)


def test_parsing_is_lenient_where_small_models_are_sloppy():
    names_ = toolcalls.tool_names(TOOLS)
    assert toolcalls.parse_tool_calls("17 * 23 is 391.", names_) is None
    assert (
        toolcalls.parse_tool_calls('{"tool_calls": [{"name": "rm", "arguments": {}}]}', names_)
        is None
    )
    trailing = '{"tool_calls": [{"name": "search", "arguments": {"query": "x"}}]} and then more'
    assert (
        toolcalls.parse_tool_calls(trailing, names_)[0]["function"]["arguments"] == '{"query": "x"}'
    )
    broken = toolcalls.call_prefix("calculator") + '"expression": 17*23}]}'
    call = toolcalls.parse_tool_calls(broken, names_)[0]
    assert call["function"] == {"name": "calculator", "arguments": '{"expression": 17*23'}
    again = toolcalls.parse_tool_calls(broken, names_, ids_from="k")[0]["id"]
    assert again == toolcalls.parse_tool_calls(broken, names_, ids_from="k")[0]["id"]


def test_calculator_is_arithmetic_only():
    assert calculate("17 * 23 + 4") == 395
    assert calculate("(2 ** 10 - 24) / 8") == 125
    assert calculate("-3 % 2 + 7 // 2") == 4
    for bad in ("__import__('os')", "2 ** 1000", "1 / 0", "x + 1", "[1]", "9" * 300, "abs(-1)"):
        with pytest.raises(ToolError):
            calculate(bad)


def test_file_reader_is_confined_to_the_fixture_repository():
    assert "FLAT_CENTS = 25" in read_file("src/fees.py")
    assert read_file(".").splitlines() == ["README.md", "docs/", "src/"]
    for bad in ("../tools.py", "/etc/passwd", "src/../../tools.py", "..\\tools.py", "nope.txt"):
        with pytest.raises(ToolError):
            read_file(bad)


def test_search_and_the_toolbox_answer_errors_as_results():
    assert search("capital of France").startswith("[paris]")
    box = default_toolbox()
    assert box.call("calculator", '{"expression": "6 * 7"}') == "42"
    assert box.call("calculator", "{not json").startswith("error: arguments are not")
    assert box.call("read_file", '{"path": "/etc/passwd"}').startswith("error:")
    assert box.call("calculator", "{}") == "error: calculator needs expression (a string)"
    assert len(load_tasks("builtin")) == 12


# --- the gateway ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tiny_teacher, tmp_path_factory):
    """The tiny teacher behind an open gateway logging to DuckDB, and a proxy gateway in front."""
    root = tmp_path_factory.mktemp("tools-gateway")
    log = open_traffic_log(root / "traffic.duckdb", max_wait_ms=2)
    log.start()
    with serve_in_thread(create_app(tiny_teacher, model_name=MODEL, log=log)) as url:
        proxy = create_app(ProxyBackend(f"{url}/v1", model=MODEL), model_name="proxied")
        with serve_in_thread(proxy) as proxy_url:
            yield {"url": f"{url}/v1", "proxy": f"{proxy_url}/v1", "log": log, "root": root}
    log.close()


def chat(url: str, **kwargs):
    with openai.OpenAI(base_url=url, api_key="none", max_retries=0) as client:
        return client.chat.completions.create(**{"model": MODEL, "max_tokens": 24, **kwargs})


def streamed(url: str, **kwargs) -> tuple[str, dict[int, dict], str, list]:
    """A stream gathered by hand, as a client of OpenAI's chunk shape does."""
    text, calls, finish, chunks = "", {}, None, []
    with openai.OpenAI(base_url=url, api_key="none", max_retries=0) as client:
        for chunk in client.chat.completions.create(
            **{"model": MODEL, "max_tokens": 24, "stream": True, **kwargs}
        ):
            chunks.append(chunk)
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
                toolcalls.gather_call_deltas(calls, choice.delta.tool_calls)
    return text, calls, finish, chunks


def test_a_named_tool_choice_is_answered_with_a_call_in_openais_shape(served):
    answer = chat(served["url"], messages=ASK, tools=TOOLS, tool_choice=CALCULATOR,
                  logprobs=True, top_logprobs=3)  # fmt: skip
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "calculator" and isinstance(call.function.arguments, str)
    # every generated token is reported, the forced ones at the teacher's own logprobs
    assert len(choice.logprobs.content) == answer.usage.completion_tokens
    assert all(len(e.top_logprobs) == 3 for e in choice.logprobs.content)


def test_tool_call_deltas_stream_in_openais_chunk_shape(served):
    kwargs = {"messages": ASK, "tools": TOOLS, "tool_choice": "required", "seed": 3}
    whole = chat(served["url"], **kwargs).choices[0].message.tool_calls[0]
    text, calls, finish, chunks = streamed(served["url"], **kwargs)
    assert finish == "tool_calls" and text == "" and list(calls) == [0]
    assert calls[0]["function"] == whole.function.model_dump() and calls[0]["id"] == whole.id
    first = next(c for c in chunks if c.choices and c.choices[0].delta.tool_calls)
    assert first.choices[0].delta.tool_calls[0].function.arguments == ""  # named, then arguments
    assert calls[0]["function"]["name"] in toolcalls.tool_names(TOOLS)


def test_tool_messages_and_earlier_calls_are_accepted(served):
    call = toolcalls.tool_call("calculator", '{"expression": "17 * 23"}', "call_1")
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": "391"}]  # fmt: skip
    answer = chat(served["url"], messages=history, tools=TOOLS, tool_choice="none", seed=1)
    assert answer.choices[0].message.tool_calls is None
    assert answer.choices[0].finish_reason in ("stop", "length")
    text, calls, _, _ = streamed(served["url"], messages=history, tools=TOOLS, tool_choice="none")
    assert calls == {} and isinstance(text, str)


@pytest.mark.parametrize(
    "body, param",
    [
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "rm"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"messages": [*ASK, {"role": "tool", "content": "391"}]}, "tool_call_id"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "name"),
        ({"parallel_tool_calls": False, "tools": TOOLS}, "parallel_tool_calls"),
    ],
)
def test_malformed_tool_requests_get_openai_400s(served, body, param):
    with pytest.raises(openai.BadRequestError) as error:
        chat(served["url"], **{"messages": ASK, **body})
    assert param in str(error.value)


def test_upstream_passes_tools_and_calls_through(served):
    kwargs = {"messages": ASK, "tools": TOOLS, "tool_choice": CALCULATOR, "seed": 5}
    direct = chat(served["url"], **kwargs).choices[0].message.tool_calls[0]
    proxied = chat(served["proxy"], **{**kwargs, "model": "proxied"}).choices[0]
    assert proxied.finish_reason == "tool_calls"
    assert proxied.message.tool_calls[0].model_dump() == direct.model_dump()
    _, calls, finish, _ = streamed(served["proxy"], **{**kwargs, "model": "proxied"})
    assert finish == "tool_calls" and calls[0]["function"] == direct.function.model_dump()


# --- trajectories: harvested through the gateway, stored, exported, trained on ------------------


@pytest.fixture(scope="module")
def harvested(served, tiny_teacher, tiny_dir, tmp_path_factory):
    """Two tasks, two turns each: locally, and through the gateway with the official client,
    streamed and not."""
    root = tmp_path_factory.mktemp("trajectories")
    tasks = [Task("calc", "What is 17 * 23 + 4?", "reasoning"), Task("file", "Read src/fees.py.")]
    sampling = SamplingConfig(exposure="top5", max_new_tokens=20, seed=0)
    remote = OpenAITeacher(served["url"], model=MODEL, tokenizer=f"hf:{tiny_dir}")
    out = {}
    for name, teacher, stream in [("local", tiny_teacher, False), ("remote", remote, False),
                                  ("streamed", remote, True)]:  # fmt: skip
        out[name] = harvest_trajectories(
            teacher, tasks, root / name, sampling=sampling, max_turns=2, stream=stream,
            progress=False,
        )  # fmt: skip
    return out


def test_trajectories_through_the_gateway_replay_the_local_teacher(harvested):
    manifest = harvested["remote"]
    assert manifest.status == "complete" and manifest.trajectories == 2
    assert manifest.tool_calls >= 2 and manifest.records >= 3
    sets = {name: RecordSet(m.out) for name, m in harvested.items()}
    turns = {name: list(records.exchanges()) for name, records in sets.items()}
    first = turns["remote"][0]
    assert first.turn == 0 and first.tool_calls[0]["type"] == "function"
    assert [m["role"] for m in first.messages] == ["system", "user"]
    second = turns["remote"][1]
    assert second.turn == 1 and second.messages[-1]["role"] == "tool"
    assert second.messages[-1]["tool_call_id"] == first.tool_calls[0]["id"]
    for name in ("remote", "streamed"):  # same prompts, same answers, same ids as in-process
        for mine, local in zip(turns[name], turns["local"], strict=True):
            assert np.array_equal(mine.prompt_ids, local.prompt_ids)
            assert np.array_equal(mine.signal.token_ids, local.signal.token_ids)
            assert np.allclose(mine.signal.topk_logprobs, local.signal.topk_logprobs, atol=1e-4)
            assert mine.tool_calls == local.tool_calls


def test_the_traffic_log_records_tools_offered_and_calls_returned(served, harvested):
    rows = served["log"].read("tool_calls IS NOT NULL").to_pylist()
    assert rows and all(r["finish_reason"] == "tool_calls" for r in rows)
    offered = json.loads(rows[0]["tools"])
    assert [t["function"]["name"] for t in offered] == toolcalls.tool_names(TOOLS)
    assert list(offered[0]["function"])[:2] == ["name", "parameters"]
    assert json.loads(rows[0]["tool_calls"])[0]["function"]["name"] in toolcalls.tool_names(TOOLS)


def test_export_writes_chat_messages_a_dataset_loader_reads(harvested, tmp_path):
    records = RecordSet(harvested["streamed"].out)
    summary = export_jsonl(records, tmp_path / "train.jsonl")
    assert summary["lines"] == len(records) and summary["tool_calls"] >= 2
    lines = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    first = lines[0]
    answer = first["messages"][-1]
    assert answer["role"] == "assistant" and answer["content"] is None
    assert json.loads(json.dumps(answer["tool_calls"][0]))["function"]["name"]
    logprobs = first["teacher_logprobs"]
    assert (
        len(logprobs["token_ids"]) == len(logprobs["topk_ids"])
        and len(logprobs["topk_ids"][0]) == 5
    )
    assert "tool" in [m["role"] for m in lines[1]["messages"]]
    # Arrow's JSON reader (what `datasets` loads JSON lines with) takes every line in one schema
    table = pajson.read_json(tmp_path / "train.jsonl")
    assert table.num_rows == len(lines) and "messages" in table.column_names
    provenance = json.loads((tmp_path / "train.provenance.json").read_text())
    assert provenance["exposure"] == "top5"


def test_training_on_trajectories_masks_all_but_the_assistant_turns(
    harvested, tiny_teacher, tmp_path
):
    records = RecordSet(harvested["remote"].out)
    tokenizer = tiny_teacher.tokenizer
    examples = examples_from_records(records, "top5", tokenizer)
    batch = collate(examples, tokenizer.pad_token_id)
    for row, (example, exchange) in enumerate(zip(examples, records.exchanges(), strict=True)):
        trained = batch.input_ids[row, batch.positions[row][batch.mask[row]] + 1].numpy()
        assert np.array_equal(trained, exchange.signal.token_ids)  # the assistant's turn, all of it
        assert len(trained) == int(batch.mask[row].sum())
        prompt = tokenizer.decode(example.prompt_ids)
        assert prompt.endswith("<|im_start|>assistant\n")  # everything before the turn is prompt
        for message in exchange.messages:
            if message["role"] == "tool":
                assert message["content"] in prompt and message["content"] not in tokenizer.decode(
                    trained
                )
    student = build_student("micro", tokenizer)
    result = distill(student, examples, tmp_path / "student",
                     DistillConfig(exposure="top5", steps=3, batch_size=2, warmup_steps=1),
                     tokenizer=tokenizer, progress=False)  # fmt: skip
    assert result.steps == 3 and np.isfinite(result.final_loss)


def test_cli_harvests_trajectories_and_exports_them(cli, tiny_dir, tmp_path):
    out = tmp_path / "t1"
    args = ["trajectories", "--teacher", f"hf:{tiny_dir}", "--n", "1", "--max-turns", "2",
            "--max-new-tokens", "24", "--device", "cpu", "--out", out, "--json"]  # fmt: skip
    result = cli(*args)
    assert result.exit_code == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert manifest["status"] == "complete" and manifest["tool_calls"] >= 1
    again = cli(*args)  # a rerun finds the trajectory written and resumes past it
    assert json.loads(again.stdout)["records"] == manifest["records"]
    exported = cli("data", "export", out, tmp_path / "t1.jsonl", "--format", "jsonl", "--json")
    assert exported.exit_code == 0 and json.loads(exported.stdout)["lines"] == manifest["records"]
    one_line_error(
        cli(*args[:-3], "--tool-choice", "rm", "--out", tmp_path / "t2"), "--tool-choice"
    )
    one_line_error(cli(*args[:-3], "--max-turns", "3", "--out", out), "max_turns")
