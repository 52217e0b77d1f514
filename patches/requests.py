# SPDX-License-Identifier: Apache-2.0
"""Hooks on SGLang 0.5.17's request validation (``--kv-compressor mosaic``).

- AROUND ``TokenizerManager._validate_one_request``: refuse token ids outside ``[0, vocab_size)`` with a
  ``ValueError`` (HTTP 400 naming ``input_ids``). SGLang 0.5.17 defines ``_validate_input_ids_in_vocab`` but never
  calls it, so such a prompt reaches the embedding lookup on the GPU, where the out-of-range index is a device-side
  assert that takes the whole server down.
- AROUND ``TokenizerManager.generate_request``: refuse a parallel-sample count ``sampling_params["n"]`` that is not
  an integer >= 1 with a ``ValueError`` (HTTP 400 naming ``n``). This is where ``/generate``, ``/v1/completions``
  and ``/v1/chat/completions`` meet (the OpenAI handlers copy ``request.n`` into ``sampling_params["n"]``), and the
  hook runs before ``GenerateReqInput.normalize_batch_and_arguments`` reads ``n``. Unchecked, SGLang 0.5.17 serves
  ``n <= 0`` as if it were 1 (``n = 0`` then fails building the OpenAI usage with the 400 "range() arg 3 must not be
  zero"; with a list of prompts the batch is emptied and indexing it fails), and a non-integer ``n`` on
  ``/generate`` is a ``TypeError`` (HTTP 500) inside the normalization. ``_validate_one_request`` comes too late:
  it runs after that normalization.

A no-op unless the server was started with ``--kv-compressor mosaic``.
"""

from __future__ import annotations

from numbers import Integral
from typing import Any, Callable, Optional, Sequence

from . import seam


def out_of_vocab(input_ids: Optional[Sequence[Any]], vocab_size: int) -> Optional[int]:
    """The first token id of ``input_ids`` outside ``[0, vocab_size)``, or ``None``."""
    if not input_ids:
        return None
    lo, hi = min(input_ids), max(input_ids)
    if lo >= 0 and hi < vocab_size:
        return None
    return next(t for t in input_ids if t < 0 or t >= vocab_size)


def token_ids_in_vocab(original: Callable[..., None], self: Any, obj: Any, input_ids: Any, *args: Any,
                       **kwargs: Any) -> None:  # fmt: skip
    """AROUND ``TokenizerManager._validate_one_request``: token ids must index the vocabulary."""
    if seam.config_of(getattr(self, "server_args", None)).enabled:
        vocab = int(self.model_config.vocab_size)
        bad = out_of_vocab(input_ids, vocab)
        if bad is not None:
            raise ValueError(f"input_ids: expected token ids in [0, {vocab}), got {bad}")
    return original(self, obj, input_ids, *args, **kwargs)


def bad_n(sampling_params: Any) -> Optional[str]:
    """The error for the first ``n`` of ``sampling_params`` (a dict, or a list of dicts) that is not an integer
    >= 1, or ``None``. A missing ``n`` means 1; that the dicts of a list agree on ``n`` is left to SGLang."""
    for params in sampling_params if isinstance(sampling_params, list) else [sampling_params]:
        if isinstance(params, dict) and "n" in params:
            n = params["n"]
            if isinstance(n, bool) or not isinstance(n, Integral) or n < 1:
                return f"n: expected an integer >= 1, got {n!r}"
    return None


def n_at_least_one(original: Callable[..., Any], self: Any, obj: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND ``TokenizerManager.generate_request``: ``sampling_params["n"]`` must be an integer >= 1.

    ``generate_request`` is an async generator function; this wrapper is a plain function that checks and then
    returns the original's generator untouched, so a bad ``n`` raises when ``generate_request`` is called (every
    SGLang caller calls it inside its ``try: ... except ValueError``, which answers 400, or an error event in a
    stream) and a good request streams exactly as before, with no extra frame per chunk.
    """
    if seam.config_of(getattr(self, "server_args", None)).enabled:
        error = bad_n(getattr(obj, "sampling_params", None))
        if error is not None:
            raise ValueError(error)
    return original(self, obj, *args, **kwargs)


def apply() -> None:
    """Register the request-validation hooks."""
    seam.register_hook(seam.TOKENIZER_VALIDATE_REQUEST, token_ids_in_vocab, "AROUND")
    seam.register_hook(seam.TOKENIZER_GENERATE_REQUEST, n_at_least_one, "AROUND")
