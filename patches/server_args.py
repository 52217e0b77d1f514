# SPDX-License-Identifier: Apache-2.0
"""Hooks on ``sglang.srt.server_args.ServerArgs`` (SGLang 0.5.17): the ``--kv-compressor`` options.

Why a hook: SGLang 0.5.17 has no extension point for plugin-defined server options (only choice lists
of existing options), and ``ServerArgs`` is a dataclass whose ``from_cli_args`` drops every argparse
attribute that is not one of its fields. Three hooks therefore carry the options:

- AFTER ``add_cli_args``: adds the MosaicKV options to the parser (so ``--help`` lists them);
- AROUND ``__init__``: accepts the same options as keywords (``ServerArgs(kv_compressor="mosaic")``,
  hence ``sglang.Engine(kv_compressor="mosaic")``), validates them and attaches the config;
- AROUND ``from_cli_args``: builds the config from the parsed flags, validates it and turns a
  validation failure into one ``error:`` line and exit status 2, as argparse does.

Removable when SGLang offers plugin-defined server options.
"""

from __future__ import annotations

import argparse
import contextvars
import sys
from typing import Any, Callable, Optional

from mosaickv_sglang.compat import check_compatibility
from mosaickv_sglang.config import OPTION_BY_KWARG, OPTIONS, MosaicConfigError, MosaicKVConfig

from . import seam

# The config parsed by from_cli_args, for the ServerArgs.__init__ call it makes (argparse attributes that are not
# ServerArgs fields, ours included, are dropped before that call).
_CLI_CONFIG: contextvars.ContextVar[Optional[MosaicKVConfig]] = contextvars.ContextVar("mosaic_cli_config",
                                                                                       default=None)

ARGUMENT_GROUP_TITLE = "MosaicKV KV-cache compression (mosaickv-sglang)"


def add_mosaic_cli_args(result: Any, parser: argparse.ArgumentParser) -> None:
    """AFTER hook on ``ServerArgs.add_cli_args``: add ``--kv-compressor`` and the ``--mosaic-*`` options."""
    group = parser.add_argument_group(ARGUMENT_GROUP_TITLE)
    for opt in OPTIONS:
        shown_default = ("on" if opt.default else "off") if isinstance(opt.default, bool) else opt.default
        # Values stay strings: MosaicKVConfig.from_options coerces and checks them, so a bad value gets the same
        # one-line message as from sglang.Engine, not argparse's error after SGLang's whole usage text.
        group.add_argument(
            opt.flag,
            dest=opt.kwarg,
            type=str,
            default=None,  # None = not given; MosaicKVConfig supplies the default
            metavar="{" + ",".join(opt.choices) + "}" if opt.choices else opt.metavar,
            help=f"{opt.help} Default: {shown_default}.",
        )
    return None


def serving_defaults(config: MosaicKVConfig, given: Callable[[str], Any]) -> dict[str, Any]:
    """ServerArgs values ``--kv-compressor mosaic`` implies, for the fields the user left unset (``given(field)`` is
    ``None``): the page size (the segment size) and :data:`seam.SERVING_DEFAULTS` (``--mosaic-cuda-graph on``
    leaves decode CUDA graphs alone, ``--mosaic-overlap-schedule on`` the overlap scheduler)."""
    if not config.enabled:
        return {}
    out: dict[str, Any] = {}
    if given("page_size") is None:
        out["page_size"] = config.segment_size
    for field, (value, _why) in seam.SERVING_DEFAULTS.items():
        if field == "disable_decode_cuda_graph" and config.cuda_graph:
            continue
        if field == "disable_overlap_schedule" and config.overlap_schedule:
            if given(field):
                raise MosaicConfigError("--mosaic-overlap-schedule: expected 'off' with --disable-overlap-schedule, "
                                        "got 'on'; drop one of them")  # fmt: skip
            continue
        if not given(field):
            out[field] = value
    return out


def init_with_mosaic_kwargs(original: Callable[..., None], self: Any, *args: Any, **kwargs: Any) -> None:
    """AROUND hook on ``ServerArgs.__init__``: take the MosaicKV keywords out, then validate and attach.

    Keywords named like MosaicKV options but unknown (``mosaic_ratio``) are taken out too, so that they are refused
    by name rather than by the dataclass's ``TypeError``.
    """
    options = {key: kwargs.pop(key) for key in list(kwargs) if key in OPTION_BY_KWARG or key.startswith("mosaic_")}
    pending = _CLI_CONFIG.get()
    config = pending if pending is not None and not options else MosaicKVConfig.from_options(options)
    user_backends = {field: kwargs.get(field) for field in seam.USER_BACKEND_FIELDS.values()}
    kwargs.update(serving_defaults(config, kwargs.get))
    check_compatibility(config, seam.requested_settings(kwargs, user_backends))
    original(self, *args, **kwargs)
    check_compatibility(config, seam.serving_settings(self, user_backends))
    seam.attach_config(self, config)


def from_cli_args_with_mosaic(original: Callable[..., Any], cls: type, args: argparse.Namespace) -> Any:
    """AROUND hook on ``ServerArgs.from_cli_args``: the CLI twin of :func:`init_with_mosaic_kwargs`."""
    try:
        config = MosaicKVConfig.from_options({opt.kwarg: getattr(args, opt.kwarg, None) for opt in OPTIONS})
        user_backends = {field: getattr(args, field, None) for field in seam.USER_BACKEND_FIELDS.values()}
        token = _CLI_CONFIG.set(config)  # ServerArgs.__init__ (hooked) runs inside from_cli_args
        try:
            server_args = original(cls, args)
        finally:
            _CLI_CONFIG.reset(token)
        check_compatibility(config, seam.serving_settings(server_args, user_backends))
    except MosaicConfigError as err:
        sys.stderr.write(f"error: {err}\n")
        raise SystemExit(2) from err
    seam.attach_config(server_args, config)
    return server_args


def apply() -> None:
    """Register the three ``ServerArgs`` hooks."""
    seam.register_hook(seam.SERVER_ARGS_ADD_CLI_ARGS, add_mosaic_cli_args, "AFTER")
    seam.register_hook(seam.SERVER_ARGS_INIT, init_with_mosaic_kwargs, "AROUND")
    seam.register_hook(seam.SERVER_ARGS_FROM_CLI_ARGS, from_cli_args_with_mosaic, "AROUND")
