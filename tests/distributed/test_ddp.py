"""Real multi-process runs: two CPU processes over gloo (Accelerate's MULTI_CPU) against one process on the
same global batch (DESIGN.md, "Exactness is testable").

The engine averages the per-task rows over the ranks in one collective before the method sees them, and
every rank draws the same tasks in the same step, so the parameters after a few SGD steps must match the
one-process run (per-device batch 2b there, b on each of the two ranks) up to float rounding. Averaging
the outputs of per-rank surgery instead would not match: the methods are not linear. ``rlw`` with
``uniform`` sampling checks that the ranks draw the same tasks and the same random weights.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("train_tiny.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(command: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize(("method", "sampling"), [("pcgrad", "all"), ("rlw", "uniform")])
def test_two_processes_match_one_on_the_same_global_batch(tmp_path, method, sampling):
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, str(SCRIPT), str(one), method, "8", sampling], cwd=tmp_path)
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            str(SCRIPT),
            str(two),
            method,
            "4",
            sampling,
        ],
        cwd=tmp_path,
    )
    single, double = torch.load(one / "result.pt"), torch.load(two / "result.pt")
    assert single["world_size"] == 1 and double["world_size"] == 2
    assert double["distributed_type"] == "DistributedType.MULTI_CPU"
    for name, value in single["params"].items():
        torch.testing.assert_close(double["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    moved = [n for n, v in single["params"].items() if not torch.equal(v, single["initial"][n])]
    # the steps trained: with `all` every encoder and head moves, with one task group a step only some do
    assert len(moved) > (len(single["params"]) // 2 if sampling == "all" else 0)
    for key, value in single["metrics"].items():  # evaluation gathers the shards of both ranks
        if key.startswith("eval_"):
            assert double["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
