# SPDX-License-Identifier: Apache-2.0
"""Serving throughput of stock SGLang, fp8 KV and MosaicKV, one configuration after another (GPU machine).

For every configuration (names as in :mod:`bench.serve_check`: ``dense``, ``fp8``, ``mosaic-r<ratio>...``) the
script starts ``python -m sglang.launch_server`` with the same model and extra flags, runs ``python -m
sglang.bench_serving --backend sglang`` with the given dataset options against it, and records SGLang's own result
line (output token throughput, TPOT, TTFT) plus the server's ``max_total_num_tokens``. Results go to
``<out>/throughput.json`` after every configuration, so a run cut short keeps what it measured.

Run ``python -m bench.serving_throughput --help``. Example (the 8B shape with dummy weights)::

    python -m bench.serving_throughput --model $MKV_MODELS/llama-3.1-8b-shape --configs dense mosaic-r3 \\
        --server-args "--load-format dummy --mem-fraction-static 0.8" \\
        --bench-args "--dataset-name random-ids --num-prompts 64 --random-input-len 16000 --random-output-len 256 \\
        --random-range-ratio 1.0" --out $OUT/tput
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from bench.serve_check import Server, _get, config_flags

logger = logging.getLogger("bench.serving_throughput")

# Keys of bench_serving's --output-file JSON lines that the report keeps.
KEPT = ("completed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
        "output_throughput", "input_throughput", "mean_ttft_ms", "median_ttft_ms", "mean_tpot_ms",
        "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "max_concurrency")  # fmt: skip


def run_bench(url: str, model: str, bench_args: List[str], result_file: Path, log_path: Path, timeout: float) -> Dict:
    """One ``sglang.bench_serving`` run; returns the kept keys of its result line."""
    port = url.rsplit(":", 1)[1]
    cmd = [sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang", "--host", "127.0.0.1", "--port",
           port, "--model", model, "--tokenizer", model, "--output-file", str(result_file), *bench_args]  # fmt: skip
    logger.info("bench: %s", " ".join(cmd))
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"bench_serving exited with {proc.returncode} (see {log_path.name})")
    last = result_file.read_text().strip().splitlines()[-1]
    data = json.loads(last)
    return {k: data[k] for k in KEPT if k in data}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--configs", nargs="+", default=["dense", "mosaic-r3"])
    ap.add_argument("--server-args", default="", help="extra flags for every server, one string")
    ap.add_argument("--dense-backend", default="flashinfer")
    ap.add_argument("--bench-args", required=True, help="flags for sglang.bench_serving, one string")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--ready-timeout", type=float, default=420.0)
    ap.add_argument("--bench-timeout", type=float, default=1800.0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    results: Dict[str, Dict[str, Any]] = {}
    for name in args.configs:
        flags = config_flags(name, args.dense_backend)
        server = Server(args.model, args.port, flags, args.out / f"server_{name}.log", args.server_args.split())
        res: Dict[str, Any] = {"config": name, "server_command": " ".join(server.cmd), "bench_args": args.bench_args}
        t0 = time.time()
        try:
            server.wait_ready(args.ready_timeout)
            res["startup_seconds"] = round(time.time() - t0, 1)
            info = _get(server.url + "/get_server_info")
            res["max_total_num_tokens"] = info.get("max_total_num_tokens")
            res.update(run_bench(server.url, args.model, args.bench_args.split(), args.out / f"bench_{name}.jsonl",
                                 args.out / f"bench_{name}.log", args.bench_timeout))  # fmt: skip
        except Exception as err:  # noqa: BLE001 - recorded for the report
            res["error"] = repr(err)
            logger.error("%s: %s", name, err)
        finally:
            server.stop()
        results[name] = res
        (args.out / "throughput.json").write_text(json.dumps(results, indent=1))
        logger.info("%s: %s", name, json.dumps(res))
    base = results.get("dense", {}).get("output_throughput")
    for name, res in results.items():
        if base and res.get("output_throughput"):
            res["output_throughput_vs_dense"] = round(res["output_throughput"] / base, 3)
    (args.out / "throughput.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
