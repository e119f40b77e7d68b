"""``python -m subfit_onnx.lm_eval ARGS``: lm-eval's own CLI, with the ``subfit-ort`` model registered.

lm-eval 0.4.13 has no plugin discovery for models: its ``--model`` names come from a built-in table plus any
module that was imported and used ``@register_model``; there is no entry-point group to declare a model in.
The options were a ``.pth`` startup hook (runs on every interpreter start, surprising), a task ``include_path``
whose Python files import us as a side effect (a hack tied to tasks), or this wrapper, which imports the adapter
and hands the untouched argument list to ``lm_eval.__main__.cli_evaluate``: every lm-eval option works as
documented, e.g.

    python -m subfit_onnx.lm_eval --model subfit-ort --model_args path=OUT --tasks hellaswag --limit 100
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    try:
        from lm_eval.__main__ import cli_evaluate

        import subfit_onnx.evaluation.lm_eval_model  # noqa: F401  (registers "subfit-ort")
    except ImportError as exc:
        sys.exit(f"error: lm-eval is not installed ({exc.name}); pip install 'subfit-onnx[eval]'")
    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
