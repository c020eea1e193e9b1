"""Every command meets the bad-input contract `train` meets (tests/test_errors.py): one `error:` line per problem
naming the fix, the documented exit code, no traceback, and nothing half-written.

Each table row builds one bad input in a private folder and runs the real CLI on it. Read-only and full volumes
are real tmpfs mounts (the tests run as root; without the privilege to mount, those rows skip).
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from entrypoint.commands.init_model import init_model
from entrypoint.config.schema import InitModelConfig
from entrypoint.errors import ExitCode
from tests.support.helpers import clean_env, finetune

LATIN1 = "caf\u00e9 au lait, cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1") * 20


@dataclass
class Place:
    """A test's private folder: a copy of the tiny model, the shared corpus, and mounts made on request."""

    tmp: Path
    model: Path
    corpus: Path  # a train.txt/valid.txt folder (shared: never written to)
    mounts: list[Path]

    def path(self, name: str) -> Path:
        return self.tmp / name

    def file(self, name: str, data: bytes = b"x") -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def tmpfs(self, name: str, options: str) -> Path:
        """A real tmpfs at tmp/name: `ro` for a read-only volume, `size=64k` for one that fills up."""
        target = self.tmp / name
        target.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip()}); run as root")
        self.mounts.append(target)
        return target

    def read_only(self) -> Path:
        return self.tmpfs("read-only", "ro,size=64k")

    def full(self) -> Path:
        return self.tmpfs("full", "size=64k")

    def model_with(self, name: str, data: bytes) -> Path:
        """The model copy with one file's bytes replaced."""
        (self.model / name).write_bytes(data)
        return self.model

    def model_without(self, *names: str) -> Path:
        for pattern in names:
            for path in self.model.glob(pattern):
                path.unlink()
        return self.model


@pytest.fixture
def place(tmp_path, tiny_model, corpus_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    made = Place(tmp=tmp_path, model=model, corpus=corpus_dir, mounts=[])
    yield made
    for target in reversed(made.mounts):
        subprocess.run(["umount", "-l", str(target)], check=False)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file under root with its size and modification time, and every folder: what a failed command may not
    add or change. (A folder's own time is left out: a staging folder made and removed again changes it.)"""
    return {str(p.relative_to(root)): ("dir",) if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


def run_case(place: Place, command: str, build: Callable[[Place], list[str]], code: ExitCode, says: str,
             env: dict[str, str] | None = None, new_dirs_ok: bool = False) -> subprocess.CompletedProcess:
    """Run `finetune command` on the input `build` makes; check the code, the message and that nothing was written.
    `new_dirs_ok`: preflight (prepare, doctor) creates the output, checkpoint and cache folders, empty, as it
    probes them."""
    args = build(place)
    before = snapshot(place.tmp)
    result = finetune(command, *args, env=clean_env(**(env or {})), timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == code, output[-3000:]
    assert says in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in output
    errors = [line for line in result.stderr.splitlines() if line.startswith(("error:", "Error:"))]
    assert errors, result.stderr
    written = sorted(k for k, v in snapshot(place.tmp).items()
                     if before.get(k) != v and not (new_dirs_ok and v == ("dir",)))
    assert not written, f"a failed {command} left or changed: {written}"
    return result


# Generate.

def _checkpoint(p: Place) -> list[str]:
    """What a Trainer checkpoint holds: weights and config, no tokenizer."""
    p.model_without("tokenizer*")
    p.file("model/trainer_state.json", b"{}")
    return ["--model-dir", str(p.model)]


def _output_dir_not_model(p: Place) -> list[str]:
    shutil.move(p.model, p.path("out/model"))
    return ["--model-dir", str(p.path("out"))]


GENERATE = [
    ("model_dir_missing", lambda p: ["--model-dir", str(p.path("none"))], ExitCode.MODEL, "does not exist"),
    ("model_dir_is_a_file", lambda p: ["--model-dir", str(p.file("a-file"))], ExitCode.MODEL, "is a file"),
    ("output_dir_instead_of_model", _output_dir_not_model, ExitCode.MODEL, "out/model (the published model)"),
    ("no_config", lambda p: ["--model-dir", str(p.model_without("config.json"))], ExitCode.MODEL, "no config.json"),
    ("no_weights", lambda p: ["--model-dir", str(p.model_without("model.safetensors"))], ExitCode.MODEL,
     "has no weights"),
    ("no_tokenizer", lambda p: ["--model-dir", str(p.model_without("tokenizer*"))], ExitCode.MODEL,
     "no tokenizer files"),
    ("training_checkpoint", _checkpoint, ExitCode.MODEL, "training checkpoints have none"),
    ("corrupt_weights", lambda p: ["--model-dir", str(p.model_with("model.safetensors", b"junk"))],
     ExitCode.MODEL, "cannot load the weights"),
    ("corrupt_config", lambda p: ["--model-dir", str(p.model_with("config.json", b"{"))],
     ExitCode.MODEL, "cannot load the config"),
    ("beyond_the_context", lambda p: ["--model-dir", str(p.model), "--max-new-tokens", "100000"], ExitCode.USAGE,
     "exceeds the model's 128-token context; use --max-new-tokens 127 or less"),
    ("prompt_longer_than_the_context", lambda p: ["--model-dir", str(p.model), "--prompt", "words " * 400],
     ExitCode.USAGE, "shorten the prompt"),
    ("zero_new_tokens", lambda p: ["--model-dir", str(p.model), "--max-new-tokens", "0"], ExitCode.USAGE,
     "--max-new-tokens"),
    ("negative_temperature", lambda p: ["--model-dir", str(p.model), "--temperature", "-1"], ExitCode.USAGE,
     "--temperature"),
    ("top_p_above_one", lambda p: ["--model-dir", str(p.model), "--top-p", "1.5"], ExitCode.USAGE, "--top-p"),
    ("zero_samples", lambda p: ["--model-dir", str(p.model), "--num-samples", "0"], ExitCode.USAGE, "--num-samples"),
    ("temperature_too_small_to_sample", lambda p: ["--model-dir", str(p.model), "--temperature", "1e-45"],
     ExitCode.USAGE, "use 0 (greedy) or a value of at least"),
    ("top_p_not_a_number", lambda p: ["--model-dir", str(p.model), "--top-p", "nan"], ExitCode.USAGE,
     "--top-p nan is not a finite number"),
    ("seed_beyond_32_bits", lambda p: ["--model-dir", str(p.model), "--seed", str(2**32)], ExitCode.USAGE, "--seed"),
]


@pytest.mark.parametrize(("build", "code", "says"), [c[1:] for c in GENERATE], ids=[c[0] for c in GENERATE])
def test_generate_bad_input_fails_cleanly(place, build, code, says):
    run_case(place, "generate", build, code, says)


def test_generate_prompt_that_is_not_utf8_names_the_byte(place):
    # A non-UTF-8 argument reaches Python as surrogate escapes; the env var is the same path as the flag.
    run_case(place, "generate", lambda p: ["--model-dir", str(p.model)], ExitCode.USAGE, "not valid UTF-8 (byte 3)",
             env={"FINETUNE_PROMPT": LATIN1[:6].decode("utf-8", "surrogateescape")})


def test_empty_prompt_samples_unconditionally_up_to_the_whole_context(place):
    # The start token (BOS, else EOS) is the one prompt token, so 127 new tokens fill a 128-position model:
    # the largest value the beyond_the_context error names.
    result = finetune("generate", "--model-dir", str(place.model), "--prompt", "", "--max-new-tokens", "127",
                      env=clean_env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()
    assert "<|endoftext|>" not in result.stdout  # the start token is not printed


def test_generate_into_a_closed_pipe_stops_quietly(place):
    # `finetune generate | head -1`: the reader leaves early. Here it has left before the first sample is written.
    proc = subprocess.Popen([sys.executable, "-m", "entrypoint", "generate", "--model-dir", str(place.model),
                             "--max-new-tokens", "4"], env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    stderr = proc.communicate(timeout=300)[1]
    assert proc.returncode == 0, stderr[-2000:]
    assert "Traceback" not in stderr and "error:" not in stderr


# Init-model.

def _init(p: Place, corpus: Path, out: Path | None = None, *extra: str) -> list[str]:
    return ["--corpus", str(corpus), "--output-dir", str(out or p.path("new-model")), "--vocab-size", "512",
            "--context", "128", *extra]


def _gzipped(p: Place) -> list[str]:
    return _init(p, p.file("corpus.txt.gz", gzip.compress((p.corpus / "train.txt").read_bytes())))


def _non_model_dir(p: Place) -> list[str]:
    p.file("notes/keep-me.txt", b"mine")
    return _init(p, p.corpus / "train.txt", p.path("notes"))


def _trained_model(p: Place) -> list[str]:
    p.file("model/COMPLETE", b"{}")  # the marker finetune train writes last when it publishes
    return _init(p, p.corpus / "train.txt", p.model)


INIT_MODEL = [
    ("no_corpus_option", lambda p: ["--output-dir", str(p.path("new-model"))], ExitCode.USAGE, "needs --corpus"),
    ("corpus_missing", lambda p: _init(p, p.path("none.txt")), ExitCode.DATA, "does not exist"),
    ("corpus_not_utf8", lambda p: _init(p, p.file("latin1.txt", LATIN1)), ExitCode.DATA,
     "latin1.txt is not valid UTF-8 (byte 3); convert it, e.g. iconv"),
    ("corpus_empty", lambda p: _init(p, p.file("empty.txt", b"")), ExitCode.DATA, "is empty"),
    ("corpus_only_whitespace", lambda p: _init(p, p.file("blank.txt", b"  \n\n \t\n" * 50)), ExitCode.DATA,
     "too little text to learn a vocabulary"),
    ("corpus_too_small", lambda p: _init(p, p.file("tiny.txt", b"hello world\n")), ExitCode.DATA,
     "too little text to learn a vocabulary"),
    ("corpus_folder_without_txt", lambda p: _init(p, p.file("docs/a.md", b"# notes\n").parent), ExitCode.DATA,
     "has no .txt file"),
    ("corpus_one_bad_file_in_a_folder", lambda p: _init(p, p.file("mixed/b.txt", LATIN1).parent), ExitCode.DATA,
     "b.txt is not valid UTF-8"),
    ("corpus_gzipped", _gzipped, ExitCode.DATA, "decompress it first"),
    ("corpus_a_device", lambda p: _init(p, Path("/dev/null")), ExitCode.DATA, "not a regular file"),
    ("output_is_a_file", lambda p: _init(p, p.corpus / "train.txt", p.file("a-file")), ExitCode.OUTPUT, "is a file"),
    ("output_under_a_file", lambda p: _init(p, p.corpus / "train.txt", p.file("a-file") / "m"), ExitCode.OUTPUT,
     "which is a file"),
    ("output_holds_other_files", _non_model_dir, ExitCode.OUTPUT, "holds other files (keep-me.txt)"),
    ("output_is_a_trained_model", _trained_model, ExitCode.OUTPUT, "will not replace a trained model"),
    ("output_read_only", lambda p: _init(p, p.corpus / "train.txt", p.read_only() / "m"), ExitCode.OUTPUT,
     "Read-only file system"),
    ("output_volume_full", lambda p: _init(p, p.corpus / "train.txt", p.full() / "m"), ExitCode.OUTPUT,
     "No space left on device"),
    ("context_too_long", lambda p: _init(p, p.corpus / "train.txt", None, "--context", "100000000"), ExitCode.USAGE,
     "--context"),
    ("vocabulary_too_small", lambda p: _init(p, p.corpus / "train.txt", None, "--vocab-size", "10"), ExitCode.USAGE,
     "--vocab-size"),
]


@pytest.mark.parametrize(("build", "code", "says"), [c[1:] for c in INIT_MODEL], ids=[c[0] for c in INIT_MODEL])
def test_init_model_bad_input_fails_cleanly(place, build, code, says):
    run_case(place, "init-model", build, code, says)


def test_init_model_rewrites_a_model_directory_whole(tmp_path, corpus_dir):
    out = tmp_path / "tiny"
    for seed in (1, 2):
        init_model(InitModelConfig(output_dir=out, corpus=corpus_dir / "train.txt", vocab_size=512, context=128,
                                   seed=seed))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no staging folder left beside it


def test_generate_with_unreadable_model_files_names_each_file(place):
    """Root reads every file whatever its mode: the run drops the capabilities that let it (as a non-root user
    would run), and the weights and the tokenizer are made unreadable."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to drop the capability to read any file")
    for name in ("model.safetensors", "tokenizer.json"):
        (place.model / name).chmod(0)
    result = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-m",
                             "entrypoint", "generate", "--model-dir", str(place.model)], env=clean_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == ExitCode.MODEL, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: cannot read {place.model / name} (Permission denied); make the model files readable "
                      f"by this user (chmod -R a+rX {place.model}) or fix the volume."
                      for name in ("model.safetensors", "tokenizer.json")]


# Corpus.

CORPUS = [
    ("output_is_a_file", lambda p: ["--output-dir", str(p.file("a-file"))], ExitCode.OUTPUT, "is a file"),
    ("output_under_a_file", lambda p: ["--output-dir", str(p.file("a-file") / "corpus")], ExitCode.OUTPUT,
     "Not a directory"),
    ("output_read_only", lambda p: ["--output-dir", str(p.read_only() / "corpus")], ExitCode.OUTPUT,
     "Read-only file system"),
    ("output_volume_full", lambda p: ["--output-dir", str(p.full() / "corpus"), "--max-documents", "3000"],
     ExitCode.OUTPUT, "No space left on device"),
    ("zero_documents", lambda p: ["--output-dir", str(p.path("c")), "--max-documents", "0"], ExitCode.USAGE,
     "--max-documents"),
    ("documents_not_a_number", lambda p: ["--output-dir", str(p.path("c")), "--max-documents", "all"],
     ExitCode.USAGE, "--max-documents"),
    ("instructions_output_is_a_file", lambda p: ["--instructions", "--output-dir", str(p.file("a-file"))],
     ExitCode.OUTPUT, "is a file"),
    ("instructions_output_under_a_file", lambda p: ["--instructions", "--output-dir", str(p.file("a-file") / "c")],
     ExitCode.OUTPUT, "Not a directory"),
    ("instructions_output_read_only", lambda p: ["--instructions", "--output-dir", str(p.read_only() / "c")],
     ExitCode.OUTPUT, "Read-only file system"),
    ("instructions_output_volume_full", lambda p: ["--instructions", "--output-dir", str(p.full() / "c")],
     ExitCode.OUTPUT, "No space left on device"),
]


@pytest.mark.parametrize(("build", "code", "says"), [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_corpus_bad_input_fails_cleanly(place, build, code, says):
    run_case(place, "corpus", build, code, says)


def test_corpus_too_small_for_a_validation_document_writes_no_empty_valid_file(tmp_path):
    result = finetune("corpus", "--output-dir", str(tmp_path), "--max-documents", "5")
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.txt"]  # train then holds a split out itself


# Prepare and doctor (the train configuration)

def _train_env(p: Place, **extra: str) -> dict[str, str]:
    return {"FINETUNE_MODEL": str(p.model), "FINETUNE_DATA_DIR": str(p.corpus), "FINETUNE_OUTPUT_DIR":
            str(p.path("out")), "FINETUNE_BLOCK_SIZE": "32", **extra}


PREPARE = [
    ("model_without_tokenizer", lambda p: ["--model", str(p.model_without("tokenizer*"))], ExitCode.MODEL,
     "no tokenizer files"),
    ("output_read_only", lambda p: ["--output-dir", str(p.read_only())], ExitCode.OUTPUT, "not writable"),
    ("cache_volume_full", lambda p: ["--cache-dir", str(p.full())], ExitCode.OUTPUT,
     "cannot write the dataset cache"),
    ("block_size_below_minimum", lambda p: ["--block-size", "4"], ExitCode.USAGE, "--block-size"),
]


@pytest.mark.parametrize(("build", "code", "says"), [c[1:] for c in PREPARE], ids=[c[0] for c in PREPARE])
def test_prepare_bad_input_fails_cleanly(place, build, code, says):
    run_case(place, "prepare", build, code, says, env=_train_env(place), new_dirs_ok=True)
    assert not list(place.tmp.rglob("blocks-*")), "a failed prepare published a cache entry"


DOCTOR = [
    ("model_without_tokenizer", lambda p: ["--model", str(p.model_without("tokenizer*"))], ExitCode.MODEL,
     "no tokenizer files"),
    ("model_without_weights", lambda p: ["--model", str(p.model_without("model.safetensors"))], ExitCode.MODEL,
     "has no weights"),
    ("corrupt_weights", lambda p: ["--model", str(p.model_with("model.safetensors", b"junk"))],
     ExitCode.MODEL, "model.safetensors is unreadable"),
    ("unknown_architecture", lambda p: ["--model", str(p.model_with("config.json", b'{"model_type": "nosuch"}'))],
     ExitCode.MODEL, "names an architecture this transformers does not know"),
    ("data_dir_is_a_file", lambda p: ["--data-dir", str(p.corpus / "train.txt")], ExitCode.DATA,
     "is a file, not a directory"),
]


@pytest.mark.parametrize(("build", "code", "says"), [c[1:] for c in DOCTOR], ids=[c[0] for c in DOCTOR])
def test_doctor_bad_input_fails_cleanly(place, build, code, says):
    result = run_case(place, "doctor", build, code, says, env=_train_env(place), new_dirs_ok=True)
    assert any(line.startswith("FAIL") and says in line for line in result.stdout.splitlines()), result.stdout


# Config.

def _preset(p: Place, text: str) -> list[str]:
    return ["--preset", str(p.file("preset.yaml", text.encode()))]


CONFIG = [
    ("nproc_not_a_number", lambda p: ["--nproc-per-node", "two"], {}, "--nproc-per-node 'two'"),
    ("nodes_without_endpoint", lambda p: ["--nnodes", "2"], {}, "--rdzv-endpoint"),
    ("split_out_of_range", lambda p: ["--validation-split", "90"], {}, "--validation-split"),
    ("learning_rate_not_a_number", lambda p: ["--learning-rate", "nan"], {}, "--learning-rate nan is not a finite"),
    ("bad_env_value", lambda p: [], {"FINETUNE_BATCH_SIZE": "lots"}, "FINETUNE_BATCH_SIZE"),
    ("missing_preset", lambda p: ["--preset", "no-such-preset"], {}, "not found"),
    ("preset_not_yaml", lambda p: _preset(p, "epochs: [1,"), {}, "not valid YAML"),
    ("preset_not_utf8", lambda p: ["--preset", str(p.file("latin1.yaml", b"epochs: 1  # caf\xe9\n"))], {},
     "not valid UTF-8 (byte 16)"),
    ("preset_not_a_mapping", lambda p: _preset(p, "- epochs\n"), {}, "must be a mapping"),
    ("preset_unknown_key", lambda p: _preset(p, "epoch: 3\n"), {}, "unknown key(s) epoch"),
    ("preset_wrong_type", lambda p: _preset(p, "epochs: many\n"), {}, "epochs = 'many'"),
    ("sagemaker_hyperparameters_not_json", lambda p: [], {"SM_MODEL_DIR": "/opt/ml/model", "SM_HPS": "{"},
     "SM_HPS is not valid JSON"),
]


@pytest.mark.parametrize(("build", "env", "says"), [c[1:] for c in CONFIG], ids=[c[0] for c in CONFIG])
def test_config_bad_input_fails_cleanly(place, build, env, says):
    result = run_case(place, "config", build, ExitCode.USAGE, says, env=env)
    assert not result.stdout, "a rejected configuration is not printed"


def test_the_docs_say_the_exit_codes_hold_for_every_command():
    for page in ("README.md", "docs/reliability.md"):
        assert "hold for every command" in (Path(__file__).resolve().parents[2] / page).read_text(), page
    doc = (Path(__file__).resolve().parents[2] / "docs" / "commands.md").read_text()
    for command in ("generate", "eval", "init-model", "corpus", "prepare", "doctor", "config"):
        assert f"`finetune {command}`" in doc, f"docs/commands.md does not cover {command}"
