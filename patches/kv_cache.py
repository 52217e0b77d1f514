# SPDX-License-Identifier: Apache-2.0
"""Hooks that put MosaicKV's compressed pool under SGLang 0.5.17's scheduler (``--kv-compressor mosaic``).

Why hooks: 0.5.17 has no registry for KV pool classes (``SRTPlatform.get_kv_pool_cls`` arrived later), no way for a
pool to learn that the allocator freed pages, and sizes the pool with a fixed per-token cost. So:

- AFTER ``DefaultPoolConfigurator.__init__`` and AROUND ``calculate_pool_sizes``: split the KV budget into the dense
  hot pool and the arenas (:func:`~mosaickv_sglang.pool.layout_for_budget`); ``max_total_num_tokens`` becomes the
  logical token count, about ``ratio`` times the dense one; AROUND ``calculate_pool_sizes_from_max_tokens`` (SGLang's
  path for ``--max-total-tokens`` and other token caps): the arenas shrink to the capped count less the hot pool
  (:func:`~mosaickv_sglang.pool.cap_layout`), so the cap bounds memory and the arenas fill with the tokens;
- AROUND ``KVCacheConfigurator.resolve_max_num_reqs``: cap running requests at what the hot pool can always serve;
- AROUND ``KVCacheConfigurator._build_mha_kv_pool``: construct :class:`~mosaickv_sglang.kv_pool.MosaicMHATokenToKVPool`
  in place of the MHA pool class, with SGLang's own arguments;
- AFTER ``KVCacheConfigurator._build_token_to_kv_pool``: refuse to start when SGLang built any other pool (MLA, SWA,
  hybrid, sparse, out-of-tree...), which would otherwise serve uncompressed or fail on the first batch;
- AFTER ``PagedTokenToKVPoolAllocator._release_page_ids`` / ``clear``: free the pages' arena granules and physical
  pages (so the allocator's accounting and the pool's stay one);
- AROUND ``PagedTokenToKVPoolAllocator.available_size``: report no more than the compressed pool can take now
  (:meth:`~mosaickv_sglang.kv_pool.MosaicMHATokenToKVPool.admissible_tokens`), so the scheduler evicts cached
  prefixes or retracts requests when the arenas run out before the logical slots; AROUND
  ``SchedulerPoolStatsObserver._get_token_info``: its token counts (and SGLang's leak checks on them) keep the
  allocator's own, logical, free count;
- AROUND ``models.utils.enable_fused_set_kv_buffer``: ``False`` with the compressed pool (the fused RoPE + KV write
  would write logical slots into the physical buffers).

Every hook is a no-op unless the server was started with ``--kv-compressor mosaic``.
"""

from __future__ import annotations

import contextvars
import functools
import logging
from typing import Any, Callable, Optional

from mosaickv_sglang.config import MosaicKVConfig

from . import seam

logger = logging.getLogger(__name__)

LAYOUT_ATTR = seam.LAYOUT_ATTR
KVC_ATTR = seam.KVC_ATTR
# set while SGLang's pool statistics are gathered: available_size then reports the logical free count
_LOGICAL_VIEW: contextvars.ContextVar[bool] = contextvars.ContextVar("mosaic_logical_view", default=False)


def _config(kvc: Any) -> MosaicKVConfig:
    """The MosaicKV config of the server a KVCacheConfigurator belongs to (the defaults when it carries none)."""
    return seam.config_of(getattr(kvc, "server_args", None))


def _is_mosaic_pool(pool: Any) -> bool:
    from mosaickv_sglang.kv_pool import MosaicMHATokenToKVPool

    return isinstance(pool, MosaicMHATokenToKVPool)


def _layout(kvc: Any) -> Any:
    """The PoolLayout chosen for this server (kept on its ServerArgs: KVCacheConfigurator has ``__slots__``)."""
    return getattr(getattr(kvc, "server_args", None), LAYOUT_ATTR, None)


def remember_configurator(result: Any, self: Any, kvc: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER ``DefaultPoolConfigurator.__init__``: keep the KVCacheConfigurator for the sizing hook."""
    object.__setattr__(self, KVC_ATTR, kvc)


def _chunk_tokens(kvc: Any) -> int:
    chunk = kvc.server_args.chunked_prefill_size
    return int(chunk) if chunk is not None and chunk > 0 else int(kvc.model_config.context_len)


def mosaic_pool_sizes(original: Callable[..., Any], self: Any, available_bytes: int, page_size: int) -> Any:
    """AROUND ``DefaultPoolConfigurator.calculate_pool_sizes``: logical tokens of the compressed pool."""
    kvc = getattr(self, KVC_ATTR, None)
    if kvc is None or not _config(kvc).enabled:
        return original(self, available_bytes, page_size)
    from sglang.srt.model_executor.pool_configurator import MemoryPoolConfig
    from sglang.srt.runtime_context import get_parallel

    from mosaickv_sglang.pool import layout_for_budget

    cfg = _config(kvc)
    mc = kvc.model_config
    layout = layout_for_budget(
        int(available_bytes), cfg.compression_ratio,
        num_layers=int(kvc.layer_info.num_effective_layers),
        num_kv_heads=int(mc.get_num_kv_heads(get_parallel().attn_tp_size)),
        head_dim=int(mc.head_dim), page_size=int(page_size), hot_window=cfg.hot_window,
        chunk_tokens=_chunk_tokens(kvc), max_running_requests=kvc.server_args.max_running_requests,
        dtype=kvc.kv_cache_dtype,
    )  # fmt: skip
    object.__setattr__(kvc.server_args, LAYOUT_ATTR, layout)
    logger.info(
        "MosaicKV pool layout: %d logical tokens (ratio %.2f), %d dense hot tokens, %d arena granules per layer, "
        "up to %d running requests",
        layout.logical_tokens, cfg.compression_ratio, layout.hot_tokens, layout.arena_granules_per_layer,
        layout.max_running_requests,
    )  # fmt: skip
    return MemoryPoolConfig(max_total_num_tokens=layout.logical_tokens)


def mosaic_capped_pool_sizes(original: Callable[..., Any], self: Any, max_total_num_tokens: int, page_size: int) -> Any:
    """AROUND ``DefaultPoolConfigurator.calculate_pool_sizes_from_max_tokens``: the layout capped at
    ``max_total_num_tokens`` logical tokens."""
    kvc = getattr(self, KVC_ATTR, None)
    layout = None if kvc is None else _layout(kvc)
    if kvc is None or not _config(kvc).enabled or layout is None:
        return original(self, max_total_num_tokens, page_size)
    from sglang.srt.model_executor.pool_configurator import MemoryPoolConfig
    from sglang.srt.runtime_context import get_parallel

    from mosaickv_sglang.pool import cap_layout

    mc = kvc.model_config
    capped = cap_layout(
        layout, int(max_total_num_tokens), _config(kvc).compression_ratio,
        num_kv_heads=int(mc.get_num_kv_heads(get_parallel().attn_tp_size)), head_dim=int(mc.head_dim),
        page_size=int(page_size), dtype=kvc.kv_cache_dtype,
    )  # fmt: skip
    object.__setattr__(kvc.server_args, LAYOUT_ATTR, capped)
    logger.info(
        "MosaicKV pool layout capped at %d logical tokens: %d arena granules per layer (was %d)",
        capped.logical_tokens, capped.arena_granules_per_layer, layout.arena_granules_per_layer,
    )  # fmt: skip
    return MemoryPoolConfig(max_total_num_tokens=capped.logical_tokens)


def cap_running_requests(original: Callable[..., int], self: Any, token_capacity: int) -> int:
    """AROUND ``KVCacheConfigurator.resolve_max_num_reqs``: at most what the hot pool can always serve."""
    reqs = original(self, token_capacity)
    layout = _layout(self)
    if layout is None or reqs <= layout.max_running_requests:
        return reqs
    logger.warning(
        "MosaicKV: max_running_requests capped from %d to %d by the dense hot pool (%d tokens); to serve more at "
        "once, pass --max-running-requests (the hot pool is then planned for it, up to a quarter of the KV budget) "
        "or lower --mosaic-hot-window",
        reqs, layout.max_running_requests, layout.hot_tokens,
    )  # fmt: skip
    return layout.max_running_requests


def build_mosaic_pool(
    original: Callable[..., Any],
    self: Any,
    *,
    max_total_num_tokens: int,
    mha_pool_class: type,
    quant_method: Optional[Any] = None,
) -> Any:
    """AROUND ``KVCacheConfigurator._build_mha_kv_pool``: the compressed pool in place of ``mha_pool_class``."""
    cfg = _config(self)
    layout = _layout(self)
    if not cfg.enabled:
        return original(self, max_total_num_tokens=max_total_num_tokens, mha_pool_class=mha_pool_class,
                        quant_method=quant_method)  # fmt: skip
    if layout is None:
        raise RuntimeError(
            "--kv-compressor mosaic: the KV pool was sized without MosaicKV's layout (an SGLang sizing path this "
            "version does not hook, e.g. a draft worker or a non-default pool configurator)"
        )
    from mosaickv_sglang.kv_pool import MosaicMHATokenToKVPool

    cls = functools.partial(
        MosaicMHATokenToKVPool, mosaic_config=cfg, hot_tokens=layout.hot_tokens,
        arena_granules_per_layer=layout.arena_granules_per_layer,
    )  # fmt: skip
    return original(self, max_total_num_tokens=max_total_num_tokens, mha_pool_class=cls, quant_method=quant_method)


def require_mosaic_pool(result: Any, self: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER ``KVCacheConfigurator._build_token_to_kv_pool``: with mosaic on, the pool must be the compressed one.

    Only SGLang's MHA pool path is replaced (:func:`build_mosaic_pool`); ``compat`` refuses the model kinds known to
    take another path when ``ServerArgs`` is built, and this catches any it does not know.
    """
    if not _config(self).enabled or _is_mosaic_pool(result):
        return
    from mosaickv_sglang.config import MosaicConfigError

    hf_config = getattr(getattr(self, "model_config", None), "hf_config", None)
    architecture = (getattr(hf_config, "architectures", None) or ["this model"])[0]
    raise MosaicConfigError(
        f"--kv-compressor: mosaic expected SGLang to build its MHA KV pool for {architecture}, got "
        f"{type(result).__name__}; MosaicKV compresses MHA/GQA caches only, drop --kv-compressor mosaic"
    )


def free_pool_pages(result: Any, self: Any, *page_ids: Any) -> None:
    """AFTER ``PagedTokenToKVPoolAllocator._release_page_ids``: release the pages in the compressed pool too."""
    pool = getattr(self, "_kvcache", None)
    if _is_mosaic_pool(pool) and page_ids:
        import torch

        pool.free_pages(torch.cat([p.reshape(-1) for p in page_ids]))


def reset_pool(result: Any, self: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER ``PagedTokenToKVPoolAllocator.clear``: every page of the compressed pool is free again."""
    pool = getattr(self, "_kvcache", None)
    if _is_mosaic_pool(pool):
        pool.reset()


def admissible_available_size(original: Callable[[Any], int], self: Any) -> int:
    """AROUND ``PagedTokenToKVPoolAllocator.available_size``: the free logical slots, capped by what the compressed
    pool can take now (hot pages, and arena room to seal full pages out of them)."""
    free = original(self)
    pool = getattr(self, "_kvcache", None)
    if _LOGICAL_VIEW.get() or not _is_mosaic_pool(pool):
        return free
    return min(free, pool.admissible_tokens())


def logical_token_info(original: Callable[[Any], Any], self: Any) -> Any:
    """AROUND ``SchedulerPoolStatsObserver._get_token_info``: count tokens against the logical free slots, as the
    leak checks' invariant (available + evictable + in use == total) requires."""
    token = _LOGICAL_VIEW.set(True)
    try:
        return original(self)
    finally:
        _LOGICAL_VIEW.reset(token)


def no_fused_kv_write(original: Callable[..., bool], forward_batch: Any, *args: Any, **kwargs: Any) -> bool:
    """AROUND ``models.utils.enable_fused_set_kv_buffer``: the compressed pool translates slots on write."""
    if _is_mosaic_pool(getattr(forward_batch, "token_to_kv_pool", None)):
        return False
    return original(forward_batch, *args, **kwargs)


def apply() -> None:
    """Register the KV-cache hooks."""
    seam.register_hook(seam.POOL_CONFIGURATOR_INIT, remember_configurator, "AFTER")
    seam.register_hook(seam.POOL_CONFIGURATOR_SIZES, mosaic_pool_sizes, "AROUND")
    seam.register_hook(seam.POOL_CONFIGURATOR_CAPPED_SIZES, mosaic_capped_pool_sizes, "AROUND")
    seam.register_hook(seam.RESOLVE_MAX_NUM_REQS, cap_running_requests, "AROUND")
    seam.register_hook(seam.BUILD_MHA_KV_POOL, build_mosaic_pool, "AROUND")
    seam.register_hook(seam.BUILD_TOKEN_TO_KV_POOL, require_mosaic_pool, "AFTER")
    seam.register_hook(seam.ALLOCATOR_RELEASE_PAGES, free_pool_pages, "AFTER")
    seam.register_hook(seam.ALLOCATOR_CLEAR, reset_pool, "AFTER")
    seam.register_hook(seam.ALLOCATOR_AVAILABLE_SIZE, admissible_available_size, "AROUND")
    seam.register_hook(seam.POOL_TOKEN_INFO, logical_token_info, "AROUND")
    seam.register_hook(seam.FUSED_KV_WRITE_GATE, no_fused_kv_write, "AROUND")
