"""entrypoint/data/split.py: the streaming held-out split and the evaluation cap, on their own and through
pipeline.prepare with real files and the real tiny tokenizer."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from entrypoint.config.schema import TrainConfig
from entrypoint.data import pipeline, split
from entrypoint.data.options import DataOptions


@pytest.mark.parametrize("percent", [0.1, 2.5, 5.0, 7.0, 33.3, 50.0])
def test_held_out_share_is_exact_and_the_same_for_any_piece_of_the_corpus(percent):
    positions = np.arange(2_000_000, dtype=np.int64)
    held = split.held_out(positions, percent, seed=42)
    assert abs(held.sum() - len(positions) * percent / 100) <= 1
    # Decided per document: any piece of the corpus (a shard, a batch of documents) gets the same answer.
    piece = positions[777_777:1_234_567]
    assert np.array_equal(split.held_out(piece, percent, seed=42), held[777_777:1_234_567])
    assert np.array_equal(split.held_out(positions, percent, seed=42), held)


def test_held_out_documents_change_with_the_seed_and_spread_over_the_corpus():
    positions = np.arange(100_000, dtype=np.int64)
    a, b = split.held_out(positions, 5.0, seed=0), split.held_out(positions, 5.0, seed=1)
    assert (a & b).sum() < 0.2 * a.sum()  # mostly other documents: ~1 in 20 would agree by chance
    gaps = np.diff(np.flatnonzero(a))
    assert gaps.max() < 40  # one per group of 20: never a long run of training-only documents


def test_split_through_prepare_is_deterministic_and_disjoint_from_training(tokenizer, tmp_path, corpus_dir):
    (tmp_path / "data").mkdir()
    lines = [line for line in (corpus_dir / "train.txt").read_text().splitlines() if line.strip()]
    (tmp_path / "data" / "train.txt").write_text("\n".join(lines) + "\n")

    def documents(run: str, seed: int) -> tuple[set[str], set[str]]:
        cfg = TrainConfig(data_dir=tmp_path / "data", output_dir=tmp_path / run, preprocessing_workers=1,
                          packing=False, seed=seed, block_size=128, max_eval_tokens=0)
        train, valid, _ = pipeline.prepare(DataOptions.of(cfg), tokenizer, 128)
        eos = tokenizer.eos_token_id

        def decoded(ds):
            ids = np.concatenate([row["input_ids"] for row in ds]).tolist()
            cuts = [i for i, t in enumerate(ids) if t == eos]
            return {tokenizer.decode(ids[a + 1:b]) for a, b in zip([-1, *cuts], cuts, strict=False)}

        return decoded(train), decoded(valid)

    train, valid = documents("a", seed=3)
    again_train, again_valid = documents("b", seed=3)
    _, other_valid = documents("c", seed=4)
    assert (train, valid) == (again_train, again_valid)
    assert not train & valid and len(valid) >= 0.04 * len(lines)
    assert other_valid != valid


def test_capped_rows_are_evenly_spaced_under_the_cap_and_none_when_all_fit():
    lengths = np.full(1000, 64, dtype=np.int64)
    rows = split.capped_rows(lengths, 6400)
    assert rows.tolist() == list(range(0, 1000, 10))
    assert split.capped_rows(lengths, 64_000) is None and split.capped_rows(lengths, 0) is None
    assert split.capped_rows(lengths, 10).tolist() == [0]  # never empty
    ragged = np.array([5, 300, 7, 300, 9, 300] * 50, dtype=np.int64)
    capped = split.capped_rows(ragged, 5000)
    assert ragged[capped].sum() <= 5000 and len(capped) > 1


def test_evaluation_scores_at_most_max_eval_tokens_the_same_rows_every_time(tokenizer, tmp_path, corpus_dir, caplog):
    caplog.set_level(logging.INFO, logger="finetune")
    cfg = TrainConfig(data_dir=corpus_dir, output_dir=tmp_path / "out", preprocessing_workers=1, max_eval_tokens=640)
    _, valid, stats = pipeline.prepare(DataOptions.of(cfg), tokenizer, 32)
    assert len(valid) == 20 < stats.valid_rows and valid.tokens() == 640
    assert "evaluation scores 20 of" in caplog.text and "--max-eval-tokens 640" in caplog.text
    _, again, _ = pipeline.prepare(DataOptions.of(cfg), tokenizer, 32)
    assert [r["input_ids"].tolist() for r in again] == [r["input_ids"].tolist() for r in valid]
    uncapped = TrainConfig(data_dir=corpus_dir, output_dir=tmp_path / "out", max_eval_tokens=0)
    assert len(pipeline.prepare(DataOptions.of(uncapped), tokenizer, 32)[1]) == stats.valid_rows
