# SPDX-License-Identifier: Apache-2.0
"""Benchmarks of MosaicKV: quality (attention error, token agreement) on a real model, RULER-style tasks."""
