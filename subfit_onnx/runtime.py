"""Running an exported decoder fast with ONNX Runtime, and generating through Optimum without the slow defaults.

Why the settings here (measured on 2 vCPUs with ``subfit-onnx benchmark --runtimes``; the README's "Fast
generation" has the table): ``ORTModelForCausalLM.generate`` with defaults ran SmolLM2-135M at 5.6 tok/s, and a
model 25% smaller was no faster. Two thread pools fight over the cores: torch's intra-op pool (the logits
processors and tensor glue of ``generate`` run in torch) and ORT's intra-op pool, whose idle threads *spin*
waiting for work and so steal the cores torch needs between ORT calls. ``torch.set_num_threads(1)`` and the ORT session option
``session.intra_op.allow_spinning=0`` remove the contention; not passing ``min_new_tokens`` drops a per-step
logits processor. Together they gave 30-33 tok/s, on par with a raw ORT loop, and compressed models got faster
again in proportion to what was removed. Re-measured here with ``benchmark --runtimes`` (SmolLM2 dense vs SubFit
25%, loaded machine; ``benchmarks/results/evaluation_smollm2.md``): defaults 4.9 / 5.4 tok/s (ratio 1.09),
these settings 20.8 / 25.6 tok/s (ratio 1.23), raw ORT loop 27.6 / 31.3.

``load_for_generation`` also repairs what Optimum gets wrong for SubFit exports:
- for model types it does not list (Phi-3, ...), Optimum sizes the empty past with ``num_attention_heads``
  instead of the KV head count; we set the head count and head_dim from the graph's KV inputs;
- a model whose every attention was removed has no KV inputs; it is loaded with ``use_cache=False``.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from .errors import SubFitError, UnsupportedModelError
from .names import ONNX_FILE
from .onnx_files import export_paths
from .quiet import quiet

Provider = Literal["cpu", "cuda"]
PROVIDERS: dict[str, str] = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def ort_provider(provider: str) -> str:
    """The ORT execution-provider name for ``cpu``/``cuda``, or a SubFitError if this onnxruntime lacks it."""
    import onnxruntime as ort

    name = PROVIDERS.get(provider)
    if name is None:
        raise SubFitError(f"provider must be one of {', '.join(PROVIDERS)}, not {provider!r}")
    available = ort.get_available_providers()
    if name not in available:
        hint = " (install onnxruntime-gpu, the 'gpu' extra, on a machine with CUDA)" if provider == "cuda" else ""
        raise SubFitError(f"{name} is not available in this onnxruntime build{hint}; available: {', '.join(available)}")
    return name


def ort_session_options(*, allow_spinning: bool = False, intra_op_threads: int | None = None) -> Any:
    """Session options for decoding: no spinning intra-op threads (see module docstring).

    Spinning only pays off when the process owns the cores; between decode steps Python and torch need them.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    flag = "1" if allow_spinning else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", flag)
    so.add_session_config_entry("session.inter_op.allow_spinning", flag)
    if intra_op_threads:
        so.intra_op_num_threads = int(intra_op_threads)
    so.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
    return so


def open_session(model_path: str | os.PathLike, provider: str = "cpu", session_options: Any = None) -> Any:
    """An ``InferenceSession`` with our session options, load errors turned into one-line SubFitErrors."""
    import onnxruntime as ort

    name = ort_provider(provider)
    try:
        return ort.InferenceSession(str(model_path), sess_options=session_options or ort_session_options(),
                                    providers=[name])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own types (Fail, InvalidGraph, NoSuchFile, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SubFitError(f"onnxruntime cannot load {model_path}: {first[:300]}") from None


def _quiet_optimum():
    """Optimum logs warnings for every non-listed model type; library code must not write to the terminal."""
    return quiet("optimum", "transformers")


_TORCH_DEFAULT_THREADS: int | None = None


def set_torch_threads(n: int) -> None:
    """``torch.set_num_threads(n)``, remembering torch's own default the first time (see ``torch_default_threads``)."""
    import torch

    global _TORCH_DEFAULT_THREADS
    if _TORCH_DEFAULT_THREADS is None:
        _TORCH_DEFAULT_THREADS = torch.get_num_threads()
    torch.set_num_threads(n)


def torch_default_threads() -> int:
    """torch's thread count before ``load_for_generation`` changed it: what "Optimum with defaults" runs with."""
    import torch

    return _TORCH_DEFAULT_THREADS if _TORCH_DEFAULT_THREADS is not None else torch.get_num_threads()


def fix_kv_layout(model: Any, session: Any, config: Any = None) -> Any:
    """Make an ``ORTModelForCausalLM`` size its empty past from the graph, not from its model-type table.

    Optimum uses ``num_attention_heads`` as the KV head count for model types it does not list (Phi-3 among
    them), so the first forward of a GQA model fails with a shape error. The graph's KV inputs are the truth.
    """
    from .evaluation.signature import read_signature, specs_from_session

    sig = read_signature(specs_from_session(session.get_inputs()), specs_from_session(session.get_outputs()),
                         config if config is not None else model.config)
    if sig.has_kv:
        shape = sig.uniform_kv_shape()
        if shape is None:
            raise UnsupportedModelError(
                "KV layers differ in head count or head_dim; ORTModelForCausalLM needs one shape for all layers")
        model.num_key_value_heads, model.embed_size_per_head = shape
    return model


def load_for_generation(model_dir: str | os.PathLike, provider: Provider = "cpu", *,
                        torch_threads: int | None = 1, allow_spinning: bool = False,
                        intra_op_threads: int | None = None, use_io_binding: bool | None = None,
                        session_options: Any = None, **kwargs: Any) -> Any:
    """``ORTModelForCausalLM`` for any Optimum ``text-generation-with-past`` export, set up to decode fast.

    - ``torch_threads=1`` calls ``torch.set_num_threads(1)`` (process-wide!) so torch's pool does not fight ORT's;
      pass ``None`` to leave torch alone.
    - ORT intra-op threads do not spin (``allow_spinning=False``); ``intra_op_threads`` caps them (default: ORT's).
    - KV head count and head_dim come from the graph (Phi-3 fix); a graph without KV inputs gets ``use_cache=False``.
    - Call ``generate`` without ``min_new_tokens``; its logits processor costs a noticeable share per token.

    Extra ``kwargs`` go to ``ORTModelForCausalLM.from_pretrained``. Errors are SubFitErrors with one line.
    """
    root, _ = export_paths(model_dir)
    if torch_threads is not None:
        set_torch_threads(int(torch_threads))
    ep = ort_provider(provider)
    so = session_options or ort_session_options(allow_spinning=allow_spinning, intra_op_threads=intra_op_threads)
    with _quiet_optimum():
        from optimum.onnxruntime import ORTModelForCausalLM

        try:
            model = ORTModelForCausalLM.from_pretrained(
                root, file_name=ONNX_FILE, provider=ep, session_options=so, use_cache=True,
                use_io_binding=use_io_binding, local_files_only=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 - Optimum/ORT/transformers raise many types: "cannot load it"
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise SubFitError(f"cannot load {root} for generation: {first[:300]}") from None
    if not model.can_use_cache:  # every attention removed: nothing to cache, so generate must not ask for it
        model.config.use_cache = False
        model.generation_config.use_cache = False
    return fix_kv_layout(model, model.session)
