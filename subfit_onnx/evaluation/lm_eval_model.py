"""lm-eval model ``subfit-ort``: any Optimum decoder export (dense or SubFit-rewritten) run by ONNX Runtime.

Why not lm-eval's own ``onnxruntime`` model: it reads Model Builder exports (``genai_config.json``), runs one
full forward per request and has no generation. This adapter reuses the project's ORT runner, which finds KV
inputs by name (gaps from removed attentions, no KV at all) and reuses a context's KV cache across the
continuations of a multiple-choice question; generation goes through ``runtime.load_for_generation``
(Optimum ``generate`` with the fast settings). lm-eval does the rest: request tokenization (``TemplateLM``),
reordering (``Collator``) and rolling windows (``get_rolling_token_windows``).

lm-eval 0.4.13 finds models only in its own table or among already-imported ``@register_model`` classes (no
entry-point discovery), so run it through ``python -m subfit_onnx.lm_eval`` (same arguments as ``lm_eval``),
or import this module before calling ``lm_eval.simple_evaluate(model="subfit-ort", ...)``.
Requires the ``eval`` extra (``lm-eval==0.4.13``).
"""

from __future__ import annotations

from typing import Any

import lm_eval.models  # noqa: F401  (fills the built-in registry first; get_model skips it once non-empty)
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator
from tqdm import tqdm

from ..model_config import config_value
from .decoder import OnnxDecoder
from .logprobs import ContinuationScorer

MODEL_NAME = "subfit-ort"
DEFAULT_MAX_LENGTH = 2048  # cap: a long context window (SmolLM2: 8192) makes rolling windows huge


def _int_or_none(value: Any) -> int | None:
    return None if value in (None, "", "None") else int(value)


@register_model(MODEL_NAME)
class SubFitORTLM(TemplateLM):
    """``--model subfit-ort --model_args path=EXPORT_DIR[,provider=cpu|cuda][,max_length=N][,max_gen_toks=N]``."""

    def __init__(self, path: str | None = None, pretrained: str | None = None, provider: str = "cpu",
                 max_length: int | str | None = None, max_gen_toks: int | str = 256, batch_size: Any = 1,
                 **kwargs: Any) -> None:
        super().__init__()
        target = path or pretrained
        if not target:
            raise ValueError("subfit-ort needs model_args path=EXPORT_DIR")
        self.decoder = OnnxDecoder(target, provider=provider)
        self.tokenizer = self.decoder.tokenizer
        cfg = self.decoder.config
        limit = config_value(cfg, "max_positions") or DEFAULT_MAX_LENGTH
        self._max_length = _int_or_none(max_length) or min(int(limit), DEFAULT_MAX_LENGTH)
        self._max_gen_toks = int(max_gen_toks)
        self.scorer = ContinuationScorer(self.decoder, max_length=self._max_length)
        self._generator = None
        self.batch_size = 1  # requests run one at a time; contexts shared across choices hit the KV cache instead

    # --- TemplateLM interface -------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return int(eos if eos is not None else self.decoder.config.get("eos_token_id", 0))

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return str(self.decoder.model_dir).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list:
        # Sort by context so the choices of one question run back to back on one cached prefill.
        collator = Collator(requests, sort_fn=lambda r: (r[1], r[2]))
        out = []
        batches = collator.get_batched(n=1)
        for (cache_key, context, continuation), in tqdm(batches, total=len(requests), disable=disable_tqdm,
                                                        desc="subfit-ort loglikelihood"):
            lp, greedy = self.scorer.score(context, continuation)
            result = (float(lp.sum()), greedy)
            out.append(result)
            if cache_key is not None:
                self.cache_hook.add_partial("loglikelihood", cache_key, result)
        return collator.get_original(out)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        results = []
        for (text,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="subfit-ort rolling"):
            windows = [(None,) + lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            total = sum(ll for ll, _ in self._loglikelihood_tokens(windows, disable_tqdm=True))
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return results

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        import torch

        model = self._generation_model()
        results = []
        for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm,
                                        desc="subfit-ort generate"):
            kw = dict(gen_kwargs)
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            eos_text = self.tok_decode([self.eot_token_id])
            if eos_text and eos_text not in until:
                until.append(eos_text)
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            if kw.get("temperature", None) == 0.0:
                kw.pop("temperature")
                kw["do_sample"] = False
            kw.setdefault("do_sample", False)
            ids = self.tok_encode(context)[-(self.max_length - max_new):]
            prompt = torch.tensor([ids], dtype=torch.long)
            stop = [s for s in until if s]
            output = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new,
                                    pad_token_id=self.eot_token_id, stop_strings=stop or None,
                                    tokenizer=self.tokenizer, **kw)
            text = self.tok_decode(output[0, len(ids):].tolist())
            for s in stop:
                text = text.split(s)[0]
            results.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return results

    def _generation_model(self) -> Any:
        """Optimum's generate, set up by ``load_for_generation``; loaded only when a task generates."""
        if self._generator is None:
            from ..runtime import load_for_generation

            self._generator = load_for_generation(self.decoder.model_dir, provider=self.decoder.provider)
        return self._generator
