"""The fine-tuning baselines the benchmarks compare hf_repair with (testbed/finetuning.py)."""

import numpy as np
import torch
import torch.nn.functional as F
from transformers import ViTForImageClassification

from testbed.experiments import small_vit
from testbed.finetuning import (
    Trajectory,
    average_checkpoints,
    finetune,
    head_inputs,
    image_dataset,
    predictions,
    refit_head,
)


def _images(n: int, num_classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=n)
    pixels = rng.normal(size=(n, 1, 28, 28)).astype(np.float32)
    pixels[:, 0, :4, :4] += 2.0 * labels[:, None, None]  # a learnable class signal
    return image_dataset(pixels, labels, [f"c{i}" for i in range(num_classes)])


def _tiny_vit(seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    return small_vit(num_classes=3, hidden_size=16, num_layers=1, heads=2).eval()


def test_refit_head_folds_the_standardisation_into_the_head():
    model, data = _tiny_vit(), _images(60)
    features = head_inputs(model, data)
    refit = refit_head(model, data, l2_grid=(1e-2, 1.0), num_folds=3)
    assert refit.l2 in (1e-2, 1.0) and set(refit.cv_loss) == {1e-2, 1.0}
    columns = data[:]
    with torch.no_grad():
        logits = model(pixel_values=columns["pixel_values"]).logits
    head = model.classifier
    torch.testing.assert_close(logits.double(), features @ head.weight.double().T + head.bias.double(),
                               rtol=1e-4, atol=1e-4)
    # the refit is the regularised optimum: its training loss beats the random head's
    with torch.no_grad():
        random_head = _tiny_vit()(pixel_values=columns["pixel_values"]).logits
    assert F.cross_entropy(logits, columns["labels"]) < F.cross_entropy(random_head, columns["labels"])


def test_finetune_checkpoints_every_epoch_and_reuses_a_finished_run(tmp_path):
    train, verified = _images(64, seed=1), _images(30, seed=2)
    trajectory = finetune(_tiny_vit(), train, verified, tmp_path / "run", epochs=2, lr=1e-3, batch_size=32, seed=0)
    assert [c.epoch for c in trajectory.checkpoints] == [1, 2]
    assert trajectory.best in [c.path for c in trajectory.checkpoints]
    assert trajectory.best_checkpoint.verified_accuracy == max(c.verified_accuracy for c in trajectory.checkpoints)
    model = _tiny_vit(seed=5)
    again = finetune(model, train, verified, tmp_path / "run", epochs=2, lr=1e-3, batch_size=32, seed=0)
    assert again == Trajectory.load(tmp_path / "run") == trajectory
    final = ViTForImageClassification.from_pretrained(trajectory.final.path)
    np.testing.assert_array_equal(predictions(model, verified), predictions(final, verified))

    averaged = average_checkpoints(ViTForImageClassification, [c.path for c in trajectory.checkpoints])
    first, second = (ViTForImageClassification.from_pretrained(c.path) for c in trajectory.checkpoints)
    torch.testing.assert_close(averaged.classifier.weight, (first.classifier.weight + second.classifier.weight) / 2)
