"""DataOptions: everything data/ reads from the configuration, and data/ never importing the schema."""

from __future__ import annotations

import ast
import dataclasses

import pytest

from entrypoint.config.schema import TrainConfig
from entrypoint.data.options import DataOptions
from tests.support.helpers import REPO

SCHEMA = "entrypoint.config.schema"


def test_data_options_carry_the_configurations_values_and_the_plans_decisions(tmp_path):
    cfg = TrainConfig(data_dir=tmp_path / "data", output_dir=tmp_path / "out", train_file=("a.jsonl",),
                      packing=False, seed=7, preprocessing_workers=0)
    opts = DataOptions.of(cfg)
    assert opts.data_dir == tmp_path / "data" and opts.train_file == ("a.jsonl",) and not opts.packing
    assert opts.seed == 7 and opts.data_cache_dir == tmp_path / "out" / "cache"  # the default --cache-dir
    assert DataOptions.of(cfg, preprocessing_workers=3).preprocessing_workers == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.seed = 8


def imported(source: str) -> list[tuple[int, str]]:
    """(line, module) for every import in `source`; `from a import b` counts as both a and a.b."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def test_no_data_module_imports_the_configuration_schema():
    assert (2, "entrypoint.config.schema") in imported("import os\nfrom entrypoint.config import schema\n")
    offenders = sorted({f"{path.relative_to(REPO)}:{line} imports {module}"
                 for path in sorted((REPO / "entrypoint" / "data").rglob("*.py"))
                 for line, module in imported(path.read_text())
                        if module == SCHEMA or module.startswith(SCHEMA + ".")})
    assert not offenders, "data/ takes DataOptions, not TrainConfig:\n" + "\n".join(offenders)
