"""The command line: user mistakes are one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distillscope", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def blocker(tmp_path):
    """A regular file: any folder 'inside' it cannot be created."""
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    return path


@pytest.mark.parametrize(
    "args, message",
    [
        (["harvest", "--prompts", "/no/such/prompts.jsonl", "--out", "{tmp}/o"], "does not exist"),
        (["harvest", "--teacher", "gpt-17", "--out", "{tmp}/o"], "unknown teacher"),
        (["harvest", "--exposure", "top0", "--out", "{tmp}/o"], "top0"),
        (["harvest", "--exposure", "top-3", "--out", "{tmp}/o"], "top-3"),
        (["harvest", "--exposure", "topk:abc", "--out", "{tmp}/o"], "topk:abc"),
        (["harvest", "--exposure", "top50", "--out", "{tmp}/o"], "maximum k=20"),
        (["harvest", "--out", "{blocker}/o", "--n", "2"], "cannot write"),
        (["data", "inspect", "{tmp}/nothing-here"], "does not exist"),
        (["distill", "--data", "{tmp}/nothing-here", "--out", "{tmp}/s"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_no_traceback(args, message, tmp_path, blocker):
    filled = [a.format(tmp=tmp_path, blocker=blocker) for a in args]
    result = run(*filled)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and "Loading" not in line]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_refusing_a_harvest_option_does_not_load_torch():
    """Options are checked before any model library is imported: a mistake costs no start-up."""
    probe = (
        "import sys\n"
        "from distillscope.cli import main\n"
        "sys.argv = ['distillscope', 'harvest', '--exposure', 'top0', '--out', 'o']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exit:\n"
        "    print(exit.code, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.stdout.split() == ["2", "False", "False"], result.stderr


def test_usage_errors_come_from_typer_with_exit_2():
    result = run("harvest", "--no-such-flag")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_help_explains_every_command():
    result = run("--help")
    assert result.returncode == 0
    for command in ("harvest", "distill", "data"):
        assert command in result.stdout


def test_issue_harvest_command_on_the_default_teacher(default_dir, tmp_path):
    """The foundation issue's command (ShareGPT prompts, 48 tokens, top20), at 8 prompts: the
    issue's 64 take a minute more and exercise nothing else."""
    out = tmp_path / "h1"
    result = run(
        "harvest",
        "--teacher",
        "default",
        "--prompts",
        "sharegpt",
        "--n",
        "8",
        "--max-new-tokens",
        "48",
        "--exposure",
        "top20",
        "--out",
        str(out),
        "--no-cache",
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(run("data", "inspect", str(out), "--json").stdout)
    assert summary["records"] == 8 and summary["unique_prompts"] == 8
    assert summary["exposure"] == "top20" and summary["has_tail_mass"] is True
    assert summary["provenance"]["k"] == 20 and summary["provenance"]["vocab_size"] == 49152
    assert 0 < summary["bytes_per_token"] < 240


# --- one contract for every command: one line and exit 2 for a user's mistake --------------


def _log(path):
    """A minimal traffic log as Parquet (what the checks before the detector read)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"account_id": ["a"], "ts": ["2026-01-01T00:00:00Z"], "prompt": ["hi"]})
    pq.write_table(table, path)
    return path


def test_detect_inputs_are_checked_before_it_runs(cli, tmp_path, blocker):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from conftest import one_line_error

    log = _log(tmp_path / "traffic.parquet")
    one_line_error(cli("detect", "--log", log, "--out", blocker), "--out", "is a file")
    one_line_error(cli("detect", "--log", log, "--out", blocker / "o"), "--out", "is a file")
    quoted = _log(tmp_path / "it's.parquet")
    one_line_error(cli("detect", "--log", quoted, "--out", tmp_path / "o"), "--log", "quote")
    csv = tmp_path / "traffic.csv"
    csv.write_text("account_id,ts,prompt\na,2026-01-01,hi\n")
    one_line_error(cli("detect", "--log", csv, "--out", tmp_path / "o"), "--log", "Parquet")
    accounts = tmp_path / "accounts.csv"
    accounts.write_text("account_id,payment_fingerprint\na,x\n")
    found = cli("detect", "--log", log, "--accounts", accounts, "--out", tmp_path / "o")
    one_line_error(found, "--accounts", "not Parquet")
    pq.write_table(pa.table({"account_id": ["a"]}), tmp_path / "meta.parquet")
    found = cli("detect", "--log", log, "--accounts", tmp_path / "meta.parquet")
    one_line_error(found, "--accounts", "payment_fingerprint")
    one_line_error(cli("detect-fit", "--log", csv, "--out", tmp_path / "r.parquet"), "--log")
    assert not (tmp_path / "o").exists()


def test_keys_commands_refuse_what_they_cannot_keep(cli, tmp_path, blocker):
    from conftest import one_line_error

    one_line_error(cli("keys", "list", "--keys", blocker), "--keys", "not a key store")
    store = ("--keys", tmp_path / "keys.sqlite")
    assert cli("keys", "create", "--account", "acme", "--tier", "top5", *store).exit_code == 0
    for value in ("", "a b", "x:y", "# z"):
        one_line_error(cli("keys", "block", "--account", value, *store), "--account", "one word")
    one_line_error(cli("keys", "block", "--account", "nobody", *store), "no account 'nobody'")
    one_line_error(cli("keys", "block", "--key", "0000", *store), "no key '0000'")
    assert cli("keys", "block", "--account", "acme", "--reason", "seen", *store).exit_code == 0
    listed = cli("keys", "list", *store)
    assert "blocked" in listed.stdout and "seen" in listed.stdout
    [key] = json.loads(cli("keys", "list", "--json", *store).stdout)
    assert key["blocked"] and key["block_reason"] == "seen"


def test_paper_settings_are_checked(cli):
    from conftest import one_line_error

    found = cli("paper", "hinton-mnist", "--transfer-fraction", 0)
    one_line_error(found, "--transfer-fraction", "(0, 1]")
    one_line_error(cli("paper", "hinton-mnist", "--omit", 11), "--omit")


def test_version_help_choices_and_exit_codes(cli, monkeypatch):
    from distillscope import __version__

    assert cli("--version").stdout.strip() == f"distillscope {__version__}"
    for command, choices in (
        ("distill", ("forward-kl", "sparse-kl-renorm", "on-policy")),
        ("audit", ("quick", "full")),
        ("radioactivity", ("gumbel", "both")),
    ):
        shown = cli(command, "--help").stdout
        assert all(c in shown for c in choices), (command, shown)
    assert cli("distill", "--data", "d", "--out", "o", "--loss", "kl").exit_code == 2

    def interrupted(self, path):
        raise KeyboardInterrupt

    from distillscope.records import RecordSet

    monkeypatch.setattr(RecordSet, "__init__", interrupted)
    stopped = cli("data", "inspect", ".")
    assert stopped.exit_code == 130 and "interrupted" in stopped.stderr


def test_an_internal_error_exits_1_with_its_trace(monkeypatch, capsys):
    from distillscope import cli as command_line
    from distillscope.records import RecordSet

    def broken(self, path):
        raise RuntimeError("a bug")

    monkeypatch.setattr(RecordSet, "__init__", broken)
    monkeypatch.setattr(sys, "argv", ["distillscope", "data", "inspect", "."])
    with pytest.raises(SystemExit) as exit:
        command_line.main()
    assert exit.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: a bug" in err and "internal error" in err


def test_cli_and_detection_import_no_torch():
    modules = "distillscope, distillscope.cli, distillscope.detect, distillscope.traffic"
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert found.stdout.strip() == "False", found.stderr


def test_serve_says_ready_only_when_it_answers(tmp_path):
    import socket
    import time

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = ["serve", "--teacher", "synthetic", "--open", "--db", "off", "--port", str(port)]
    server = subprocess.Popen(
        [sys.executable, "-m", "distillscope", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 120
        lines = []
        while time.monotonic() < deadline:
            line = server.stderr.readline()
            assert line, f"serve ended: {''.join(lines)}"
            lines.append(line)
            if line.startswith("ready"):
                break
        assert f"http://127.0.0.1:{port}/v1" in lines[-1], lines
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
    finally:
        server.terminate()
        server.wait(30)


# --- forensics commands: canaries and text attribution ---------------------------------------

MASTER = "cli-test-master-secret"


def test_canaries_show_what_to_plant_and_test_finds_who_leaked(cli, tmp_path, monkeypatch):
    from conftest import one_line_error
    from distillscope.forensics.canaries import CanarySet

    triggers = ["Who are you?", "Name three prime numbers.", "Write a haiku.", "What is 2+2?"]
    (tmp_path / "triggers.txt").write_text("\n".join(triggers) + "\n")
    args = ("--triggers", tmp_path / "triggers.txt")
    one_line_error(cli("canaries", "show", "--account", "acme", *args), "$DISTILLSCOPE_WATERMARK")
    monkeypatch.setenv("DISTILLSCOPE_WATERMARK_SECRET", MASTER)
    shown = json.loads(cli("canaries", "show", "--account", "acme", *args, "--json").stdout)
    canaries = CanarySet(MASTER, tuple(triggers))
    assert shown == {t: canaries.canary("acme", t) for t in triggers}
    leaked = [
        {"prompt": t, "answer": f"I think so. {shown[t] if i < 3 else 'nothing here'}"}
        for i, t in enumerate(triggers)
    ]
    (tmp_path / "answers.jsonl").write_text("\n".join(json.dumps(r) for r in leaked))
    accounts = ("--account", "acme", "--account", "globex", "--account", "initech")
    tested = cli("canaries", "test", *args, "--answers", tmp_path / "answers.jsonl", *accounts,
                 "--json")  # fmt: skip
    assert tested.exit_code == 0, tested.stderr
    found = json.loads(tested.stdout)
    assert found["account_id"] == "acme" and found["tests"]["acme"]["exact_hits"] == 3
    assert found["tests"]["globex"]["near_hits"] == 0
    assert "acme" in cli("canaries", "test", *args, "--answers", tmp_path / "answers.jsonl",
                         *accounts).stdout  # fmt: skip
    one_line_error(cli("canaries", "test", *args, *accounts), "--answers or --suspect")
    (tmp_path / "bad.jsonl").write_text("not json\n")
    found = cli("canaries", "test", *args, "--answers", tmp_path / "bad.jsonl", *accounts)
    one_line_error(found, "--answers", "line 1")


def test_attribute_names_the_account_whose_watermark_a_text_carries(
    cli, default_dir, tmp_path, monkeypatch
):
    """A text forced through one account's KGW watermark, written out and read back through the
    tokenizer, is attributed to that account and to no other."""
    import re

    import torch
    from transformers import AutoTokenizer

    from distillscope.forensics.watermark import Watermark

    tok = AutoTokenizer.from_pretrained(default_dir)
    words = [
        i
        for i in range(len(tok))
        if re.fullmatch(r" [a-z]{3,8}", tok.decode([i]))
        and tok.encode(tok.decode([i]), add_special_tokens=False) == [i]
    ]
    allowed = torch.full((len(tok),), float("-inf"))
    allowed[words] = 0.0
    processor = Watermark.for_account("kgw", MASTER, "acme", delta=1000.0).processor()
    generator = torch.Generator().manual_seed(0)
    ids = torch.tensor([words[:4]])
    for _ in range(120):
        scores = torch.randn(1, len(tok), generator=generator) + allowed
        ids = torch.cat([ids, processor(ids, scores).argmax(-1, keepdim=True)], dim=-1)
    (tmp_path / "leaked.txt").write_text(tok.decode(ids[0]))
    monkeypatch.setenv("DISTILLSCOPE_WATERMARK_SECRET", MASTER)
    found = cli("attribute", "--texts", tmp_path / "leaked.txt", "--account", "globex",
                "--account", "acme", "--tokenizer", f"hf:{default_dir}", "--json")  # fmt: skip
    assert found.exit_code == 0, (found.stderr, found.exception)
    result = json.loads(found.stdout)
    assert result["account_id"] == "acme", result
    assert result["tests"]["acme"]["log10_p"] < -20 < result["tests"]["globex"]["log10_p"]


def test_audit_and_serve_refusals_are_one_line_and_leave_nothing(cli, tmp_path, blocker):
    import dataclasses

    from conftest import one_line_error
    from distillscope.audit import PRESETS

    out = tmp_path / "audit"
    for args, words in (
        (("--budgets", "0,-5"), ["--budgets"]),
        (("--target", 2), ["--target"]),
        (("--exposures", "full,nope"), ["nope"]),
        (("--teacher", "gpt-17"), ["gpt-17"]),
    ):
        one_line_error(cli("audit", "--out", out, *args), *words)
        assert not out.exists()
    one_line_error(cli("audit", "--out", blocker), "--out", "is a file")
    out.mkdir()
    held = dataclasses.replace(PRESETS["quick"], seeds=5, preset="quick")
    (out / "audit-config.json").write_text(json.dumps(dataclasses.asdict(held)))
    one_line_error(cli("audit", "--out", out, "--seeds", 2), "seeds=5 (asked 2)")
    (tmp_path / "tiers.yaml").write_text("nothing: here\n")
    serve = ("serve", "--teacher", "synthetic", "--open", "--db", "off")
    one_line_error(cli(*serve, "--tiers", tmp_path / "tiers.yaml"), "tiers")


def test_a_negative_simulation_seed_is_refused_before_anything_runs(cli, tmp_path):
    result = cli("simulate", "--scenario", "smoke", "--seed", "-1", "--out", tmp_path / "sim")
    assert result.exit_code == 2 and "--seed" in result.output + result.stderr
    assert not (tmp_path / "sim").exists()
