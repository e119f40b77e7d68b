"""One exception type for everything a user can get wrong.

The CLI turns a ``SubFitError`` into one line on stderr and a non-zero exit; anything else is a bug and
keeps its traceback. Library callers catch ``SubFitError`` to tell bad input from defects.
"""

from __future__ import annotations


class SubFitError(Exception):
    """A problem with the user's input, files or settings, worded for the user."""

    def for_cli(self) -> str:
        """The message in command-line words (an API message may name keyword arguments instead of options)."""
        return str(self)


class UnsupportedModelError(SubFitError):
    """The model family or graph structure is not one SubFit knows how to compress."""


class CalibrationDataError(SubFitError):
    """The calibration text is missing, empty or too short."""


class PlanMismatchError(SubFitError):
    """A plan, checkpoint or graph belong to different models."""


class OutputExistsError(SubFitError):
    """The output folder is taken and replacing it was not asked for."""

    def __init__(self, path: object) -> None:
        self.path = path
        super().__init__(f"{path} already exists; pass overwrite=True to replace it")

    def for_cli(self) -> str:
        return f"{self.path} already exists; pass --overwrite to replace it"


class InvalidQuantizeError(SubFitError):
    """A quantization precision SubFit does not offer."""

    def __init__(self, value: object, choices: tuple[str, ...]) -> None:
        self.value, self.choices = value, choices
        super().__init__(f"quantize must be one of {', '.join(choices)} or None, not {value!r}")

    def for_cli(self) -> str:
        return f"--quantize must be one of {', '.join(self.choices)}, not {self.value!r}"


class InvalidSparsityError(SubFitError):
    """A sparsity outside (0, 1); a percentage gets a hint, since 25 for 25% is the usual slip."""

    def __init__(self, value: object) -> None:
        hint = ""
        if isinstance(value, (int, float)) and 1 < value < 100:
            hint = f"; did you mean {value / 100:g}?"
        super().__init__(f"sparsity must be between 0 and 1 (exclusive), got {value}{hint}")
