# SPDX-License-Identifier: Apache-2.0
"""The one MosaicKV configuration object and the table of its user-facing options.

Every option exists three ways with one name each: the CLI flag of ``python -m sglang.launch_server``
(``--mosaic-segment-size``), the keyword of ``sglang.Engine(...)``/``ServerArgs(...)``
(``mosaic_segment_size``) and the field of :class:`MosaicKVConfig` (``segment_size``).
:data:`OPTIONS` is the single table those three are derived from.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, NoReturn, Optional

COMPRESSORS = ("none", "mosaic")
AXES = ("both", "token", "channel")  # mosaickv_sglang.strategies.menu.AXES (config imports no torch)

# Largest ratio the strategy menu can reach on average (tok-m at S/4 with chan-k at d/8, minus
# metadata) is about 20x; asking for more is a typo, not a setting.
MAX_COMPRESSION_RATIO = 16.0
MIN_SEGMENT_SIZE = 16
MAX_SEGMENT_SIZE = 256
MAX_SINK_TOKENS = 8192
MAX_HOT_WINDOW = 65536


class MosaicConfigError(ValueError):
    """A MosaicKV option, or its combination with another SGLang option, is not valid.

    The message is one sentence that starts with the offending flag, e.g.
    ``"--mosaic-compression-ratio: expected a number in [1, 16], got 0.5"``.
    """


def _parse_on_off(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("on", "off"):
        return value.lower() == "on"
    raise ValueError(f"expected 'on' or 'off', got {value!r}")


@dataclass(frozen=True)
class Option:
    """One user-facing MosaicKV option."""

    field: str  # MosaicKVConfig field name
    flag: str  # CLI flag
    type: Callable[[Any], Any]  # argparse type / coercion of Engine keyword values
    default: Any
    help: str
    choices: Optional[tuple[str, ...]] = None
    metavar: Optional[str] = None

    @property
    def kwarg(self) -> str:
        """Keyword of ``ServerArgs(...)`` / ``sglang.Engine(...)`` and argparse ``dest``."""
        return self.flag.lstrip("-").replace("-", "_")


OPTIONS: tuple[Option, ...] = (
    Option(
        "compressor",
        "--kv-compressor",
        str,
        "none",
        "KV-cache compressor. 'none' serves with SGLang's own KV cache, untouched; 'mosaic' serves with "
        "the MosaicKV compressed cache (2-D per-segment compression).",
        choices=COMPRESSORS,
    ),
    Option(
        "compression_ratio",
        "--mosaic-compression-ratio",
        float,
        4.0,
        "MosaicKV: target memory compression ratio of the sealed KV cache (dense bytes / compressed bytes), "
        f"in [1, {MAX_COMPRESSION_RATIO:g}]. 1 keeps every segment dense (exact outputs).",
        metavar="RATIO",
    ),
    Option(
        "segment_size",
        "--mosaic-segment-size",
        int,
        64,
        "MosaicKV: tokens per compressed segment (one layer, one KV head); a power of two in "
        f"[{MIN_SEGMENT_SIZE}, {MAX_SEGMENT_SIZE}] and a multiple of --page-size.",
        metavar="TOKENS",
    ),
    Option(
        "hot_window",
        "--mosaic-hot-window",
        int,
        512,
        "MosaicKV: most recent tokens of each request kept dense; a segment is compressed (sealed) once it "
        "has left this window.",
        metavar="TOKENS",
    ),
    Option(
        "sink_tokens",
        "--mosaic-sink-tokens",
        int,
        64,
        "MosaicKV: first tokens of each request kept dense and always read (attention sinks); rounded up "
        "to whole segments.",
        metavar="TOKENS",
    ),
    Option(
        "decode_read_budget",
        "--mosaic-decode-read-budget",
        int,
        4096,
        "MosaicKV: compressed tokens each decode step reads per request and KV head; segments with the "
        "lowest upper-bound scores are skipped. 0 reads every segment.",
        metavar="TOKENS",
    ),
    Option(
        "sidecar",
        "--mosaic-sidecar",
        _parse_on_off,
        True,
        "MosaicKV: run the CPU sidecar that refines compression plans off the decode path ('on' or 'off').",
        choices=("on", "off"),
    ),
    Option(
        "resegment",
        "--mosaic-resegment",
        _parse_on_off,
        True,
        "MosaicKV: re-plan pages of prefixes shared through the radix cache on idle scheduler ticks ('on' or "
        "'off'); 'off' keeps their plans as sealed (and refined by the sidecar). Needs --mosaic-sidecar on: "
        "without the sidecar nothing is re-planned.",
        choices=("on", "off"),
    ),
    Option(
        "axes",
        "--mosaic-axes",
        str,
        "both",
        "MosaicKV: the compression axes the planners may use: 'both' (2-D, the method), 'token' (drop tokens, "
        "keep each kept vector whole: a SnapKV-like baseline) or 'channel' (keep every token, prune channels per "
        "vector: a ThinK-like baseline). The single-axis settings serve accuracy comparisons at equal bytes; they "
        "reach lower ratios.",
        choices=AXES,
    ),
    Option(
        "cuda_graph",
        "--mosaic-cuda-graph",
        _parse_on_off,
        True,
        "MosaicKV: capture decode steps in CUDA graphs ('on' or 'off'); 'off' runs decode eager. Prefill graphs "
        "stay off.",
        choices=("on", "off"),
    ),
    Option(
        "overlap_schedule",
        "--mosaic-overlap-schedule",
        _parse_on_off,
        False,
        "MosaicKV: let SGLang's overlap scheduler prepare the next batch while the GPU runs the current one ('on' "
        "or 'off'); 'off' implies --disable-overlap-schedule. Experimental.",
        choices=("on", "off"),
    ),
)

OPTION_BY_FIELD = {o.field: o for o in OPTIONS}
OPTION_BY_KWARG = {o.kwarg: o for o in OPTIONS}


@dataclass(frozen=True)
class MosaicKVConfig:
    """Validated MosaicKV settings, built once per process and passed to every part by constructor.

    Parameters
    ----------
    compressor:
        ``"none"`` (stock SGLang) or ``"mosaic"``.
    compression_ratio:
        Target ratio of dense bytes to compressed bytes for sealed segments.
    segment_size:
        Tokens per segment; a power of two, a multiple of SGLang's page size.
    hot_window:
        Recent tokens kept dense.
    sink_tokens:
        First tokens kept dense and always read.
    decode_read_budget:
        Compressed tokens read per decode step, request and KV head; 0 = all.
    sidecar:
        Whether the CPU planning sidecar runs.
    resegment:
        Whether the sidecar also re-plans prefix-shared pages on idle ticks; no effect without the sidecar.
    axes:
        Compression axes of the planners' menus: ``"both"``, ``"token"`` or ``"channel"``.
    cuda_graph:
        Whether decode steps may run in CUDA graphs; off forces --disable-decode-cuda-graph.
    overlap_schedule:
        Whether SGLang's overlap scheduler stays on; off forces --disable-overlap-schedule.
    """

    compressor: str = "none"
    compression_ratio: float = 4.0
    segment_size: int = 64
    hot_window: int = 512
    sink_tokens: int = 64
    decode_read_budget: int = 4096
    sidecar: bool = True
    resegment: bool = True
    axes: str = "both"
    cuda_graph: bool = True
    overlap_schedule: bool = False

    def __post_init__(self) -> None:
        _check_choice("compressor", self.compressor, COMPRESSORS)
        ratio = _check_number("compression_ratio", self.compression_ratio)
        if not (1.0 <= ratio <= MAX_COMPRESSION_RATIO):
            _fail("compression_ratio", f"a number in [1, {MAX_COMPRESSION_RATIO:g}]", self.compression_ratio)
        seg = _check_int("segment_size", self.segment_size)
        if not (MIN_SEGMENT_SIZE <= seg <= MAX_SEGMENT_SIZE and seg & (seg - 1) == 0):
            _fail("segment_size", f"a power of two in [{MIN_SEGMENT_SIZE}, {MAX_SEGMENT_SIZE}]", self.segment_size)
        if not (0 <= _check_int("hot_window", self.hot_window) <= MAX_HOT_WINDOW):
            _fail("hot_window", f"an integer in [0, {MAX_HOT_WINDOW}]", self.hot_window)
        if not (0 <= _check_int("sink_tokens", self.sink_tokens) <= MAX_SINK_TOKENS):
            _fail("sink_tokens", f"an integer in [0, {MAX_SINK_TOKENS}]", self.sink_tokens)
        budget = _check_int("decode_read_budget", self.decode_read_budget)
        if budget != 0 and budget < seg:
            _fail("decode_read_budget", f"0 (read all) or at least --mosaic-segment-size ({seg})", budget)
        if not isinstance(self.sidecar, bool):
            _fail("sidecar", "'on' or 'off'", self.sidecar)
        if not isinstance(self.resegment, bool):
            _fail("resegment", "'on' or 'off'", self.resegment)
        _check_choice("axes", self.axes, AXES)
        if not isinstance(self.cuda_graph, bool):
            _fail("cuda_graph", "'on' or 'off'", self.cuda_graph)
        if not isinstance(self.overlap_schedule, bool):
            _fail("overlap_schedule", "'on' or 'off'", self.overlap_schedule)

    @property
    def enabled(self) -> bool:
        """True when the MosaicKV cache replaces SGLang's KV cache."""
        return self.compressor == "mosaic"

    @property
    def sink_segments(self) -> int:
        """Number of leading segments kept dense (sink tokens rounded up to whole segments)."""
        return math.ceil(self.sink_tokens / self.segment_size)

    @classmethod
    def from_options(cls, values: dict[str, Any]) -> "MosaicKVConfig":
        """Build from ``{kwarg: value}`` (argparse ``dest`` names or Engine keywords); unset means default.

        Values are coerced with each option's type first, so ``"4"`` and ``4`` are both accepted for an
        integer option; anything that does not coerce raises :class:`MosaicConfigError` naming the flag. A
        ``--mosaic-*`` option without ``--kv-compressor mosaic`` is refused too: it would be silently ignored.
        """
        unknown = sorted(set(values) - set(OPTION_BY_KWARG))
        if unknown:
            raise MosaicConfigError(
                f"{unknown[0]}: unknown MosaicKV option; expected one of {sorted(OPTION_BY_KWARG)}"
            )
        fields: dict[str, Any] = {}
        for kwarg, value in values.items():
            if value is None:
                continue
            opt = OPTION_BY_KWARG[kwarg]
            fields[opt.field] = _coerce(opt, value)
        config = cls(**fields)
        ignored = [opt.flag for opt in OPTIONS if opt.field in fields and opt.field != "compressor"]
        if ignored and not config.enabled:
            raise MosaicConfigError(
                f"{ignored[0]}: expected together with --kv-compressor mosaic, got --kv-compressor {config.compressor}; "
                f"add --kv-compressor mosaic or drop {ignored[0]}"
            )
        return config

    def to_options(self) -> dict[str, Any]:
        """Inverse of :meth:`from_options`: ``{kwarg: value}`` for every option."""
        return {OPTION_BY_FIELD[f.name].kwarg: getattr(self, f.name) for f in dataclasses.fields(self)}


def _coerce(opt: Option, value: Any) -> Any:
    if opt.type is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            _fail(opt.field, "an integer", value)
        try:
            return int(value)
        except ValueError:
            _fail(opt.field, "an integer", value)
    if opt.type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            _fail(opt.field, "a number", value)
        try:
            return float(value)
        except ValueError:
            _fail(opt.field, "a number", value)
    if opt.type is str:
        return value
    try:
        return opt.type(value)
    except ValueError:
        _fail(opt.field, "'on' or 'off'", value)


def positive_int_env(name: str, default: int, unit: str = "") -> int:
    """The integer >= 1 that the environment variable ``name`` holds (``default`` when unset or blank); ``unit``
    (e.g. ``" number of MiB"``) names what it counts in the error a bad value raises."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{name}: expected an integer{unit} >= 1, got {raw!r}")
    return value


def float_env(name: str, default: float, lo: float, hi: float, expected: str) -> float:
    """The number in ``[lo, hi]`` that the environment variable ``name`` holds (``default`` when unset or blank); a
    bad value raises ``"<name>: expected <expected>, got <value>"``."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not lo <= value <= hi:
        raise ValueError(f"{name}: expected {expected}, got {raw!r}")
    return value


def flag_env(name: str, default: bool = False) -> bool:
    """The on/off setting the environment variable ``name`` holds: ``1`` or ``0`` (``default`` when unset or blank;
    any other value is refused by name)."""
    raw = os.environ.get(name, "").strip()
    if raw not in ("", "0", "1"):
        raise ValueError(f"{name}: expected 0 or 1, got {raw!r}")
    return default if not raw else raw == "1"


def _fail(field: str, expected: str, got: Any) -> NoReturn:
    raise MosaicConfigError(f"{OPTION_BY_FIELD[field].flag}: expected {expected}, got {got!r}")


def _check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(field, "one of " + ", ".join(repr(c) for c in choices), value)


def _check_int(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(field, "an integer", value)
    return value


def _check_number(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(field, "a finite number", value)
    return float(value)
