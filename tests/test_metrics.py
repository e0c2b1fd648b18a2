"""Tests of `hf_mtl.metrics`: offline built-in metrics against scikit-learn and hand computations,
masking per head kind, user-supplied `evaluate` modules, Δm (Maninis et al., 2019, in the convention of Nash-MTL and FAMO) and
gradient-conflict diagnostics (Elich et al., arXiv 2311.04698). No network: a fixture makes any connection fail."""

from __future__ import annotations

import math
import socket
import textwrap

import datasets
import evaluate
import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from hf_mtl.metrics import (
    BuiltinMetric,
    GradientConflict,
    compute_task_metrics,
    delta_m,
    gradient_conflict,
    gradient_conflict_from_gramian,
    list_metrics,
    load_metric,
    majority_class_accuracy,
    resolve_metrics,
)

BUILTINS = ["accuracy", "f1", "mae", "matthews_correlation", "mse", "precision", "recall"]

# NYUv2, SegNet-MTAN (Maninis et al., 2019, in the convention of Nash-MTL and FAMO): mIoU, PixAcc, AbsErr, RelErr, angle mean, median, <11.25°, <22.5°, <30°
NYUV2_NAMES = ["miou", "pix_acc", "abs_err", "rel_err", "mean", "median", "within_11", "within_22", "within_30"]
NYUV2_HIGHER = [True, True, False, False, False, False, True, True, True]
NYUV2_STL = [38.30, 63.76, 0.6754, 0.2780, 25.01, 19.21, 30.14, 57.20, 69.15]
# Nash-MTL, "Multi-Task Learning as a Bargaining Game" (Navon et al., ICML 2022), Table 2 (NYUv2), paper Δm -4.04
NYUV2_NASH = [40.13, 65.93, 0.5261, 0.2171, 25.26, 20.08, 28.40, 55.47, 68.15]


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Every test runs with network access made impossible (and the Hub libraries told so), and with
    `evaluate`'s metric and module caches under ``tmp_path``."""

    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(evaluate.config, "HF_METRICS_CACHE", tmp_path / "metrics_cache")
    monkeypatch.setattr(evaluate.config, "HF_MODULES_CACHE", tmp_path / "modules_cache")


def _labels(n: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, num_classes, n), rng.integers(0, num_classes, n)


# ---------------------------------------------------------------------------------------- built-ins


def test_builtin_names_and_types() -> None:
    assert list_metrics() == BUILTINS
    for name in BUILTINS:
        module = load_metric(name)
        assert isinstance(module, BuiltinMetric)
        assert isinstance(module, evaluate.Metric)
        assert module.name == name  # the Hub module's name, so an evaluate.load("...") module is a drop-in


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_output_key_is_the_metric_name(name: str) -> None:
    predictions, references = ([0.5, 1.0, 2.0], [1.0, 1.0, 3.0]) if name in ("mse", "mae") else ([0, 1, 1], [0, 1, 0])
    assert list(load_metric(name).compute(predictions=predictions, references=references)) == [name]


def test_hand_computed_values() -> None:
    assert load_metric("accuracy").compute(predictions=[0, 1, 2, 1], references=[0, 1, 1, 1]) == {"accuracy": 0.75}
    assert (
        load_metric("accuracy").compute(predictions=[0, 1, 2, 1], references=[0, 1, 1, 1], normalize=False)["accuracy"]
        == 3
    )
    # the Hub modules' documented examples
    f1 = load_metric("f1", average="binary").compute(predictions=[0, 0, 1, 1, 0], references=[0, 1, 0, 1, 0])
    assert f1["f1"] == pytest.approx(0.5)
    predictions, references = [0, 2, 1, 0, 0, 1], [0, 1, 2, 0, 1, 2]
    assert load_metric("f1").compute(predictions=predictions, references=references)["f1"] == pytest.approx(0.8 / 3)
    assert load_metric("f1").compute(predictions=predictions, references=references, average="micro")[
        "f1"
    ] == pytest.approx(1 / 3)
    np.testing.assert_allclose(
        load_metric("f1").compute(predictions=predictions, references=references, average=None)["f1"], [0.8, 0.0, 0.0]
    )
    # binary: TP = 1, FP = 1, FN = 1
    assert (
        load_metric("precision", average="binary").compute(predictions=[1, 1, 0], references=[1, 0, 1])["precision"]
        == 0.5
    )
    assert load_metric("recall", average="binary").compute(predictions=[1, 1, 0], references=[1, 0, 1])["recall"] == 0.5
    # perfect and perfectly inverted binary predictions
    mcc = load_metric("matthews_correlation")
    assert mcc.compute(predictions=[0, 1, 0, 1], references=[0, 1, 0, 1])["matthews_correlation"] == pytest.approx(1.0)
    assert mcc.compute(predictions=[1, 0, 1, 0], references=[0, 1, 0, 1])["matthews_correlation"] == pytest.approx(-1.0)
    mse = load_metric("mse")
    assert mse.compute(predictions=[2.5, 0.0, 2, 8], references=[3, -0.5, 2, 7]) == {"mse": pytest.approx(0.375)}
    assert mse.compute(predictions=[2.5, 0.0, 2, 8], references=[3, -0.5, 2, 7], squared=False)["mse"] == pytest.approx(
        math.sqrt(0.375)
    )
    assert load_metric("mae").compute(predictions=[2.5, 0.0, 2, 8], references=[3, -0.5, 2, 7]) == {
        "mae": pytest.approx(0.5)
    }


@pytest.mark.parametrize("average", ["macro", "micro", "weighted"])
@pytest.mark.parametrize(
    "name, sk", [("f1", skm.f1_score), ("precision", skm.precision_score), ("recall", skm.recall_score)]
)
def test_averaged_metrics_match_sklearn(name: str, sk, average: str) -> None:
    predictions, references = _labels(200, 5, seed=1)
    expected = sk(references, predictions, average=average, zero_division=0.0)
    assert load_metric(name, average=average).compute(predictions=predictions, references=references)[
        name
    ] == pytest.approx(expected)
    # the compute argument overrides the constructor's
    assert load_metric(name).compute(predictions=predictions, references=references, average=average)[
        name
    ] == pytest.approx(expected)


def test_default_average_is_macro() -> None:
    predictions, references = _labels(100, 4, seed=2)
    assert load_metric("f1").compute(predictions=predictions, references=references)["f1"] == pytest.approx(
        skm.f1_score(references, predictions, average="macro")
    )


def test_accuracy_and_mcc_match_sklearn() -> None:
    predictions, references = _labels(300, 7, seed=3)
    weights = np.random.default_rng(4).random(300)
    assert load_metric("accuracy").compute(predictions=predictions, references=references)["accuracy"] == pytest.approx(
        skm.accuracy_score(references, predictions)
    )
    assert load_metric("accuracy").compute(predictions=predictions, references=references, sample_weight=weights)[
        "accuracy"
    ] == pytest.approx(skm.accuracy_score(references, predictions, sample_weight=weights))
    assert load_metric("matthews_correlation").compute(predictions=predictions, references=references)[
        "matthews_correlation"
    ] == pytest.approx(skm.matthews_corrcoef(references, predictions))


def test_regression_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(5)
    predictions, references = rng.normal(size=(50, 3)), rng.normal(size=(50, 3))
    flat = {"predictions": predictions.ravel(), "references": references.ravel()}
    assert load_metric("mse").compute(**flat)["mse"] == pytest.approx(
        skm.mean_squared_error(references.ravel(), predictions.ravel())
    )
    assert load_metric("mae").compute(**flat)["mae"] == pytest.approx(
        skm.mean_absolute_error(references.ravel(), predictions.ravel())
    )
    per_output = load_metric("mse", config_name="multilist").compute(
        predictions=predictions, references=references, multioutput="raw_values"
    )["mse"]
    np.testing.assert_allclose(per_output, ((predictions - references) ** 2).mean(axis=0))
    rmse = load_metric("mse", config_name="multilist").compute(
        predictions=predictions, references=references, squared=False
    )
    assert rmse["mse"] == pytest.approx(np.sqrt(((predictions - references) ** 2).mean(axis=0)).mean())
    mae = load_metric("mae", config_name="multilist").compute(predictions=predictions, references=references)
    assert mae["mae"] == pytest.approx(np.abs(predictions - references).mean())


def test_multilabel_config_matches_sklearn() -> None:
    rng = np.random.default_rng(6)
    predictions, references = rng.integers(0, 2, (40, 4)), rng.integers(0, 2, (40, 4))
    f1 = load_metric("f1", config_name="multilabel").compute(predictions=predictions, references=references)
    assert f1["f1"] == pytest.approx(skm.f1_score(references, predictions, average="macro"))


def test_builtin_argument_errors() -> None:
    with pytest.raises(ValueError, match=r"`average` of metric 'f1' must be one of .*'macro'.*got 'mean'"):
        load_metric("f1", average="mean")
    with pytest.raises(
        ValueError, match=r"`config_name` .* must be one of \['default', 'multilist'\], got 'multilabel'"
    ):
        load_metric("mse", config_name="multilabel")
    with pytest.raises(TypeError, match="unexpected compute argument"):
        load_metric("recall").compute(predictions=[0, 1], references=[0, 1], averag="micro")


# ------------------------------------------------------------------------------------- load_metric


class ExactAndNear(evaluate.Metric):
    """A user's metric with two outputs: exact matches and predictions within one class."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="exact and near matches",
            citation="",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        predictions, references = np.asarray(predictions), np.asarray(references)
        return {
            "exact": float((predictions == references).mean()),
            "near": float((abs(predictions - references) <= 1).mean()),
        }


class Balanced(evaluate.Metric):
    """A user's metric whose single output key is its own name."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="balanced accuracy",
            citation="",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        return {"balanced": float(skm.balanced_accuracy_score(references, predictions))}


def test_user_module_is_accepted_as_is() -> None:
    module = ExactAndNear(keep_in_memory=True)
    assert load_metric(module) is module
    assert resolve_metrics([module]) == {"exact_and_near": module}
    # present pairs (prediction/reference): 0/0, 2/2, 0/3
    result = compute_task_metrics(
        "classification", [0, 2, 0, 1], [0, 2, 3, -100], [module, Balanced(keep_in_memory=True)]
    )
    assert result == {
        "exact_and_near_exact": pytest.approx(2 / 3),
        "exact_and_near_near": pytest.approx(2 / 3),
        "balanced": pytest.approx(2 / 3),  # per-class recalls 1, 1, 0
    }


def test_user_module_replaces_a_builtin_under_the_same_name() -> None:
    class Accuracy(evaluate.Metric):  # a stand-in for evaluate.load("accuracy"): same name, same key
        def _info(self):
            return evaluate.MetricInfo(
                description="",
                citation="",
                features=datasets.Features(
                    {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
                ),
            )

        def _compute(self, predictions, references):
            return {"accuracy": float(skm.accuracy_score(references, predictions))}

    predictions, references = [0, 1, 1, 2], [0, 1, 2, -100]
    assert compute_task_metrics(
        "classification", predictions, references, [Accuracy(keep_in_memory=True)]
    ) == compute_task_metrics("classification", predictions, references, ["accuracy"])


def test_local_metric_script_goes_through_evaluate_load(tmp_path) -> None:
    folder = tmp_path / "off_by_one"
    folder.mkdir()
    (folder / "off_by_one.py").write_text(
        textwrap.dedent(
            """
            import datasets
            import evaluate


            class OffByOne(evaluate.Metric):
                def _info(self):
                    return evaluate.MetricInfo(
                        description="fraction within one",
                        citation="",
                        features=datasets.Features(
                            {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
                        ),
                    )

                def _compute(self, predictions, references):
                    near = [abs(p - r) <= 1 for p, r in zip(predictions, references)]
                    return {"off_by_one": sum(near) / len(near)}
            """
        )
    )
    module = load_metric(str(folder), keep_in_memory=True)
    assert isinstance(module, evaluate.EvaluationModule)
    assert compute_task_metrics("classification", [0, 3, 2], [1, 1, 2], {"off_by_one": module}) == {
        "off_by_one": pytest.approx(2 / 3)
    }


def test_unknown_metric_error_names_it_and_the_builtins() -> None:
    with pytest.raises(ValueError) as info:
        load_metric("no_such_metric_xyz")
    message = str(info.value)
    assert "'no_such_metric_xyz'" in message
    for name in BUILTINS:
        assert name in message
    with pytest.raises(ValueError, match="built-in names are: accuracy"):
        load_metric(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"already built; arguments \['average'\]"):
        load_metric(load_metric("f1"), average="micro")
    with pytest.raises(ValueError, match="'f1' is given twice"):
        resolve_metrics(["f1", load_metric("f1")])


# ---------------------------------------------------------------------------- masking per head kind


def test_classification_drops_missing_labels_and_accepts_logits() -> None:
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(60, 4))
    references = rng.integers(0, 4, 60)
    references[::5] = -100
    present = references != -100
    predictions = logits.argmax(-1)
    expected = {
        "accuracy": skm.accuracy_score(references[present], predictions[present]),
        "f1": skm.f1_score(references[present], predictions[present], average="macro"),
        "matthews_correlation": skm.matthews_corrcoef(references[present], predictions[present]),
    }
    names = ["accuracy", "f1", "matthews_correlation"]
    for given in (predictions, logits, torch.from_numpy(logits).to(torch.bfloat16).float(), predictions.tolist()):
        result = compute_task_metrics("classification", given, torch.from_numpy(references), names)
        assert result == pytest.approx(expected)


def test_token_classification_drops_padding_and_aligns_lengths() -> None:
    references = np.array([[0, 1, -100, -100, -100], [2, -100, 1, 1, -100]])
    predictions = np.array([[0, 2, 1, 1], [2, 0, 1, 0]])  # padded to 4 positions, the labels to 5
    # present positions: (0,0) 0/0, (0,1) 1/2, (1,0) 2/2, (1,2) 1/1, (1,3) 1/0
    result = compute_task_metrics("token_classification", predictions, references, ["accuracy"])
    assert result == {"accuracy": pytest.approx(3 / 5)}
    logits = np.eye(3)[predictions] * 5.0  # (B, T, C)
    assert compute_task_metrics("token_classification", logits, references, ["accuracy"]) == result


def test_multilabel_flattens_present_entries() -> None:
    references = np.array([[1, 0, -100], [0, 1, 1], [-100, -100, 0]], dtype=np.float32)  # collate_labels gives floats
    predictions = np.array([[1, 1, 0], [0, 1, 0], [1, 1, 1]])
    # present entries (prediction/reference): 1/1, 1/0, 0/0, 1/1, 0/1, 1/0 -> 3 of 6 right
    result = compute_task_metrics("multilabel", predictions, references, ["accuracy", "f1", "precision", "recall"])
    tp, fp, fn = 2, 2, 1
    assert result == pytest.approx(
        {"accuracy": 0.5, "f1": 2 * tp / (2 * tp + fp + fn), "precision": tp / (tp + fp), "recall": tp / (tp + fn)}
    )


def test_multilabel_without_missing_entries_is_per_label_accuracy_and_micro_f1() -> None:
    rng = np.random.default_rng(8)
    predictions, references = rng.integers(0, 2, (30, 5)), rng.integers(0, 2, (30, 5))
    result = compute_task_metrics(
        "multilabel", torch.from_numpy(predictions), torch.from_numpy(references), ["accuracy", "f1"]
    )
    assert result["accuracy"] == pytest.approx((predictions == references).mean())  # not the exact-match ratio
    assert result["f1"] == pytest.approx(skm.f1_score(references, predictions, average="micro"))
    # an explicit average is respected: macro over the two outcomes 0 and 1 of the flattened entries
    macro = compute_task_metrics("multilabel", predictions, references, [load_metric("f1", average="weighted")])
    assert macro["f1"] == pytest.approx(skm.f1_score(references.ravel(), predictions.ravel(), average="weighted"))


def test_multilabel_rejects_non_binary_values() -> None:
    with pytest.raises(ValueError, match=r"multilabel: `predictions` must be 0 or 1.*found 0\.7"):
        compute_task_metrics("multilabel", np.array([[0.7, 1.0]]), np.array([[1, 0]]), ["accuracy"])
    with pytest.raises(ValueError, match=r"multilabel: `references` must be 0 or 1.*found 2"):
        compute_task_metrics("multilabel", np.array([[1, 1]]), np.array([[2, 0]]), ["accuracy"])


def test_regression_drops_nan_targets_and_flattens_targets() -> None:
    predictions = np.array([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]])
    references = np.array([[1.5, np.nan], [3.0, 5.0], [np.nan, np.nan]])
    # present: errors 0.5, 0, 1
    assert compute_task_metrics("regression", predictions, references, ["mse", "mae"]) == pytest.approx(
        {"mse": (0.25 + 0 + 1) / 3, "mae": 1.5 / 3}
    )
    # one target: (N, 1) predictions against (N,) references
    single = compute_task_metrics(
        "regression", torch.tensor([[1.0], [2.0]]), torch.tensor([2.0, float("nan")]), ["mse"]
    )
    assert single == {"mse": pytest.approx(1.0)}


def test_all_labels_missing_gives_nan() -> None:
    result = compute_task_metrics("classification", [1, 0], [-100, -100], ["accuracy", "f1"])
    assert list(result) == ["accuracy", "f1"] and all(math.isnan(v) for v in result.values())


def test_shape_and_head_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown `head_kind` 'segmentation'; valid head kinds are: classification"):
        compute_task_metrics("segmentation", [0], [0], ["accuracy"])
    with pytest.raises(
        ValueError, match=r"classification: `predictions` of shape \(3,\) do not match `references` of shape \(2,\)"
    ):
        compute_task_metrics("classification", [0, 1, 1], [0, 1], ["accuracy"])
    with pytest.raises(ValueError, match="regression: `predictions` of shape"):
        compute_task_metrics("regression", np.zeros((4, 2)), np.zeros((4, 3)), ["mse"])


def test_result_names_flatten_arrays_and_keys() -> None:
    predictions, references = [0, 1, 2, 2], [0, 1, 1, 2]
    result = compute_task_metrics(
        "classification", predictions, references, {"acc": "accuracy", "per_class": load_metric("f1", average=None)}
    )
    per_class = skm.f1_score(references, predictions, average=None)
    assert result == pytest.approx(
        {
            "acc_accuracy": 0.75,
            "per_class_f1_0": per_class[0],
            "per_class_f1_1": per_class[1],
            "per_class_f1_2": per_class[2],
        }
    )


# -------------------------------------------------------------------------------------------- delta_m


def test_delta_m_nash_mtl_nyuv2() -> None:
    """Navon et al., Nash-MTL, NYUv2 table: the Nash-MTL NYUv2 row against STL gives -4.05 ± 0.01 (paper -4.04; exact -4.047)."""
    value = delta_m(NYUV2_NASH, NYUV2_STL, NYUV2_HIGHER)
    assert value == pytest.approx(-4.05, abs=0.01)
    assert value == pytest.approx(-4.047, abs=5e-4)
    named = delta_m(
        {**dict(zip(NYUV2_NAMES, NYUV2_NASH, strict=True)), "eval_loss": 1.3},  # extra keys are ignored
        dict(zip(NYUV2_NAMES, NYUV2_STL, strict=True)),
        dict(zip(NYUV2_NAMES, NYUV2_HIGHER, strict=True)),
    )
    assert named == pytest.approx(value)


def test_delta_m_hand_values_and_sign() -> None:
    # accuracy 0.8 -> 0.88 (+10 %, better), error 2.0 -> 2.5 (+25 %, worse): (−10 + 25) / 2
    assert delta_m({"acc": 0.88, "err": 2.5}, {"acc": 0.8, "err": 2.0}, {"acc": True, "err": False}) == pytest.approx(
        7.5
    )
    assert delta_m([1.0, 2.0], [1.0, 2.0], [True, False]) == 0.0
    assert delta_m([1.1], [1.0], [True]) < 0  # beats the baseline
    # a negative baseline keeps the direction: a higher correlation is still an improvement
    assert delta_m({"mcc": -0.1}, {"mcc": -0.2}, {"mcc": True}) == pytest.approx(-50.0)


def test_delta_m_errors() -> None:
    with pytest.raises(ValueError, match=r"`metrics` lacks the baseline metric\(s\) \['err'\]; it has: acc"):
        delta_m({"acc": 0.9}, {"acc": 0.8, "err": 1.0}, {"acc": True, "err": False})
    with pytest.raises(ValueError, match=r"`higher_is_better` lacks the baseline metric\(s\) \['err'\]"):
        delta_m({"acc": 0.9, "err": 1.0}, {"acc": 0.8, "err": 1.0}, {"acc": True})
    with pytest.raises(ValueError, match="baseline value of metric 'err' must be finite and non-zero"):
        delta_m({"err": 0.1}, {"err": 0.0}, {"err": False})
    with pytest.raises(ValueError, match="value of metric 'acc' must be finite, got nan"):
        delta_m({"acc": float("nan")}, {"acc": 0.5}, {"acc": True})
    with pytest.raises(ValueError, match="`metrics` has 2 values but the baseline has 3 metrics"):
        delta_m([1.0, 2.0], [1.0, 2.0, 3.0], [True, True, True])
    with pytest.raises(ValueError, match="`baseline` is empty"):
        delta_m({}, {}, {})


# ------------------------------------------------------------------------------- gradient_conflict


def test_gradient_conflict_hand_made_matrix() -> None:
    jacobian = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, 3.0]])
    result = gradient_conflict(jacobian)
    assert isinstance(result, GradientConflict)
    torch.testing.assert_close(result.norms, torch.tensor([1.0, math.sqrt(2), 3.0]))
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(result.cosine, torch.tensor([[1.0, -s, 0.0], [-s, 1.0, s], [0.0, s, 1.0]]))
    # S_mag = 2ab / (a² + b²)
    mag = lambda a, b: 2 * a * b / (a * a + b * b)  # noqa: E731
    expected_mag = torch.tensor(
        [
            [1.0, mag(1, math.sqrt(2)), mag(1, 3)],
            [mag(1, math.sqrt(2)), 1.0, mag(math.sqrt(2), 3)],
            [mag(1, 3), mag(math.sqrt(2), 3), 1.0],
        ]
    )
    torch.testing.assert_close(result.magnitude_similarity, expected_mag)
    assert float(result.conflict_fraction) == pytest.approx(1 / 3)  # one of three pairs, (0, 1), conflicts
    summary = result.summary()
    assert summary["conflict/fraction"] == pytest.approx(1 / 3)
    assert summary["conflict/cosine_min"] == pytest.approx(-s)
    assert summary["conflict/cosine_mean"] == pytest.approx(0.0, abs=1e-7)


def test_gradient_conflict_special_cases() -> None:
    opposite = gradient_conflict(torch.tensor([[2.0, -1.0], [-2.0, 1.0]]))
    assert float(opposite.cosine[0, 1]) == pytest.approx(-1.0)
    assert float(opposite.magnitude_similarity[0, 1]) == pytest.approx(1.0)
    assert float(opposite.conflict_fraction) == 1.0

    scaled = gradient_conflict(torch.tensor([[1.0, 1.0], [1e6, 1e6]]))
    assert float(scaled.cosine[0, 1]) == pytest.approx(1.0)
    assert float(scaled.magnitude_similarity[0, 1]) == pytest.approx(2e6 / (1 + 1e12), rel=1e-4)
    assert float(scaled.conflict_fraction) == 0.0

    zero_row = gradient_conflict(torch.tensor([[1.0, 2.0], [0.0, 0.0]]))
    assert float(zero_row.cosine[0, 1]) == 0.0 and float(zero_row.magnitude_similarity[0, 1]) == 0.0
    all_zero = gradient_conflict(torch.zeros(2, 4))
    assert torch.isfinite(all_zero.cosine).all() and float(all_zero.magnitude_similarity[0, 1]) == 1.0

    single = gradient_conflict(torch.randn(1, 5))
    assert math.isnan(float(single.conflict_fraction)) and math.isnan(single.summary()["conflict/cosine_mean"])

    half = gradient_conflict(torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.bfloat16))
    assert half.cosine.dtype == torch.float32

    with pytest.raises(ValueError, match=r"`jacobian` must have shape \(K, P\), got \(3,\)"):
        gradient_conflict(torch.ones(3))
    with pytest.raises(ValueError, match=r"`gramian` must be a square \(K, K\) matrix, got shape \(2, 3\)"):
        gradient_conflict_from_gramian(torch.ones(2, 3))


def test_gradient_conflict_properties_on_random_matrices() -> None:
    generator = torch.Generator().manual_seed(0)
    for k, p in [(2, 3), (4, 50), (7, 1000)]:
        jacobian = (
            torch.randn(k, p, generator=generator, dtype=torch.float64)
            * torch.logspace(-3, 3, k, dtype=torch.float64)[:, None]
        )
        result = gradient_conflict(jacobian)
        reference = torch.nn.functional.cosine_similarity(jacobian[:, None, :], jacobian[None, :, :], dim=-1)
        torch.testing.assert_close(result.cosine, reference)
        torch.testing.assert_close(result.cosine, result.cosine.T)
        assert (result.magnitude_similarity <= 1 + 1e-12).all() and (result.magnitude_similarity >= 0).all()
        # invariant to a common rescaling, and permuting the tasks permutes the matrices
        torch.testing.assert_close(gradient_conflict(jacobian * 1e4).cosine, result.cosine)
        order = torch.randperm(k, generator=generator)
        permuted = gradient_conflict(jacobian[order])
        torch.testing.assert_close(permuted.cosine, result.cosine[order][:, order])
        assert float(permuted.conflict_fraction) == pytest.approx(float(result.conflict_fraction))
        rows, cols = torch.triu_indices(k, k, offset=1)
        expected = (jacobian[rows] * jacobian[cols]).sum(-1).lt(0).double().mean()
        assert float(result.conflict_fraction) == pytest.approx(float(expected))
        torch.testing.assert_close(gradient_conflict_from_gramian(jacobian @ jacobian.T).cosine, result.cosine)


def test_majority_class_accuracy_counts_the_most_frequent_present_label():
    # 3 of the 5 present labels are 2; the missing labels (-100, None) are left out
    assert majority_class_accuracy([2, 0, 2, -100, 1, 2, None]) == pytest.approx(3 / 5)
    assert majority_class_accuracy(np.array([4, 4, 4, 4])) == 1.0
    assert math.isnan(majority_class_accuracy([-100, -100]))
