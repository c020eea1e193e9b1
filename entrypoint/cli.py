"""The `finetune` command line. The only module that touches click and os.environ.

Options are generated from the dataclasses in config.py, so an option, its env var and its YAML key cannot
drift apart. Precedence: flag > FINETUNE_* env var > platform contract > preset > default.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import sys
import traceback
from pathlib import Path

import click
from click.core import ParameterSource

from . import options as schema
from .config import GenerateConfig, InitModelConfig, TrainConfig
from .errors import DESCRIPTIONS, ConfigError, ExitCode, FinetuneError
from .platforms import platform_defaults

log = logging.getLogger("finetune")
EXIT_CODES_HELP = "\b\nExit codes:\n" + "\n".join(f"  {int(c)}  {d}" for c, d in DESCRIPTIONS.items())
# FINETUNE_* variables that are settings but not options of a command: --preset's, and where presets live.
SETTINGS = {"FINETUNE_PRESET", "FINETUNE_PRESET_DIR"}


def schema_options(config_class: type):
    """Decorate a command with one click option per field of `config_class`."""

    def decorate(fn):
        for name, f in reversed(schema.fields(config_class).items()):
            fn = _option(name, f, config_class)(fn)
        return fn

    return decorate


def _option(name: str, f, config_class: type):
    kind = schema.base_type(f)
    meta = f.metadata
    flag = "--" + name.replace("_", "-")
    kwargs = {"envvar": schema.env_name(name), "show_envvar": True, "help": meta["help"],
              "default": f.default if f.default is not None else None,
              "show_default": f.default is not None and f.default != ()}
    if meta.get("secret"):
        kwargs["show_default"] = False
    if kind is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", name, **kwargs)
    if meta.get("multiple"):
        kwargs.update(multiple=True, default=f.default, show_default=False)
    if meta.get("choices"):
        kwargs["type"] = click.Choice(meta["choices"])
    elif kind is int:
        kwargs["type"] = click.IntRange(min=meta.get("min"), max=meta.get("max"))
        if meta.get("auto"):
            kwargs["type"] = IntOrAuto(kwargs["type"])
    elif kind is float:
        kwargs["type"] = click.FloatRange(min=meta.get("min"), max=meta.get("max"))
    elif kind is Path:
        kwargs["type"] = click.Path(path_type=Path)
    return click.option(flag, name, **kwargs)


class IntOrAuto(click.ParamType):
    """An integer in range, or the word auto."""

    name = "integer|auto"

    def __init__(self, ints: click.IntRange):
        self.ints = ints

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        return self.ints.convert(value, param, ctx)


def preset_option(fn):
    return click.option("--preset", envvar="FINETUNE_PRESET", show_envvar=True, default=None,
                        help="Preset name from config/ (e.g. gpt2, smoke) or a path to a YAML file of overrides.")(fn)


def resolve(config_class: type, params: dict, preset: str | None = None):
    """The config object and each value's source, from what click parsed plus presets and platforms."""
    ctx = click.get_current_context()
    explicit = {}
    for name in schema.fields(config_class):
        source = ctx.get_parameter_source(name)
        if source is ParameterSource.COMMANDLINE:
            explicit[name] = (_tuple(params[name]), f"flag --{name.replace('_', '-')}")
        elif source is ParameterSource.ENVIRONMENT:
            explicit[name] = (_tuple(params[name]), f"env {schema.env_name(name)}")
    return schema.resolve(config_class, explicit, preset, os.environ)


def check_environment() -> None:
    """A FINETUNE_* variable that names no option of any command nor a setting is an error, not a silently
    ignored value (a typo in a ConfigMap would otherwise train with the default)."""
    known = SETTINGS | {p.envvar for c in cli.commands.values() for p in c.params if isinstance(p.envvar, str)}
    problems = []
    for name in sorted(os.environ):
        if name.startswith(schema.ENV_PREFIX) and name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            fix = f"did you mean {close[0]}?" if close else "finetune COMMAND --help lists every variable;"
            problems.append(f"environment variable {name} is not a finetune setting; {fix} rename or unset it.")
    if problems:
        raise ConfigError(*problems)


def _tuple(value):
    return tuple(value) if isinstance(value, list) else value


def handled(output_dir_of=None):
    """Run a command body: a FinetuneError becomes one line per problem and its exit code (no traceback);
    anything else is a bug, printed with its traceback, exit 1. Failures are also written to status.json
    and /dev/termination-log."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            from . import outputs
            from .lease import held_by_another

            try:
                check_environment()
                return fn(*args, **kwargs)
            except FinetuneError as exc:
                code, lines = exc.code, exc.problems
            except KeyboardInterrupt:  # a signal before training installed its own handler: nothing to save
                code, lines = ExitCode.PREEMPTED, ["interrupted before training started; rerun the same command."]
            except Exception:
                code = ExitCode.INTERNAL
                traceback.print_exc()
                lines = [f"internal error (a bug, please report it with the traceback above): "
                         f"{sys.exc_info()[1]!r}"]
            for line in lines:
                click.echo(f"error: {line}", err=True)
            message = " | ".join(lines)
            outputs.write_termination_message(message, _platform())
            ctx = click.get_current_context(silent=True)
            output_dir = (ctx and ctx.meta.get(RESOLVED_OUTPUT_DIR)) or _output_dir(output_dir_of, kwargs)
            # Never into a directory another live run holds (BUSY, or a failure while it runs): it is theirs.
            if output_dir is not None and os.environ.get("RANK", "0") == "0" and not held_by_another(output_dir):
                state = "preempted" if code == ExitCode.PREEMPTED else "failed"
                outputs.write_status(output_dir, state, int(code), message)
            sys.exit(int(code))

        return wrapper

    return decorate


def _platform() -> str | None:
    try:
        return platform_defaults(os.environ)[0]
    except FinetuneError:  # the platform's own variables (SM_HPS) may be what failed
        return None


def _output_dir(output_dir_of, kwargs) -> Path | None:
    try:
        return Path(output_dir_of(kwargs)) if output_dir_of else None
    except Exception:  # the config itself may be what failed; then there is no output dir to report into
        return None


# Where a command body records the output directory its configuration resolved to (a flag, a variable, a preset
# or a platform contract may set it), so every later failure's status.json lands there.
RESOLVED_OUTPUT_DIR = "finetune.output_dir"


def _train_output_dir(kwargs) -> Path:
    """Before the configuration resolves (or when it is what failed): the raw flag or the default."""
    return kwargs.get("output_dir") or Path("/output")


def setup_logs(cfg: TrainConfig | None = None, rank: int = 0) -> None:
    from . import logs

    logs.setup(cfg.log_format if cfg else "text", rank)


def this_process():
    """Rank, local rank and world size from the variables torchrun sets."""
    from .launch import Dist

    env = os.environ
    return Dist(rank=int(env.get("RANK", 0)), local_rank=int(env.get("LOCAL_RANK", 0)),
                world_size=int(env.get("WORLD_SIZE", 1))) if "LOCAL_RANK" in env else Dist()


def log_config(cfg, sources: dict[str, str]) -> None:
    from .logs import event

    values = schema.as_dict(cfg)
    event("config: " + ", ".join(f"{k}={v}" for k, v in values.items()), config=values,
          sources={k: v for k, v in sources.items() if v != "default"})
    changed = {k: v for k, v in sources.items() if v != "default"}
    if changed:
        event("config sources: " + ", ".join(f"{k} from {v}" for k, v in changed.items()))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
             epilog=EXIT_CODES_HELP)
@click.version_option(package_name="finetune-gpt2")
def cli():
    """Fine-tune GPT-2-family causal language models on a folder of text.

    Every option can also be set as an environment variable (shown in each command's --help) or in a preset
    (--preset NAME). Precedence: flag > environment > platform (SageMaker, Vertex AI) > preset > default.
    """


@cli.command(epilog=EXIT_CODES_HELP)
@preset_option
@schema_options(TrainConfig)
@handled(_train_output_dir)
def train(preset, **params):
    """Fine-tune a model on the text in --data-dir and publish it to --output-dir/model.

    With --nproc-per-node > 1 or --nnodes > 1 it re-launches itself under torchrun with the same arguments."""
    from .train import run

    cfg, sources = resolve(TrainConfig, params, preset)
    click.get_current_context().meta[RESOLVED_OUTPUT_DIR] = cfg.output_dir
    dist = this_process()
    setup_logs(cfg, dist.rank)
    if dist.is_main:
        log_config(cfg, sources)
    if "LOCAL_RANK" not in os.environ and (cfg.nproc_per_node, cfg.nnodes) != ("1", "1"):
        from .checks import preflight
        from .launch import run_torchrun, torchrun_arguments

        preflight(cfg)  # one clean error here rather than one per worker
        args = torchrun_arguments(cfg, sys.argv[1:])
        if args:
            # The agent forwards SIGTERM to the workers, then kills them after this many seconds: long enough
            # for a checkpoint save; the kubelet's own grace period still bounds it.
            os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "3600")
            sys.exit(run_torchrun(args))
    metrics = run(cfg, sources, dist)
    if metrics and dist.is_main:
        from .logs import event

        mfu = f", MFU {metrics['mfu']:.1%}" if metrics.get("mfu") is not None else ""
        event(f"done: eval loss {metrics['eval_loss']:.4f}, perplexity {metrics['perplexity']:.2f} on "
              f"{metrics.get('data_format', 'text')} data, "
              f"{metrics['useful_tokens_per_second']:,.0f} useful tokens/s, padding "
              f"{metrics['padding_fraction']:.1%}{mfu}, peak memory {metrics['peak_memory_bytes'] / 2**30:.2f} GiB, "
              f"{metrics['global_step']} steps in {metrics['train_runtime']:.0f} s after "
              f"{metrics['data_prepare_seconds']:.1f} s of data preparation, model at {cfg.output_dir / 'model'}",
              **metrics)


@cli.command(epilog=EXIT_CODES_HELP)
@preset_option
@click.option("--shard", type=click.IntRange(min=0), default=None, envvar="FINETUNE_SHARD", show_envvar=True,
              help="Which share of the input this process tokenizes, from 0 [default: JOB_COMPLETION_INDEX in an "
                   "Indexed Job, else 0].")
@click.option("--num-shards", type=click.IntRange(min=1), default=1, show_default=True, envvar="FINETUNE_NUM_SHARDS",
              show_envvar=True, help="Processes or pods sharing the preparation (an Indexed Job's completions); "
                                     "the cache is complete when every shard is written.")
@schema_options(TrainConfig)
@handled()
def prepare(preset, shard, num_shards, **params):
    """Tokenize and pack the data into the cache only (run once, then train many times or on many nodes)."""
    import dataclasses

    from . import data
    from .checks import preflight
    from .errors import ConfigError
    from .model import load_tokenizer
    from .platforms import shard_default
    from .preemption import StopRequest

    cfg, sources = resolve(TrainConfig, params, preset)
    # An Indexed Job's index would also set --node-rank; preparing is not a training run, so it does not apply.
    cfg = dataclasses.replace(cfg, nnodes="1", node_rank=0)
    if shard is None:
        shard = shard_default(os.environ) if num_shards > 1 else 0
    if shard >= num_shards:
        raise ConfigError(f"--shard {shard} must be below --num-shards {num_shards}; shards count from 0 (set "
                          "--num-shards to the Indexed Job's completions).")
    setup_logs(cfg)
    log_config(cfg, sources)
    if Path(cfg.model).is_dir():  # a local model without tokenizer files would tokenize everything to nothing
        from .checks import check_model_dir

        check_model_dir(Path(cfg.model), "--model", weights=False)
    plan = preflight(cfg, trains=False)
    stop = StopRequest().install()
    tokenizer = load_tokenizer(cfg)
    stats = data.prepare_shard(cfg, tokenizer, plan.block_size, shard, num_shards, stop=stop)
    if stats is None:
        click.echo(f"prepared: shard {shard} of {num_shards} in {cfg.data_cache_dir}; the cache is complete once "
                   "every shard is written")
        return
    click.echo(f"prepared: {stats.train_rows} training and {stats.valid_rows} validation rows of "
               f"{plan.block_size} tokens of {stats.data_format} data in {cfg.data_cache_dir}")


@cli.command(epilog=EXIT_CODES_HELP)
@preset_option
@schema_options(TrainConfig)
@handled()
def doctor(preset, **params):
    """Check versions, device, precision, data, output, disk, shared memory and the model; exit non-zero on a
    blocking problem."""
    from .doctor import diagnose

    cfg, _ = resolve(TrainConfig, params, preset)
    setup_logs(cfg)
    diagnose(cfg, click.echo)


@cli.command("config", epilog=EXIT_CODES_HELP)
@preset_option
@schema_options(TrainConfig)
@handled()
def show_config(preset, **params):
    """Print the resolved configuration as YAML, each value with where it came from."""
    cfg, sources = resolve(TrainConfig, params, preset)
    problems = schema.check_values(cfg)
    if problems:  # the same range and cross-field checks train makes, so a printed config is a runnable one
        raise ConfigError(*problems)
    platform, _ = platform_defaults(os.environ)
    if platform:
        click.echo(f"# platform contract applied: {platform}")
    for name, value in schema.as_dict(cfg).items():
        rendered = "null" if value is None else value
        click.echo(f"{name}: {rendered}  # {sources[name]}")


@cli.command(epilog=EXIT_CODES_HELP)
@schema_options(GenerateConfig)
@handled()
def generate(**params):
    """Sample text from a model directory (by default the published model)."""
    from .generate import check_inputs, sample

    cfg, _ = resolve(GenerateConfig, params)
    check_inputs(cfg)  # before the logging setup, which imports transformers: a typo costs no seconds
    setup_logs()
    try:
        for text in sample(cfg):
            click.echo(text)
    except BrokenPipeError:  # the reader (`| head -1`) has what it wanted; silence the interpreter's final flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@cli.command("init-model", epilog=EXIT_CODES_HELP)
@schema_options(InitModelConfig)
@handled()
def init_model(**params):
    """Create a small random GPT-2 with a byte-level BPE tokenizer trained on --corpus (no Hub needed)."""
    from . import modelinit

    cfg, _ = resolve(InitModelConfig, params)
    files = modelinit.check_inputs(cfg)  # before the logging setup, which imports transformers
    setup_logs()
    modelinit.init_model(cfg, files)


@cli.command(epilog=EXIT_CODES_HELP)
@click.option("--output-dir", type=click.Path(path_type=Path), required=True, envvar="FINETUNE_OUTPUT_DIR",
              show_envvar=True, help="Directory to write train.txt and valid.txt to.")
@click.option("--max-documents", type=click.IntRange(min=1), default=None, envvar="FINETUNE_MAX_DOCUMENTS",
              show_envvar=True, help="Stop after this many documents [default: all].")
@click.option("--instructions", is_flag=True, envvar="FINETUNE_INSTRUCTIONS", show_envvar=True,
              help="Write train.jsonl and valid.jsonl instead: prompt = a function's signature, completion = the "
              "first paragraph of its docstring (instruction data).")
@handled()
def corpus(output_dir, max_documents, instructions):
    """Write a line-by-line corpus built from the Python standard library's docstrings (for demos and smoke
    tests: real prose on every machine, nothing downloaded)."""
    from . import corpus as plain
    from . import sftcorpus

    counts = (sftcorpus if instructions else plain).build(output_dir, max_documents)
    kind = "prompt/completion records" if instructions else "documents"
    click.echo(f"corpus: {counts['train']} training and {counts['valid']} validation {kind} in {output_dir}")


def main() -> None:
    cli(prog_name="finetune")
