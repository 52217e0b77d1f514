# SPDX-License-Identifier: Apache-2.0
"""MosaicKV: dynamic two-dimensional KV-cache compression for SGLang.

Importing this package has no side effects; SGLang loads the plugin through the entry point
``sglang.srt.plugins: mosaic = mosaickv_sglang.plugin:register``.
"""

from mosaickv_sglang.config import MosaicConfigError, MosaicKVConfig

__version__ = "0.1.0"
__all__ = ["MosaicConfigError", "MosaicKVConfig", "__version__"]
