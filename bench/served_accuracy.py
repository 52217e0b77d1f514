# SPDX-License-Identifier: Apache-2.0
"""Run the accuracy suite (:mod:`bench.accuracy`) against SGLang servers started in turn, one per configuration (GPU
machine), then the comparison report (:mod:`bench.accuracy_report`).

Configurations are named as in :mod:`bench.serve_check` (``dense``, ``fp8``, ``mosaic-r<ratio>[-b<tokens>]
[-h<tokens>]``, each with an optional ``-tp<N>``). For each one the script starts ``python -m
sglang.launch_server``, waits for it, runs ``python -m bench.accuracy --url ... --label <config>`` with the suite
flags given after ``--``, and stops the server. It writes ``<out>/accuracy-<config>.json``, the logs of the server
and of the suite, and ``<out>/report.txt``.

Example::

    python -m bench.served_accuracy --model $M --configs dense fp8 mosaic-r1-b0 mosaic-r3 --out $OUT/acc \\
        --server-args "--dtype bfloat16 --mem-fraction-static 0.5" -- --lengths 2048 4096 --samples 5
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

from bench.serve_check import Server, config_flags

logger = logging.getLogger("bench.served_accuracy")


def suite_command(url: str, config: str, out_json: Path, suite_args: List[str]) -> List[str]:
    """The ``bench.accuracy`` command line for one configuration."""
    return [sys.executable, "-m", "bench.accuracy", "--url", url, "--label", config, "--out", str(out_json), "-q",
            *suite_args]  # fmt: skip


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    suite_args: List[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, suite_args = argv[:cut], argv[cut + 1 :]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Flags after -- go to python -m bench.accuracy.")  # fmt: skip
    ap.add_argument("--model", required=True, help="model path (a Hugging Face checkpoint directory)")
    ap.add_argument("--configs", nargs="+", required=True,
                    help="configurations in order (see bench.serve_check): dense, fp8, mosaic-r<ratio>[-b..][-h..]")
    ap.add_argument("--server-args", default="", help="extra flags for every server, one string")
    ap.add_argument("--dense-backend", default="flashinfer", help="attention backend of dense and fp8")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--ready-timeout", type=float, default=420.0)
    ap.add_argument("--suite-timeout", type=float, default=1800.0, help="seconds for one configuration's suite")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    for name in args.configs:
        config_flags(name)  # fail early on a bad name
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    results: List[Path] = []
    for name in args.configs:
        server = Server(args.model, args.port, config_flags(name, args.dense_backend), args.out / f"server_{name}.log",
                        args.server_args.split())  # fmt: skip
        out_json = args.out / f"accuracy-{name}.json"
        t0 = time.time()
        try:
            server.wait_ready(args.ready_timeout)
            logger.info("%s: server ready after %.0f s; running the suite", name, time.time() - t0)
            with open(args.out / f"suite_{name}.log", "w") as log:
                subprocess.run(suite_command(server.url, name, out_json, suite_args), stdout=log,
                               stderr=subprocess.STDOUT, timeout=args.suite_timeout, check=True)  # fmt: skip
            results.append(out_json)
            logger.info("%s: done in %.0f s", name, time.time() - t0)
        except (RuntimeError, subprocess.SubprocessError) as err:
            logger.error("%s: %s (see the logs in %s)", name, err, args.out)
        finally:
            server.stop()
    if not results:
        logger.error("no configuration produced a result")
        return 1
    report = subprocess.run([sys.executable, "-m", "bench.accuracy_report", *map(str, results), "--by-length"],
                            capture_output=True, text=True)  # fmt: skip
    (args.out / "report.txt").write_text(report.stdout + report.stderr)
    print(report.stdout)
    return 0 if len(results) == len(args.configs) else 1


if __name__ == "__main__":
    sys.exit(main())
