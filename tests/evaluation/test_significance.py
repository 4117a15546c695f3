"""The significance gate: a gain within noise is refused, a large one accepted, on the same held-out samples."""

import math

import datasets
import numpy as np
import pytest
import torch
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

from hf_repair import RepairConfig, Repairer
from hf_repair.evaluation import compare_predictions, significance_gate
from hf_repair.evaluation.significance import bootstrap_gain_interval, mcnemar_p_value


def paired(n, wins, losses, both_right, seed=0):
    """Correctness vectors with exactly `wins` / `losses` discordant pairs, shuffled."""
    candidate = np.zeros(n, bool)
    baseline = np.zeros(n, bool)
    candidate[:wins] = True
    baseline[wins:wins + losses] = True
    candidate[wins + losses:wins + losses + both_right] = True
    baseline[wins + losses:wins + losses + both_right] = True
    order = np.random.default_rng(seed).permutation(n)
    return candidate[order], baseline[order]


def test_mcnemar_matches_the_exact_one_sided_binomial_tail():
    # 8 wins, 2 losses: P(X >= 8 | Bin(10, 1/2)) = (45 + 10 + 1) / 1024.
    assert mcnemar_p_value(8, 2) == pytest.approx(56 / 1024)
    # One-sided: losing 8 of 10 is no evidence of a gain, P(X >= 2) = 1 - 11/1024.
    assert mcnemar_p_value(2, 8) == pytest.approx(1013 / 1024)
    assert mcnemar_p_value(5, 5) == pytest.approx(638 / 1024)
    assert mcnemar_p_value(0, 0) == 1.0
    # Large counts stay exact (no underflow): 1000 discordant pairs, a 560/440 split is significant.
    assert 0 < mcnemar_p_value(560, 440) < 0.001


@pytest.mark.parametrize("test", ["mcnemar", "bootstrap"])
def test_a_gain_of_one_sample_in_500_is_noise(test):
    candidate, baseline = paired(500, wins=6, losses=5, both_right=400)
    comparison = compare_predictions(candidate, baseline, test=test, level=0.05, seed=0)
    assert comparison.gain == pytest.approx(1 / 500)
    assert (comparison.wins, comparison.losses, comparison.n) == (6, 5, 500)
    assert comparison.ci_low < 0 < comparison.ci_high
    assert comparison.p_value == pytest.approx(0.5)  # P(X >= 6 | Bin(11, 1/2))
    assert not comparison.significant


@pytest.mark.parametrize("test", ["mcnemar", "bootstrap"])
def test_a_large_gain_is_significant(test):
    candidate, baseline = paired(500, wins=40, losses=5, both_right=350)
    comparison = compare_predictions(torch.as_tensor(candidate), torch.as_tensor(baseline), test=test, seed=0)
    assert comparison.gain == pytest.approx(35 / 500)
    assert 0 < comparison.ci_low < comparison.gain < comparison.ci_high
    assert comparison.p_value < 1e-6
    assert comparison.significant


def test_a_significant_loss_is_never_significant_for_the_candidate():
    candidate, baseline = paired(500, wins=5, losses=40, both_right=350)
    for test in ("mcnemar", "bootstrap"):
        comparison = compare_predictions(candidate, baseline, test=test)
        assert comparison.p_value > 1 - 1e-6 and not comparison.significant


def test_none_applies_no_test_but_still_reports_the_comparison():
    candidate, baseline = paired(500, wins=6, losses=5, both_right=400)
    comparison = compare_predictions(candidate, baseline, test="none")
    assert comparison.significant
    assert comparison.as_metrics()["gain_ci"] == [comparison.ci_low, comparison.ci_high]


def test_the_bootstrap_interval_is_seeded_and_covers_its_level():
    assert bootstrap_gain_interval(30, 10, 400, 0.05, seed=1) == bootstrap_gain_interval(30, 10, 400, 0.05, seed=1)
    low, high = bootstrap_gain_interval(30, 10, 400, 0.05, seed=1)
    # The normal approximation of the paired difference: sd = sqrt((w + l)/n - gain^2) / sqrt(n).
    gain, sd = 20 / 400, math.sqrt(40 / 400 - (20 / 400) ** 2) / math.sqrt(400)
    assert low == pytest.approx(gain - 1.96 * sd, abs=0.01)
    assert high == pytest.approx(gain + 1.96 * sd, abs=0.01)


def test_mismatched_samples_and_unknown_tests_are_refused():
    with pytest.raises(ValueError, match="same samples"):
        compare_predictions(np.ones(4, bool), np.ones(5, bool))
    with pytest.raises(ValueError, match="Unknown significance test"):
        compare_predictions(np.ones(4, bool), np.ones(4, bool), test="t-test")
    with pytest.raises(ValueError, match="significance_level"):
        RepairConfig(significance_level=1.5)


def test_the_gate_reads_the_config():
    candidate, baseline = paired(500, wins=6, losses=5, both_right=400)
    assert not significance_gate(candidate, baseline, RepairConfig()).significant
    assert significance_gate(candidate, baseline, RepairConfig(significance_test="none")).significant
    # 20 wins / 11 losses: p = 0.075, refused at the default 0.05, accepted at a level the caller passes (auto's)
    candidate, baseline = paired(500, wins=20, losses=11, both_right=400)
    assert not significance_gate(candidate, baseline, RepairConfig()).significant
    loose = significance_gate(candidate, baseline, RepairConfig(), level=0.2)
    assert loose.significant and loose.level == 0.2 and loose.p_value == pytest.approx(mcnemar_p_value(20, 11))


class Linear(nn.Module):
    def __init__(self, dim, classes):
        super().__init__()
        self.fc = nn.Linear(dim, classes)

    def forward(self, pixel_values, labels=None):
        return ImageClassifierOutput(logits=self.fc(pixel_values))


def random_split(seed, n=90, dim=12, classes=3):
    torch.manual_seed(seed)
    x = torch.randn(n, dim)
    split = datasets.Dataset.from_dict({"pixel_values": x.numpy(), "labels": (torch.arange(n) % classes).numpy()})
    return split.with_format("torch"), Linear(dim, classes)


def test_the_projection_is_not_adopted_for_a_gain_within_noise():
    """On random labels an alpha's held-out 'gain' is noise: the old rule (significance_test='none') adopts
    the best alpha for 2 samples in 90 (10 wins, 8 losses); the gate leaves the model bit-identical."""
    split, model = random_split(seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = Repairer(model, RepairConfig(seed=0, repair_disable_tqdm=True, alpha_search="grid")).repair(split)
    assert not result.adopted
    assert result.metrics["gain"] > 0 and not result.metrics["significant"]
    assert result.metrics["gain_ci"][0] < 0 < result.metrics["gain_ci"][1]
    assert result.metrics["p_value"] > 0.05
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert "McNemar p" in result.summary()

    old_rule = Repairer(model, RepairConfig(seed=0, significance_test="none", repair_disable_tqdm=True,
                                            alpha_search="grid")).repair(split)
    assert old_rule.adopted and old_rule.metrics["gain"] == pytest.approx(result.metrics["gain"])


@pytest.mark.parametrize("test", ["mcnemar", "bootstrap"])
def test_the_projection_is_adopted_for_a_large_gain(test):
    """The labels follow two high-variance input directions; the model also leans hard on a weak one (std 0.05)
    that carries no signal. The projection shrinks the weak direction: a large, significant held-out gain."""
    torch.manual_seed(0)
    n, classes = 150, 3
    labels = torch.arange(n) % classes
    centres = torch.tensor([[3.0, 0.0], [-1.5, 2.6], [-1.5, -2.6]])
    x = torch.cat([centres[labels] + torch.randn(n, 2), 0.05 * torch.randn(n, 1)], dim=1)
    model = Linear(3, classes)
    with torch.no_grad():
        model.fc.weight.copy_(torch.cat([centres, torch.tensor([[200.0], [-200.0], [0.0]])], dim=1))
        model.fc.bias.zero_()
    split = datasets.Dataset.from_dict({"pixel_values": x.numpy(), "labels": labels.numpy()}).with_format("torch")
    result = Repairer(model, RepairConfig(seed=0, significance_test=test, repair_disable_tqdm=True)).repair(split)
    assert result.adopted and result.metrics["significant"]
    assert result.metrics["gain"] > 0.1 and result.metrics["gain_ci"][0] > 0 and result.metrics["p_value"] < 0.01
    assert result.metrics["accuracy_after"] - result.metrics["accuracy_before"] == pytest.approx(result.metrics["gain"])


def test_the_gate_is_one_sided():
    # 20 wins, 10 losses: P(X >= 20 | Bin(30, 1/2)) = 0.049 (0.099 two-sided): adopted at level 0.05.
    candidate, baseline = paired(500, wins=20, losses=10, both_right=420)
    comparison = compare_predictions(candidate, baseline, test="mcnemar", level=0.05)
    assert comparison.p_value == pytest.approx(0.0494, abs=1e-4)
    assert comparison.significant
    assert not compare_predictions(candidate, baseline, test="mcnemar", level=0.04).significant
