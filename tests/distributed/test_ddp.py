"""Real multi-process runs: two CPU processes over gloo (Accelerate's MULTI_CPU), launched by ``torchrun`` and by
``accelerate launch`` with a config file, against one process on the same global batch.

Every task's loss is normalised by its labelled items over the whole step (all micro-batches, all ranks), the
engine sums the per-task rows over the ranks in one collective before the method sees them, every rank draws
the same tasks in the same step, loss-weighting methods take their weights from the step's global mean losses,
representation methods sum their feature Gramians over the ranks, and SAM / F-MTL perturb along the whole
step's gradient. So the parameters after a few SGD steps must match the one-process run (per-device batch 2b
there, b on each of the two ranks) to float rounding, with gradient accumulation and with sampling strategies
that leave tasks out of micro-steps. Averaging the outputs of per-rank surgery instead would not match: the
methods are not linear.
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

#: launcher -> the configurations it runs (``name=method,option:value,...``)
CONFIGS = {
    "torchrun": [
        "pcgrad_all=pcgrad,evaluate:yes",
        "cagrad_uniform=cagrad,sampling:uniform,accumulation:2",
        "mgda_ub_uniform=mgda_ub,sampling:uniform,accumulation:2",
        "fmtl_pcgrad=pcgrad,sam:fmtl,sampling:proportional,accumulation:2",
    ],
    "accelerate": [
        "famo_uniform=famo,sampling:uniform,accumulation:2",
        "sam_upgrad=upgrad,sam:sam,sampling:temperature,accumulation:2",
        "rlw_uniform=rlw,sampling:uniform",
    ],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(command: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _launch(launcher: str, out: Path, configs: list[str], cwd: Path) -> None:
    port = _free_port()
    if launcher == "torchrun":
        prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        prefix += ["--master_addr", "127.0.0.1", "--master_port", str(port)]
    else:
        config = cwd / "accelerate.yaml"
        config.write_text(
            "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 2\nnum_machines: 1\n"
            f"machine_rank: 0\nmain_process_ip: 127.0.0.1\nmain_process_port: {port}\nmixed_precision: 'no'\n"
            "rdzv_backend: static\nsame_network: true\nuse_cpu: false\n"
        )
        prefix = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    _run([*prefix, str(SCRIPT), str(out), "4", *configs], cwd=cwd)


@pytest.mark.parametrize("launcher", list(CONFIGS))
def test_two_processes_match_one_on_the_same_global_batch(tmp_path, launcher):
    configs = CONFIGS[launcher]
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, str(SCRIPT), str(one), "8", *configs], cwd=tmp_path)
    _launch(launcher, two, configs, cwd=tmp_path)
    for config in configs:
        name = config.split("=")[0]
        single, double = torch.load(one / f"{name}.pt"), torch.load(two / f"{name}.pt")
        assert single["world_size"] == 1 and double["world_size"] == 2
        assert double["distributed_type"] == "DistributedType.MULTI_CPU"
        for param, value in single["params"].items():
            torch.testing.assert_close(double["params"][param], value, rtol=1e-5, atol=1e-6, msg=f"{name}: {param}")
        moved = [n for n, v in single["params"].items() if not torch.equal(v, single["initial"][n])]
        # the steps trained: with `all` every encoder and head moves, with one task group a step only some do
        assert len(moved) > (len(single["params"]) // 2 if "sampling" not in config else 0), name
        # the logged losses are the same step means in both runs
        for a, b in zip(single["logs"], double["logs"]):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), name
        for key, value in single["metrics"].items():  # evaluation gathers the shards of both ranks
            if key.startswith("eval_"):
                assert double["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_a_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_weights(tmp_path):
    """SIGKILL right after checkpoint-3, then `resume_from_checkpoint`: FAMO (its logits and Adam moments in
    mtl_state.pt), uniform sampling (the task draws from the seed and the step), dropout on (the Trainer's saved RNG
    states): the final weights are the uninterrupted run's, bit for bit."""
    options = "famo,sampling:uniform,dropout:on,save:3"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "TINY_STEPS": "6"}
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _run_env([sys.executable, str(SCRIPT), str(whole), "8", f"run={options}"], tmp_path, env)
    killed = subprocess.run(
        [sys.executable, str(SCRIPT), str(cut), "8", f"run={options},kill:3"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (cut / "run" / "checkpoint-3" / "mtl_state.pt").is_file() and not (cut / "run.pt").exists()
    _run_env([sys.executable, str(SCRIPT), str(cut), "8", f"run={options},resume:yes"], tmp_path, env)
    a, b = torch.load(whole / "run.pt"), torch.load(cut / "run.pt")
    for name, value in a["params"].items():
        assert torch.equal(b["params"][name], value), name
    assert any(not torch.equal(v, a["initial"][n]) for n, v in a["params"].items())


def _run_env(command: list[str], cwd: Path, env: dict[str, str]) -> None:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
