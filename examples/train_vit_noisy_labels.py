"""Train a small ViT on Fashion-MNIST with noisy labels, and repair it when training ends.

`RepairCallback` repairs the trained model with a few verified (hand-checked) samples, logs
`repair/*` metrics to the `report_to` integrations, and writes `repair_results.json`; the script
then saves the repaired model and compares test accuracy before and after the repair.

    # one process (add --use_cpu without a GPU)
    python examples/train_vit_noisy_labels.py --output_dir runs/vit-noisy --num_train_epochs 3

    # several processes; FSDP2 and DeepSpeed ZeRO-3 configs are next to this one
    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml \\
        examples/train_vit_noisy_labels.py --output_dir runs/vit-noisy --num_train_epochs 3

    # CI size, about half a minute on 2 CPU cores
    python examples/train_vit_noisy_labels.py --output_dir /tmp/vit --use_cpu --num_train 256 \\
        --num_verified 90 --num_test 128 --max_steps 8 --hidden_size 16 --num_layers 1 --heads 2

Every `TrainingArguments` and `RepairConfig` field is a flag too (`--help` lists them all), e.g.
`--target_modules query value`, `--alphas 1 10 100`, `--report_to tensorboard`, or
`--method projection+retention` to project and then fine-tune briefly on the training set with the
harmful samples found and down-weighted (the callback reads the `Trainer`'s training set). Fashion-MNIST
is read from the Debian package `dataset-fashion-mnist`; nothing is downloaded.
"""

from __future__ import annotations

import gc
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import transformers
from accelerate import PartialState
from transformers import EvalPrediction, HfArgumentParser, Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's testbed/

from hf_repair import RepairCallback, RepairConfig
from testbed.experiments import small_vit
from testbed.noise import NOISE_TYPES, corrupt_dataset
from testbed.offline_data import DEFAULT_FASHION_MNIST_ROOT, load_fashion_mnist

logger = logging.getLogger(__name__)


@dataclass
class ExampleArguments:
    """The data and the model of this example; training and repair options are their own flags."""

    num_train: int = field(default=50_000, metadata={"help": "Training images, labels corrupted by --noise."})
    num_verified: int = field(
        default=1_000, metadata={"help": "Verified images (true labels), held out of training, for the repair."}
    )
    num_test: int = field(default=10_000, metadata={"help": "Test images for the before/after comparison."})
    noise: str = field(default="symmetric", metadata={"help": "Label noise.", "choices": ["symmetric", "asymmetric"]})
    noise_rate: float = field(default=0.4, metadata={"help": "Share of training labels that are changed."})
    hidden_size: int = field(default=64, metadata={"help": "ViT width."})
    num_layers: int = field(default=4, metadata={"help": "ViT depth."})
    heads: int = field(default=4, metadata={"help": "Attention heads per layer."})
    patch_size: int = field(default=7, metadata={"help": "ViT patch size (28 must be a multiple of it)."})
    data_dir: str = field(
        default=DEFAULT_FASHION_MNIST_ROOT, metadata={"help": "Folder of the Fashion-MNIST IDX files."}
    )

    def __post_init__(self) -> None:
        if self.noise not in NOISE_TYPES:
            raise ValueError(f"--noise must be one of {list(NOISE_TYPES)}, got {self.noise!r}.")


def accuracy(prediction: EvalPrediction) -> dict[str, float]:
    return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}


def main() -> None:
    parser = HfArgumentParser((ExampleArguments, TrainingArguments, RepairConfig))
    example, args, repair_config = parser.parse_args_into_dataclasses()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=args.get_process_log_level())
    transformers.utils.logging.set_verbosity(args.get_process_log_level())

    # Verified samples and training samples are disjoint parts of the training split; only the
    # training part gets noisy labels. Every process builds the same split from the same seed.
    images = load_fashion_mnist("train", root=example.data_dir).shuffle(seed=args.seed)
    if example.num_verified + example.num_train > len(images):
        parser.error(f"--num_verified + --num_train must be at most {len(images)}.")
    verified = images.select(range(example.num_verified))
    train = corrupt_dataset(
        images.select(range(example.num_verified, example.num_verified + example.num_train)),
        noise=example.noise, rate=example.noise_rate, seed=args.seed,
    )
    test = load_fashion_mnist("test", root=example.data_dir).select(range(example.num_test))

    model = small_vit(patch_size=example.patch_size, hidden_size=example.hidden_size,
                      num_layers=example.num_layers, heads=example.heads)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=test, compute_metrics=accuracy)
    callback = RepairCallback(repair_config, verified).attach(trainer)  # ahead of report_to integrations
    trainer.train()

    repaired = trainer.evaluate(test, metric_key_prefix="test_repaired")
    trainer.save_model()  # the repaired weights, next to repair_results.json
    if callback.result is None:
        logger.error("The repair failed (%s); the saved model is the trained one.", callback.error)
        return
    callback.result.undo()  # the trained weights again, only to measure them
    trained = trainer.evaluate(test, metric_key_prefix="test_trained")
    if trainer.is_world_process_zero():
        m = callback.result.metrics
        print(
            f"\n{example.noise} noise {example.noise_rate:.0%}, {m['num_verified']} verified samples, "
            f"{repair_config.method}: {'adopted' if callback.result.adopted else 'not adopted'} "
            f"(alpha={m.get('alpha')}, flagged={m.get('num_flagged')})\n"
            f"  held-out verified accuracy: {m['accuracy_before']:.4f} -> {m['accuracy_after']:.4f}\n"
            f"  test accuracy:              {trained['test_trained_accuracy']:.4f} -> "
            f"{repaired['test_repaired_accuracy']:.4f}\n"
            f"  repaired model saved to {args.output_dir}"
        )


if __name__ == "__main__":
    main()
    # Leave the process group together and cleanly: a gloo/NCCL group left to interpreter shutdown
    # (or torn down while another rank still talks to it) can abort the process at exit.
    state = PartialState()
    state.wait_for_everyone()
    gc.collect()  # release DDP's reference to the group first
    state.destroy_process_group()
