"""Regenerate the tables in docs/ that are facts of the code: each command's options (from the config schema
through the click commands built from it), the exit codes (from entrypoint/errors.py) and which fine-tuning mode
fits which GPU (from the memory plan's estimator, entrypoint/train/memory.py), and the storage fault matrix (from
the cases bench/fault_storage.py runs and tests/e2e/test_faults.py asserts).

    python scripts/gen_docs.py           rewrite the generated regions in place
    python scripts/gen_docs.py --check   exit 1, naming the stale files, when a region differs (make test runs this)

A generated region sits between `<!-- generated: NAME -->` and `<!-- end generated -->`; the text around it is
written by hand.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

REGION = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.DOTALL)


def options_table(command: str, only: type | None = None) -> str:
    """The command's options; with `only` (a config class), just that class's fields (eval's own, beside train's)."""
    import click

    from entrypoint.cli import cli
    from entrypoint.config.options import fields

    rows = ["| option | env var | default | meaning |", "| --- | --- | --- | --- |"]
    for param in cli.commands[command].params:
        if not isinstance(param, click.Option) or param.hidden or param.name == "help":
            continue
        if only is not None and param.name not in fields(only):
            continue
        flag = param.opts[0] + (f" / {param.secondary_opts[0]}" if param.secondary_opts else "")
        shown = param.show_default and param.default not in (None, ())
        default = f"`{param.default}`" if shown else ""
        meaning = (param.help or "").replace("|", "\\|")
        rows.append(f"| `{flag}` | `{param.envvar}` | {default} | {meaning} |")
    return "\n".join(rows) + "\n"


def exit_codes_table() -> str:
    from entrypoint.errors import DESCRIPTIONS, PERMANENT, ExitCode

    rows = ["| code | name | meaning | what a Kubernetes Job does |", "| --- | --- | --- | --- |"]
    for code in ExitCode:
        if code == ExitCode.OK:
            effect = "succeeds"
        elif code in PERMANENT:
            effect = "fails the Job at once"
        else:
            effect = "retried (counts against backoffLimit)"
        rows.append(f"| {code.value} | `{code.name}` | {DESCRIPTIONS[code]} | {effect} |")
    return "\n".join(rows) + "\n"


def which_mode_fits() -> str:
    from entrypoint.train.memory import which_mode_fits

    return which_mode_fits()


def storage_faults() -> str:
    from bench.fault_storage import matrix

    return matrix() + "\n"


def generators() -> dict:
    from entrypoint.config.schema import EvalConfig

    tables = {f"options-{c}": (lambda c=c: options_table(c)) for c in ("train", "generate", "init-model", "corpus")}
    tables["options-eval"] = lambda: options_table("eval", EvalConfig)
    return {**tables, "exit-codes": exit_codes_table, "which-mode-fits": which_mode_fits,
            "storage-faults": storage_faults}


def render(text: str) -> str:
    known = generators()

    def replace(match: re.Match) -> str:
        name = match.group("name")
        if name not in known:
            raise SystemExit(f"unknown generated region {name!r}; known: {', '.join(known)}")
        return match.group(1) + known[name]() + match.group(4)

    return REGION.sub(replace, text)


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for path in sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")]):
        text = path.read_text()
        fresh = render(text)
        if fresh != text:
            stale.append(path.relative_to(REPO))
            if not check:
                path.write_text(fresh)
    if check and stale:
        print(f"stale generated tables in {', '.join(map(str, stale))}; run: make docs", file=sys.stderr)
        return 1
    if not check:
        print(f"updated {', '.join(map(str, stale))}" if stale else "docs are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
