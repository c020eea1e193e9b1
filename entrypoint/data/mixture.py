"""What to read: --data-dir's files (sources.discover), or the datasets named by --dataset (hubdata.py), mixed by
weight.

Each --dataset value is NAME or NAME:WEIGHT. The weight is what follows the last ':' when that is a plain positive
number (0.7, 3, 1e-2); anything else is part of the name, so Hub ids (which have no ':') and paths need no quoting,
and a path that itself ends in ':<number>' takes an explicit weight (`odd:2:1`). Either every value has a weight or
none has: without weights the datasets are concatenated whole; with them, WEIGHT is a share of the training tokens
(weights are normalised: 7 and 3 mean 0.7 and 0.3).

A weighted mixture is the largest that takes no document twice: the source with the fewest tokens for its share is
read whole and the others are cut to their shares, each keeping a seeded random subset of its documents (--seed), so
a rerun with the same seed takes the same documents. Token counts are estimated before tokenizing from the mean
length of up to SAMPLE_DOCUMENTS evenly spaced documents of each source, so shares hold within a few percent;
the exact tokens each source contributes are counted as the cache is written (DataStats.source_tokens, in
metrics.json as train_tokens_by_source). Every source must have one record format (formats.py). Validation: each
source's own validation split where it has one, else --validation-split percent of its (selected) documents.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from entrypoint import logs
from entrypoint.data import formats, hubdata, sources
from entrypoint.data import split as splitting
from entrypoint.data.options import DataOptions
from entrypoint.data.sources import Source
from entrypoint.errors import ConfigError, DataError

log = logs.area("data")
SAMPLE_DOCUMENTS = 1000  # per source, tokenized to estimate its mean document length
WEIGHT = re.compile(r"(?P<name>.+):(?P<weight>(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)")


@dataclass(frozen=True)
class Part:
    """One source of the training data: a resolved dataset and its weight (None: taken whole)."""

    named: hubdata.Named
    weight: float | None = None
    seed: int = 0  # picks a weighted source's documents

    @property
    def label(self) -> str:
        """The source's name in logs and metrics: the --dataset value without its weight."""
        return self.named.name

    @property
    def identity(self) -> str:
        """What the cache key needs beyond the local files' bytes: the name as given (it labels the source's
        token count in the cache's stats), what is read, a Hub commit, the weight and the seed that picks the
        documents."""
        n = self.named
        return json.dumps([n.name, n.loader, n.config, n.split, n.valid_split, None if n.local else n.revision,
                           self.weight, self.seed if self.weight is not None else None])

    def describe(self, split: str = "train") -> str:
        if split != "train":
            return f"{self.label} split {self.named.valid_split}" if self.named.valid_split else \
                f"{self.label}: held out"
        weight = f", weight {self.weight:g}" if self.weight is not None else ""
        own = f"its {self.named.valid_split} split" if self.named.valid_split else "held out"
        return self.named.describe(f"{weight}, validation {own}")


def parse(values: tuple[str, ...]) -> list[tuple[str, float | None]]:
    """(name, weight) of each --dataset value, or the ConfigError naming the fix."""
    parsed = []
    for value in values:
        match = WEIGHT.fullmatch(value)
        name, weight = (match["name"], float(match["weight"])) if match else (value, None)
        if not name.strip():
            raise ConfigError("--dataset is empty; give a Hub id, a dataset folder or a data file.")
        if weight is not None and not (math.isfinite(weight) and weight > 0):
            raise ConfigError(f"--dataset {value}: the weight must be a number above 0, e.g. {name}:0.5.")
        parsed.append((name, weight))
    weighted = [value for value, (_, w) in zip(values, parsed, strict=True) if w is not None]
    if weighted and len(weighted) < len(values):
        raise ConfigError(f"--dataset: {', '.join(weighted)} ha{'s' if len(weighted) == 1 else 've'} a weight but "
                          "other values have none; give every --dataset a weight (NAME:WEIGHT), or none.")
    names = [name for name, _ in parsed]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"--dataset {twice[0]} is given twice; name each dataset once (its weight is its share).")
    return parsed


def discover(opts: DataOptions) -> tuple[Source, Source]:
    """The training and validation inputs, as sources.discover: files, or the --dataset sources resolved (cards
    read, files listed, Hub commits resolved; nothing tokenized). An empty validation Source means some documents
    are held out."""
    if not opts.dataset:
        return sources.discover(opts)
    parts = tuple(Part(hubdata.resolve(name, opts), weight, opts.seed) for name, weight in parse(opts.dataset))
    files = tuple(dict.fromkeys(f for part in parts for f in part.named.files))
    train = Source(files=files, parts=parts)
    own = all(part.named.valid_split for part in parts)
    return train, Source(parts=parts, split="validation") if own else Source()


def read_jobs(parts: tuple[Part, ...], opts: DataOptions, tokenizer, scratch: Path) -> tuple[list, str]:
    """The documents to tokenize as pipeline jobs (documents, split, hold-out, source label) and their record
    format: each source's training documents (cut to its weight) and its own validation split or the documents
    held out of them (split.held_out, as for files)."""
    train = [hubdata.read(p.named, p.named.split, opts, scratch) for p in parts]
    valid = [hubdata.read(p.named, p.named.valid_split, opts, scratch) if p.named.valid_split else None
             for p in parts]
    found = {p.label: sources.record_format(d) for p, d in zip(parts, train, strict=True)}
    found.update({f"{p.label} split {p.named.valid_split}": sources.record_format(d)
                  for p, d in zip(parts, valid, strict=True) if d is not None})
    if len(set(found.values())) > 1:
        listed = ", ".join(f"{name}: {fmt}" for name, fmt in found.items())
        raise DataError(f"the datasets hold different record formats ({listed}); mix datasets of one format.")
    fmt = next(iter(found.values()))
    jobs = []
    for part, docs, own in zip(parts, select(parts, train, fmt, tokenizer, opts), valid, strict=True):
        if own is None:  # held out here rather than as it streams, so every job has one split (see shares)
            held = splitting.held_out(np.arange(len(docs), dtype=np.int64), opts.validation_split, opts.seed)
            docs, own = rows(docs, np.flatnonzero(~held)), rows(docs, np.flatnonzero(held))
        jobs += [(docs, "train", None, part.label), (own, "valid", None, part.label)]
    return jobs, fmt


def shares(jobs: list, shard: int, num_shards: int) -> list[tuple[int, int]]:
    """Each job's documents [lo, hi) in shard `shard` of `num_shards`: equal runs of each split's documents, its
    jobs read one after another, so the shards' streams in shard order are exactly the single-process stream."""
    totals: dict[str, int] = {}
    for docs, split, *_ in jobs:
        totals[split] = totals.get(split, 0) + len(docs)
    done: dict[str, int] = {}
    ranges = []
    for docs, split, *_ in jobs:
        base, total = done.get(split, 0), totals[split]
        start, end = total * shard // num_shards - base, total * (shard + 1) // num_shards - base
        lo, hi = min(max(start, 0), len(docs)), min(max(end, 0), len(docs))
        ranges.append((lo, max(lo, hi)))
        done[split] = base + len(docs)
    return ranges


def select(parts: tuple[Part, ...], docs: list, fmt: str, tokenizer, opts: DataOptions) -> list:
    """Each source's documents cut to its share of the training tokens (see the module's docstring); all of them
    when no weights are given."""
    if all(part.weight is None for part in parts):
        return docs
    # Training tokens per document: a source without its own validation split loses its held-out share.
    means = [mean_tokens(d, fmt, tokenizer, opts.train_on_prompt)
             * (1 if part.named.valid_split else 1 - opts.validation_split / 100)
             for part, d in zip(parts, docs, strict=True)]
    total = sum(part.weight for part in parts)
    shares = [part.weight / total for part in parts]
    # Tokens of the whole mixture: the most every source's share allows without repeating a document.
    mixture = min(m * len(d) / s for m, d, s in zip(means, docs, shares, strict=True))
    chosen = []
    for index, (part, d, mean, share) in enumerate(zip(parts, docs, means, shares, strict=True)):
        keep = min(len(d), max(1, round(share * mixture / mean))) if mean else len(d)
        log.info(f"mixing {part.label} at weight {share:.3f}: {keep} of {len(d)} documents (about "
                 f"{keep * mean:,.0f} training tokens, {mean:.0f} per document)")
        chosen.append(d if keep == len(d) else pick(d, keep, opts.seed, index))
    return chosen


def pick(docs, keep: int, seed: int, index: int):
    """`keep` documents of `docs`, a seeded random subset in their order, as a table of its own (preparation reads
    the Arrow table in order, so no indices mapping may remain)."""
    return rows(docs, np.sort(np.random.default_rng([seed, index]).choice(len(docs), size=keep, replace=False)))


def rows(docs, indices: np.ndarray):
    """The documents at `indices` (ascending) as a table of their own, in the scratch folder `docs` lives in."""
    return docs.select(indices).flatten_indices()


def mean_tokens(docs, fmt: str, tokenizer, train_on_prompt: bool) -> float:
    """Mean tokens per document (BOS and EOS included) of up to SAMPLE_DOCUMENTS evenly spaced documents."""
    count = len(docs)
    rows = np.unique(np.linspace(0, count - 1, min(count, SAMPLE_DOCUMENTS)).astype(np.int64))
    conv = formats.convention(tokenizer)
    lengths = []
    for record in docs.select(rows).to_list():
        if fmt == formats.TEXT and not (record.get("text") or "").strip():
            lengths.append(0)  # preparation skips empty documents
            continue
        lengths.append(len(formats.encode(record, fmt, tokenizer, conv, train_on_prompt=train_on_prompt).ids))
    return float(np.mean(lengths)) if lengths else 0.0


def summary(tokens: dict[str, int]) -> str:
    """The log line of each source's training tokens and share."""
    total = sum(tokens.values()) or 1
    return "training tokens by source: " + ", ".join(f"{name} {count:,} ({count / total:.1%})"
                                                     for name, count in tokens.items())
