"""Registers ``optimum-cli subfit`` (Optimum loads every module in this PEP 420 namespace at CLI start).

Kept to one import of a module that pulls only argparse, typer and Optimum's command base; the heavy work loads
when a subfit command runs.
"""

from subfit_onnx.optimum_commands import SubFitCommand

REGISTER_COMMANDS = [SubFitCommand]
