"""The instruction corpus built from the standard library at run time."""

from __future__ import annotations

import ast
import json

from entrypoint.data import formats, records, sftcorpus


def test_records_pair_a_signature_with_the_first_docstring_paragraph(tmp_path):
    counts = sftcorpus.build(tmp_path, max_records=400)
    assert counts["train"] + counts["valid"] == 400 and counts["valid"] > 0
    records = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(records) == counts["train"] and len({r["prompt"] for r in records}) == len(records)
    for record in records:
        assert record["prompt"].startswith(("def ", "async def ")) and record["prompt"].endswith(":\n")
        ast.parse(record["prompt"] + "    pass\n")  # a real signature
        assert len(record["completion"]) >= sftcorpus.MIN_CHARS and "\n" not in record["completion"]
    assert formats.detect(records[0]) == formats.INSTRUCTION


def test_the_split_is_the_same_on_every_build(tmp_path):
    sftcorpus.build(tmp_path / "a", max_records=200)
    sftcorpus.build(tmp_path / "b", max_records=200)
    assert (tmp_path / "a" / "valid.jsonl").read_text() == (tmp_path / "b" / "valid.jsonl").read_text()


def test_a_split_without_validation_records_writes_no_empty_valid_file(tmp_path):
    # Only a record whose 32-bit hash is 0 would go to validation: none of these five (train then holds a split
    # out itself).
    counts = sftcorpus.build(tmp_path, max_records=5, valid_every=2**33)
    assert counts == {"train": 5, "valid": 0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl"]


def test_alpaca_records_render_to_the_same_prompt_completion_pairs(tmp_path):
    sftcorpus.build(tmp_path / "pairs", max_records=100)
    sftcorpus.build(tmp_path / "alpaca", max_records=100, alpaca=True)
    pairs = [json.loads(line) for line in (tmp_path / "pairs" / "train.jsonl").read_text().splitlines()]
    alpaca = [json.loads(line) for line in (tmp_path / "alpaca" / "train.jsonl").read_text().splitlines()]
    assert formats.detect(alpaca[0]) == formats.ALPACA and set(alpaca[0]) == {"instruction", "input", "output"}
    assert [records.alpaca(r) for r in alpaca] == pairs


def test_preference_pairs_reject_with_another_functions_docstring():
    records = [{"prompt": f"def f{i}():\n", "completion": f"Docstring number {i} of thirty chars."} for i in range(4)]
    records.insert(2, {"prompt": "def " + "x" * 200 + "():\n", "completion": "A signature too long for the demo."})
    pairs = list(sftcorpus.preference_pairs(iter(records)))
    assert [p["prompt"] for p in pairs] == ["def f1():\n", "def f2():\n", "def f3():\n"]
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    assert pairs[0]["rejected"] == records[0]["completion"] and pairs[1]["rejected"] == records[1]["completion"]
