# SPDX-License-Identifier: Apache-2.0
"""The single seam between MosaicKV and SGLang's internals (SGLang 0.5.17).

Every dotted hook target, every SGLang private attribute and every ``ServerArgs`` field MosaicKV
reads is named in this module and nowhere else, so an SGLang upgrade touches one file;
``tests/test_patch_targets.py`` resolves every name in :data:`HOOK_TARGETS` and :data:`SERVER_ARGS_FIELDS`
against the installed SGLang and fails loudly when one moves.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from mosaickv_sglang.compat import ServingSettings
from mosaickv_sglang.config import MosaicKVConfig

logger = logging.getLogger(__name__)

SGLANG_VERSION = "0.5.17"

SERVER_ARGS = "sglang.srt.server_args.ServerArgs"
SERVER_ARGS_ADD_CLI_ARGS = f"{SERVER_ARGS}.add_cli_args"
SERVER_ARGS_FROM_CLI_ARGS = f"{SERVER_ARGS}.from_cli_args"
SERVER_ARGS_INIT = f"{SERVER_ARGS}.__init__"

KV_CONFIGURATOR = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
POOL_CONFIGURATOR = "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator"
PAGED_ALLOCATOR = "sglang.srt.mem_cache.allocator.paged.PagedTokenToKVPoolAllocator"
POOL_CONFIGURATOR_INIT = f"{POOL_CONFIGURATOR}.__init__"
POOL_CONFIGURATOR_SIZES = f"{POOL_CONFIGURATOR}.calculate_pool_sizes"
POOL_CONFIGURATOR_CAPPED_SIZES = f"{POOL_CONFIGURATOR}.calculate_pool_sizes_from_max_tokens"
RESOLVE_MAX_NUM_REQS = f"{KV_CONFIGURATOR}.resolve_max_num_reqs"
BUILD_MHA_KV_POOL = f"{KV_CONFIGURATOR}._build_mha_kv_pool"
BUILD_TOKEN_TO_KV_POOL = f"{KV_CONFIGURATOR}._build_token_to_kv_pool"
ALLOCATOR_RELEASE_PAGES = f"{PAGED_ALLOCATOR}._release_page_ids"
ALLOCATOR_CLEAR = f"{PAGED_ALLOCATOR}.clear"
ALLOCATOR_AVAILABLE_SIZE = f"{PAGED_ALLOCATOR}.available_size"
POOL_STATS_OBSERVER = "sglang.srt.managers.scheduler_components.pool_stats_observer.SchedulerPoolStatsObserver"
POOL_TOKEN_INFO = f"{POOL_STATS_OBSERVER}._get_token_info"
FUSED_KV_WRITE_GATE = "sglang.srt.models.utils.enable_fused_set_kv_buffer"
SCHEDULER_ON_IDLE = "sglang.srt.managers.scheduler.Scheduler.on_idle"
SCHEDULER_RUN_BATCH = "sglang.srt.managers.scheduler.Scheduler.run_batch"
TOKENIZER_MANAGER = "sglang.srt.managers.tokenizer_manager.TokenizerManager"
TOKENIZER_VALIDATE_REQUEST = f"{TOKENIZER_MANAGER}._validate_one_request"
TOKENIZER_GENERATE_REQUEST = f"{TOKENIZER_MANAGER}.generate_request"
METRICS_REPORTER = "sglang.srt.managers.scheduler_components.metrics_reporter.SchedulerMetricsReporter"
REPORT_DECODE_STATS = f"{METRICS_REPORTER}.report_decode_stats"
REPORT_PREFILL_STATS = f"{METRICS_REPORTER}.report_prefill_stats"
LOG_IDLE_METRICS = f"{METRICS_REPORTER}._maybe_log_idle_metrics"

HOOK_TARGETS = (
    SERVER_ARGS_ADD_CLI_ARGS,
    SERVER_ARGS_FROM_CLI_ARGS,
    SERVER_ARGS_INIT,
    POOL_CONFIGURATOR_INIT,
    POOL_CONFIGURATOR_SIZES,
    POOL_CONFIGURATOR_CAPPED_SIZES,
    RESOLVE_MAX_NUM_REQS,
    BUILD_MHA_KV_POOL,
    BUILD_TOKEN_TO_KV_POOL,
    ALLOCATOR_RELEASE_PAGES,
    ALLOCATOR_CLEAR,
    ALLOCATOR_AVAILABLE_SIZE,
    POOL_TOKEN_INFO,
    FUSED_KV_WRITE_GATE,
    SCHEDULER_ON_IDLE,
    SCHEDULER_RUN_BATCH,
    TOKENIZER_VALIDATE_REQUEST,
    TOKENIZER_GENERATE_REQUEST,
    REPORT_DECODE_STATS,
    REPORT_PREFILL_STATS,
    LOG_IDLE_METRICS,
)

# Where the validated config rides on ServerArgs. ServerArgs (a dataclass) pickles its __dict__ into the
# spawned scheduler processes, and a name starting with "_" stays writable after SGLang seals the fields.
CONFIG_ATTR = "_mosaic_config"

# Where the KV-cache hooks keep their state: the PoolLayout on the server's ServerArgs (KVCacheConfigurator is a
# slots dataclass), and the KVCacheConfigurator on the DefaultPoolConfigurator it creates.
LAYOUT_ATTR = "_mosaic_layout"
KVC_ATTR = "_mosaic_kvc"

# What the metrics hooks read on SGLang's SchedulerMetricsReporter: whether this scheduler exports metrics
# (--enable-metrics, and attention-TP rank 0 unless --enable-metrics-for-all-schedulers), its
# SchedulerMetricsCollector and that collector's label dict; and where the hooks keep MosaicKV's exporter.
REPORTER_METRICS_ENABLED_ATTR = "current_scheduler_metrics_enabled"
REPORTER_COLLECTOR_ATTR = "metrics_collector"
COLLECTOR_LABELS_ATTR = "labels"
METRICS_EXPORTER_ATTR = "_mosaic_metrics"
# The scheduler's SchedulerMetricsReporter, and where the step hook keeps its DecodeStepTimer on it.
SCHEDULER_REPORTER_ATTR = "metrics_reporter"
# ScheduleBatch fields the overlap hook reads (patches/scheduler.py): host request indices and the new slots
BATCH_REQ_POOL_INDICES_CPU_ATTR = "req_pool_indices_cpu"
BATCH_OUT_CACHE_LOC_ATTR = "out_cache_loc"
STEP_TIMER_ATTR = "_mosaic_step_timer"
# ScheduleBatch fields the step trace reads for a batch's context: the sum SGLang keeps for extend batches, and the
# host lengths it keeps for decode batches (where it sets the sum to None)
BATCH_SEQ_LENS_SUM_ATTR = "seq_lens_sum"
BATCH_SEQ_LENS_CPU_ATTR = "seq_lens_cpu"
# Whether the Scheduler runs SGLang's overlap loop (launch a batch, then wait for the last one's result): the step
# timer keeps the decode period after a prefill apart then (patches/metrics.py).
SCHEDULER_OVERLAP_ATTR = "enable_overlap"
SCHEDULER_FORWARD_STREAM_ATTR = "forward_stream"  # the stream Scheduler.run_batch's forwards run on
# The scheduler's ParallelState (tp_rank, tp_size): the stack sampler's file name per tensor-parallel rank.
SCHEDULER_PARALLEL_STATE_ATTR = "ps"

# ServerArgs fields MosaicKV sets when --kv-compressor mosaic is on and the user left them alone, with the value
# and why (logged once at startup).
SERVING_DEFAULTS = {
    "attention_backend": ("mosaic", "reads the compressed pool"),
    "disable_prefill_cuda_graph": (True, "extend plans on the host per batch"),
    "disable_decode_cuda_graph": (True, "--mosaic-cuda-graph off"),
    "disable_overlap_schedule": (True, "--mosaic-overlap-schedule off"),
}

# ServerArgs fields read to build ServingSettings: {ServingSettings field: ServerArgs field}.
SERVER_ARGS_FIELDS = {
    "page_size": "page_size",
    "kv_cache_dtype": "kv_cache_dtype",
    "enable_hierarchical_cache": "enable_hierarchical_cache",
    "disaggregation_mode": "disaggregation_mode",
    "speculative_algorithm": "speculative_algorithm",
    "enable_dp_attention": "enable_dp_attention",
    "pp_size": "pp_size",
    "dcp_size": "dcp_size",
    "use_ray": "use_ray",
    "enable_lmcache": "enable_lmcache",
    "enable_hisparse": "enable_hisparse",
    "prefill_only_disable_kv_cache": "prefill_only_disable_kv_cache",
    "enable_unified_memory": "enable_unified_memory",
    "enable_page_major_kv_layout": "enable_page_major_kv_layout",
}
# User-facing attention-backend choices, read before SGLang resolves defaults into them.
USER_BACKEND_FIELDS = {
    "attention_backend_flag_set": "attention_backend",
    "prefill_attention_backend_flag_set": "prefill_attention_backend",
    "decode_attention_backend_flag_set": "decode_attention_backend",
}
# Model paths for which ServerArgs skips model resolution (no config to inspect).
PLACEHOLDER_MODEL_PATHS = ("none", "dummy")


def register_hook(target: str, fn: Callable[..., Any], kind: str) -> None:
    """Register ``fn`` on ``target`` with SGLang's HookRegistry (``kind``: BEFORE/AFTER/AROUND/REPLACE)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(target, fn, HookType[kind])


def apply_hooks_outside_plugin_loading() -> None:
    """Apply registered hooks now, unless SGLang's ``load_plugins()`` is running and will apply them itself.

    ``register()`` is also called by hand in processes where SGLang never loads plugins (for example
    ``sglang.bench_one_batch``); there the hooks must be applied explicitly. Inside ``load_plugins()``
    applying early would make SGLang skip hooks that plugins loaded after us put on the same targets.
    """
    from sglang.srt.plugins.hook_registry import HookRegistry, _current_plugin_source

    if _current_plugin_source.get() is None:
        HookRegistry.apply_hooks()


def attach_config(server_args: Any, config: MosaicKVConfig) -> None:
    """Store ``config`` on ``server_args`` so that it travels with it into SGLang's subprocesses."""
    object.__setattr__(server_args, CONFIG_ATTR, config)


def config_of(server_args: Any) -> MosaicKVConfig:
    """The MosaicKV config carried by ``server_args`` (the defaults, i.e. compressor 'none', if none)."""
    config = getattr(server_args, CONFIG_ATTR, None)
    return config if isinstance(config, MosaicKVConfig) else MosaicKVConfig()


def serving_settings(server_args: Any, user_backends: dict[str, Any]) -> ServingSettings:
    """Snapshot the SGLang settings and model facts MosaicKV's compatibility rules read.

    Parameters
    ----------
    server_args:
        A resolved ``ServerArgs``.
    user_backends:
        The attention-backend options as the user gave them (argparse namespace values or ``ServerArgs``
        keywords), keyed by ``ServerArgs`` field name; absent means not given.
    """
    fields = {ours: getattr(server_args, theirs) for ours, theirs in SERVER_ARGS_FIELDS.items()}
    fields.update({ours: user_backends.get(theirs) for ours, theirs in USER_BACKEND_FIELDS.items()})
    fields.update(_model_facts(server_args))
    return ServingSettings(**fields)


def requested_settings(requested: dict[str, Any], user_backends: dict[str, Any]) -> ServingSettings:
    """The :class:`ServingSettings` the user asked for, before SGLang resolves them and without model facts.

    Checked before ``ServerArgs.__post_init__`` so that SGLang's own validation, which does not know MosaicKV (it
    refuses e.g. speculative decoding with an unknown backend), never speaks first about a flag MosaicKV refuses.

    Parameters
    ----------
    requested:
        ``ServerArgs`` keywords as given (argparse values or ``Engine`` keywords); absent or ``None`` means the
        SGLang default.
    user_backends:
        As for :func:`serving_settings`.
    """
    fields = {
        ours: requested[theirs] for ours, theirs in SERVER_ARGS_FIELDS.items() if requested.get(theirs) is not None
    }
    fields.update({ours: user_backends.get(theirs) for ours, theirs in USER_BACKEND_FIELDS.items()})
    return ServingSettings(**fields)


def _model_facts(server_args: Any) -> dict[str, Any]:
    if str(server_args.model_path).lower() in PLACEHOLDER_MODEL_PATHS:
        return {}
    from sglang.srt.configs.hybrid_arch import linear_attn_model_spec
    from sglang.srt.configs.model_config import AttentionArch, ModelConfig, is_encoder_decoder_model

    # ServerArgs caches the resolved ModelConfig in the public attribute `model_config` during resolution.
    model_config = getattr(server_args, "model_config", None) or ModelConfig.from_server_args(server_args)
    architectures = list(getattr(model_config.hf_config, "architectures", None) or [])
    return {
        "model_is_mla": model_config.attention_arch == AttentionArch.MLA,
        "model_is_hybrid_swa": bool(model_config.is_hybrid_swa),
        "model_is_hybrid_linear": bool(linear_attn_model_spec(model_config)),
        "model_is_encoder_decoder": is_encoder_decoder_model(architectures),
        "model_architecture": architectures[0] if architectures else "",
    }
