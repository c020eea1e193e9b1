"""The fault matrix: each way a run can be cut short, misconfigured or doubled, done for real to `finetune train`
on a tiny model, in subprocesses, with real signals, files and mounts. One table shows what each did: exit codes
(the fault's run, then a rerun where there is one), whether a model was published, the checkpoint the rerun
resumed from, and the final step and eval loss against an uninterrupted reference run.

    python -m bench.faults [--workdir DIR] [--only NAME ...]      (make faults)

tests/e2e/test_faults.py runs the same registry, CASES, and asserts each case's expected outcome. A case is a small
function in bench/fault_cases.py registered with @fault: it gets a Lab (bench/fault_lab.py: paths, the reference
run, helpers) and returns an Outcome.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

# Importing the case modules registers every case, in table order.
from bench import fault_cases, fault_remote, fault_s3data, fault_storage  # noqa: F401
from bench.fault_lab import CASES, Case, Lab, Outcome, Skip
from tests.support.helpers import clean_env

__all__ = ["CASES", "Case", "Lab", "Outcome", "Skip", "main", "run_case", "verdict"]


def run_case(lab: Lab, case: Case) -> tuple[Outcome | None, str]:
    """The outcome and a verdict: ok, SKIP (why) or FAIL (why)."""
    try:
        outcome = case.run(lab)
    except Skip as exc:
        return None, f"SKIP: {exc}"
    except AssertionError as exc:
        return None, f"FAIL: {str(exc).splitlines()[0]}"
    finally:
        lab.unmount_all()
    return outcome, verdict(lab, case, outcome)


def verdict(lab: Lab, case: Case, outcome: Outcome) -> str:
    problems = []
    if tuple(outcome.codes) != case.codes:
        problems.append(f"exit codes {outcome.codes}, expected {list(case.codes)}")
    if outcome.published != case.published:
        problems.append("published" if outcome.published else "not published")
    if case.exact:
        ref = lab.reference
        if outcome.final_step != ref["global_step"] or outcome.eval_loss is None \
                or abs(outcome.eval_loss - ref["eval_loss"]) > 1e-4:
            problems.append(f"step {outcome.final_step} / eval loss {outcome.eval_loss} differ from the reference "
                            f"{ref['global_step']} / {ref['eval_loss']:.4f}")
    return "FAIL: " + "; ".join(problems) if problems else "ok"


def table(lab: Lab, results: list[tuple[Case, Outcome | None, str]]) -> str:
    ref = lab.reference
    rows = [("fault", "exit codes", "published", "resumed from", "final step", "eval loss vs reference", "verdict",
             "note")]
    for case, out, result in results:
        if out is None:
            rows.append((case.name, "", "", "", "", "", result, ""))
            continue
        loss = f"{out.eval_loss:.4f} vs {ref['eval_loss']:.4f}" if out.eval_loss is not None else "-"
        rows.append((case.name, " then ".join(_code(c) for c in out.codes), "yes" if out.published else "no",
                     out.resumed_from or "-", str(out.final_step or "-"), loss, result, out.note))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def _code(code: int) -> str:
    return signal.Signals(-code).name if code < 0 else str(code)


def prepare_lab(root: Path) -> Lab:
    """A corpus and a tiny model under `root` (made once), as tests/conftest.py makes them."""
    from entrypoint.commands.init_model import init_model
    from entrypoint.config.schema import InitModelConfig
    from entrypoint.data.corpus import build

    data, model = root / "corpus", root / "tiny-gpt2"
    if not (data / "train.txt").is_file():
        build(data, max_documents=3000)
    if not (model / "config.json").is_file():
        init_model(InitModelConfig(output_dir=model, corpus=data / "train.txt", vocab_size=512, context=128))
    return Lab(root, model, data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="kept between runs [default: a temporary one]")
    parser.add_argument("--only", nargs="*", default=None, help="run only the cases whose name contains one of these")
    args = parser.parse_args(argv)
    os.environ.update({k: v for k, v in clean_env().items() if k in ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")})
    with contextlib.ExitStack() as stack:
        root = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="faults-")))
        root.mkdir(parents=True, exist_ok=True)
        lab = prepare_lab(root)
        stack.callback(lab.close)
        chosen = [c for c in CASES.values() if not args.only or any(s.lower() in c.name.lower() for s in args.only)]
        results = []
        for case in chosen:
            start = time.monotonic()
            outcome, result = run_case(lab, case)
            print(f"{case.name}: {result} ({time.monotonic() - start:.0f} s)", file=sys.stderr, flush=True)
            results.append((case, outcome, result))
        print(table(lab, results))
        if any(case.name.startswith("storage: ") for case, _, _ in results):
            print("\nStorage faults (site x fault):\n" + fault_storage.observed(results))
    return 0 if all(not r.startswith("FAIL") for _, _, r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
