"""entrypoint/data/sources.py: finding the training files, checking and fingerprinting them, reading documents.

Every test writes real files in a real format and reads them back with the real loaders; no tokenizer is
needed here, so these tests do not wait for the tiny model.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from entrypoint.config.schema import TrainConfig
from entrypoint.data.options import DataOptions
from entrypoint.data.sources import CHUNK, Source, discover, fingerprint, load_documents
from entrypoint.errors import DataError

# Commas, quotes, tabs and non-ASCII text, so a loader that mangles any of them is caught.
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett", "kilo", "lima",
         "mike"]
DOCS = [f"Document {i} says {word}, with a comma, \"quotes\" and\ttabs." for i, word in enumerate(WORDS)]
DOCS += ["Café ☕ naïve — “curly quotes” 日本語 text.", "A short one."]


def write(path: Path, docs: list[str], field: str = "text") -> Path:
    """Write `docs` in the format the file name says (.txt, .jsonl, .json, .csv, .parquet, each maybe .gz),
    with an extra `id` column beside the text so the loaders must pick the right one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.name.removesuffix(".gz").rsplit(".", 1)[-1]
    rows = [{field: doc, "id": i} for i, doc in enumerate(docs)]
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path
    if fmt == "txt":
        body = "".join(doc + "\n" for doc in docs)
    elif fmt == "jsonl":
        body = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    elif fmt == "json":
        body = json.dumps(rows, ensure_ascii=False)
    elif fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=[field, "id"])
        writer.writeheader()
        writer.writerows(rows)
        body = buffer.getvalue()
    else:
        raise ValueError(fmt)
    raw = body.encode()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def config(tmp_path: Path, data_dir: Path | None = None, **options) -> TrainConfig:
    return TrainConfig(data_dir=data_dir or tmp_path / "data", output_dir=tmp_path / "out", **options)


def read(cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """What `data.prepare` does before tokenizing: discover, fingerprint (the checks), load documents."""
    train, valid = discover(DataOptions.of(cfg))
    fingerprint(train)
    if valid:
        fingerprint(valid)
    cache = cfg.output_dir / "raw"
    return (load_documents(train, DataOptions.of(cfg), cache)["text"],
            load_documents(valid, DataOptions.of(cfg), cache)["text"] if valid else [])


def data_error(cfg: TrainConfig) -> str:
    """The message of the DataError reading `cfg`'s data raises, checked to be one line."""
    with pytest.raises(DataError) as caught:
        read(cfg)
    message = str(caught.value)
    assert "\n" not in message and len(caught.value.problems) == 1
    return message


# Formats.


@pytest.mark.parametrize("valid_name", ["valid.txt", "validation.txt"])
def test_train_and_valid_txt_are_found_without_configuration(tmp_path, valid_name):
    write(tmp_path / "data" / "train.txt", DOCS[:10])
    write(tmp_path / "data" / valid_name, DOCS[10:])
    train, valid = read(config(tmp_path))
    assert train == DOCS[:10]
    assert valid == DOCS[10:]


@pytest.mark.parametrize("name", ["train.txt", "train.jsonl", "train.json", "train.csv", "train.parquet",
                                  "train.txt.gz", "train.jsonl.gz", "train.csv.gz"])
def test_every_format_yields_each_document_once_in_order(tmp_path, name):
    write(tmp_path / "data" / name, DOCS)
    train, valid = read(config(tmp_path))
    assert train == DOCS
    assert valid == []  # held out later by data.split_documents


@pytest.mark.parametrize("name", ["train.jsonl", "train.json", "train.csv", "train.parquet", "train.jsonl.gz"])
def test_text_field_picks_a_custom_column(tmp_path, name):
    write(tmp_path / "data" / name, DOCS, field="body")
    train, _ = read(config(tmp_path, text_field="body"))
    assert train == DOCS


def test_parquet_with_large_string_text_is_read(tmp_path):
    # pandas with pyarrow strings and polars write large_string; it is text like any other.
    path = tmp_path / "data" / "train.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"text": pa.array(DOCS, pa.large_string())}), path)
    write(tmp_path / "data" / "valid.txt", DOCS[:2])
    train, valid = read(config(tmp_path))
    assert train == DOCS
    assert valid == DOCS[:2]


def test_large_string_parquet_and_txt_can_be_mixed(tmp_path):
    pq.write_table(pa.table({"text": pa.array(DOCS[:5], pa.large_string())}), tmp_path / "a.parquet")
    write(tmp_path / "b.txt", DOCS[5:])
    train, _ = read(config(tmp_path, data_dir=tmp_path, train_file=("a.parquet", "b.txt")))
    assert sorted(train) == sorted(DOCS)


def test_several_files_and_globs_are_all_read(tmp_path):
    data_dir = tmp_path / "data"
    write(data_dir / "shards" / "part-0.txt", DOCS[:4])
    write(data_dir / "shards" / "part-1.txt", DOCS[4:8])
    (data_dir / "shards" / "notes.md").write_text("not matched by the glob\n")
    write(data_dir / "extra.jsonl", DOCS[8:])
    cfg = config(tmp_path, train_file=("shards/*.txt", "extra.jsonl"))
    train_src, valid_src = discover(DataOptions.of(cfg))
    assert [p.name for p in train_src.files] == ["part-0.txt", "part-1.txt", "extra.jsonl"]
    assert not valid_src  # --train-file without --valid-file: split from training
    train, _ = read(cfg)
    assert sorted(train) == sorted(DOCS)


def test_recursive_glob_and_absolute_paths_are_read(tmp_path):
    write(tmp_path / "data" / "a" / "b" / "deep.txt", DOCS[:3])
    outside = write(tmp_path / "elsewhere" / "more.txt", DOCS[3:])
    train, _ = read(config(tmp_path, train_file=("**/*.txt", str(outside))))
    assert sorted(train) == sorted(DOCS)


def test_valid_file_option_reads_validation_from_it(tmp_path):
    write(tmp_path / "data" / "mine.jsonl", DOCS[:10])
    write(tmp_path / "data" / "held-out.csv", DOCS[10:])
    train, valid = read(config(tmp_path, train_file=("mine.jsonl",), valid_file=("held-out.csv",)))
    assert (train, valid) == (DOCS[:10], DOCS[10:])


def test_a_directory_given_as_train_file_reads_its_supported_files(tmp_path):
    write(tmp_path / "data" / "corpus" / "a.txt", DOCS[:5])
    write(tmp_path / "data" / "corpus" / "b.parquet", DOCS[5:])
    (tmp_path / "data" / "corpus" / "README.md").write_text("# not data\n")
    train, _ = read(config(tmp_path, train_file=("corpus",)))
    assert sorted(train) == sorted(DOCS)


def test_saved_dataset_directory_is_read(tmp_path):
    datasets.Dataset.from_dict({"text": DOCS, "id": list(range(len(DOCS)))}).save_to_disk(tmp_path / "data")
    train_src, valid_src = discover(DataOptions.of(config(tmp_path)))
    assert train_src.saved_dataset == tmp_path / "data" and not valid_src
    train, valid = read(config(tmp_path))
    assert (train, valid) == (DOCS, [])


def test_saved_dataset_dict_uses_its_train_and_validation_splits(tmp_path):
    saved = tmp_path / "data" / "saved"
    datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"content": DOCS[:10]}),
        validation=datasets.Dataset.from_dict({"content": DOCS[10:]}),
    ).save_to_disk(saved)
    for cfg in (config(tmp_path, data_dir=saved, text_field="content"),
                config(tmp_path, train_file=("saved",), text_field="content")):
        assert read(cfg) == (DOCS[:10], DOCS[10:])


# How .txt divides into documents.


def test_txt_is_one_document_per_line_and_skips_blank_lines(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.txt").write_text("first line\n\n   \nsecond line\r\nthird line")
    train, _ = read(config(tmp_path))
    assert train == ["first line", "second line", "third line"]


def test_txt_split_paragraph_makes_one_document_per_blank_line_separated_block(tmp_path):
    paragraphs = ["Para one,\nline two of it.", "Para two.", "Para three\nhas\nthree lines."]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.txt").write_text("\n\n".join(paragraphs) + "\n")
    train, _ = read(config(tmp_path, txt_split="paragraph"))
    assert [t.strip() for t in train] == paragraphs


def test_txt_split_file_makes_one_document_per_file(tmp_path):
    texts = {"a.txt": "Story A.\nIt goes on.\n\nAnd on.\n", "b.txt": "Story B, a single line.", "c.txt": "Story C.\n"}
    for name, text in texts.items():
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / name).write_text(text)
    train, _ = read(config(tmp_path, txt_split="file"))
    assert train == list(texts.values())


# Discovery and fingerprints.


def test_train_named_file_wins_over_other_files(tmp_path):
    write(tmp_path / "data" / "train.txt", DOCS[:3])
    write(tmp_path / "data" / "notes.txt", ["not training data"])
    train_src, _ = discover(DataOptions.of(config(tmp_path)))
    assert [p.name for p in train_src.files] == ["train.txt"]


def test_without_a_train_file_every_file_except_validation_and_test_trains(tmp_path):
    for name in ("a.txt", "b.jsonl", "dev.txt", "test.txt", "val.jsonl"):
        write(tmp_path / "data" / name, DOCS[:2])
    train_src, valid_src = discover(DataOptions.of(config(tmp_path)))
    assert [p.name for p in train_src.files] == ["a.txt", "b.jsonl"]
    assert [p.name for p in valid_src.files] == ["dev.txt", "val.jsonl"]


def test_fingerprint_depends_on_bytes_not_names_or_times(tmp_path):
    a = write(tmp_path / "a.txt", DOCS)
    b = write(tmp_path / "b.txt", DOCS)
    before = fingerprint(Source(files=(a,)))
    os.utime(a, (1_000_000_000, 1_000_000_000))
    assert fingerprint(Source(files=(a,))) == before == fingerprint(Source(files=(b,)))
    write(b, DOCS[:-1])
    assert fingerprint(Source(files=(b,))) != before


# Bad data: a DataError whose one line names the file and the fix.


def test_missing_data_dir(tmp_path):
    message = data_error(config(tmp_path, data_dir=tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in message and "does not exist" in message and "--data-dir" in message


def test_empty_data_dir(tmp_path):
    (tmp_path / "data").mkdir()
    message = data_error(config(tmp_path))
    assert "no training data" in message and "found: nothing" in message and "train.txt" in message


def test_data_dir_with_only_unsupported_files(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "corpus.docx").write_bytes(b"PK\x03\x04")
    message = data_error(config(tmp_path))
    assert "found: corpus.docx" in message and "--train-file" in message


def test_unsupported_extension(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "corpus.xml").write_text("<doc>text</doc>")
    message = data_error(config(tmp_path, train_file=("corpus.xml",)))
    assert "corpus.xml" in message and "unsupported" in message and ".jsonl" in message


def test_glob_matching_nothing(tmp_path):
    write(tmp_path / "data" / "train.txt", DOCS)
    message = data_error(config(tmp_path, train_file=("shards/*.jsonl",)))
    assert "'shards/*.jsonl' matches nothing" in message and str(tmp_path / "data") in message


@pytest.mark.parametrize("name", ["train.txt", "train.jsonl", "train.txt.gz"])
def test_empty_file(tmp_path, name):
    path = tmp_path / "data" / name
    path.parent.mkdir()
    path.write_bytes(gzip.compress(b"") if name.endswith(".gz") else b"")
    message = data_error(config(tmp_path))
    assert f"{path} is empty" in message


def test_whitespace_only_file(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.txt").write_text("\n  \n\t\n")
    message = data_error(config(tmp_path))
    assert "train.txt" in message and "contains no text" in message


def test_not_utf8_file_names_the_byte(tmp_path):
    path = tmp_path / "data" / "train.txt"
    path.parent.mkdir()
    # The bad byte lies past the first 1 MiB read, so the reported offset must count earlier chunks.
    good = ("plain ascii line\n" * 70_000).encode()
    path.write_bytes(good + "caf\xe9 au lait\n".encode("latin-1"))
    message = data_error(config(tmp_path))
    assert f"{path} is not valid UTF-8 (byte {len(good) + 3})" in message and "iconv" in message


def test_not_utf8_offset_counts_a_character_split_across_reads(tmp_path):
    path = tmp_path / "data" / "train.txt"
    path.parent.mkdir()
    # "é" (2 bytes) straddles the 1 MiB read boundary; the bad byte follows in the second read.
    body = b"a" * (CHUNK - 1) + "é".encode() + b"b" * 100 + b"\xff\n"
    path.write_bytes(body)
    bad = body.index(b"\xff")
    assert f"{path} is not valid UTF-8 (byte {bad})" in data_error(config(tmp_path))


def test_not_utf8_inside_gzip(tmp_path):
    path = tmp_path / "data" / "train.jsonl.gz"
    path.parent.mkdir()
    path.write_bytes(gzip.compress('{"text": "caf\xe9"}\n'.encode("latin-1")))
    assert f"{path} is not valid UTF-8" in data_error(config(tmp_path))


def test_file_ending_inside_a_utf8_character(tmp_path):
    path = tmp_path / "data" / "train.txt"
    path.parent.mkdir()
    path.write_bytes("café ☕".encode()[:-1])
    assert f"{path} ends inside a UTF-8 character (byte {len('café '.encode())})" in data_error(config(tmp_path))


def _truncated(raw: bytes) -> bytes:
    return raw[: len(raw) // 2]


def _flipped_body(raw: bytes) -> bytes:
    # A valid header over a damaged deflate stream: zlib, not gzip, notices.
    return raw[:20] + bytes(b ^ 0xFF for b in raw[20:60]) + raw[60:]


def _flipped_crc(raw: bytes) -> bytes:
    return raw[:-8] + bytes([raw[-8] ^ 0xFF]) + raw[-7:]


@pytest.mark.parametrize("damage", [_truncated, _flipped_body, _flipped_crc, lambda raw: b"not gzip at all"],
                         ids=["truncated", "damaged-deflate-stream", "bad-crc", "not-gzip"])
def test_corrupt_gzip(tmp_path, damage):
    path = tmp_path / "data" / "train.txt.gz"
    path.parent.mkdir()
    path.write_bytes(damage(gzip.compress("".join(d + "\n" for d in DOCS * 50).encode())))
    message = data_error(config(tmp_path))
    assert f"{path} is not a valid gzip file" in message and "re-compress" in message


def test_jsonl_missing_the_text_field(tmp_path):
    path = write(tmp_path / "data" / "train.jsonl", DOCS, field="body")
    message = data_error(config(tmp_path))
    assert f"{path} has no field 'text'" in message and "body, id" in message and "--text-field" in message


def test_custom_text_field_missing(tmp_path):
    write(tmp_path / "data" / "train.parquet", DOCS)
    message = data_error(config(tmp_path, text_field="content"))
    assert "train.parquet has no field 'content'" in message and "--text-field" in message


@pytest.mark.parametrize("value", [7, 2.5, True, ["a", "list"], {"a": "dict"}],
                         ids=["int", "float", "bool", "list", "dict"])
def test_jsonl_field_that_is_not_a_string(tmp_path, value):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps({"text": value}) + "\n" for _ in DOCS))
    message = data_error(config(tmp_path))
    assert "field 'text' in" in message and "train.jsonl" in message and "not text" in message


def test_jsonl_that_does_not_parse(tmp_path):
    path = write(tmp_path / "data" / "train.jsonl", DOCS)
    with path.open("a") as f:
        f.write('{"text": "unterminated\n')
    message = data_error(config(tmp_path))
    assert "cannot parse json file(s)" in message and str(path) in message


def test_saved_dataset_dict_without_the_train_split(tmp_path):
    datasets.DatasetDict(test=datasets.Dataset.from_dict({"text": DOCS})).save_to_disk(tmp_path / "data")
    message = data_error(config(tmp_path))
    assert "has splits test but no 'train'" in message
