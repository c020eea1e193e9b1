"""The command line as a contract: --help documents every option, docs/configuration.md agrees with --help."""

from __future__ import annotations

import re

import click
import pytest

from entrypoint.cli import cli
from tests.support.helpers import REPO, finetune

COMMANDS = sorted(cli.commands)


def options(command: str) -> list[click.Option]:
    return [p for p in cli.commands[command].params if isinstance(p, click.Option) and not p.hidden
            and p.name != "help"]


def test_the_contracted_subcommands_exist():
    assert {"train", "prepare", "doctor", "generate", "init-model", "config"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_every_options_env_var_and_default(command):
    result = finetune(command, "--help")
    assert result.returncode == 0
    text = re.sub(r"(?<=[a-z])- (?=[a-z])", "-", " ".join(result.stdout.split()))  # undo click's line wrapping
    for option in options(command):
        expected = "FINETUNE_" + option.name.upper()
        assert option.envvar == expected, f"{option.opts[0]} has env var {option.envvar}, want {expected}"
        assert f"env var: {expected}" in text, f"{command} --help does not show {expected}"
        if option.show_default and option.default not in (None, ()):
            shown = str(option.default)
            if option.is_bool_flag and option.secondary_opts:  # click names the default side of --x/--no-x
                shown = (option.opts[0] if option.default else option.secondary_opts[0]).lstrip("-")
            assert re.search(rf"env var: {expected}; default: {re.escape(shown)}[;\]]", text), \
                f"{command} --help does not show the default of {option.opts[0]}"


def test_configuration_docs_options_table_matches_train_help():
    readme = (REPO / "docs" / "configuration.md").read_text()
    readme = readme.split("## `finetune train` options", 1)[1].split("\n## ", 1)[0]
    rows = {m.group(2): m.group(0) for m in re.finditer(r"^\| `(--[^`]+)` \| `(FINETUNE_\w+)` \| ([^|]*) \|", readme,
                                                         re.MULTILINE)}
    for option in options("train"):
        env = option.envvar
        if env == "FINETUNE_PRESET":
            continue
        assert env in rows, f"docs/configuration.md options table lacks {env}"
        row = rows[env]
        assert f"`{option.opts[0]}`" in row or f"`{option.opts[0]} /" in row, row
        if option.show_default and option.default not in (None, ()):
            assert f"`{option.default}`" in row, f"docs/configuration.md default for {env} differs from --help: {row}"
    documented = set(rows) - {"FINETUNE_PRESET"}
    assert documented == {o.envvar for o in options("train")} - {"FINETUNE_PRESET"}, \
        "docs/configuration.md documents removed options"


def test_version_and_top_level_help_list_exit_codes():
    result = finetune("--help")
    assert "Exit codes:" in result.stdout and "7  stopped by a signal" in result.stdout
    assert finetune("--version").returncode == 0


def test_python_dash_m_and_the_console_script_are_the_same_program():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "finetune"  # pip puts console scripts beside the interpreter
    assert script.is_file(), f"{script} missing: install the package (make install)"
    via_script = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert via_script.stdout == finetune("--help").stdout


def test_a_misspelt_finetune_variable_is_refused_with_a_suggestion(tmp_path):
    from tests.support.helpers import clean_env

    result = finetune("config", env=clean_env(FINETUNE_LEARNIN_RATE="0.1", FINETUNE_OUTPUT_DIR=str(tmp_path)))
    assert result.returncode == 2
    assert "error: environment variable FINETUNE_LEARNIN_RATE is not a finetune setting; did you mean " \
           "FINETUNE_LEARNING_RATE?" in result.stderr
    assert not (tmp_path / "status.json").exists()


def test_every_variable_of_any_command_and_the_documented_settings_are_accepted():
    from tests.support.helpers import clean_env

    names = {p.envvar for c in cli.commands.values() for p in c.params if isinstance(p.envvar, str)}
    assert {"FINETUNE_MAX_DOCUMENTS", "FINETUNE_PROMPT", "FINETUNE_VOCAB_SIZE", "FINETUNE_PRESET"} <= names
    env = clean_env(**dict.fromkeys(names - {"FINETUNE_PRESET"}, ""), FINETUNE_PRESET_DIR=str(REPO / "config"))
    result = finetune("config", "--model", "gpt2", env=env)
    assert "not a finetune setting" not in result.stderr, result.stderr


def test_train_reports_a_missing_data_directory_before_importing_torch_or_transformers(tmp_path):
    """The exit code a missing data directory gets, decided before any heavy import (seconds on a busy machine)."""
    import subprocess
    import sys

    from entrypoint.errors import ExitCode
    from tests.support.helpers import clean_env

    args = ["train", "--model", str(tmp_path / "model"), "--data-dir", str(tmp_path / "missing"),
            "--output-dir", str(tmp_path / "out")]
    code = ("import sys\nfrom entrypoint.cli import cli\n"
            f"try:\n    cli({args!r}, prog_name='finetune')\n"
            "except SystemExit as exc:\n"
            "    print(exc.code, sorted({'torch', 'transformers', 'datasets'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.split(maxsplit=1) == [str(int(ExitCode.DATA)), "[]\n"], result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "does not exist" in errors[0], result.stderr
