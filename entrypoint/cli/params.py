"""Click options generated from the dataclasses in config.py, so an option, its env var and its YAML key cannot
drift apart, and the resolution of a command's configuration from them. Precedence: flag > FINETUNE_* env var >
platform contract > preset > default.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import click
from click.core import ParameterSource

from entrypoint.config import options as schema
from entrypoint.errors import ConfigError

# FINETUNE_* variables that are settings but not options of a command: --preset's, and where presets live; the
# launcher's pid, which it sets for its workers (launch.die_with_launcher).
SETTINGS = {"FINETUNE_PRESET", "FINETUNE_PRESET_DIR", "FINETUNE_LAUNCHER_PID"}


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
        if "none" in meta["choices"] and f.default is None:
            kwargs["callback"] = _none_is_unset  # --quantize none: the same as leaving it out
    elif kind is int:
        kwargs["type"] = click.IntRange(min=meta.get("min"), max=meta.get("max"))
        if meta.get("auto"):
            kwargs["type"] = IntOrAuto(kwargs["type"])
    elif kind is float:
        kwargs["type"] = click.FloatRange(min=meta.get("min"), max=meta.get("max"))
    elif kind is Path:
        kwargs["type"] = PathOrURL() if meta.get("url") else click.Path(path_type=Path)
    return click.option(flag, name, **kwargs)


def _none_is_unset(ctx, param, value):
    return None if value == "none" else value


class IntOrAuto(click.ParamType):
    """An integer in range, or the word auto."""

    name = "integer|auto"

    def __init__(self, ints: click.IntRange):
        self.ints = ints

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        return self.ints.convert(value, param, ctx)


class PathOrURL(click.Path):
    """A local path, or an s3:// or gs:// URL kept as the string it is (a Path would fold its "//")."""

    def __init__(self):
        super().__init__(path_type=Path)

    def convert(self, value, param, ctx):
        if isinstance(value, str) and "://" in value:
            return value.strip()
        return super().convert(value, param, ctx)


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


def check_environment(group: click.Group) -> None:
    """A FINETUNE_* variable that names no option of any command nor a setting is an error, not a silently
    ignored value (a typo in a ConfigMap would otherwise train with the default)."""
    known = SETTINGS | {p.envvar for c in group.commands.values() for p in c.params if isinstance(p.envvar, str)}
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
