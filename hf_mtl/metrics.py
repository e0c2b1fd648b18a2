"""Per-task evaluation with 🤗 `evaluate`, Δm against a baseline, and gradient-conflict diagnostics.

Three parts:

- **Built-in metrics that work offline.** ``evaluate.load("accuracy")`` fetches the module's script
  from the Hub, so it fails without a network. hf_mtl therefore ships its own `evaluate.Metric`
  subclasses for the common metrics, under the Hub modules' names and with the same output keys
  (``accuracy``, ``f1``, ``precision``, ``recall``, ``matthews_correlation``, ``mse``, ``mae``), so a
  module from ``evaluate.load`` can replace ours and give the same key. The arithmetic is
  scikit-learn's, exactly as in the Hub modules (which call the same functions): the numbers, and
  the edge cases (a class never predicted, ``zero_division``, a constant prediction in MCC) agree
  with what users get from the Hub, and scikit-learn is already a dependency.
- **Per-task metrics** (`compute_task_metrics`): drops the missing labels of each head kind
  (``-100`` for classes, NaN for regression targets), flattens what must be flattened, runs each
  metric and returns flat ``{name: float}`` results that the trainer reports as
  ``eval_<task>_<name>``.
- **Summaries**: `delta_m` (Maninis et al., 2019, in the convention of Nash-MTL and FAMO) and the gradient-conflict measures of Elich et al.,
  "Examining Common Paradigms in Multi-Task Learning" (arXiv 2311.04698, §4.2 and App. A3.2):
  `gradient_conflict` between task gradients, `inter_sample_conflict` and
  `inter_task_conflict_per_sample` over per-sample gradients.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import evaluate
import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    matthews_corrcoef,
    mean_absolute_error,
    mean_squared_error,
    precision_score,
    recall_score,
)
from torch import Tensor
from transformers.utils import logging

from .registry import Registry

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100

#: Built-in metrics, by their Hub names.
METRICS: Registry[type[BuiltinMetric]] = Registry("metric")

MetricSpec = str | evaluate.EvaluationModule

_CITATION_SKLEARN = """\
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and Varoquaux, G. and Gramfort, A. and Michel, V. and Thirion, B. and Grisel, O.
          and Blondel, M. and Prettenhofer, P. and Weiss, R. and Dubourg, V. and Vanderplas, J. and Passos, A.
          and Cournapeau, D. and Brucher, M. and Perrot, M. and Duchesnay, E.},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


def list_metrics() -> list[str]:
    """The names of the built-in (offline) metrics."""
    return METRICS.names()


# --------------------------------------------------------------------------------------------------
# Built-in metrics
# --------------------------------------------------------------------------------------------------


class BuiltinMetric(evaluate.Metric):
    """Base of hf_mtl's offline metrics: an `evaluate.Metric` whose ``_info`` needs no download.

    Each subclass carries the Hub module's name and output key and the Hub module's compute
    arguments. Differences from the Hub modules: values are stored as int64 / float64 (the Hub
    uses int32 / float32), ``f1`` / ``precision`` / ``recall`` average ``"macro"`` by default (the
    Hub: ``"binary"``, which fails on more than two classes) and score an empty class 0 without a
    warning, and ``mse(squared=False)`` works with every scikit-learn release.

    Instances keep their inputs in memory (``keep_in_memory=True`` unless told otherwise), so they
    write no cache files and several processes never contend for a lock file.

    Args:
        config_name (`str`, *optional*, defaults to `"default"`):
            ``"default"`` (one value per example) or the Hub module's configuration for one sequence
            per example (``"multilabel"`` for ``accuracy``, ``f1``, ``precision`` and ``recall``,
            ``"multilist"`` for ``mse`` and ``mae``; ``matthews_correlation`` has none).
        keep_in_memory (`bool`, *optional*, defaults to `True`):
            Passed to `evaluate.EvaluationModule`.
        kwargs:
            Other `evaluate.EvaluationModule` arguments (``cache_dir``, ``experiment_id``, ...).
    """

    #: Arrow type of one value; set by subclasses.
    value_type: str = "int64"
    #: Whether a higher value is better: the direction Δm (`delta_m`) and `metric_for_best_model` read
    #: (`metric_greater_is_better`). Error metrics set it to `False`.
    greater_is_better: bool = True
    #: Name of the configuration with one sequence per example.
    sequence_config: str | None = "multilabel"
    reference_url: str = ""

    def __init__(self, config_name: str | None = None, keep_in_memory: bool = True, **kwargs: Any) -> None:
        valid = ("default", self.sequence_config) if self.sequence_config else ("default",)
        if config_name is not None and config_name not in valid:
            raise ValueError(
                f"`config_name` of metric {type(self).__name__} must be one of {list(valid)}, got {config_name!r}"
            )
        super().__init__(config_name=config_name, keep_in_memory=keep_in_memory, **kwargs)

    def _info(self) -> evaluate.MetricInfo:
        value = datasets.Value(self.value_type)
        if self.config_name == self.sequence_config:
            value = datasets.Sequence(value)
        return evaluate.MetricInfo(
            description=(type(self).__doc__ or "").strip().split("\n")[0],
            citation=_CITATION_SKLEARN,
            inputs_description=(type(self).__doc__ or ""),
            features=datasets.Features({"predictions": value, "references": value}),
            reference_urls=[type(self).reference_url] if type(self).reference_url else [],
        )


@METRICS.register("accuracy")
class Accuracy(BuiltinMetric):
    """Accuracy: the fraction of predictions equal to their reference (`sklearn.metrics.accuracy_score`).

    Compute arguments:
        normalize (`bool`, *optional*, defaults to `True`): ``False`` returns the number of correct predictions.
        sample_weight (`list[float]`, *optional*): per-example weights.

    Returns: ``{"accuracy": float}``.
    """

    reference_url = "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"

    def _compute(self, predictions, references, normalize: bool = True, sample_weight=None) -> dict[str, float]:
        return {
            "accuracy": float(accuracy_score(references, predictions, normalize=normalize, sample_weight=sample_weight))
        }


class _AveragedMetric(BuiltinMetric):
    """A precision-style metric with an ``average`` that can be fixed at construction."""

    score_fn = None
    key = ""

    def __init__(self, average: str | None = "macro", **kwargs: Any) -> None:
        valid = ("macro", "micro", "weighted", "binary", "samples", None)
        if average not in valid:
            raise ValueError(f"`average` of metric {self.key!r} must be one of {list(valid)}, got {average!r}")
        super().__init__(**kwargs)
        self.average = average

    def _compute(
        self,
        predictions,
        references,
        labels=None,
        pos_label: int = 1,
        sample_weight=None,
        zero_division: float | str = 0.0,
        **kwargs: Any,
    ) -> dict[str, Any]:
        average = kwargs.pop("average", self.average)
        if kwargs:
            raise TypeError(f"metric {self.key!r} got unexpected compute argument(s) {sorted(kwargs)}")
        score = type(self).score_fn(
            references,
            predictions,
            labels=labels,
            pos_label=pos_label,
            average=average,
            sample_weight=sample_weight,
            zero_division=zero_division,
        )
        score = np.asarray(score)
        return {self.key: float(score) if score.size == 1 else score}


@METRICS.register("f1")
class F1(_AveragedMetric):
    """F1 score, the harmonic mean of precision and recall (`sklearn.metrics.f1_score`).

    Unlike the Hub module (``average="binary"``), the default is the **macro** average, which is
    defined for any number of classes.

    Args:
        average (`str` or `None`, *optional*, defaults to `"macro"`):
            ``"macro"``, ``"micro"``, ``"weighted"``, ``"binary"`` (the ``pos_label`` class only),
            ``"samples"`` (``multilabel`` configuration), or ``None`` for one score per class. A
            compute argument ``average=...`` overrides it for one call.

    Compute arguments: ``labels``, ``pos_label`` (defaults to 1), ``average``, ``sample_weight``,
    ``zero_division`` (defaults to 0.0: a class with no predicted or true example scores 0, silently).

    Returns: ``{"f1": float}``, or ``{"f1": array}`` with ``average=None``.
    """

    score_fn = staticmethod(f1_score)
    key = "f1"
    reference_url = "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html"


@METRICS.register("precision")
class Precision(_AveragedMetric):
    """Precision, TP / (TP + FP) (`sklearn.metrics.precision_score`); ``average`` as for `F1`
    (macro by default).

    Returns: ``{"precision": float}``, or ``{"precision": array}`` with ``average=None``.
    """

    score_fn = staticmethod(precision_score)
    key = "precision"
    reference_url = "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.precision_score.html"


@METRICS.register("recall")
class Recall(_AveragedMetric):
    """Recall, TP / (TP + FN) (`sklearn.metrics.recall_score`); ``average`` as for `F1` (macro by
    default).

    Returns: ``{"recall": float}``, or ``{"recall": array}`` with ``average=None``.
    """

    score_fn = staticmethod(recall_score)
    key = "recall"
    reference_url = "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.recall_score.html"


@METRICS.register("matthews_correlation")
class MatthewsCorrelation(BuiltinMetric):
    """Matthews correlation coefficient, in [-1, 1], multiclass form (`sklearn.metrics.matthews_corrcoef`).

    Compute arguments: ``sample_weight``.

    Returns: ``{"matthews_correlation": float}``.
    """

    sequence_config = None
    reference_url = "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.matthews_corrcoef.html"

    def _compute(self, predictions, references, sample_weight=None) -> dict[str, float]:
        return {"matthews_correlation": float(matthews_corrcoef(references, predictions, sample_weight=sample_weight))}


def majority_class_accuracy(labels: Sequence[Any]) -> float:
    """The accuracy of always predicting the most frequent label: a chance level for single-label tasks.

    ``max_c |{i : y_i = c}| / n`` over the labels that are present; ``None`` and negative labels
    (the ``-100`` of a missing label) are left out. Returns ``nan`` when no label is present.
    """
    present = [int(label) for label in labels if label is not None and int(label) >= 0]
    if not present:
        return math.nan
    _, counts = np.unique(np.asarray(present), return_counts=True)
    return float(counts.max()) / len(present)


def _regression_error(fn, predictions, references, sample_weight, multioutput) -> Any:
    value = fn(references, predictions, sample_weight=sample_weight, multioutput=multioutput)
    return float(value) if np.ndim(value) == 0 else value


@METRICS.register("mse")
class Mse(BuiltinMetric):
    """Mean squared error (`sklearn.metrics.mean_squared_error`).

    Compute arguments:
        sample_weight (`list[float]`, *optional*): per-example weights.
        multioutput (`str` or array, *optional*, defaults to `"uniform_average"`): with the
            ``"multilist"`` configuration, ``"raw_values"`` gives one error per output.
        squared (`bool`, *optional*, defaults to `True`): ``False`` gives the root mean squared
            error (per output, then averaged, as scikit-learn defines it).

    Returns: ``{"mse": float}``.
    """

    value_type = "float64"
    greater_is_better = False
    sequence_config = "multilist"
    reference_url = "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.mean_squared_error.html"

    def _compute(
        self, predictions, references, sample_weight=None, multioutput="uniform_average", squared: bool = True
    ) -> dict[str, Any]:
        if squared:
            return {"mse": _regression_error(mean_squared_error, predictions, references, sample_weight, multioutput)}
        # scikit-learn >= 1.6 dropped `squared=`; the RMSE is the root of each output's MSE, then averaged
        per_output = np.sqrt(
            mean_squared_error(references, predictions, sample_weight=sample_weight, multioutput="raw_values")
        )
        if isinstance(multioutput, str) and multioutput == "raw_values":
            return {"mse": per_output}
        weights = None if isinstance(multioutput, str) else multioutput
        return {"mse": float(np.average(per_output, weights=weights))}


@METRICS.register("mae")
class Mae(BuiltinMetric):
    """Mean absolute error (`sklearn.metrics.mean_absolute_error`).

    Compute arguments: ``sample_weight``, ``multioutput`` (as for `Mse`).

    Returns: ``{"mae": float}``.
    """

    value_type = "float64"
    greater_is_better = False
    sequence_config = "multilist"
    reference_url = "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.mean_absolute_error.html"

    def _compute(self, predictions, references, sample_weight=None, multioutput="uniform_average") -> dict[str, Any]:
        return {"mae": _regression_error(mean_absolute_error, predictions, references, sample_weight, multioutput)}


def load_metric(spec: MetricSpec, **kwargs: Any) -> evaluate.EvaluationModule:
    """Resolves a metric specification to an `evaluate.EvaluationModule`.

    Args:
        spec (`str` or `evaluate.EvaluationModule`):
            - a built-in name (`list_metrics()`): hf_mtl's offline module, built with ``kwargs``
              (e.g. ``load_metric("f1", average="micro")``);
            - an `evaluate.EvaluationModule` instance (e.g. from ``evaluate.load`` or a user's
              `evaluate.Metric` subclass): returned as is;
            - any other string: ``evaluate.load(spec, **kwargs)``, so a local script folder or file,
              or a Hub module when a network (or a warm cache) is there.
        kwargs:
            Arguments of the built-in module's constructor, or of `evaluate.load`.

    Returns:
        `evaluate.EvaluationModule`

    Raises:
        `ValueError`: for a spec of another type, or a string `evaluate.load` cannot resolve (the
        message names the metric and the built-in names).
    """
    if isinstance(spec, evaluate.EvaluationModule):
        if kwargs:
            raise ValueError(
                f"metric {spec.name!r} is already built; arguments {sorted(kwargs)} apply only to a metric "
                f"given by name"
            )
        return spec
    if not isinstance(spec, str) or not spec:
        raise ValueError(
            f"a metric must be a name or an `evaluate.EvaluationModule`, got {spec!r} ({type(spec).__name__}); "
            f"built-in names are: {', '.join(list_metrics())}"
        )
    if spec in METRICS:
        return METRICS.build(spec, **kwargs)
    try:
        return evaluate.load(spec, **kwargs)
    except Exception as error:  # evaluate raises FileNotFoundError, ConnectionError, ImportError, ...
        raise ValueError(
            f"could not load metric {spec!r} with `evaluate.load` ({type(error).__name__}: {error}). "
            f"Built-in metrics, which need no network, are: {', '.join(list_metrics())}. "
            f"A local metric script folder or an `evaluate.EvaluationModule` instance is accepted too."
        ) from error


def resolve_metrics(
    metrics: MetricSpec | Sequence[MetricSpec] | Mapping[str, MetricSpec],
) -> dict[str, evaluate.EvaluationModule]:
    """Resolves a task's metrics once (so that a bad name fails before training) to ``{name: module}``.

    Args:
        metrics (`str`, `evaluate.EvaluationModule`, a sequence of them, or a mapping):
            A sequence is named by the specs (a module by its ``name``); a mapping gives the names
            under which the results are reported. Already-resolved output of this function passes
            through unchanged.

    Returns:
        `dict[str, evaluate.EvaluationModule]`

    Raises:
        `ValueError`: for an unresolvable metric or two metrics with the same name.
    """
    if isinstance(metrics, (str, evaluate.EvaluationModule)):
        metrics = [metrics]
    if isinstance(metrics, Mapping):
        items = list(metrics.items())
    else:
        items = [(spec.name if isinstance(spec, evaluate.EvaluationModule) else spec, spec) for spec in metrics]
    resolved: dict[str, evaluate.EvaluationModule] = {}
    for name, spec in items:
        if not isinstance(name, str) or not name:
            raise ValueError(f"metric names must be non-empty strings, got {name!r}")
        if name in resolved:
            raise ValueError(
                f"metric {name!r} is given twice; use a mapping to report two variants under different names"
            )
        resolved[name] = load_metric(spec)
    return resolved


def metric_greater_is_better(metric: evaluate.EvaluationModule) -> bool | None:
    """Whether a higher value of ``metric`` is better, read from the metric itself.

    hf_mtl's built-in metrics carry it as the class attribute ``greater_is_better`` (``True`` for
    accuracy, F1, precision, recall and the Matthews correlation, ``False`` for the errors ``mse`` and
    ``mae``). Any other `evaluate.EvaluationModule` is asked for the same attribute, so a user's module
    states its direction with ``module.greater_is_better = False``.

    Returns:
        `bool`, or `None` when the module does not say.
    """
    value = getattr(metric, "greater_is_better", None)
    return None if value is None else bool(value)


# --------------------------------------------------------------------------------------------------
# Per-task metrics
# --------------------------------------------------------------------------------------------------


def _head_class(head: Any) -> Any:
    """The `TaskHead` class of a head kind's name, a head class or a head."""
    from .modeling.heads import HEADS, TaskHead

    if isinstance(head, str):
        if head not in HEADS:
            raise ValueError(f"unknown `head_kind` {head!r}; valid head kinds are: {', '.join(HEADS.names())}")
        return HEADS.get(head)
    if isinstance(head, TaskHead):
        return type(head)
    if isinstance(head, type) and issubclass(head, TaskHead):
        return head
    raise ValueError(f"`head_kind` must be a registered head name or a TaskHead, got {type(head).__name__}")


def _to_numpy(array: Any, field: str) -> np.ndarray:
    if isinstance(array, Tensor):
        array = array.detach().cpu()
        if array.dtype == torch.bfloat16:
            array = array.float()
        return array.numpy()
    try:
        return np.asarray(array)
    except ValueError as error:  # ragged nested lists
        raise ValueError(f"`{field}` must be an array-like of one shape: {error}") from error


def _flatten_result(name: str, result: Mapping[str, Any] | None) -> dict[str, float]:
    """``{key: value}`` of one metric to flat float entries (see `compute_task_metrics`)."""
    if not result:
        return {}
    flat: dict[str, float] = {}
    single = len(result) == 1
    for key, value in result.items():
        entry = name if single and key == name else f"{name}_{key}"
        array = np.asarray(value) if not isinstance(value, str) else None
        if array is None or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
            logger.warning(
                f"metric {name!r}: result {key!r} is not numeric ({type(value).__name__}); it is not reported"
            )
        elif array.size == 1:
            flat[entry] = float(array.reshape(()))
        else:
            for index, item in enumerate(array.reshape(-1)):
                flat[f"{entry}_{index}"] = float(item)
    return flat


def compute_task_metrics(
    head_kind: Any,
    predictions: Any,
    references: Any,
    metrics: MetricSpec | Sequence[MetricSpec] | Mapping[str, MetricSpec],
) -> dict[str, float]:
    """Computes one task's metrics over its present labels.

    The head kind decides what is compared (its ``metric_inputs``: the flat pairs over the present
    labels) and any per-metric ``compute`` arguments (its ``metric_kwargs``), so a head registered by
    a user is scored the same way. For the built-in kinds (``hf_mtl/modeling/heads.py``):

    - ``classification``: references ``-100`` (missing labels). Predictions are class indices, or
      logits of shape ``(N, C)`` (their arg-max is taken).
    - ``token_classification``: positions whose reference is ``-100`` (padding, special tokens,
      sub-words). Predictions ``(B, T)`` or logits ``(B, T, C)``; when predictions and references
      were padded to different lengths, both are cut to the shorter one.
    - ``multilabel``: the ``(N, L)`` 0/1 matrices are flattened and entries whose reference is
      ``-100`` (or NaN) are dropped, so every metric sees one example per present (row, label)
      entry. ``accuracy`` is then the **per-label accuracy** (the fraction of present entries
      right), not the exact-match ratio of whole rows, and the built-in ``f1`` / ``precision`` /
      ``recall`` report the positive class (``average="binary"``, equal to scikit-learn's multilabel
      micro average over the present entries) unless built with another ``average`` than the
      default.
    - ``regression``: references NaN (missing targets); several targets per example are flattened,
      so ``mse`` / ``mae`` average over all present targets.

    Result names: a metric whose result has one key equal to its name gives ``<name>``; other keys
    give ``<name>_<key>``; an array value gives ``<entry>_<index>`` per element (e.g. ``f1`` built
    with ``average=None``). Non-numeric values are skipped with a warning. When a task has no
    present label at all, every metric is reported as NaN.

    Args:
        head_kind (`str`, `TaskHead` or a `TaskHead` class):
            A registered head kind (`hf_mtl.list_heads()`), or the task's head.
        predictions (`np.ndarray`, `torch.Tensor` or nested lists):
            What the head's ``predictions`` gives (or logits, for the classification kinds).
        references (`np.ndarray`, `torch.Tensor` or nested lists):
            The collated labels, with the missing ones marked as above.
        metrics (`str`, `evaluate.EvaluationModule`, a sequence of them, or a mapping):
            See `resolve_metrics`; pass its output to avoid resolving names at every evaluation.

    Returns:
        `dict[str, float]`: metric name to value, to be reported as ``eval_<task>_<name>``.

    Raises:
        `ValueError`: for an unknown head kind, mismatched shapes, a non-0/1 multilabel entry, an
        unresolvable metric, or two results with the same name.
    """
    head = _head_class(head_kind)
    predictions, references = head.metric_inputs(
        _to_numpy(predictions, "predictions"), _to_numpy(references, "references")
    )
    return score_present_labels(head, predictions, references, metrics)


def score_present_labels(
    head_kind: Any,
    predictions: Any,
    references: Any,
    metrics: MetricSpec | Sequence[MetricSpec] | Mapping[str, MetricSpec],
) -> dict[str, float]:
    """Runs every metric on flat (predictions, references) pairs that hold only present labels (what a
    head's ``metric_inputs`` returns); `compute_task_metrics` without the flattening. Same arguments and
    results."""
    head = _head_class(head_kind)
    modules = resolve_metrics(metrics)
    predictions, references = np.asarray(predictions), np.asarray(references)
    if references.size == 0:
        logger.warning(f"{head.name} task: no present label in the evaluation data; its metrics are NaN")
        return {name: math.nan for name in modules}

    results: dict[str, float] = {}
    for name, module in modules.items():
        compute_kwargs = head.metric_kwargs(module)
        flat = _flatten_result(name, module.compute(predictions=predictions, references=references, **compute_kwargs))
        clash = sorted(set(flat) & set(results))
        if clash:
            raise ValueError(f"metric {name!r} reports {clash}, which another metric of the task already reports")
        results.update(flat)
    return results


# --------------------------------------------------------------------------------------------------
# Δm
# --------------------------------------------------------------------------------------------------


def _as_named(values: Mapping[str, Any] | Sequence[Any], field: str, names: list[str] | None) -> dict[str, Any]:
    if isinstance(values, Mapping):
        return dict(values)
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray, Tensor)):
        raise ValueError(
            f"`{field}` must be a mapping from metric name to value or a sequence, got {type(values).__name__}"
        )
    values = list(values.tolist() if isinstance(values, (np.ndarray, Tensor)) else values)
    if names is None:
        names = [str(index) for index in range(len(values))]
    if len(values) != len(names):
        raise ValueError(f"`{field}` has {len(values)} values but the baseline has {len(names)} metrics")
    return dict(zip(names, values, strict=True))


def delta_m(
    metrics: Mapping[str, float] | Sequence[float],
    baseline: Mapping[str, float] | Sequence[float],
    higher_is_better: Mapping[str, bool] | Sequence[bool],
) -> float:
    """Δm%, the mean relative change of every metric against a baseline (Maninis et al., 2019), in the
    convention of Nash-MTL and FAMO (Maninis et al., 2019, in the convention of Nash-MTL and FAMO): **lower is better, negative beats the baseline**.

    ```
    Δm% = 100 / K · Σ_k (-1)^{δ_k} (M_m,k - M_b,k) / |M_b,k|,   δ_k = 1 if higher is better for metric k
    ```

    K is the number of **metrics** (9 on NYUv2), not of tasks: per-task averaging first gives a
    different number, and LibMTL's ``count_improvement`` has the opposite sign. The denominator is
    ``|M_b,k|`` so that a negative baseline (e.g. a Matthews correlation) keeps the direction; for the
    usual positive metrics it is ``M_b,k``.

    Args:
        metrics (`Mapping[str, float]` or `Sequence[float]`):
            The method's values. As a mapping it may hold more keys (``eval_loss``, runtimes...):
            only the baseline's keys are used.
        baseline (`Mapping[str, float]` or `Sequence[float]`):
            The reference values (usually single-task learning with the same backbone). Its keys
            are the K metrics compared.
        higher_is_better (`Mapping[str, bool]` or `Sequence[bool]`):
            Per metric, whether a higher value is better (accuracy, mIoU) or a lower one (errors).
            Sequences are matched by position, so all three must then be sequences of length K.

    Returns:
        `float`: Δm in percent.

    Raises:
        `ValueError`: for a metric missing from `metrics` or `higher_is_better`, a zero or
        non-finite baseline value, a non-finite metric, or an empty baseline.

    Example (Nash-MTL on NYUv2 against STL, Navon et al., Nash-MTL, NYUv2 table):

    ```python
    >>> stl = [38.30, 63.76, 0.6754, 0.2780, 25.01, 19.21, 30.14, 57.20, 69.15]
    >>> nash = [40.13, 65.93, 0.5261, 0.2171, 25.26, 20.08, 28.40, 55.47, 68.15]
    >>> up = [True, True, False, False, False, False, True, True, True]
    >>> round(delta_m(nash, stl, up), 2)
    -4.05
    ```
    """
    base = _as_named(baseline, "baseline", None)
    if not base:
        raise ValueError("`baseline` is empty; Δm needs at least one metric")
    names = list(base)
    positional = not isinstance(baseline, Mapping)
    values = _as_named(metrics, "metrics", names if positional else None)
    directions = _as_named(higher_is_better, "higher_is_better", names if positional else None)
    for field, given in (("metrics", values), ("higher_is_better", directions)):
        missing = [name for name in names if name not in given]
        if missing:
            raise ValueError(
                f"`{field}` lacks the baseline metric(s) {missing}; it has: {', '.join(map(str, given)) or 'nothing'}"
            )

    total = 0.0
    for name in names:
        reference, value = float(base[name]), float(values[name])
        if not math.isfinite(reference) or reference == 0.0:
            raise ValueError(
                f"baseline value of metric {name!r} must be finite and non-zero for a relative change, got {reference}"
            )
        if not math.isfinite(value):
            raise ValueError(f"value of metric {name!r} must be finite, got {value}")
        sign = -1.0 if bool(directions[name]) else 1.0
        total += sign * (value - reference) / abs(reference)
    return 100.0 * total / len(names)


# --------------------------------------------------------------------------------------------------
# Gradient conflict
# --------------------------------------------------------------------------------------------------


@dataclass
class GradientConflict:
    """Pairwise diagnostics of K task gradients (Elich et al., 2023, §4.2; Elich et al., arXiv 2311.04698).

    Attributes:
        norms (`torch.Tensor` of shape `(K,)`): ``‖g_i‖``.
        cosine (`torch.Tensor` of shape `(K, K)`): ``S_cos = g_i·g_j / (‖g_i‖ ‖g_j‖)``; 0 where a
            gradient is zero (no direction, so no conflict); 1 on the diagonal of non-zero rows.
        magnitude_similarity (`torch.Tensor` of shape `(K, K)`): ``S_mag = 2 ‖g_i‖ ‖g_j‖ / (‖g_i‖² + ‖g_j‖²)``,
            1 for equal norms (two zero gradients included), towards 0 as the norms part.
        conflict_fraction (`torch.Tensor`, 0-d): the fraction of the K(K-1)/2 pairs ``i < j`` with
            ``S_cos < 0``; NaN when K < 2 (no pair).
        conflicting_parameters (`torch.Tensor` of shape `(K, K)`, *optional*): the ratio of conflicting
            gradient parameters, ``#{p : g_i[p] g_j[p] < 0} / P``: the fraction of the P coordinates where
            the two gradients have opposite signs (a zero coordinate conflicts with nothing; 0 on the
            diagonal). Only `gradient_conflict` (which sees the gradients) fills it; a Gramian does not
            determine it.
    """

    norms: Tensor
    cosine: Tensor
    magnitude_similarity: Tensor
    conflict_fraction: Tensor
    conflicting_parameters: Tensor | None = None

    def select(self, indices: Sequence[int] | Tensor) -> GradientConflict:
        """The result of the rows ``indices`` alone (their sub-matrices; the conflict fraction of their pairs)."""
        index = torch.as_tensor(indices, dtype=torch.long, device=self.cosine.device)
        cosine = self.cosine[index][:, index]
        pairs = self.pairs(cosine)
        fraction = (pairs < 0).double().mean() if pairs.numel() else torch.tensor(math.nan, dtype=torch.float64)
        return GradientConflict(
            norms=self.norms[index],
            cosine=cosine,
            magnitude_similarity=self.magnitude_similarity[index][:, index],
            conflict_fraction=fraction.to(cosine.dtype),
            conflicting_parameters=None
            if self.conflicting_parameters is None
            else self.conflicting_parameters[index][:, index],
        )

    def pairs(self, matrix: Tensor) -> Tensor:
        """The entries ``i < j`` of a (K, K) matrix of this result (``cosine``, ...), row-major, as float64."""
        k = matrix.shape[0]
        rows, cols = torch.triu_indices(k, k, offset=1, device=matrix.device)
        return matrix[rows, cols].double()

    def summary(self, prefix: str = "conflict/") -> dict[str, float]:
        """Scalars for logging: the conflict fraction and the mean / minimum off-diagonal cosine, the
        mean magnitude similarity and (when present) the mean ratio of conflicting parameters over the
        pairs ``i < j`` (NaN when K < 2)."""
        pair_cos, pair_mag = self.pairs(self.cosine), self.pairs(self.magnitude_similarity)
        empty = pair_cos.numel() == 0
        summary = {
            f"{prefix}fraction": float(self.conflict_fraction),
            f"{prefix}cosine_mean": math.nan if empty else float(pair_cos.mean()),
            f"{prefix}cosine_min": math.nan if empty else float(pair_cos.min()),
            f"{prefix}magnitude_similarity_mean": math.nan if empty else float(pair_mag.mean()),
        }
        if self.conflicting_parameters is not None:
            pair_sign = self.pairs(self.conflicting_parameters)
            summary[f"{prefix}conflicting_parameters_mean"] = math.nan if empty else float(pair_sign.mean())
        return summary

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and floats (for JSON): ``norms``, ``cosine``, ``magnitude_similarity``,
        ``conflicting_parameters`` (when present) and ``conflict_fraction``; NaN becomes ``None``."""
        out = {
            "norms": _plain(self.norms),
            "cosine": _plain(self.cosine),
            "magnitude_similarity": _plain(self.magnitude_similarity),
        }
        if self.conflicting_parameters is not None:
            out["conflicting_parameters"] = _plain(self.conflicting_parameters)
        out["conflict_fraction"] = _plain(self.conflict_fraction)
        return out


def _plain(value: Tensor) -> Any:
    """A tensor as nested lists of Python floats, non-finite values as ``None`` (strict JSON has no NaN)."""
    data = value.detach().double().cpu().tolist()

    def clean(x: Any) -> Any:
        if isinstance(x, list):
            return [clean(item) for item in x]
        return x if math.isfinite(x) else None

    return clean(data)


def gradient_conflict_from_gramian(gramian: Tensor) -> GradientConflict:
    """`gradient_conflict` from the K x K Gramian ``G = J Jᵀ`` (``G_ij = g_i·g_j``).

    Args:
        gramian (`torch.Tensor` of shape `(K, K)`): symmetric positive semi-definite.

    Returns:
        `GradientConflict`, in the Gramian's floating dtype (float32 for half-precision input) and device.
    """
    if gramian.ndim != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(f"`gramian` must be a square (K, K) matrix, got shape {tuple(gramian.shape)}")
    if not gramian.is_floating_point() or gramian.dtype in (torch.float16, torch.bfloat16):
        gramian = gramian.float()
    squared = gramian.diagonal().clamp_min(0.0)
    norms = squared.sqrt()
    outer = norms[:, None] * norms[None, :]
    nonzero = outer > 0
    cosine = torch.where(
        nonzero, gramian / torch.where(nonzero, outer, torch.ones_like(outer)), torch.zeros_like(outer)
    )
    cosine = cosine.clamp(-1.0, 1.0)
    denominator = squared[:, None] + squared[None, :]
    magnitude = torch.where(
        denominator > 0,
        2.0 * outer / torch.where(denominator > 0, denominator, torch.ones_like(denominator)),
        torch.ones_like(outer),
    )
    k = gramian.shape[0]
    rows, cols = torch.triu_indices(k, k, offset=1, device=gramian.device)
    pairs = cosine[rows, cols]
    if pairs.numel():
        fraction = (pairs < 0).to(cosine.dtype).mean()
    else:
        fraction = torch.tensor(math.nan, dtype=cosine.dtype, device=cosine.device)
    return GradientConflict(norms=norms, cosine=cosine, magnitude_similarity=magnitude, conflict_fraction=fraction)


def gradient_conflict(jacobian: Tensor) -> GradientConflict:
    """Gradient-conflict diagnostics of K task gradients, measured as in Elich et al., "Examining
    Common Paradigms in Multi-Task Learning" (arXiv 2311.04698, §4.2; Elich et al., arXiv 2311.04698): pairwise cosine
    similarity, gradient magnitude similarity, the ratio of conflicting gradient parameters and the
    fraction of conflicting pairs.

    ```
    G = J Jᵀ,  S_cos(i, j) = G_ij / √(G_ii G_jj),  S_mag(i, j) = 2 √(G_ii G_jj) / (G_ii + G_jj)
    R(i, j) = #{p : J[i, p] J[j, p] < 0} / P       (`conflicting_parameter_ratio`)
    conflict fraction = #{i < j : S_cos(i, j) < 0} / (K (K - 1) / 2)
    ```

    The cosine and magnitude similarities come from the Gramian, one (K, P) x (P, K) product, the
    ratio from the signs; half-precision input is promoted to float32 first.

    Args:
        jacobian (`torch.Tensor` of shape `(K, P)`): one task gradient per row (the shared
            parameters, flattened).

    Returns:
        `GradientConflict`.
    """
    if jacobian.ndim != 2:
        raise ValueError(f"`jacobian` must have shape (K, P), got {tuple(jacobian.shape)}")
    if not jacobian.is_floating_point() or jacobian.dtype in (torch.float16, torch.bfloat16):
        jacobian = jacobian.float()
    result = gradient_conflict_from_gramian(jacobian @ jacobian.T)
    result.conflicting_parameters = conflicting_parameter_ratio(jacobian).to(result.cosine.dtype)
    return result


#: Columns per chunk of `conflicting_parameter_ratio`: below 2^24, so float32 sums of 0/1 are exact in a chunk.
_SIGN_CHUNK = 1 << 20


def conflicting_parameter_ratio(jacobian: Tensor) -> Tensor:
    """The ratio of conflicting gradient parameters between every two rows (Elich et al., 2023, §4.2):
    the fraction of the P coordinates where the two gradients have opposite signs.

    ```
    R(i, j) = #{p : J[i, p] J[j, p] < 0} / P  =  (z_i·z_j - s_i·s_j) / (2P),   s = sign(J),  z = |s|
    ```

    A coordinate where either gradient is zero counts as no conflict, so the diagonal is 0 and R is
    symmetric. The counts are products of sign matrices, computed over chunks of at most 2^20 columns
    (integers, exact in float32) and summed in float64.

    Args:
        jacobian (`torch.Tensor` of shape `(K, P)`): one gradient per row.

    Returns:
        `torch.Tensor` of shape `(K, K)`, float64, on the Jacobian's device (NaN when P = 0).
    """
    if jacobian.ndim != 2:
        raise ValueError(f"`jacobian` must have shape (K, P), got {tuple(jacobian.shape)}")
    k, p = jacobian.shape
    counts = torch.zeros(k, k, dtype=torch.float64, device=jacobian.device)
    for start in range(0, p, _SIGN_CHUNK):
        # with s = sign(J) and z = |s|: z_i·z_j counts the coordinates where both are non-zero and s_i·s_j
        # the agreeing minus the opposite ones, so the opposite ones are (z_i·z_j - s_i·s_j) / 2
        signs = torch.sign(jacobian[:, start : start + _SIGN_CHUNK].float())
        nonzero = signs.abs()
        counts += ((nonzero @ nonzero.T - signs @ signs.T) / 2).double()
    return counts / p if p else torch.full_like(counts, math.nan)


def inter_sample_conflict(per_sample_gradients: Tensor) -> list[GradientConflict]:
    """Inter-sample conflict: for each task, `gradient_conflict` between the gradients of its samples
    (Elich et al., 2023, §4.2: "same task, two samples").

    Args:
        per_sample_gradients (`torch.Tensor` of shape `(K, n, P)`): the gradient of task k's loss on
            sample s alone, ``[k, s]``.

    Returns:
        `list[GradientConflict]`: one per task, over its n x n sample pairs (all from one Gramian and one
        sign count of the K n gradients: `GradientConflict.select`).
    """
    k, n = _check_per_sample(per_sample_gradients)
    every = gradient_conflict(per_sample_gradients.reshape(k * n, -1))
    return [every.select(range(task * n, (task + 1) * n)) for task in range(k)]


def _check_per_sample(per_sample_gradients: Tensor) -> tuple[int, int]:
    if per_sample_gradients.ndim != 3:
        raise ValueError(f"`per_sample_gradients` must have shape (K, n, P), got {tuple(per_sample_gradients.shape)}")
    return per_sample_gradients.shape[0], per_sample_gradients.shape[1]


def inter_task_conflict_per_sample(per_sample_gradients: Tensor) -> list[GradientConflict]:
    """Inter-task conflict sample by sample: for each sample, `gradient_conflict` between the K task
    gradients of that one sample (Elich et al., 2023, §4.2: "same sample, two tasks").

    Args:
        per_sample_gradients (`torch.Tensor` of shape `(K, n, P)`): as for `inter_sample_conflict`; the
            K tasks must label the same n samples.

    Returns:
        `list[GradientConflict]`: one per sample, over its K x K task pairs.
    """
    k, n = _check_per_sample(per_sample_gradients)
    every = gradient_conflict(per_sample_gradients.reshape(k * n, -1))
    return [every.select(range(sample, k * n, n)) for sample in range(n)]


__all__ = [
    "Accuracy",
    "BuiltinMetric",
    "F1",
    "GradientConflict",
    "Mae",
    "MatthewsCorrelation",
    "Mse",
    "Precision",
    "Recall",
    "compute_task_metrics",
    "conflicting_parameter_ratio",
    "score_present_labels",
    "delta_m",
    "gradient_conflict",
    "gradient_conflict_from_gramian",
    "inter_sample_conflict",
    "inter_task_conflict_per_sample",
    "list_metrics",
    "load_metric",
    "majority_class_accuracy",
    "metric_greater_is_better",
    "resolve_metrics",
]
