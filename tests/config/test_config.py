"""The configuration schema, presets, precedence and platform contracts, through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from entrypoint.config import options
from entrypoint.config.options import PRESET_DIR
from entrypoint.config.schema import TrainConfig
from entrypoint.errors import ConfigError, ExitCode
from tests.support.helpers import clean_env, finetune


def resolved(*args: str, **env: str) -> dict[str, tuple[str, str]]:
    """`finetune config` output as {name: (value, source)}."""
    result = finetune("config", *args, env=clean_env(**env))
    assert result.returncode == 0, result.stderr
    values = {}
    for line in result.stdout.splitlines():
        if line.startswith("#"):
            continue
        name, rest = line.split(": ", 1)
        value, source = rest.rsplit("  # ", 1)
        values[name] = (value, source)
    return values


def test_precedence_is_flag_then_env_then_preset_then_default():
    out = resolved("--preset", "seed", "--learning-rate", "0.5",
                   FINETUNE_LEARNING_RATE="0.25", FINETUNE_BATCH_SIZE="3")
    assert out["learning_rate"] == ("0.5", "flag --learning-rate")
    assert out["batch_size"] == ("3", "env FINETUNE_BATCH_SIZE")
    assert out["grad_accum"] == ("8", "preset seed")
    assert out["seed"] == ("42", "default")


def test_env_beats_preset_and_preset_can_come_from_env():
    out = resolved(FINETUNE_PRESET="seed", FINETUNE_BLOCK_SIZE="256")
    assert out["block_size"] == ("256", "env FINETUNE_BLOCK_SIZE")
    assert out["learning_rate"] == ("2e-05", "preset seed")


def test_boolean_and_multiple_options_from_env():
    out = resolved(FINETUNE_PACKING="false", FINETUNE_TRAIN_FILE="a.txt more/*.jsonl")
    assert out["packing"][0] == "False"
    assert out["train_file"][0] == "['a.txt', 'more/*.jsonl']"


def test_secrets_are_redacted_in_printed_config():
    out = resolved(FINETUNE_HUB_TOKEN="hf_secret_value")
    assert out["hub_token"][0] == "***"


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
def test_every_shipped_preset_loads_and_passes_checks(preset):
    overrides = options.load_preset(preset)
    assert overrides, f"preset {preset} overrides nothing"
    cfg = TrainConfig(**overrides)
    assert options.check_values(cfg) == []
    header = (PRESET_DIR / f"{preset}.yaml").read_text().splitlines()[:2]
    assert header[0].startswith("# ") and "Run:" in "\n".join(header), f"{preset}.yaml needs a purpose/run header"


def test_required_presets_ship():
    assert {"gpt2", "distilgpt2", "gpt2-medium", "smoke", "seed"} <= {p.stem for p in PRESET_DIR.glob("*.yaml")}


def test_preset_with_unknown_key_is_a_usage_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 0.1\n")
    result = finetune("config", "--preset", str(bad))
    assert result.returncode == ExitCode.USAGE
    assert "unknown key(s) learning_rat" in result.stderr


def test_preset_with_wrong_type_names_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_size: lots\n")
    with pytest.raises(ConfigError, match="batch_size = 'lots' is not a valid int"):
        options.load_preset(str(bad))


def test_missing_preset_lists_the_shipped_ones():
    result = finetune("config", "--preset", "nope")
    assert result.returncode == ExitCode.USAGE
    assert "preset 'nope' not found" in result.stderr and "gpt2" in result.stderr


def test_sagemaker_contract_sets_paths_and_hyperparameters():
    out = resolved(SM_CHANNEL_TRAIN="/opt/ml/input/data/train", SM_CHANNEL_VALIDATION="/opt/ml/input/data/val",
                   SM_MODEL_DIR="/opt/ml/model", SM_HPS=json.dumps({"learning-rate": 0.001, "epochs": 2}))
    assert out["data_dir"] == ("/opt/ml/input/data/train", "sagemaker")
    assert out["valid_file"] == ("['/opt/ml/input/data/val']", "sagemaker")
    assert out["output_dir"] == ("/opt/ml/model", "sagemaker")
    assert out["checkpoint_dir"] == ("/opt/ml/checkpoints", "sagemaker")
    assert out["learning_rate"] == ("0.001", "sagemaker")
    assert out["epochs"] == ("2.0", "sagemaker")


def test_finetune_env_beats_the_platform_contract():
    out = resolved(SM_MODEL_DIR="/opt/ml/model", FINETUNE_OUTPUT_DIR="/elsewhere")
    assert out["output_dir"] == ("/elsewhere", "env FINETUNE_OUTPUT_DIR")


def test_vertex_contract_maps_gcs_uris_to_the_fuse_mount():
    result = finetune("config", env=clean_env(AIP_MODEL_DIR="gs://bucket/run/model",
                                              AIP_CHECKPOINT_DIR="gs://bucket/run/ckpt",
                                              AIP_TENSORBOARD_LOG_DIR="gs://bucket/run/tb"))
    assert "# platform contract applied: vertex" in result.stdout
    assert "output_dir: /gcs/bucket/run/model  # vertex" in result.stdout
    assert "checkpoint_dir: /gcs/bucket/run/ckpt  # vertex" in result.stdout
    assert "tensorboard_dir: /gcs/bucket/run/tb  # vertex" in result.stdout


def test_unknown_sagemaker_hyperparameter_is_a_usage_error():
    result = finetune("config", env=clean_env(SM_MODEL_DIR="/opt/ml/model", SM_HPS='{"wibble": 1}'))
    assert result.returncode == ExitCode.USAGE
    assert "'wibble' is not an option" in result.stderr


def test_check_values_collects_every_problem():
    cfg = TrainConfig(nproc_per_node="two", report_to="tensorboard,nonsense", early_stopping_patience=2,
                      eval_steps=30, save_steps=50)
    problems = options.check_values(cfg)
    assert len(problems) == 3
    assert any("--nproc-per-node" in p for p in problems)
    assert any("nonsense" in p for p in problems)
    assert any("multiple of --eval-steps" in p for p in problems)


def test_config_yaml_keys_round_trip_through_the_schema(tmp_path):
    """What `config.yaml` publishes can be fed back as a preset."""
    cfg = TrainConfig(learning_rate=1e-4, train_file=("a.txt",), data_dir=Path("/d"))
    preset = tmp_path / "again.yaml"
    preset.write_text(yaml.safe_dump(options.as_dict(cfg)))
    assert TrainConfig(**options.load_preset(str(preset))) == cfg
