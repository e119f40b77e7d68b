"""One exception type for everything a user can get wrong.

The CLI turns a ``SubFitError`` into one line on stderr and a non-zero exit; anything else is a bug and
keeps its traceback. Library callers catch ``SubFitError`` to tell bad input from defects.
"""

from __future__ import annotations


class SubFitError(Exception):
    """A problem with the user's input, files or settings, worded for the user."""


class UnsupportedModelError(SubFitError):
    """The model family or graph structure is not one SubFit knows how to compress."""


class CalibrationDataError(SubFitError):
    """The calibration text is missing, empty or too short."""


class PlanMismatchError(SubFitError):
    """A plan, checkpoint or graph belong to different models."""
