"""benchmarks/gpu_smoke.py is run by hand on GPU machines; here only its step list, which needs no GPU."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_lists_every_step_without_a_gpu(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_smoke.py"), "--dry-run",
                             "--out", str(tmp_path / "smoke")], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    for step in ("versions", "probe-thread-device", "probe-nccl-wait", "probe-side-stream", "probe-bf16",
                 "colocated-fp32", "colocated-bf16", "colocated-fp16", "disaggregated-1gpu", "nccl-launch",
                 "nccl-killed-server"):
        assert f"  {step} " in result.stdout, step
    assert "tolerances" in result.stdout
    assert not (tmp_path / "smoke").exists()  # a dry run writes nothing
