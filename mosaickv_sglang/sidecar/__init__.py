# SPDX-License-Identifier: Apache-2.0
"""The MosaicKV CPU sidecar: exact plans (SVD factors, error estimates, strategy choices) off the decode path.

One sidecar per scheduler (TP rank): a ``spawn`` process running :func:`~mosaickv_sglang.planner.plan_exact`,
fed through a bounded pool of shared-memory slots (:mod:`.shared_buffers`) with small versioned messages
(:mod:`.protocol`), driven by :class:`SidecarClient` from the scheduler's idle ticks, restarted when it dies.
:mod:`.resegment` is the radix-awareness policy (re-plan shared segments with merged statistics).
This package does not import SGLang; the scheduler hook lives with the other seams.
"""

from mosaickv_sglang.sidecar.client import (
    JobOutcome,
    JobStatus,
    PageGenerations,
    SidecarClient,
    SidecarConfig,
    SidecarCounters,
)
from mosaickv_sglang.sidecar.protocol import (
    PROTOCOL_VERSION,
    REASON_RESEGMENT,
    REASON_SEALED,
    PlanReply,
    PlanRequest,
    Ready,
    SegmentKey,
    Shutdown,
)
from mosaickv_sglang.sidecar.resegment import (
    JobInputs,
    ResegmentJob,
    ResegmentQueue,
    SharedSegment,
    job_inputs,
    merge_reader_stats,
)
from mosaickv_sglang.sidecar.shared_buffers import SlotBuffers, SlotPool, SlotShape, SlotState

__all__ = [
    "PROTOCOL_VERSION",
    "REASON_RESEGMENT",
    "REASON_SEALED",
    "JobInputs",
    "JobOutcome",
    "JobStatus",
    "PageGenerations",
    "PlanReply",
    "PlanRequest",
    "Ready",
    "ResegmentJob",
    "ResegmentQueue",
    "SegmentKey",
    "SharedSegment",
    "Shutdown",
    "SidecarClient",
    "SidecarConfig",
    "SidecarCounters",
    "SlotBuffers",
    "SlotPool",
    "SlotShape",
    "SlotState",
    "job_inputs",
    "merge_reader_stats",
]
