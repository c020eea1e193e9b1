"""Plain `.txt` files read straight into tokenizing tasks, without a `datasets` copy of the corpus.

Split by line (the default) or by paragraph, the files are cut at document boundaries into pieces of about
`piece_bytes`. Every tokenizing worker reads the files in order and tokenizes its own share of the pieces
(forkpool.ordered), so no text passes between processes; cutting runs at about 1 GB/s, some 300 times a core's
tokenizing speed. What this saves: the text loader's Arrow copy, which took 48 s on one core for 4 GB of text
before any tokenizing began, and as many bytes again on the cache volume.

The documents and their numbering are exactly those of `datasets`' text loader (sources.read_documents), which
still reads `.gz` files and `--txt-split file`; tests/data/test_textfiles.py compares the two:
- newlines are universal: "\\r\\n" and a lone "\\r" read as "\\n";
- by line, every line is a document, empty ones included (preparation skips those), without its line break;
- by paragraph, the text is split at each "\\n\\n" from the left and empty pieces are not documents;
- the files follow one another, numbered on.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from entrypoint.data.sources import Source, file_format

MODES = ("line", "paragraph")
MIN_PIECE, MAX_PIECE = 16 << 10, 1 << 20  # bytes; at most 256 pieces per corpus below 256 MiB, so work spreads
READ_BYTES = 1 << 20
_NEWLINES = re.compile(rb"\n\n+")


@dataclass(frozen=True)
class TextFiles:
    """Uncompressed `.txt` files, read as documents split by `mode`; `nbytes` is their size on disk."""

    files: tuple[Path, ...]
    mode: str
    nbytes: int

    @property
    def piece_bytes(self) -> int:
        # From the corpus's size alone, so every process (and every shard's pod) cuts the same pieces.
        return min(MAX_PIECE, max(MIN_PIECE, self.nbytes // 256))

    def pieces(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, bytes]]:
        """(index of its first document, text) of each piece that begins in bytes [start, end) of the files
        read one after another (newlines translated). Pieces before `start` are read to number the documents."""
        index = offset = 0
        for path in self.files:
            for piece in cut(path, self.mode, self.piece_bytes):
                if end is not None and offset >= end:
                    return
                if offset >= start:
                    yield index, piece
                index += count_documents(piece, self.mode)
                offset += len(piece)


def text_files(source: Source, txt_split: str) -> TextFiles | None:
    """The source as TextFiles when every input is an uncompressed `.txt` split by line or paragraph, else None."""
    if source.saved_dataset or txt_split not in MODES:
        return None
    if not all(isinstance(p, Path) and file_format(p) == "text" and p.suffix.lower() != ".gz" for p in source.files):
        return None
    return TextFiles(source.files, txt_split, sum(p.stat().st_size for p in source.files))


def documents(piece: bytes, mode: str) -> list[str]:
    """The documents of one piece (as `cut` makes them), empty ones included in line mode."""
    text = piece.decode("utf-8")
    if mode == "paragraph":
        return [p for p in text.split("\n\n") if p]
    rows = text.split("\n")
    if rows[-1] == "":  # the break ending the last line
        rows.pop()
    return rows


def count_documents(piece: bytes, mode: str) -> int:
    """len(documents(piece, mode)) without decoding: every piece is numbered, tokenized or not."""
    if mode == "paragraph":
        return sum(1 for p in piece.split(b"\n\n") if p)
    return piece.count(b"\n") + (not piece.endswith(b"\n"))


def cut(path: Path, mode: str, size: int) -> Iterator[bytes]:
    """The file's text (newlines translated) in pieces that end at a document boundary at or after `size` bytes."""
    buffer = b""
    for block in _read(path):
        buffer += block
        while len(buffer) >= size and (end := _boundary(buffer, size, mode)) is not None:
            yield buffer[:end]
            buffer = buffer[end:]
    if buffer:
        yield buffer


def _read(path: Path) -> Iterator[bytes]:
    """The file's bytes with "\\r\\n" and "\\r" turned into "\\n" (a pair split between two reads included)."""
    with path.open("rb") as f:
        while block := f.read(READ_BYTES):
            while block.endswith(b"\r") and (more := f.read(1)):
                block += more
            if b"\r" in block:
                block = block.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            yield block


def _boundary(buffer: bytes, size: int, mode: str) -> int | None:
    """Where the first document boundary at or after `size` lies in `buffer` (a piece's start), or None when the
    buffer ends first. By paragraph, that is a split point of str.split("\\n\\n") over the whole text: the pairs of
    a newline run are taken from its start, so an odd run leaves its last newline to the next document."""
    if mode == "line":
        found = buffer.find(b"\n", size - 1)
        return None if found < 0 else found + 1
    run = _NEWLINES.search(buffer, size - 1)
    if run is None or run.end() == len(buffer):  # the run may go on in the next read
        return None
    start = run.start()
    while start > 0 and buffer[start - 1] == 0x0A:  # the run began before `size`
        start -= 1
    return start + 2 * ((run.end() - start) // 2)
