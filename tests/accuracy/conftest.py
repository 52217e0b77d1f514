# SPDX-License-Identifier: Apache-2.0
"""Tests of the accuracy suite (:mod:`bench.accuracy`): task generators, HTTP client, report, CPU smoke run."""

import sys
from pathlib import Path

# --import-mode=importlib puts no test folder on sys.path; the fake server in mkv_fake_openai.py (uniquely named) is
# imported by name from this folder, and its scaffolding (mkv_http_fake.py) from the tests folder above.
for _dir in (Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]):
    if str(_dir) not in sys.path:
        sys.path.insert(0, str(_dir))
