"""Bad input of every kind: a one-line error naming the fix, the documented exit code, nothing published."""

from __future__ import annotations

import errno
import gzip
import json
import shutil
import threading
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from entrypoint.cli.running import handled
from entrypoint.errors import ExitCode, storage_errno
from tests.support.helpers import FAST_TRAIN, clean_env, finetune


def no_data(data: Path, model: Path) -> list[str]:
    shutil.rmtree(data)
    return []


def empty_dir(data: Path, model: Path) -> list[str]:
    for path in data.iterdir():
        path.unlink()
    return []


def not_utf8(data: Path, model: Path) -> list[str]:
    (data / "train.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 50)
    return []


def empty_file(data: Path, model: Path) -> list[str]:
    (data / "train.txt").write_text("")
    return []


def jsonl_without_field(data: Path, model: Path) -> list[str]:
    (data / "train.txt").unlink()
    (data / "train.jsonl").write_text("".join(json.dumps({"body": f"document {i}"}) + "\n" for i in range(50)))
    return []


def glob_matches_nothing(data: Path, model: Path) -> list[str]:
    return ["--train-file", "nothing-*.txt"]


def unsupported_type(data: Path, model: Path) -> list[str]:
    (data / "notes.docx").write_bytes(b"PK\x03\x04")
    return ["--train-file", "notes.docx"]


def corrupt_gzip(data: Path, model: Path) -> list[str]:
    packed = gzip.compress((data / "train.txt").read_bytes())
    (data / "train.txt").unlink()
    (data / "train.txt.gz").write_bytes(packed[: len(packed) // 2])
    return []


def too_little_text(data: Path, model: Path) -> list[str]:
    (data / "train.txt").write_text("tiny\nfile\n")
    (data / "valid.txt").write_text("tiny\n")
    return []


def model_dir_without_config(data: Path, model: Path) -> list[str]:
    (model / "config.json").unlink()
    return []


def corrupt_weights(data: Path, model: Path) -> list[str]:
    (model / "model.safetensors").write_bytes(b"not a safetensors file")
    return []


def offline_hub_model(data: Path, model: Path) -> list[str]:
    return ["--model", "no-such-org/no-such-model"]


def block_beyond_positions(data: Path, model: Path) -> list[str]:
    return ["--block-size", "4096"]


def fp16_on_cpu(data: Path, model: Path) -> list[str]:
    return ["--precision", "fp16"]


def zero_batch(data: Path, model: Path) -> list[str]:
    return ["--batch-size", "0"]


def non_numeric_lr(data: Path, model: Path) -> list[str]:
    return ["--learning-rate", "fast"]


def bad_nproc(data: Path, model: Path) -> list[str]:
    return ["--nproc-per-node", "two"]


def missing_preset(data: Path, model: Path) -> list[str]:
    return ["--preset", "no-such-preset"]


def save_not_multiple_of_eval(data: Path, model: Path) -> list[str]:
    return ["--early-stopping-patience", "2", "--eval-steps", "3", "--save-steps", "8"]


def output_under_a_file(data: Path, model: Path) -> list[str]:
    (data.parent / "a-file").write_text("x")
    return ["--output-dir", str(data.parent / "a-file" / "out")]


def huge_validation_split(data: Path, model: Path) -> list[str]:
    return ["--validation-split", "90"]


CASES = [
    (no_data, ExitCode.DATA, "does not exist"),
    (empty_dir, ExitCode.DATA, "no training data"),
    (not_utf8, ExitCode.DATA, "not valid UTF-8"),
    (empty_file, ExitCode.DATA, "is empty"),
    (jsonl_without_field, ExitCode.DATA, "no field 'text'"),
    (glob_matches_nothing, ExitCode.DATA, "matches nothing"),
    (unsupported_type, ExitCode.DATA, "unsupported type"),
    (corrupt_gzip, ExitCode.DATA, "gzip"),
    (too_little_text, ExitCode.DATA, "fewer than --block-size"),
    (model_dir_without_config, ExitCode.MODEL, "not a model directory"),
    (corrupt_weights, ExitCode.MODEL, "cannot load model weights"),
    (offline_hub_model, ExitCode.MODEL, "HF_HUB_OFFLINE=1"),
    (block_beyond_positions, ExitCode.USAGE, "exceeds the model's 128 positions"),
    (fp16_on_cpu, ExitCode.USAGE, "needs a CUDA GPU"),
    (zero_batch, ExitCode.USAGE, "--batch-size"),
    (non_numeric_lr, ExitCode.USAGE, "--learning-rate"),
    (bad_nproc, ExitCode.USAGE, "--nproc-per-node"),
    (missing_preset, ExitCode.USAGE, "not found"),
    (save_not_multiple_of_eval, ExitCode.USAGE, "multiple of --eval-steps"),
    (output_under_a_file, ExitCode.OUTPUT, "not writable"),
    (huge_validation_split, ExitCode.USAGE, "--validation-split"),
]


@pytest.mark.parametrize(("breaks", "code", "says"), CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_input_fails_cleanly(tmp_path, data_dir, tiny_model, breaks, code, says):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    out = tmp_path / "out"
    args = breaks(data_dir, model)
    env = clean_env(**{**FAST_TRAIN, "FINETUNE_MODEL": str(model), "FINETUNE_DATA_DIR": str(data_dir),
                       "FINETUNE_OUTPUT_DIR": str(out)})
    result = finetune("train", *args, env=env)
    assert result.returncode == code, result.stderr[-2000:]
    assert says in result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith(("error:", "Error:"))]
    assert errors, result.stderr
    assert not (out / "model").exists()
    if (out / "status.json").exists():
        status = json.loads((out / "status.json").read_text())
        assert (status["state"], status["exit_code"]) == ("failed", code)


def test_every_problem_is_reported_at_once(tmp_path, data_dir, tiny_model):
    """The checks that need neither torch nor transformers (options, data, output directories) report together,
    before anything heavy is imported; once they pass, the rest (device, model, block size) report together."""
    env = clean_env(FINETUNE_MODEL=str(tiny_model), FINETUNE_OUTPUT_DIR=str(tmp_path / "out"),
                    FINETUNE_BLOCK_SIZE="4096", FINETUNE_PRECISION="fp16")
    cheap = {"FINETUNE_DATA_DIR": str(tmp_path / "missing"), "FINETUNE_NPROC_PER_NODE": "many"}
    for extra, says in ((cheap, ["--nproc-per-node", "does not exist"]),
                        ({"FINETUNE_DATA_DIR": str(data_dir)}, ["needs a CUDA GPU", "exceeds the model's"])):
        result = finetune("train", env={**env, **extra})
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == len(says) and all(any(s in e for e in errors) for s in says), result.stderr
        assert result.returncode == ExitCode.USAGE  # the most fundamental problem decides the code


def test_exit_code_table_in_the_docs_matches_the_code():
    from entrypoint.errors import DESCRIPTIONS

    readme = (Path(__file__).resolve().parent.parent / "docs" / "reliability.md").read_text()
    for code, description in DESCRIPTIONS.items():
        assert f"| {int(code)} | `{code.name}` | {description} |" in readme, \
            f"docs/reliability.md lacks exit code {int(code)}"


@pytest.mark.parametrize("where", ["preset", "vertex"])
def test_a_failure_writes_status_into_the_output_dir_the_configuration_resolved(tmp_path, tiny_model, where):
    out = tmp_path / "resolved-out"
    env = clean_env(FINETUNE_MODEL=str(tiny_model), FINETUNE_DATA_DIR=str(tmp_path / "missing"))
    args = []
    if where == "preset":
        (tmp_path / "preset.yaml").write_text(f"output_dir: {out}\n")
        args = ["--preset", str(tmp_path / "preset.yaml")]
    else:
        env.update(AIP_MODEL_DIR=str(out), AIP_CHECKPOINT_DIR=str(tmp_path / "ckpt"))
    result = finetune("train", *args, env=env)
    assert result.returncode == ExitCode.DATA, result.stderr[-2000:]
    status = json.loads((out / "status.json").read_text())
    assert (status["state"], status["exit_code"]) == ("failed", ExitCode.DATA)
    assert "does not exist" in status["message"]


# Storage faults, recognised by the errno an exception carries, whatever its class.

def _raised(make):
    try:
        make()
    except Exception as exc:
        return exc
    raise AssertionError("nothing was raised")


def _wrapped(inner: BaseException, outer: type[Exception] = RuntimeError, chained: bool = True):
    def make():
        try:
            raise inner
        except BaseException as exc:
            if chained:
                raise outer("saving failed") from exc
            raise outer("saving failed") from None

    return _raised(make)


@pytest.mark.parametrize(("exc", "code"), [
    (OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC),
    (OSError(errno.EROFS, "Read-only file system"), errno.EROFS),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), errno.EDQUOT),
    (OSError(errno.EIO, "Input/output error"), errno.EIO),
    # safetensors and tokenizers (Rust): the errno only as text, the class their own
    (Exception("Error while serializing: I/O error: No space left on device (os error 28)"), errno.ENOSPC),
    (Exception("Read-only file system (os error 30)"), errno.EROFS),
    # pyarrow's wording, and a wrapper that kept only the system's words
    (OSError("Error writing bytes to file. Detail: [errno 28] No space left on device"), errno.ENOSPC),
    (ValueError("write failed: Input/output error"), errno.EIO),
    # fsspec, PIL, TensorBoard: the OSError as the cause, or as the context of an error raised while handling it
    (_wrapped(OSError(errno.ENOSPC, "No space left on device")), errno.ENOSPC),
    (_wrapped(OSError(errno.EROFS, "Read-only file system"), ValueError), errno.EROFS),
], ids=["enospc", "erofs", "edquot", "eio", "rust-enospc", "rust-erofs", "pyarrow", "words-only", "cause",
        "context"])
def test_a_storage_fault_is_recognised_by_its_errno_whatever_the_exception_class(exc, code):
    assert storage_errno(exc) == code


@pytest.mark.parametrize("exc", [
    OSError(errno.ENOENT, "No such file or directory"), OSError(errno.EACCES, "Permission denied"),
    KeyError("model.safetensors"), RuntimeError("shape mismatch (os error 2)"), ValueError("errno 13"),
    _wrapped(OSError(errno.ENOSPC, "No space left on device"), chained=False),
])
def test_anything_else_is_not_a_storage_fault(exc):
    assert storage_errno(exc) is None


def _command_raising(exc: BaseException) -> click.Group:
    """A CLI of one command whose body raises `exc`, run through the same `handled` as every finetune command."""
    group = click.Group("finetune")

    @group.command("write")
    @handled()
    def write():
        raise exc

    return group


@pytest.mark.parametrize(("exc", "says"), [
    (OSError(errno.ENOSPC, "No space left on device", "/out/.metrics.json.tmp-host-1"),
     "error: cannot write metrics.json to /out (No space left on device"),
    (Exception("Error while serializing: I/O error: Read-only file system (os error 30)"),
     "error: cannot write a file to the output, checkpoint or cache volume (Read-only file system); mount it"),
])
def test_a_storage_fault_no_site_maps_itself_still_exits_4_with_one_line(exc, says):
    result = CliRunner().invoke(_command_raising(exc), ["write"])
    assert result.exit_code == ExitCode.OUTPUT, result.output
    assert [line for line in result.output.splitlines() if line.startswith("error:")] == [result.output.strip()]
    assert result.output.startswith(says) and "Traceback" not in result.output


def test_an_exception_without_a_storage_errno_stays_a_bug_with_its_traceback():
    result = CliRunner().invoke(_command_raising(KeyError("model.safetensors")), ["write"])
    assert result.exit_code == ExitCode.INTERNAL
    assert "Traceback" in result.output and "internal error (a bug" in result.output


@pytest.mark.parametrize(("exc", "storage"), [(OSError(errno.ENOSPC, "No space left on device"), True),
                                              (ValueError("a bug in a thread"), False)])
def test_a_writer_thread_meeting_a_full_volume_warns_in_one_line_and_a_bug_keeps_its_traceback(exc, storage):
    """TensorBoard's event writer raises a full volume's OSError in its own thread (and again at the command's next
    write, which the command reports): the thread's report is one warning, not a traceback."""
    def write():
        raise exc

    group = click.Group("finetune")

    @group.command("write")
    @handled()
    def command():
        thread = threading.Thread(target=write, name="EventFileWriter")
        thread.start()
        thread.join()

    err = CliRunner().invoke(group, ["write"]).output
    if storage:
        assert err == "warning: a background writer (EventFileWriter) stopped: [Errno 28] No space left on device\n"
    else:
        assert "Traceback" in err and "ValueError: a bug in a thread" in err
