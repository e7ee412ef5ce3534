"""tools/gpu_check.py, the one command for a lent GPU machine: run on CPU here so it cannot rot between the rare
sessions that have a GPU (a broken script would waste one), and on CUDA in the GPU tier."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


from tests.conftest import needs_gpus

REPO = Path(__file__).resolve().parents[1]


def _run(device: str, tmp_path: Path) -> tuple[int, dict, str]:
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--device", device, "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=900)
    last = proc.stdout.strip().splitlines()[-1]
    return proc.returncode, json.loads(last), proc.stdout + proc.stderr


def _assert_passed(code: int, report: dict, output: str, device: str) -> None:
    assert report["device"] == device
    failed = {name: check for name, check in report["checks"].items() if not check["ok"]}
    assert code == 0 and report["ok"] and not failed, f"failed checks: {failed}\n{output[-3000:]}"
    assert set(report["checks"]) == {"parity_fp32", "update_bf16", "checkpoint", "resume", "export", "throughput"}
    assert report["checks"]["throughput"]["equal"]["update_tokens_per_s"] > 0
    assert report["checks"]["checkpoint"]["differing_after_load"] == 0
    assert report["checks"]["parity_fp32"]["optimizer"] == "DistributedOptimizer"


def test_gpu_check_passes_on_cpu(tmp_path):
    code, report, output = _run("cpu", tmp_path)
    _assert_passed(code, report, output, "cpu")
    assert json.loads((tmp_path / "results.json").read_text())["ok"]


def test_unknown_check_is_refused():
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--device", "cpu", "--checks", "speed"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "unknown check 'speed'" in proc.stderr


@needs_gpus(1)
def test_gpu_check_passes_on_cuda(tmp_path):
    code, report, output = _run("cuda", tmp_path)
    _assert_passed(code, report, output, "cuda")
    assert report["checks"]["update_bf16"]["param_dtype"] == "torch.bfloat16"
