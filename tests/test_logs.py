"""One logging API: every line names its area, as an "area: " prefix in text and an "area" key in JSON, and no
module but logs.py makes a logger or types the prefix itself."""

from __future__ import annotations

import ast
import json
import logging
import re
from pathlib import Path

import pytest

from entrypoint import logs

PACKAGE = Path(logs.__file__).parent
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "  # the text format's timestamp
# A message that begins with a word and a colon types the prefix its area adds (`log.info("data: ...")`).
TYPED_PREFIX = re.compile(r"^[a-z][a-z-]*: ")
LOG_METHODS = {"info", "warning", "error", "progress"}


@pytest.fixture
def setup(capsys):
    """The real `logs.setup`, writing to the captured stderr; the root logger and the libraries' verbosity and
    progress bars it changes are put back afterwards, so later tests' caplog still sees our records."""
    import datasets
    import transformers

    root = logging.getLogger(logs.ROOT)
    saved = root.handlers[:], root.level, root.propagate
    verbosity = transformers.logging.get_verbosity(), datasets.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled(), not datasets.utils.are_progress_bars_disabled()
    yield logs.setup
    root.handlers[:], root.level, root.propagate = saved
    transformers.logging.set_verbosity(verbosity[0])
    datasets.logging.set_verbosity(verbosity[1])
    if bars[0]:
        transformers.utils.logging.enable_progress_bar()
    if bars[1]:
        datasets.enable_progress_bars()


def write_one_line_per_area() -> None:
    logs.area("data").info("cache hit blocks-1a2b", rows=12)
    logs.area("resume").warning("checkpoint-4 predates run identities")
    logs.area("init-model").error("cannot write the model")
    logs.area("train").progress("step 3/10 (30%) loss 5.1234", step=3, loss=5.1234)
    logs.area("eval").progress("step 3: eval loss 5.0000", step=3)


def test_text_lines_start_with_their_area_once(setup, capsys):
    setup("text")
    write_one_line_per_area()
    lines = capsys.readouterr().err.splitlines()
    expected = ["data: cache hit blocks-1a2b", "resume: checkpoint-4 predates run identities",
                "init-model: cannot write the model", "train step 3/10 (30%) loss 5.1234",
                "eval  step 3: eval loss 5.0000"]
    assert len(lines) == len(expected), lines
    for line, text in zip(lines, expected, strict=True):
        assert re.fullmatch(STAMP + re.escape(text), line), line


def test_json_lines_carry_the_area_the_message_and_the_fields(setup, capsys):
    setup("json")
    write_one_line_per_area()
    entries = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [e["area"] for e in entries] == ["data", "resume", "init-model", "train", "eval"]
    assert [e["level"] for e in entries] == ["info", "warning", "error", "info", "info"]
    assert entries[0]["message"] == "data: cache hit blocks-1a2b" and entries[0]["rows"] == 12
    assert entries[3]["message"].startswith("train step 3/10") and entries[3]["loss"] == 5.1234
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", e["time"]) for e in entries)


def test_a_process_other_than_rank_0_writes_only_warnings_marked_with_its_rank(setup, capsys):
    setup("text", rank=1)
    write_one_line_per_area()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" ", 2)[2] for line in lines] == [
        "[rank 1] resume: checkpoint-4 predates run identities", "[rank 1] init-model: cannot write the model"]


def test_work_progress_lines_belong_to_the_area_they_name(setup, capsys):
    setup("json")
    progress = logs.WorkProgress("data", total_bytes=2048, interval=0.0)
    progress.update(1024, tokens=300)
    progress.update(1024, tokens=300)
    progress.close()
    entries = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [e["area"] for e in entries] == ["data", "data"]
    assert entries[-1]["message"].startswith("data: 2 KiB of 2 KiB (100%), 600 tokens")
    assert entries[-1]["bytes_done"] == entries[-1]["bytes_total"] == 2048


def test_records_reach_caplog_under_the_one_root(caplog):
    caplog.set_level(logging.INFO, logger=logs.ROOT)
    logs.area("checkpoint").info("saved checkpoint-2 in 0.1 s", save_seconds=0.1)
    [record] = caplog.records
    assert record.name == "finetune.checkpoint" and record.getMessage() == "checkpoint: saved checkpoint-2 in 0.1 s"
    assert record.fields == {"save_seconds": 0.1} and record.filename == "test_logs.py"  # the caller's line


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_only_logs_py_makes_loggers():
    users = [str(p.relative_to(PACKAGE)) for p in modules() if "getLogger" in p.read_text() and p.name != "logs.py"]
    assert users == [], f"use `log = logs.area(...)` instead of logging.getLogger in {users}"


def leading_text(node: ast.expr) -> str | None:
    """The literal text a message expression starts with: a string, an f-string's first part, a sum's left."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values:
        return leading_text(node.values[0])
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return leading_text(node.left)
    return None


def test_no_message_types_the_prefix_its_area_adds():
    calls, typed = 0, []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in LOG_METHODS and node.args):
                calls += 1
                text = leading_text(node.args[0])
                if text is not None and TYPED_PREFIX.match(text):
                    typed.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {text[:40]!r}")
    assert calls > 40, "the scan found too few log calls to be looking at the right thing"
    assert typed == [], "the area adds this prefix; drop it from the message:\n" + "\n".join(typed)
