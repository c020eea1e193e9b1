"""The package's shape, read from its source with `ast`: no function takes more than six parameters, and a click
command's body is a few lines that call work done elsewhere (testable without click)."""

from __future__ import annotations

import ast

from tests.support.helpers import REPO

PACKAGE = REPO / "entrypoint"
MAX_PARAMETERS = 6  # self and cls not counted
MAX_COMMAND_LINES = 15  # a command's body, its docstring not counted
# Commands still over MAX_COMMAND_LINES while their work moves out (issue 28): remove each once it is short.
LONG_COMMANDS_FOR_NOW = {"train"}


def functions():
    """(where, function node) for every function and method in the package."""
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{path.relative_to(REPO)}:{node.lineno} {node.name}", node


def parameters(node: ast.FunctionDef) -> list[str]:
    args = node.args
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
    return [n for n in names if n not in ("self", "cls")]


def body_lines(node: ast.FunctionDef) -> int:
    """Lines from the first statement after the docstring to the end of the last."""
    body = node.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and len(body) > 1:
        body = body[1:]
    return body[-1].end_lineno - body[0].lineno + 1


def is_click_command(node: ast.FunctionDef) -> bool:
    """Decorated with `<group>.command(...)` or `click.command(...)`."""
    for decorator in node.decorator_list:
        call = decorator.func if isinstance(decorator, ast.Call) else decorator
        if isinstance(call, ast.Attribute) and call.attr == "command":
            return True
    return False


def test_no_function_takes_more_than_six_parameters():
    crowded = [f"{where} takes {len(parameters(node))}: {', '.join(parameters(node))}"
               for where, node in functions() if len(parameters(node)) > MAX_PARAMETERS]
    assert not crowded, "group these into an options or build object:\n" + "\n".join(crowded)


def test_click_command_bodies_are_short():
    commands = {node.name: (where, node) for where, node in functions() if is_click_command(node)}
    assert {"prepare", "doctor", "generate", "init_model", "corpus", "show_config"} <= set(commands)
    long = [f"{where}: {body_lines(node)} lines" for name, (where, node) in commands.items()
            if body_lines(node) > MAX_COMMAND_LINES and name not in LONG_COMMANDS_FOR_NOW]
    assert not long, "move the work into entrypoint/commands/:\n" + "\n".join(long)
    assert all(name in commands for name in LONG_COMMANDS_FOR_NOW)


def test_the_scans_see_what_they_look_for():
    tree = ast.parse("@cli.command('x')\ndef a(self, b, c, d, e, f, g, *h, i=1, **j):\n    '''doc'''\n    b = 1\n"
                     "    return b\n")
    node = tree.body[0]
    assert len(parameters(node)) == 9 and body_lines(node) == 2 and is_click_command(node)
