# SPDX-License-Identifier: Apache-2.0
"""Pad a Llama checkpoint with zero attention heads so that tensor parallelism can shard it, without changing
what it computes.

SmolLM2-135M-Instruct has 9 query heads and 3 KV heads: ``--tp-size 2`` cannot split them. Adding one KV head whose
K/V projections are zero, and ``group`` query heads that read it and whose columns of ``o_proj`` are zero, gives
12 query / 4 KV heads (GQA group 3 kept). The added heads contribute exactly zero to the output (their V rows are
zero and so is their share of ``o_proj``), so the padded model computes the same function and a TP2 run of it
can be compared with a TP1 run on real text.

Run ``python -m bench.pad_heads --src DIR --out DIR --kv-heads 4``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

_PROJ = re.compile(r"^(?P<prefix>.*\.self_attn)\.(?P<proj>[qkvo])_proj\.(?P<kind>weight|bias)$")


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros((rows - t.shape[0],) + tuple(t.shape[1:]))], dim=0)


def pad_state_dict(
    state: Dict[str, torch.Tensor], *, q_heads: int, kv_heads: int, head_dim: int, new_kv_heads: int
) -> Dict[str, torch.Tensor]:
    """The state dict with ``new_kv_heads`` KV heads (and as many more query heads as keep the GQA group)."""
    if q_heads % kv_heads:
        raise ValueError(f"q_heads: expected a multiple of kv_heads={kv_heads}, got {q_heads}")
    if new_kv_heads < kv_heads:
        raise ValueError(f"kv_heads: expected at least the model's {kv_heads}, got {new_kv_heads}")
    group = q_heads // kv_heads
    new_q = new_kv_heads * group
    out: Dict[str, torch.Tensor] = {}
    for name, t in state.items():
        m = _PROJ.match(name)
        if m is None:
            out[name] = t
            continue
        proj, kind = m["proj"], m["kind"]
        if proj == "q":
            out[name] = _pad_rows(t, new_q * head_dim)
        elif proj in "kv":
            out[name] = _pad_rows(t, new_kv_heads * head_dim)
        elif kind == "weight":  # o_proj: [hidden, q_heads * head_dim] -> zero columns for the new heads
            out[name] = _pad_rows(t.t(), new_q * head_dim).t().contiguous()
        else:  # o_proj bias is per output feature: unchanged
            out[name] = t
    return out


def pad_checkpoint(src: Path, out: Path, new_kv_heads: int) -> Path:
    """Write the padded safetensors checkpoint (config, weights, tokenizer files) to ``out``; returns ``out``."""
    from safetensors.torch import load_file, save_file

    config = json.loads((src / "config.json").read_text())
    q_heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // q_heads
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"--src: expected a safetensors checkpoint directory, got {src} (no *.safetensors)")
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        padded = pad_state_dict(load_file(str(f)), q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
                                new_kv_heads=new_kv_heads)  # fmt: skip
        save_file(padded, str(out / f.name), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy2(f, out / f.name)
    config.update(num_attention_heads=new_kv_heads * (q_heads // kv_heads), num_key_value_heads=new_kv_heads,
                  head_dim=head_dim)  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, required=True, help="Llama safetensors checkpoint directory")
    ap.add_argument("--out", type=Path, required=True, help="directory of the padded checkpoint")
    ap.add_argument("--kv-heads", type=int, default=4, help="KV heads after padding (default 4)")
    args = ap.parse_args(argv)
    print(pad_checkpoint(args.src, args.out, args.kv_heads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
