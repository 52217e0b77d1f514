# SPDX-License-Identifier: Apache-2.0
"""Hooks on SGLang 0.5.17's request validation (``--kv-compressor mosaic``).

- AROUND ``TokenizerManager._validate_one_request``: refuse token ids outside ``[0, vocab_size)`` with a
  ``ValueError`` (HTTP 400 naming ``input_ids``). SGLang 0.5.17 defines ``_validate_input_ids_in_vocab`` but never
  calls it, so such a prompt reaches the embedding lookup on the GPU, where the out-of-range index is a device-side
  assert that takes the whole server down.

A no-op unless the server was started with ``--kv-compressor mosaic``.
"""

from __future__ import annotations

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


def apply() -> None:
    """Register the request-validation hooks."""
    seam.register_hook(seam.TOKENIZER_VALIDATE_REQUEST, token_ids_in_vocab, "AROUND")
