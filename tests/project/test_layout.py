"""The package's import order, read from the source with `ast`: imports run from the CLI down to the root, never
in a cycle, and only the CLI imports our own modules inside a function (elsewhere that hides a cycle or a heavy
import behind a call)."""

from __future__ import annotations

import ast
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

from tests.support.helpers import REPO

PACKAGE = REPO / "entrypoint"
# From top to bottom; a module imports only from its own package or a lower one. "root" is errors, logs, fsutil.
ORDER = ["cli", "commands", "train", "data", "publish", "runtime", "config", "root"]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def level(module: str) -> str:
    """The package a module belongs to: entrypoint.data.formats -> data; entrypoint.logs -> root."""
    parts = module.split(".")
    if len(parts) == 1 or module == "entrypoint.__main__":
        return "cli" if len(parts) > 1 else "root"
    return parts[1] if parts[1] in ORDER else "root"


def targets(node: ast.Import | ast.ImportFrom) -> list[str]:
    """Our modules an import statement loads: `from entrypoint.data import formats` is entrypoint.data.formats."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "entrypoint"]
    if node.level or not node.module or node.module.split(".")[0] != "entrypoint":
        return []
    found = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES]
    return found or [node.module]


def imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, our module, inside a function) for every import of ours in the file."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend((child.lineno, target, in_function) for target in targets(child))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(REPO)}:{line}"


def test_every_import_runs_down_the_order():
    wrong = []
    for module, path in MODULES.items():
        for line, target, _ in imports(path):
            mine, theirs = level(module), level(target)
            if ORDER.index(theirs) < ORDER.index(mine):
                wrong.append(f"{where(module, line)} imports {target}: {mine} may not import from {theirs} "
                             f"(order: {' > '.join(ORDER)})")
    assert not wrong, "\n".join(wrong)


def test_only_the_cli_imports_our_modules_inside_a_function():
    hidden = [f"{where(module, line)} imports {target} inside a function; import it at the top (make the module "
              "light at import if that is why it was hidden)"
              for module, path in MODULES.items() if level(module) != "cli"
              for line, target, in_function in imports(path) if in_function]
    assert not hidden, "\n".join(hidden)


def test_no_module_imports_itself_back():
    graph = {m: {t: line for line, t, in_function in imports(p) if not in_function and t in MODULES and t != m}
             for m, p in MODULES.items()}
    cycles, done = [], set()

    def walk(module: str, trail: list[str]) -> None:
        if module in trail:
            cycle = trail[trail.index(module):] + [module]
            steps = [f"{a} ({where(a, graph[a][b])})" for a, b in pairwise(cycle)]
            cycles.append(" -> ".join([*steps, module]))
            return
        if module in done:
            return
        for target in graph[module]:
            walk(target, [*trail, module])
        done.add(module)

    for module in graph:
        walk(module, [])
    assert not cycles, "\n".join(cycles)


def test_the_layout_test_sees_the_package():
    assert {"entrypoint.logs", "entrypoint.cli.commands", "entrypoint.data.formats"} <= set(MODULES)
    assert level("entrypoint.logs") == "root" and level("entrypoint.data.formats") == "data"
    assert level("entrypoint.__main__") == "cli"


# Modules that format, parse or check, and the CLI itself: usage errors and cheap checks must not wait for torch.
LIGHT = ["entrypoint.cli", "entrypoint.train.checkpoints", "entrypoint.train.preflight", "entrypoint.publish.export",
         "entrypoint.data.formats", "entrypoint.data.sources", "entrypoint.logs"]


def test_modules_that_only_format_parse_or_check_import_neither_torch_nor_transformers():
    code = ("import sys\n"
            f"for name in {LIGHT!r}:\n"
            "    __import__(name)\n"
            "print(sorted({'torch', 'transformers', 'datasets'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"importing {LIGHT} also imported {result.stdout.strip()}"


# Tests mirror the package: entrypoint/data/pipeline.py is tested in tests/data/test_pipeline.py. A module whose
# behaviour is proven through another one's tests is listed here with where, so a reader finds them.
TESTED_THROUGH = {
    "cli/commands.py": ["e2e/test_cli.py", "commands/test_commands.py"],
    "cli/params.py": ["e2e/test_cli.py", "config/test_config.py"],
    "cli/running.py": ["e2e/test_cli.py", "test_errors.py", "e2e/test_stop_together.py"],
    "commands/generate.py": ["commands/test_commands.py", "data/test_formats.py"],
    "commands/init_model.py": ["commands/test_commands.py"],
    "commands/train.py": ["e2e/test_cli.py", "runtime/test_launch.py"],
    "config/options.py": ["config/test_config.py"],
    "config/schema.py": ["config/test_config.py", "project/test_docs.py"],
    "config/destinations.py": ["publish/test_export.py", "commands/test_commands.py"],
    "data/cache.py": ["data/test_pipeline.py", "data/test_shards.py"],
    "data/collate.py": ["data/test_pipeline.py", "data/test_records.py", "train/test_attention.py"],
    "data/corpus.py": ["commands/test_commands.py", "data/test_sftcorpus.py"],
    "data/tokendataset.py": ["data/test_shards.py"],
    "train/preflight.py": ["commands/test_commands.py", "runtime/test_toolchain.py", "train/test_plan.py"],
    "train/progress.py": ["train/test_job.py", "train/test_preemption.py"],
    "train/trainer.py": ["train/test_preemption.py", "train/test_steps.py"],
}


def test_every_module_has_its_test_file_or_says_where_it_is_tested():
    tests = REPO / "tests"
    missing, stale = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name.startswith("__"):
            continue
        relative = path.relative_to(PACKAGE)
        own = tests / relative.parent / f"test_{path.name}"
        elsewhere = TESTED_THROUGH.get(relative.as_posix())
        if own.is_file() and elsewhere:
            stale.append(f"{relative} has {own.relative_to(REPO)}: drop it from TESTED_THROUGH")
        elif not own.is_file() and not elsewhere:
            missing.append(f"{relative}: add {own.relative_to(REPO)}")
        for where in elsewhere or []:
            if not (tests / where).is_file():
                stale.append(f"{relative}: tests/{where} does not exist")
    unknown = sorted(set(TESTED_THROUGH) - {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")})
    assert not missing and not stale and not unknown, "\n".join(missing + stale + unknown)
