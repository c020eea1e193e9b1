"""A smoke of the benchmark harness (bench/compare.py), so it cannot rot: a real tiny model, one optimizer step a
side, the real tutorial recipe and the real `finetune train`, each in its own process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from entrypoint.commands.init_model import init_model
from entrypoint.config.schema import InitModelConfig
from tests.support.helpers import REPO, clean_env


def test_harness_reports_both_sides_and_ours_over_tutorial_ratio(tmp_path, corpus_dir):
    model = tmp_path / "model"  # the recipe pads to 512, so the context must reach it
    init_model(InitModelConfig(output_dir=model, corpus=corpus_dir / "train.txt", vocab_size=512, context=512))
    report_path = tmp_path / "compare.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.compare", "--model", str(model), "--train-file", str(corpus_dir / "train.txt"),
         "--valid-file", str(corpus_dir / "valid.txt"), "--valid-lines", "16", "--max-steps", "1", "--repeats", "1",
         "--workdir", str(tmp_path / "bench"), "--json", str(report_path)],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    report = json.loads(report_path.read_text())
    for side in ("tutorial", "ours"):
        median = report["median"][side]
        assert median["useful_tokens_per_second"] > 0 and median["global_step"] == 1
        assert median["eval_loss"] > 0 and median["wall_seconds"] > 0
    assert report["median"]["tutorial"]["padding_fraction"] > 0.5  # every line padded to 512
    assert report["median"]["ours"]["padding_fraction"] == 0.0  # packed
    # One step's timing is noise on a busy machine; what a step holds is not: 32 x 512 text tokens against the
    # tutorial's few real tokens per padded line.
    assert report["ratio"]["useful_tokens_per_second"] > 0 and report["ratio"]["train_tokens"] > 2
    assert report["config"]["compared_at"] == "equal optimizer steps (1)"
    table = done.stdout
    assert "ours/tutorial" in table and "useful tokens/s" in table and "x" in table.splitlines()[1]


@pytest.mark.slow  # four CLI processes over 6 MB of text: about 30 s on a quiet machine
def test_prepare_scale_reports_tokens_per_second_and_the_process_trees_anonymous_memory(tmp_path, tiny_model):
    report_path = tmp_path / "scale.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.prepare_scale", "--sizes", "6M", "--model", str(tiny_model), "--block-size",
         "64", "--workdir", str(tmp_path / "bench"), "--json", str(report_path)],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads(report_path.read_text())
    assert row["text_bytes"] == 6 << 20 and row["tokens"] > 1_000_000 and row["tokens_per_second"] > 0
    assert row["peak_processes"] == 3  # the CLI and its two tokenizing workers were all sampled
    assert 0 < row["peak_pss_anon_bytes"] <= row["peak_rss_anon_sum_bytes"]
    assert 0 < row["cache_hit_ratio"] < 1
    assert "tokens/s" in done.stdout and "Pss_Anon peak" in done.stdout
