"""The dataset cache's keys and the pointer that lets waiting processes find a build without reading the inputs.

The content key hashes the inputs' bytes, the tokenizer and every option that changes the result: only a
builder computes it. The pre-key hashes the same options and each input's path, size, times and inode (a `stat`
per file): once a build is complete its builder writes `ready-<pre-key>` naming the content key, and the other
processes of a run wait for that pointer instead of reading the corpus themselves.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from entrypoint import logs
from entrypoint.data import objectstore, records
from entrypoint.data.formats import PRETOKENIZED, Fields, chat_template, convention
from entrypoint.data.options import DataOptions
from entrypoint.data.sources import Source, file_formats, fingerprint
from entrypoint.errors import DataError
from entrypoint.fsutil import COMPLETE

log = logs.area("data")
# 3: streamed token shards read through np.memmap, per-document hashed split
# 4: BOS where the tokenizer adds one; instruction and chat records with a per-token loss mask
# 5: Alpaca, ShareGPT and pretokenized records
FORMAT_VERSION = 5


def key_options(opts: DataOptions, tokenizer, valid: Source, block_size: int, pretokenized: bool = False) -> dict:
    """Everything besides the inputs that changes what a build writes. (--isolate-documents does not: position
    ids come from the documents' lengths when the cache is read.) `pretokenized` inputs are not tokenized: of the
    tokenizer and the options that say how to read text, none is in their key."""
    common = {
        "format": FORMAT_VERSION,
        "block_size": block_size,
        "packing": opts.packing,
        "records": records.RENDERING,  # how Alpaca and ShareGPT records render and pretokenized rows are read
        "vocab_size": opts.vocab_size,  # pretokenized ids are checked against it
        # The held-out split depends on these only when there is no validation input.
        "split": None if valid else [opts.validation_split, opts.seed],
    }
    if pretokenized:
        return common
    answers = [opts.chosen_field, opts.rejected_field]
    # Left out at their defaults, so caches (and the checkpoints whose identity holds this key) from before
    # --chosen-field and --rejected-field stay valid.
    answers = [] if answers == [Fields().chosen, Fields().rejected] else answers
    return common | {
        "tokenizer": hashlib.blake2b(tokenizer.backend_tokenizer.to_str().encode(), digest_size=16).hexdigest(),
        "eos": tokenizer.eos_token_id,
        "txt_split": opts.txt_split,
        "text_field": opts.text_field,
        "bos": convention(tokenizer).bos_id,
        "record_fields": [opts.prompt_field, opts.completion_field, opts.messages_field, *answers],
        "train_on_prompt": opts.train_on_prompt,
        "chat_template": hashlib.blake2b(chat_template(tokenizer).encode(), digest_size=16).hexdigest(),
    }


def all_pretokenized(opts: DataOptions, *inputs: Source) -> bool:
    """Whether every input file holds pretokenized rows (by its first record; a saved dataset counts as not, and so
    do datasets by name, whose formats mixture.py checks source by source)."""
    if any(source.parts or source.saved_dataset for source in inputs):
        return False
    fields = Fields.from_config(opts)
    found = [fmt for source in inputs if source for fmt in file_formats(source.files, fields).values()]
    return bool(found) and not any(source.saved_dataset for source in inputs) and \
        all(fmt == PRETOKENIZED for fmt in found)


def _digest(parts: dict) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=12).hexdigest()


def cache_key(opts: DataOptions, tokenizer, train: Source, valid: Source, block_size: int) -> str:
    """The content key: reads every input byte (and checks text is UTF-8)."""
    inputs = {"train": fingerprint(train), "valid": fingerprint(valid) if valid else None}
    return _digest({**key_options(opts, tokenizer, valid, block_size, all_pretokenized(opts, train, valid)),
                    **inputs})


def pre_key(opts: DataOptions, tokenizer, train: Source, valid: Source, block_size: int) -> str:
    """A key from the inputs' metadata only. The change time and inode are in it: rewriting a file's bytes
    changes its ctime even when the size and mtime are restored (cp -p, rsync -t, os.utime)."""
    def stat(source: Source) -> list:
        paths = sorted(p for p in source.saved_dataset.rglob("*") if p.is_file()) if source.saved_dataset \
            else list(source.files)
        if objectstore.remote(paths):  # objects: the listing is all there is, and all that is needed
            return objectstore.describe(paths)
        found = []
        for path in paths:
            st = path.stat()
            found.append([str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
        return found + [part.identity for part in source.parts]  # a Hub dataset's commit, a mixture's weights

    return _digest({**key_options(opts, tokenizer, valid, block_size, all_pretokenized(opts, train, valid)),
                    "train": stat(train), "valid": stat(valid) if valid else None})


def wait_for_builder(cache_dir: Path, pre: str, stop=None, poll_seconds: float = 1.0) -> Path:
    """The cache another process is building for these inputs, once it is complete."""
    pointer, waited = cache_dir / f"ready-{pre}", 0.0
    while not pointer.is_file():
        if waited and waited % 60 < poll_seconds:
            log.info(f"waiting for another process to build the dataset cache ({waited:.0f} s)")
        if stop is not None:
            stop.raise_if_requested("while waiting for the dataset cache")
        time.sleep(poll_seconds)
        waited += poll_seconds
    target = cache_dir / f"blocks-{pointer.read_text().strip()}"
    if not (target / COMPLETE).is_file():
        raise DataError(f"{pointer} names {target.name}, which is incomplete; delete both and rerun.")
    return target
