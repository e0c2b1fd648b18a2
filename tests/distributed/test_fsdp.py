"""FSDP2 for real: two CPU processes over gloo, each holding a shard of every parameter (``fully_shard``), against one
process without FSDP on the same global batch; and the refusals of what cannot run sharded.

Under FSDP each rank holds a column shard J_s of every task's row. The engine lets FSDP reduce-scatter each task's
backward with a plain sum (the losses are already normalised by their global item counts), sums the per-shard
Gramians G = Σ_s J_s J_sᵀ over the ranks, takes the method's weights from G on every rank, and writes its shard of
wᵀ J as a DTensor gradient (`hf_mtl.engine.fsdp`). So after a few SGD steps the gathered parameters must match the
one-process run (per-device batch 2b there, b on each of the two ranks) to float rounding, with gradient
accumulation, sampling strategies that leave tasks out of micro-steps, a task labelled on one rank only in a
micro-batch, one global problem, surgery restricted by name, loss weighting from the step's losses (FAMO), and the trainer's evaluation.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.utils import DistributedType

from hf_mtl.engine.fsdp import distribution_refusal, fsdp_refusal
from hf_mtl.methods import get_method
from hf_mtl.sharpness import get_sharpness

SCRIPT = Path(__file__).with_name("train_tiny_fsdp.py")

#: the configurations of the one launch (``name=method,option:value,...``), trained in both runs
TRAINED = [
    "mgda_all=mgda,evaluate:yes",
    "upgrad_uniform=upgrad,sampling:uniform,accumulation:2",
    "ew_temperature=ew,sampling:temperature,accumulation:2",
    "famo_uniform=famo,sampling:uniform,accumulation:2",
    "pcgrad_partial=pcgrad,partial:yes",
    "dualproj_global=dualproj,blocks:global,sampling:proportional",
    "imtl_scales=imtl,sampling:uniform,accumulation:2",
    "cagrad_surgery=cagrad,surgery:encoder\\.layer",
]
#: configurations the engine refuses when it finds sharded parameters -> a phrase of the message
REFUSED = {
    "gradvac_refused=gradvac": "needs each task's whole gradient row",
    "heads_unsharded=pcgrad,shard:encoders": "every trainable parameter must be sharded",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(command: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_two_fsdp_processes_match_one_process_on_the_same_global_batch(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, str(SCRIPT), str(one), "4", *TRAINED], cwd=tmp_path)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    launcher += ["--master_port", str(_free_port())]
    _run([*launcher, str(SCRIPT), str(two), "2", *TRAINED, *REFUSED], cwd=tmp_path)
    for config in TRAINED:
        name = config.split("=")[0]
        single, double = torch.load(one / f"{name}.pt"), torch.load(two / f"{name}.pt")
        assert single["world_size"] == 1 and double["world_size"] == 2
        # every trainable parameter was an FSDP shard, and each rank held about half of the model
        assert single["sharded_parameters"] == 0 and double["sharded_parameters"] == len(double["params"]), name
        assert double["local_size"] < 0.6 * double["full_size"], name
        assert "FSDP shards" in double["describe"] or "weights the task losses" in double["describe"], name
        for param, value in single["params"].items():
            torch.testing.assert_close(double["params"][param], value, rtol=1e-5, atol=1e-6, msg=f"{name}: {param}")
        for param, value in single["method"].items():  # the method's own parameters (IMTL-L's loss scales)
            torch.testing.assert_close(double["method"][param], value, rtol=1e-5, atol=1e-6, msg=f"{name}: {param}")
        moved = [n for n, v in single["params"].items() if not torch.equal(v, single["initial"][n])]
        assert len(moved) > (len(single["params"]) // 2 if "sampling" not in config else 0), name
        # the logged step means of the losses and the method's weights
        for a, b in zip(single["logs"], double["logs"], strict=True):
            assert a.keys() == b.keys(), name
            for key, value in a.items():
                assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-6), f"{name}: {key}"
        for key, value in single["metrics"].items():  # evaluation: the ranks run as many forwards, results gathered
            if key.startswith("eval_"):
                assert double["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert torch.load(two / "mgda_all.pt")["metrics"], "the evaluation ran"
    assert torch.load(one / "imtl_scales.pt")["method"]["s"].abs().max() > 0.1, "IMTL-L's scales trained"
    # a micro-batch had `coarse` items on one rank and none on the other: both ranks backpropagated it
    assert torch.load(two / "pcgrad_partial.pt")["split_micro_batches"] > 0
    for config, phrase in REFUSED.items():
        saved = torch.load(two / f"{config.split('=')[0]}.pt")
        assert phrase in saved["refusal"], saved


def _refusal(name: str, **kwargs) -> str | None:
    method = get_method(name, num_tasks=3, **kwargs.pop("method_kwargs", {}))
    return distribution_refusal(
        DistributedType.FSDP, method=method, fsdp_version=kwargs.pop("fsdp_version", 2), **kwargs
    )


@pytest.mark.parametrize(
    "name",
    ["pcgrad", "mgda", "cagrad", "nash_mtl", "upgrad", "dualproj", "aligned_mtl", "cr_mogm", "ew", "famo", "rlw"],
)
def test_gramian_and_loss_weighting_methods_run_under_fsdp(name):
    assert _refusal(name) is None


@pytest.mark.parametrize(
    ("name", "phrase"),
    [
        ("gradvac", "whole gradient row"),
        ("db_mtl", "whole gradient row"),
        ("moco", "whole gradient row"),
        ("trimmed_mean", "whole gradient row"),
        ("excess_mtl", "whole gradient row"),
        ("graddrop", "per-task gradients of the shared features"),
        ("mgda_ub", "per-task gradients of the shared features"),
        ("gradnorm", "whole gradient row"),
    ],
)
def test_methods_that_need_whole_rows_are_refused_under_fsdp(name, phrase):
    message = _refusal(name)
    assert message is not None and phrase in message and "use DDP" in message, message


@pytest.mark.parametrize("name", ["uw", "imtl"])
def test_methods_with_own_parameters_are_refused_under_fsdp_only_when_the_optimizer_is_checkpointed(name):
    message = _refusal(name, saves_optimizer=True)
    assert message is not None and "parameter(s) of its own" in message and "save_only_model=True" in message
    assert ("loss_balancing" in message) == (name == "imtl")
    assert _refusal(name, saves_optimizer=False) is None
    assert _refusal("imtl", method_kwargs={"loss_balancing": False}, saves_optimizer=True) is None


@pytest.mark.parametrize("variant", ["sam", "asam", "fmtl"])
def test_sharpness_variants_are_refused_under_fsdp(variant):
    message = _refusal("pcgrad", sharpness=get_sharpness(variant, rho=0.05))
    assert message is not None and f"{variant.upper()} (`sam`)" in message and "use DDP" in message


@pytest.mark.parametrize("mode", ["features", "gramian"])
def test_jacobian_modes_without_rows_are_refused_under_fsdp(mode):
    message = _refusal("upgrad", jacobian_mode=mode)
    assert message is not None and f"`mtl_jacobian_mode`={mode!r}" in message and "'rows'" in message


def test_fsdp1_is_refused_with_the_setting_that_runs():
    message = _refusal("mgda", fsdp_version=1)
    assert message is not None and "fsdp_version" in message and "2" in message


@pytest.mark.parametrize("name", ["pcgrad", "ew"])
def test_deepspeed_is_refused_for_every_method(name):
    message = distribution_refusal(DistributedType.DEEPSPEED, method=get_method(name, num_tasks=3))
    assert message is not None and "DeepSpeed" in message and "DDP" in message


@pytest.mark.parametrize("kind", [DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU])
def test_data_parallel_runs_every_method(kind):
    for name in ("gradvac", "uw", "mgda_ub"):
        assert distribution_refusal(kind, method=get_method(name, num_tasks=3)) is None
    assert fsdp_refusal(get_method("mgda", num_tasks=3)) is None
