# SPDX-License-Identifier: Apache-2.0
"""Shared fixtures: SGLang server arguments built on the CPU from the model shapes in ../shared."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

# Without CUDA, Triton kernels run in the interpreter; it must be on before any @triton.jit function is created,
# whichever test folder imports the kernels first (explicit settings win).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
MODEL_SHAPES = REPO.parent / "shared" / "device" / "models"


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for the module: the planner's small batched ops (SVD above all) are much slower
    oversubscribed on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def llama_shape() -> Path:
    """A Llama (GQA 32/8, head_dim 64) config and tokenizer, served with dummy weights."""
    path = MODEL_SHAPES / "llama-3.2-1b-shape"
    if not (path / "config.json").exists():
        pytest.fail(f"model shape missing: {path} (the repo expects ../shared beside it)")
    return path


@pytest.fixture(scope="session")
def mla_shape(tmp_path_factory: pytest.TempPathFactory, llama_shape: Path) -> Path:
    """A tiny DeepSeek-V2 (MLA) config with the Llama shape's tokenizer."""
    path = tmp_path_factory.mktemp("mla-shape")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama_shape / name, path / name)
    config = {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "hidden_size": 256,
        "intermediate_size": 512, "moe_intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 64, "q_lora_rank": None,
        "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "n_routed_experts": 4,
        "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "vocab_size": 2000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "torch_dtype": "bfloat16", "topk_method": "greedy", "n_group": 1, "topk_group": 1,
        "routed_scaling_factor": 1.0, "scoring_func": "softmax", "norm_topk_prob": False,
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="session")
def sglang_with_plugin():
    """SGLang's plugin loading as a launcher runs it: our entry point registered, hooks applied."""
    from sglang.srt.plugins import load_plugins

    load_plugins()
    import sglang.srt.server_args as server_args_module

    return server_args_module


@pytest.fixture(scope="session")
def cpu_args(llama_shape: Path):
    """Build CLI arguments that SGLang resolves on a CPU-only machine (the Llama shape unless given)."""

    def build(*extra: str, model: Path = llama_shape) -> list[str]:
        return ["--model-path", str(model), "--load-format", "dummy", "--device", "cpu", *extra]

    return build
