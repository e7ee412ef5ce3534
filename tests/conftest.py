"""Shared fixtures: tiny random-weight HF models built once per test session (no downloads); the test tiers.

Tiers: the CPU tier runs everywhere, a machine with GPUs included (Megatron over gloo stays on the CPU there);
`gpu` tests need CUDA and skip, naming how many GPUs they need, where fewer exist (`pytest -m gpu` runs that tier);
`stack` tests need the serving stack (vLLM and Ray) and skip where it is not installed, as on a GPU machine that
only carries megatron-core.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MISSING_STACK = [m for m in ("vllm", "ray") if importlib.util.find_spec(m) is None]
# test modules that import vLLM or Ray themselves: not collected at all where either is missing
collect_ignore = ["test_engine_placement.py", "test_rollout_units.py", "test_shm_direct.py",
                  "test_transport.py"] if MISSING_STACK else []


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def needs_gpus(n: int = 1):
    """Decorator of a GPU-tier test that needs n GPUs."""
    def mark(fn):
        return pytest.mark.gpu(pytest.mark.skipif(gpu_count() < n, reason=f"needs {n} GPU(s), found {gpu_count()}")(fn))
    return mark


def pytest_collection_modifyitems(config, items):
    if not MISSING_STACK:
        return
    skip = pytest.mark.skip(reason=f"needs the serving stack ({', '.join(MISSING_STACK)} not installed)")
    for item in items:
        if item.get_closest_marker("stack"):
            item.add_marker(skip)


def pytest_report_header(config):
    if MISSING_STACK:
        return [f"serving stack absent ({', '.join(MISSING_STACK)}): not collected: {', '.join(collect_ignore)}; "
                "`stack` tests skip"]
    return []

# (family, tied embeddings): every family the builder supports, both embedding layouts.
TINY_CASES = [("llama", False), ("llama", True), ("qwen2", False), ("qwen2", True), ("qwen3", False),
              ("qwen3", True)]


def case_id(family: str, tied: bool) -> str:
    return f"{family}_{'tied' if tied else 'untied'}"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """case id -> HF dir. Vocab 1000 (padded to 1024 in Megatron), head_dim 32, GQA 4 heads / 2 groups."""
    from harmony_mcore.tiny import make_tiny_hf_model

    root = tmp_path_factory.mktemp("tiny_hf")
    return {
        case_id(f, t): make_tiny_hf_model(root / case_id(f, t), f, tied=t, seed=i, llama3_rope=(f == "llama"))
        for i, (f, t) in enumerate(TINY_CASES)
    }


@pytest.fixture(scope="session")
def tiny_qwen3(tiny_models) -> Path:
    return tiny_models["qwen3_untied"]
