"""Finding harmful training samples: real Fashion-MNIST with injected noise, the influence math, bad input.

The two trained models (40% symmetric and 20% asymmetric noise, SmallCNN width 16 on 3,000 samples,
1,000 verified) are trained once per module; the rest uses small untrained models on real images.
"""

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_repair import IdentificationResult, RepairConfig, Repairer, identify_harmful
from hf_repair.identification import label_confidence
from hf_repair.identification.influence import InfluenceModel, TrackedLayer, _solve_kfac
from hf_repair.identification.ranking import auroc, average_ranks, flag_lowest
from hf_repair.modeling.hooks import LayerCapture
from hf_repair.modeling.layers import adapter_for
from testbed.experiments import SmallCNN, small_vit, train_classifier
from testbed.noise import FASHION_MNIST_CONFUSABLE_PAIRS, corrupt_dataset

from helpers import launch_two_processes
from identification_setup import NUM_TRAIN, NUM_VERIFIED, fashion_subsets  # noqa: E402

QUIET = dict(repair_disable_tqdm=True)



@pytest.fixture(scope="module")
def subsets():
    try:
        return fashion_subsets()
    except FileNotFoundError as err:
        pytest.skip(str(err))


def _trained(train, seed=0):
    torch.manual_seed(seed)
    model = SmallCNN(width=16)
    return train_classifier(model, train, epochs=20, batch_size=128, lr=2e-3, seed=seed, progress=False)


@pytest.fixture(scope="module")
def symmetric40(subsets):
    train, verified = subsets
    noisy = corrupt_dataset(train, "symmetric", 0.4, seed=0)
    return _trained(noisy), noisy, verified


@pytest.fixture(scope="module")
def asymmetric20(subsets):
    train, verified = subsets
    noisy = corrupt_dataset(train, "asymmetric", 0.2, seed=0, pairs=FASHION_MNIST_CONFUSABLE_PAIRS)
    return _trained(noisy), noisy, verified


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, state):
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------
# real data, injected noise


@pytest.fixture(scope="module")
def default_identification(symmetric40):
    """The default identification of the 40%-noise model, and whether it left the model exactly as it was."""
    model, train, verified = symmetric40
    model.train()  # identify must restore the mode it found
    before = _state(model)
    ident = Repairer(model, RepairConfig(**QUIET)).identify(train, verified)
    untouched = _same_state(model, before) and model.training
    model.eval()
    return ident, untouched


def test_default_score_finds_40pct_symmetric_noise(symmetric40, default_identification):
    _, train, _ = symmetric40
    ident, untouched = default_identification
    assert isinstance(ident, IdentificationResult) and untouched
    s = ident.summary
    assert s["score"] == "probe" and s["probe_layer"] == "classifier.1"
    assert s["auroc"] >= 0.95, s
    assert s["num_samples"] == NUM_TRAIN and s["num_verified"] == NUM_VERIFIED
    assert s["blind_classes"] == []
    assert s["noise_rate_source"] == "probe_disagreement" and abs(s["estimated_noise_rate"] - 0.4) < 0.05

    table = ident.table.with_format("numpy")
    assert list(table["index"]) == list(range(NUM_TRAIN))
    for column, dtype in [("index", "int64"), ("score", "float64"), ("given_label", "int64"),
                          ("suggested_label", "int64"), ("flagged", "bool"), ("is_corrupted", "bool")]:
        assert ident.table.features[column].dtype == dtype, column
    given = np.asarray(table["given_label"])
    assert np.array_equal(given, np.asarray(train.with_format("numpy")["labels"]))
    corrupted = np.asarray(table["is_corrupted"])
    flagged = np.asarray(table["flagged"])
    assert np.array_equal(corrupted, np.asarray(train.with_format("numpy")["is_corrupted"]))

    # The noise-rate rule flags exactly that share of the lowest scores, and the summary matches the table.
    assert flagged.sum() == round(s["estimated_noise_rate"] * NUM_TRAIN) == s["num_flagged"]
    score = np.asarray(table["score"])
    assert score[flagged].max() <= score[~flagged].min()
    assert np.array_equal(ident.flagged_indices, np.flatnonzero(flagged))
    assert s["precision"] == pytest.approx((flagged & corrupted).sum() / flagged.sum())
    assert s["recall"] == pytest.approx((flagged & corrupted).sum() / corrupted.sum())
    assert s["precision"] > 0.85 and s["recall"] > 0.85

    # The suggested label recovers most true labels of the corrupted samples (chance: 1/9 of them).
    clean = np.asarray(train.with_format("numpy")["clean_labels"])
    suggested = np.asarray(table["suggested_label"])
    assert (suggested[corrupted] == clean[corrupted]).mean() > 0.7


def test_noise_rate_interval_covers_the_truth_and_nothing_warns(default_identification):
    s = default_identification[0].summary
    low, high = s["estimated_noise_rate_interval"]
    assert low <= s["estimated_noise_rate"] <= high and low < 0.4 < high and high - low <= 0.1
    assert s["noise_rate_warning"] is None
    estimates = s["noise_rate_estimates"]
    assert estimates["probe_disagreement"] == s["estimated_noise_rate"]
    assert abs(estimates["probe_confidence_matched"] - estimates["probe_disagreement"]) < 0.02


def test_the_flags_precision_estimated_without_the_truth_lands_on_it(default_identification):
    """The probe's held-out predictions on the verified split, at the estimated noise transition, tell what share
    of the flags are wrong labels and what share of the wrong labels are flagged (scratch: 0.939 against 0.944)."""
    ident = default_identification[0]
    s = ident.summary
    assert s["flag_precision_source"] == "probe"
    low, high = s["estimated_flag_precision_interval"]
    assert low <= s["estimated_flag_precision"] <= high and high - low < 0.1
    assert abs(s["estimated_flag_precision"] - s["precision"]) < 0.05, s
    assert abs(s["estimated_flag_recall"] - s["recall"]) < 0.05, s
    assert f"estimated_flag_precision={s['estimated_flag_precision']:.4f}" in repr(ident)


class _Memorising(nn.Module):
    """The 40%-noise CNN with its training labels memorised in the features the probe reads, as a fine-tuned
    transformer does: each training sample's features are pulled halfway to the verified mean features of its
    given class (looked up by `sample_id`; verified samples have none and are left as they are)."""

    def __init__(self, inner, targets):
        super().__init__()
        self.inner = inner
        self.register_buffer("targets", targets)

    def forward(self, pixel_values, sample_id):
        features = self.inner.features(pixel_values).flatten(1)
        pull = 0.5 * (sample_id >= 0).to(features)[:, None]
        return self.inner.classifier[1:]((1 - pull) * features + pull * self.targets[sample_id.clamp_min(0)])


def test_memorised_probe_features_make_the_noise_rate_estimate_warn(symmetric40, caplog):
    model, train, verified = symmetric40
    with torch.no_grad():
        v = verified.with_format("torch")[:]
        features = model.features(v["pixel_values"]).flatten(1)
        centroids = torch.stack([features[v["labels"] == c].mean(0) for c in range(10)])
    given = torch.as_tensor(np.asarray(train.with_format("numpy")["labels"]))
    memorising = _Memorising(model, centroids[given]).eval()
    with caplog.at_level(logging.WARNING, logger="hf_repair.identification"):
        ident = identify_harmful(memorising, train.add_column("sample_id", list(range(len(train)))),
                                 verified.add_column("sample_id", [-1] * len(verified)), RepairConfig(**QUIET))
    s = ident.summary
    assert s["probe_layer"] == "inner.classifier.1" and s["auroc"] > 0.9  # the ranking still works...
    assert s["estimated_noise_rate"] < 0.2  # ...but the probe agrees with most memorised labels
    assert "sees training samples differently from held-out ones" in s["noise_rate_warning"]
    assert any("is not reliable" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_the_probability_that_a_label_is_right_tells_the_corrupted_ones(symmetric40):
    """Repairer.identify keeps the probe's class probabilities on request; through the estimated noise transition they
    give each sample's probability that its label is right, low on the corrupted labels and high on the clean ones."""
    model, train, verified = symmetric40
    train = train.select(range(1000))
    ident = Repairer(model, RepairConfig(**QUIET)).identify(train, verified, keep_reference_log_probs=True)
    confidence = label_confidence(ident.reference_log_probs, np.asarray(train["labels"]),
                                  ident.summary["noise_transition"])
    corrupted = np.asarray(train["is_corrupted"], dtype=bool)
    assert auroc(confidence, corrupted) > 0.9
    assert confidence[~corrupted].mean() > 0.8 and confidence[corrupted].mean() < 0.3


def test_influence_beats_loss_baseline_and_columns_hold_what_they_say(symmetric40, default_identification):
    model, train, verified = symmetric40
    ident, _ = default_identification
    by_score = ident.summary["auroc_by_score"]
    assert by_score["influence"] >= 0.9 and by_score["influence"] > by_score["loss"], by_score
    table = ident.table.with_format("numpy")
    corrupted = np.asarray(table["is_corrupted"])
    for name in ("probe", "influence", "loss"):
        assert auroc(np.asarray(table[name]), corrupted) == pytest.approx(by_score[name])
    # the loss column is the trained model's own log-likelihood of the given label
    with torch.no_grad():
        x = train.with_format("torch")[:64]["pixel_values"]
        log_probs = model(pixel_values=x).logits.double().log_softmax(-1)
    expected = log_probs.gather(1, torch.as_tensor(table["given_label"][:64])[:, None])[:, 0].numpy()
    np.testing.assert_allclose(table["loss"][:64], expected, rtol=1e-5, atol=1e-6)


def test_default_score_beats_loss_ranking_at_20pct_asymmetric_noise(asymmetric20):
    model, train, verified = asymmetric20
    ident = identify_harmful(model, train, verified, RepairConfig(**QUIET))
    s = ident.summary
    assert s["auroc_by_score"]["loss"] < s["auroc"] - 0.03, s["auroc_by_score"]
    assert abs(s["estimated_noise_rate"] - 0.2) < 0.05


def test_combined_and_projection_scores_leave_the_model_unchanged(symmetric40):
    model, train, verified = symmetric40
    train = train.select(range(1000))
    before = _state(model)
    config = RepairConfig(score="combined", combine_scores=["influence", "refit", "projection"],
                          alphas=[10.0, 1e3, 1e5], **QUIET)
    ident = identify_harmful(model, train, verified, config)
    assert _same_state(model, before)
    table = ident.table.with_format("numpy")
    ranks = [average_ranks(np.asarray(table[name])) / len(train) for name in ("influence", "refit", "projection")]
    np.testing.assert_allclose(table["score"], np.mean(ranks, axis=0))
    assert ident.summary["auroc_by_score"]["projection"] > 0.8
    assert ident.summary["auroc"] > 0.95


def test_flag_rules(symmetric40):
    model, train, verified = symmetric40
    config = RepairConfig(score="influence", flag_rule="threshold", **QUIET)
    ident = identify_harmful(model, train.select(range(500)), verified, config)
    table = ident.table.with_format("numpy")
    np.testing.assert_array_equal(table["score"], table["influence"])
    np.testing.assert_array_equal(table["flagged"], np.asarray(table["score"]) < 0.0)
    assert ident.summary["threshold"] == 0.0 and ident.summary["score"] == "influence"

    score = np.array([0.3, -1.0, 0.0, -1.0, 2.0])
    flagged, cut = flag_lowest(score, RepairConfig(flag_rule="budget", flag_top_k=2), noise_rate=0.0)
    assert flagged.tolist() == [False, True, False, True, False] and cut == -1.0
    flagged, _ = flag_lowest(score, RepairConfig(flag_rule="budget", flag_fraction=0.6), noise_rate=0.0)
    assert flagged.tolist() == [False, True, True, True, False]
    flagged, _ = flag_lowest(score, RepairConfig(), noise_rate=0.2)  # noise_rate: the lowest 20%, ties by index
    assert flagged.tolist() == [False, True, False, False, False]


def test_auroc_helper_counts_ties_half():
    assert auroc(np.array([0.0, 1.0, 2.0, 3.0]), np.array([True, True, False, False])) == 1.0
    assert auroc(np.array([3.0, 2.0, 1.0, 0.0]), np.array([True, True, False, False])) == 0.0
    assert auroc(np.array([1.0, 1.0, 1.0, 1.0]), np.array([True, False, True, False])) == 0.5


# ---------------------------------------------------------------------------------------------
# the influence math, against brute-force autograd


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return SmallCNN(width=4).eval()  # head: Linear(8, 10); hidden: Linear(196, 8)


def _brute_force_influence(model, names, verified_x, verified_y, train_x, train_y, damping, classes=10):
    """s_c(z) = sum over layers of g_z^T (H + lambda I)^-1 mean verified gradient of class c, all by autograd."""
    modules = dict(model.named_modules())
    params = {n: [modules[n].weight, modules[n].bias] for n in names}

    def flat_grad(loss, name):
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params[name], retain_graph=True)]).double()

    total = torch.zeros(len(train_y), classes, dtype=torch.float64)
    for name in names:
        size = sum(p.numel() for p in params[name])
        hessian = torch.zeros(size, size, dtype=torch.float64)
        means = torch.zeros(classes, size, dtype=torch.float64)
        for x, y in zip(verified_x, verified_y, strict=True):
            logits = model(pixel_values=x[None]).logits[0]
            jac = torch.stack([flat_grad(logits[k], name) for k in range(classes)])  # (C, P)
            p = logits.detach().double().softmax(-1)
            hessian += jac.t() @ (torch.diag(p) - p[:, None] * p[None, :]) @ jac
            means[y] += flat_grad(F.cross_entropy(logits[None], y[None]), name)
        hessian /= len(verified_y)
        means /= torch.bincount(verified_y, minlength=classes).clamp_min(1)[:, None].double()
        lam = damping * hessian.diagonal().mean()
        solved = torch.linalg.solve(hessian + lam * torch.eye(size, dtype=torch.float64), means.t()).t()
        for i, (x, y) in enumerate(zip(train_x, train_y, strict=True)):
            g = flat_grad(F.cross_entropy(model(pixel_values=x[None]).logits, y[None]), name)
            total[i] += solved @ g
    return total


def _library_influence(model, names, closed_form, verified_x, verified_y, train_x, train_y, damping,
                       preconditioner="exact", batch=16):
    modules = dict(model.named_modules())
    layers = [TrackedLayer(n, modules[n], adapter_for(modules[n]), closed_form=n in closed_form) for n in names]
    influence = InfluenceModel(layers, 10, preconditioner)
    with LayerCapture({n: modules[n] for n in names}, track_grad=influence.needs_backward) as capture:
        for start in range(0, len(verified_y), batch):
            capture.clear()
            with torch.set_grad_enabled(influence.needs_backward):
                logits = model(pixel_values=verified_x[start : start + batch]).logits
            influence.accumulate(capture, logits, verified_y[start : start + batch])
        influence.finalize(damping)
        capture.clear()
        with torch.set_grad_enabled(influence.needs_backward):
            logits = model(pixel_values=train_x).logits
        return influence.class_influence(capture, logits, train_y)


@pytest.fixture(scope="module")
def real_images(subsets):
    train, verified = subsets
    v = verified.with_format("torch")[:40]
    t = train.with_format("torch")[:12]
    return v["pixel_values"], v["labels"].long(), t["pixel_values"], t["labels"].long()


def _in_float64(real_images):
    """Both sides in float64, so they agree to round-off rather than to float32 precision."""
    verified_x, verified_y, train_x, train_y = real_images
    return _tiny_model().double(), (verified_x.double(), verified_y, train_x.double(), train_y, 1e-2)


def test_closed_form_head_influence_matches_autograd(real_images):
    model, args = _in_float64(real_images)
    expected = _brute_force_influence(model, ["classifier.3"], *args)
    closed = _library_influence(model, ["classifier.3"], {"classifier.3"}, *args)
    torch.testing.assert_close(closed, expected, rtol=1e-9, atol=1e-12)


def test_autograd_layers_and_expected_fisher_match_brute_force(real_images):
    model, args = _in_float64(real_images)
    names = ["classifier.1", "classifier.3"]
    expected = _brute_force_influence(model, names, *args)
    # classifier.3 through autograd too (closed_form empty): the Fisher is the expectation over labels.
    found = _library_influence(model, names, set(), *args)
    torch.testing.assert_close(found, expected, rtol=1e-9, atol=1e-12)


def test_kfac_solve_equals_dense_kronecker_solve():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    s = torch.randn(4, 4, generator=g, dtype=torch.float64)
    input_factor, output_factor = a @ a.t(), s @ s.t()
    means = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    found = _solve_kfac(output_factor, input_factor, means, damping=0.1)
    dense = torch.kron(output_factor, input_factor)  # row-major vec(X): (S (x) A) vec(X) = vec(S X A)
    lam = 0.1 * torch.linalg.eigvalsh(dense).mean()
    expected = torch.linalg.solve(dense + lam * torch.eye(24, dtype=torch.float64), means.reshape(3, -1).t()).t()
    torch.testing.assert_close(found.reshape(3, -1), expected)


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.fixture(scope="module")
def small(subsets):
    train, verified = subsets
    return corrupt_dataset(train.select(range(200)), "symmetric", 0.4, seed=1), verified.select(range(120))


def test_bad_training_sets_are_refused_before_any_work(small):
    train, verified = small
    model = _tiny_model()
    with pytest.raises(ValueError, match="no 'labels' column.*rename_column"):
        identify_harmful(model, train.rename_column("labels", "target"), verified, RepairConfig(**QUIET))
    with pytest.raises(ValueError, match="empty"):
        identify_harmful(model, train.select([]), verified, RepairConfig(**QUIET))
    with pytest.raises(TypeError, match="datasets.Dataset"):
        identify_harmful(model, [{"pixel_values": 0, "labels": 0}], verified, RepairConfig(**QUIET))
    floats = train.remove_columns("labels").add_column("labels", [0.5] * len(train))
    with pytest.raises(ValueError, match="integer class ids"):
        identify_harmful(model, floats, verified, RepairConfig(**QUIET))


def test_nan_or_inf_training_inputs_are_refused_with_their_rows(small):
    train, verified = small

    def poison(example, index):
        if index in (3, 41, 150):
            example["pixel_values"][0][5][5] = float("inf") if index == 41 else float("nan")
        return example

    broken = train.with_format(None).map(poison, with_indices=True).with_format("torch")
    model = _tiny_model()
    before = _state(model)
    with pytest.raises(ValueError, match=r"NaN or inf \('pixel_values' in rows \[3, 41, 150\]\).*drop the 3 rows"):
        identify_harmful(model, broken, verified, RepairConfig(**QUIET))
    assert _same_state(model, before)
    # a selection is checked in its own row order
    with pytest.raises(ValueError, match=r"rows \[1, 39, 148\]"):
        identify_harmful(model, broken.select(range(2, 200)), verified, RepairConfig(**QUIET))


def test_weak_probe_on_a_small_verified_split_says_its_noise_rate_is_unsure(small):
    train, verified = small
    s = identify_harmful(_tiny_model(), train, verified, RepairConfig(**QUIET)).summary
    low, high = s["estimated_noise_rate_interval"]
    assert high - low > 0.1 and "wider than" in s["noise_rate_warning"]


@pytest.mark.parametrize("bad_label", [10, -1])
def test_out_of_range_training_labels_name_the_classes(small, bad_label):
    train, verified = small
    model = _tiny_model()
    labels = np.asarray(train.with_format("numpy")["labels"]).copy()
    labels[7] = bad_label
    broken = train.remove_columns("labels").add_column("labels", labels.tolist())
    before = _state(model)
    with pytest.raises(ValueError, match=rf"\[{bad_label}\] are outside the model's 10 classes"):
        identify_harmful(model, broken, verified, RepairConfig(**QUIET))
    assert _same_state(model, before)


def test_verified_split_missing_classes_warns_and_reports_them(small, caplog):
    train, verified = small
    labels = np.asarray(verified.with_format("numpy")["labels"])
    partial = verified.select(np.flatnonzero(~np.isin(labels, [3, 8])))
    with caplog.at_level(logging.WARNING, logger="hf_repair.identification"):
        ident = identify_harmful(_tiny_model(), train, partial, RepairConfig(**QUIET))
    assert ident.summary["blind_classes"] == [3, 8]
    assert any("no sample of classes 3, 8" in r.getMessage() for r in caplog.records)
    assert np.isfinite(np.asarray(ident.table.with_format("numpy")["score"])).all()


class _Scaled(nn.Module):
    """Logits derived from the head's output (scaled), so the closed form does not apply."""

    def __init__(self):
        super().__init__()
        self.inner = _tiny_model()

    def forward(self, pixel_values):
        return self.inner(pixel_values=pixel_values).logits * 1.0


def test_head_without_closed_form_falls_back_to_autograd(small):
    train, verified = small
    wrapped = _Scaled()
    config = RepairConfig(score="influence", preconditioner="kfac", **QUIET)
    fallback = identify_harmful(wrapped, train, verified, config)
    assert fallback.summary["closed_form"] == [] and fallback.summary["influence_layers"] == ["inner.classifier.3"]
    closed = identify_harmful(wrapped.inner, train, verified, config)
    assert closed.summary["closed_form"] == ["classifier.3"]
    # Same gradients and the same K-FAC statistics (expected Fisher = exact output factor of the head).
    np.testing.assert_allclose(fallback.table["score"], closed.table["score"], rtol=1e-5, atol=1e-10)
    # The probe only reads layer inputs, so it still runs; the refit needs the closed-form head and says so.
    assert identify_harmful(wrapped, train, verified, RepairConfig(**QUIET)).summary["score"] == "probe"
    with pytest.raises(ValueError, match="needs a classification head whose output is the logits"):
        identify_harmful(wrapped, train, verified, RepairConfig(score="refit", **QUIET))


class _TokenHead(nn.Module):
    """GPT-2 style: the head runs on every position (7 rows of 28 pixels) and the logits are pooled after it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(28, 16)
        self.score = nn.Linear(16, 10)

    def forward(self, pixel_values):
        tokens = torch.tanh(self.embed(pixel_values[:, 0, ::4, :]))  # (batch, 7, 16)
        return self.score(tokens).mean(1)


def test_per_position_head_uses_autograd_and_auto_falls_back_to_influence(small):
    train, verified = small
    model = _TokenHead()
    ident = identify_harmful(model, train, verified, RepairConfig(influence_depth=2, **QUIET))
    s = ident.summary
    assert s["score"] == "influence" and s["closed_form"] == [] and s["influence_layers"] == ["embed", "score"]
    assert s["noise_rate_source"] == "negative_influence"
    assert "probe" not in ident.table.column_names and "refit" not in ident.table.column_names
    # Per-position gradients summed over positions, against autograd on one sample at a time.
    config = RepairConfig(score="influence", influence_modules=["score"], preconditioner="identity",
                          influence_aggregation="mean", **QUIET)
    found = np.asarray(identify_harmful(model, train, verified, config).table.with_format("numpy")["score"])
    v = verified.with_format("torch")[:]
    mean_grads = []
    for c in range(10):
        members = v["labels"] == c
        loss = F.cross_entropy(model(v["pixel_values"][members]), v["labels"][members].long(), reduction="sum")
        mean_grads.append([g / members.sum() for g in torch.autograd.grad(loss, [model.score.weight, model.score.bias])])
    weights = torch.bincount(v["labels"].long(), minlength=10).double() / len(v["labels"])
    t = train.with_format("torch")[:5]
    for i in range(5):
        loss = F.cross_entropy(model(t["pixel_values"][i : i + 1]), t["labels"][i : i + 1].long())
        g = torch.autograd.grad(loss, [model.score.weight, model.score.bias])
        expected = sum(w * sum((a * b).sum() for a, b in zip(g, m, strict=True)) for w, m in zip(weights, mean_grads, strict=True))
        assert found[i] == pytest.approx(float(expected), rel=1e-4, abs=1e-8)
    with pytest.raises(ValueError, match="needs the 'probe' score"):
        identify_harmful(model, train, verified, RepairConfig(score="probe", **QUIET))
    with pytest.raises(ValueError, match="probe_module='embed' sees more than one row per sample"):
        identify_harmful(model, train, verified, RepairConfig(probe_module="embed", **QUIET))


def test_transformers_vit_gets_the_closed_form_head_and_a_probe(small):
    train, verified = small
    torch.manual_seed(0)
    vit = small_vit(num_classes=10, hidden_size=32, num_layers=2).eval()
    before = _state(vit)
    ident = identify_harmful(vit, train, verified, RepairConfig(influence_depth=2, **QUIET))
    s = ident.summary
    assert _same_state(vit, before)
    assert s["closed_form"] == ["classifier"] and s["probe_layer"] == "classifier" and s["score"] == "probe"
    assert len(s["influence_layers"]) == 2 and s["preconditioner"][s["influence_layers"][0]] == "kfac"
    assert np.isfinite(np.asarray(ident.table.with_format("numpy")["influence"])).all()


class _NoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(10))

    def forward(self, pixel_values):
        return pixel_values.flatten(1)[:, :10] * self.scale


def test_model_without_supported_layers_is_a_clear_error(small):
    train, verified = small
    with pytest.raises(ValueError, match="No layer to compute per-sample gradients for.*influence_modules"):
        identify_harmful(_NoLinear(), train, verified, RepairConfig(**QUIET))


def test_config_rejects_bad_identification_settings():
    with pytest.raises(ValueError, match="Unknown score"):
        RepairConfig(score="oracle")
    with pytest.raises(ValueError, match="exactly one of flag_fraction or flag_top_k"):
        RepairConfig(flag_rule="budget")
    with pytest.raises(ValueError, match="flag_fraction must be in"):
        RepairConfig(flag_rule="budget", flag_fraction=1.5)
    with pytest.raises(ValueError, match="damping must be positive"):
        RepairConfig(damping=0.0)
    with pytest.raises(ValueError, match="combine_scores"):
        RepairConfig(score="combined", combine_scores=["combined"])


# ---------------------------------------------------------------------------------------------
# two processes give the same scores as one



def test_two_processes_give_the_same_table_as_one(subsets, tmp_path):
    """...and the same log-probabilities of every class under the reference that suggests labels (kept on request):
    distributions whose arg-max is the suggested label."""
    from identification_setup import distributed_case

    model, train, verified, config = distributed_case()
    launch_two_processes("distributed_identify.py", tmp_path)

    identification = identify_harmful(model, train, verified, config, keep_reference_log_probs=True)
    single, reference = identification.table.with_format("numpy"), identification.reference_log_probs
    assert reference.shape == (len(train), 10) and reference.dtype == np.float32
    np.testing.assert_allclose(np.exp(reference).sum(1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(reference.argmax(1), single["suggested_label"])
    assert identify_harmful(model, train, verified, config).reference_log_probs is None  # not kept unless asked
    for rank in range(2):
        found = np.load(tmp_path / f"rank{rank}.npz")
        np.testing.assert_allclose(found["reference_log_probs"], reference, atol=1e-5)
        assert found["index"].tolist() == list(range(len(train)))
        for column in ("score", "influence", "refit", "probe", "loss"):
            np.testing.assert_allclose(found[column], single[column], rtol=1e-5, atol=1e-9, err_msg=column)
        for column in ("given_label", "suggested_label", "flagged"):
            np.testing.assert_array_equal(found[column], single[column], err_msg=column)
