"""The `finetune` command line: commands.py (the commands), params.py (click options generated from
the config schema, and resolving them), running.py (errors to exit codes, logging set-up)."""

from entrypoint.cli.commands import cli, main
from entrypoint.cli.params import resolve

__all__ = ["cli", "main", "resolve"]
