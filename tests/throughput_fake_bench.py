# SPDX-License-Identifier: Apache-2.0
"""``python -m throughput_fake_bench``: the fake ``sglang.benchmark.serving`` of :mod:`throughput_fake_sglang`."""

import sys

from throughput_fake_sglang import bench_main

if __name__ == "__main__":
    sys.exit(bench_main())
