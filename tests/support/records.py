"""Record files of every format, good and bad, for the data, doctor and end-to-end tests."""

from __future__ import annotations

import json
from pathlib import Path

WORDS = ["number", "page", "step", "row"]
ALPACA = [{"instruction": f"Which {word} comes after {i}?", "input": f"Counting {word}s." if i % 3 else "",
           "output": f"The {word} {i + 1} does."} | ({"system": "Answer briefly."} if i % 4 == 0 else {})
          for i, word in enumerate(WORDS * 15)]
SHAREGPT = [{"conversations": [{"from": "system", "value": "Be brief."},
                               {"from": "human", "value": f"Say {word} {i} times."},
                               {"from": "gpt", "value": f"{word.title()} said {i} times."},
                               {"from": "human", "value": "Again, shorter."},
                               {"from": "gpt", "value": f"{word} x{i}"}]}
            for i, word in enumerate(["hello", "yes", "ok"] * 12)]


def pretokenized(tokenizer, count: int = 60) -> list[dict]:
    """Rows tokenized ahead of time: a question whose labels are -100 and its answer's ids, padded with
    attention_mask 0 to a common length (as a padded tokenizer call writes them)."""
    rows = []
    for i in range(count):
        question = tokenizer(f"Which page comes after {i}? ", add_special_tokens=False)["input_ids"]
        answer = tokenizer(f"Page {i + 1}.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = question + answer
        pad = 24 - len(ids)
        rows.append({"input_ids": ids + [tokenizer.eos_token_id] * pad,
                     "labels": [-100] * len(question) + answer + [-100] * pad,
                     "attention_mask": [1] * len(ids) + [0] * pad})
    return rows


def write_records(directory: Path, name: str, records: list[dict], kind: str) -> Path:
    """`records` as <name>.<kind>: jsonl, json (an array), csv or parquet; returns the file."""
    import datasets

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif kind == "json":
        path.write_text(json.dumps(records))
    elif kind == "csv":
        datasets.Dataset.from_list(records).to_csv(str(path), index=False)
    elif kind == "parquet":
        datasets.Dataset.from_list(records).to_parquet(str(path))
    else:
        raise ValueError(kind)
    return path


GOOD_TURNS = [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Hello."}]
# Bad files: (format family, records with the bad one at line 4, words the one-line problem must hold). Each
# would stop `train`; doctor names the file and line of each.
BAD = {
    "sharegpt-unknown-role": ("sharegpt", [{"conversations": [{"from": "bot", "value": "Hi."}, GOOD_TURNS[1]]}],
                              ["line 4", "'bot'", "not a known role", "human"]),
    "sharegpt-ends-with-user": ("sharegpt", [{"conversations": GOOD_TURNS + [{"from": "human", "value": "And?"}]}],
                                ["line 4", "ends with a human turn", "gpt turn"]),
    "sharegpt-empty-value": ("sharegpt", [{"conversations": [{"from": "human", "value": " "}, GOOD_TURNS[1]]}],
                             ["line 4", "empty or missing value"]),
    "alpaca-empty-output": ("alpaca", [{"instruction": "Do it.", "input": "", "output": ""}],
                            ["line 4", "'output' is empty"]),
    "alpaca-list-input": ("alpaca", [{"instruction": "Do it.", "input": ["a"], "output": "Done."}],
                          ["line 4", "'input' is list"]),
    "pretokenized-outside-vocabulary": ("pretokenized", [{"input_ids": [5, 6, 100000]}],
                                        ["line 4", "token id 100000", "vocabulary of 512"]),
    "pretokenized-wrong-labels": ("pretokenized", [{"input_ids": [5, 6, 7], "labels": [5, 9, 7]}],
                                  ["line 4", "labels[1] is 9", "-100"]),
    "pretokenized-lengths": ("pretokenized", [{"input_ids": [5, 6, 7], "attention_mask": [1, 1]}],
                             ["line 4", "differ in length"]),
}
GOOD_OF = {"sharegpt": SHAREGPT[0], "alpaca": ALPACA[1], "pretokenized": {"input_ids": [5, 6, 7]}}


def bad_records(name: str) -> list[dict]:
    """Three good records of the family, then the bad one (line 4), then two good ones."""
    family, bad, _ = BAD[name]
    return [GOOD_OF[family]] * 3 + bad + [GOOD_OF[family]] * 2
