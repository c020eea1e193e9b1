"""entrypoint/data/textfiles.py: `.txt` read straight into pieces gives exactly the documents, and the numbering, of
`datasets`' text loader (sources.read_documents), however the pieces and reads are cut; and a cache built that way
equals one built through the loader.

Real files with the awkward cases (CRLF, lone CR, CR at the end of a read, runs of 1 to 7 newlines, empty and
blank lines, multi-byte characters, a byte-order mark, no final newline) and the real loader as the reference.
"""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import numpy as np
import pytest

from entrypoint.config.schema import TrainConfig
from entrypoint.data import pipeline, shards, textfiles
from entrypoint.data.options import DataOptions
from entrypoint.data.sources import Source, read_documents

PIECES = ["alpha", "beta gamma", "  ", "\t", "é中文 ünïcode", "x", "last words", "\ufeffmarked", "-- 42 --"]
BREAKS = ["\n", "\r\n", "\r", "\n\n", "\r\n\r\n", "\n\n\n", "\n\n\n\n", "\n\r\n", "\n" * 5, "\n" * 7, "\r\r\n"]


def awkward_text(seed: int, parts: int = 400) -> str:
    rng = random.Random(seed)
    text = "".join(rng.choice(PIECES) + rng.choice(BREAKS) for _ in range(parts))
    return text if seed % 2 else text.rstrip("\r\n")  # half the files end without a line break


@pytest.fixture
def awkward_files(tmp_path) -> list[Path]:
    paths = []
    for seed in range(3):
        path = tmp_path / f"part{seed}.txt"
        path.write_bytes(awkward_text(seed).encode())
        paths.append(path)
    return paths


def loaded(files: list[Path], mode: str, scratch: Path) -> list[tuple[int, str]]:
    cfg = TrainConfig(data_dir=files[0].parent, txt_split=mode)
    docs = read_documents(Source(files=tuple(files)), DataOptions.of(cfg), scratch)
    return list(enumerate(docs["text"]))


def streamed(source: textfiles.TextFiles, start: int = 0, end: int | None = None) -> list[tuple[int, str]]:
    return [(first + i, doc) for first, piece in source.pieces(start, end)
            for i, doc in enumerate(textfiles.documents(piece, source.mode))]


@pytest.mark.parametrize("mode", textfiles.MODES)
@pytest.mark.parametrize(("piece", "read"), [(1, 1), (3, 5), (7, 2), (64, 1 << 20), (1 << 16, 13)])
def test_pieces_give_the_loaders_documents_and_numbers_wherever_they_are_cut(awkward_files, tmp_path, monkeypatch,
                                                                               mode, piece, read):
    monkeypatch.setattr(textfiles, "MIN_PIECE", piece)
    monkeypatch.setattr(textfiles, "MAX_PIECE", piece)
    monkeypatch.setattr(textfiles, "READ_BYTES", read)
    source = textfiles.text_files(Source(files=tuple(awkward_files)), mode)
    assert source.piece_bytes == piece and len(list(source.pieces())) > (1 if piece < 100 else 0)
    assert streamed(source) == loaded(awkward_files, mode, tmp_path / "scratch")
    for _, text in source.pieces():
        assert textfiles.count_documents(text, mode) == len(textfiles.documents(text, mode))


@pytest.mark.parametrize("num_shards", [2, 3, 7])
def test_byte_shards_partition_the_documents_in_order(awkward_files, monkeypatch, num_shards):
    monkeypatch.setattr(textfiles, "MIN_PIECE", 50)
    monkeypatch.setattr(textfiles, "MAX_PIECE", 50)
    source = textfiles.text_files(Source(files=tuple(awkward_files)), "line")
    parts = [streamed(source, *shards.share(source, i, num_shards)) for i in range(num_shards)]
    assert sum(parts, []) == streamed(source) and sum(bool(p) for p in parts) == num_shards


def test_only_uncompressed_txt_split_by_line_or_paragraph_takes_the_direct_path(awkward_files, tmp_path):
    plain = Source(files=tuple(awkward_files))
    assert textfiles.text_files(plain, "line").nbytes == sum(p.stat().st_size for p in awkward_files)
    assert textfiles.text_files(plain, "file") is None
    packed = tmp_path / "more.txt.gz"
    packed.write_bytes(gzip.compress(b"text\n"))
    assert textfiles.text_files(Source(files=(*awkward_files, packed)), "line") is None
    (tmp_path / "r.jsonl").write_text('{"text": "a"}\n')
    assert textfiles.text_files(Source(files=(tmp_path / "r.jsonl",)), "line") is None


@pytest.mark.parametrize("mode", textfiles.MODES)
def test_a_cache_from_txt_equals_one_built_through_the_loader(tokenizer, corpus_dir, tmp_path, monkeypatch, mode):
    """The same text as train.txt (read directly) and as train.txt.gz (through `datasets`), validation held out
    of it by document number: every file of the caches is identical."""
    monkeypatch.setattr(textfiles, "MAX_PIECE", 4096)  # many pieces, so workers share the work
    monkeypatch.setattr(shards, "PARALLEL_MIN_BYTES", 0)
    text = (corpus_dir / "train.txt").read_text() + awkward_text(5)
    caches = []
    for name, payload in (("train.txt", text.encode()), ("train.txt.gz", gzip.compress(text.encode()))):
        directory = tmp_path / name.replace(".", "-")
        directory.mkdir()
        (directory / name).write_bytes(payload)
        cfg = TrainConfig(data_dir=directory, output_dir=tmp_path / "out", cache_dir=directory / "cache",
                          txt_split=mode, preprocessing_workers=2)
        stats = pipeline.prepare_shard(DataOptions.of(cfg), tokenizer, 32, 0, 1)
        assert stats.valid_documents > 0
        caches.append(next((directory / "cache").glob("blocks-*/shard-*")))
    for kind in ("train.tokens", "train.docs", "valid.tokens", "valid.docs", "stats.json"):
        direct, through = ((c / kind).read_bytes() for c in caches)
        assert direct == through, kind
    assert len(np.fromfile(caches[0] / "valid.docs", dtype=np.int64)) > 10
