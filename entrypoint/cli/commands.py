"""The `finetune` commands. The CLI (this package) is the only code that touches click and os.environ; every other
module takes the config object, and the environment where it must (the driver check) as an argument.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from entrypoint.cli.params import preset_option, resolve, schema_options
from entrypoint.cli.running import (
    EXIT_CODES_HELP,
    fail,
    handled,
    leave,
    log_config,
    resolved_output_dir,
    setup_logs,
    this_process,
    train_output_dir,
)
from entrypoint.config import options as schema
from entrypoint.config.platforms import platform_defaults
from entrypoint.config.schema import EvalConfig, GenerateConfig, InitModelConfig, TrainConfig
from entrypoint.errors import ConfigError, ExitCode, FinetuneError


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
@handled(train_output_dir)
def train(preset, **params):
    """Fine-tune a model on the text in --data-dir and publish it to --output-dir/model.

    With --nproc-per-node > 1 or --nnodes > 1 it re-launches itself under torchrun with the same arguments."""
    from entrypoint.train.preflight import check_cheaply

    dist = this_process()  # first: a torchrun worker must not outlive its launcher
    cfg, sources = resolve(TrainConfig, params, preset)
    ctx = resolved_output_dir(cfg.output_dir)
    check_cheaply(cfg)  # before the logging set-up and the job, which import transformers: a typo costs no seconds
    setup_logs(cfg, dist.rank)
    if dist.is_main:
        log_config(cfg, sources)
    from entrypoint.commands import train as command

    if (code := command.relaunch(cfg, sys.argv[1:], os.environ)) is not None:
        leave(code)
    command.train(cfg, sources, dist, os.environ,
                  blocked_exit=lambda message: fail(ExitCode.PREEMPTED, [message], train_output_dir, params, ctx))


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
    from entrypoint.commands import prepare as preparing

    cfg, sources = resolve(TrainConfig, params, preset)
    cfg, shard = preparing.settle(cfg, shard, num_shards, os.environ)
    setup_logs(cfg)
    log_config(cfg, sources)
    click.echo(preparing.prepare(cfg, shard, num_shards))


@cli.command(epilog=EXIT_CODES_HELP)
@preset_option
@schema_options(TrainConfig)
@handled()
def doctor(preset, **params):
    """Check versions, device, precision, data, output, disk, shared memory and the model; exit non-zero on a
    blocking problem."""
    from entrypoint.commands.doctor import diagnose

    cfg, _ = resolve(TrainConfig, params, preset)
    setup_logs(cfg)
    diagnose(cfg, click.echo, os.environ, planned_world_size(cfg))


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
    click.echo(f"# run plan: {_plan_line(cfg)}")


def planned_world_size(cfg: TrainConfig) -> int:
    """The processes a `train` with this configuration starts (an elastic range's largest), for doctor and config."""
    from entrypoint.runtime.launch import processes_per_node

    return processes_per_node(cfg.nproc_per_node) * int(cfg.nnodes.split(":")[-1])


def _plan_line(cfg: TrainConfig) -> str:
    """The run plan `train` would log here, or why it cannot be made on this machine (the model is not reachable,
    no GPU...): `config` shows the configuration whatever the machine."""
    from entrypoint.train.plan import decide
    from entrypoint.train.preflight import resolved

    try:
        return decide(cfg, resolved(cfg, os.environ), planned_world_size(cfg), probe=False).line()
    except FinetuneError as exc:
        return f"not available here ({exc.problems[0]})"


@cli.command(epilog=EXIT_CODES_HELP)
@schema_options(GenerateConfig)
@handled()
def generate(**params):
    """Sample text from a model directory (by default the published model)."""
    from entrypoint.commands.generate import check_inputs, sample

    cfg, _ = resolve(GenerateConfig, params)
    check_inputs(cfg)  # before the logging setup, which imports transformers: a typo costs no seconds
    setup_logs()
    try:
        for text in sample(cfg):
            click.echo(text)
    except BrokenPipeError:  # the reader (`| head -1`) has what it wanted; silence the interpreter's final flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@cli.command("eval", epilog=EXIT_CODES_HELP)
@preset_option
@schema_options(EvalConfig)
@schema_options(TrainConfig)
@handled()
def evaluate(preset, **params):
    """Score a model directory (--model: a published model/, a checkpoint, a base model) on --data-dir's or
    --dataset's held-out data as training evaluates it; print (and --output) loss, perplexity and tokens scored."""
    cfg, _ = resolve(TrainConfig, params, preset)
    ecfg, _ = resolve(EvalConfig, params)
    setup_logs(cfg)  # before the job's modules import peft and bitsandbytes, so their import-time noise is quiet
    from entrypoint.commands import eval as evaluation

    click.echo(json.dumps(evaluation.evaluate(cfg, ecfg, os.environ), indent=2, sort_keys=True))


@cli.command("init-model", epilog=EXIT_CODES_HELP)
@schema_options(InitModelConfig)
@handled()
def init_model(**params):
    """Create a small random GPT-2 with a byte-level BPE tokenizer trained on --corpus (no Hub needed)."""
    from entrypoint.commands import init_model as modelinit

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
@click.option("--alpaca", is_flag=True, envvar="FINETUNE_ALPACA", show_envvar=True,
              help="Write the --instructions pairs as Alpaca records (instruction, input, output), which train "
              "renders to the same prompts.")
@click.option("--preferences", is_flag=True, envvar="FINETUNE_PREFERENCES", show_envvar=True,
              help="Write preference pairs for DPO instead: prompt = a function's signature, chosen = its docstring's "
              "first paragraph, rejected = another function's.")
@handled()
def corpus(output_dir, max_documents, instructions, alpaca, preferences):
    """Write a line-by-line corpus built from the Python standard library's docstrings (for demos and smoke
    tests: real prose on every machine, nothing downloaded)."""
    from entrypoint.data import corpus as plain
    from entrypoint.data import sftcorpus

    if instructions or alpaca or preferences:
        counts = sftcorpus.build(output_dir, max_documents, alpaca=alpaca, preferences=preferences)
    else:
        counts = plain.build(output_dir, max_documents)
    kind = "preference pairs" if preferences else "Alpaca records" if alpaca else \
        "prompt/completion records" if instructions else "documents"
    click.echo(f"corpus: {counts['train']} training and {counts['valid']} validation {kind} in {output_dir}")


def main() -> None:
    cli(prog_name="finetune")
