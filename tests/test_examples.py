"""The examples run end to end at a tiny size, with `python` and with `accelerate launch`."""

import glob
import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType
from transformers import HfArgumentParser, TrainingArguments

from hf_repair import RepairConfig
from testbed.offline_data import DEFAULT_FASHION_MNIST_ROOT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "train_vit_noisy_labels.py")
CONFIGS = os.path.join(ROOT, "examples", "accelerate_configs")
TINY = ["--use_cpu", "--num_train", "256", "--num_verified", "90", "--num_test", "128", "--max_steps", "8",
        "--hidden_size", "16", "--num_layers", "1", "--heads", "2", "--alphas", "1", "100", "1e4",
        "--min_improvement", "-1", "--significance_test", "none", "--save_strategy", "no", "--disable_tqdm", "true"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")

needs_fashion_mnist = pytest.mark.skipif(
    not os.path.exists(os.path.join(DEFAULT_FASHION_MNIST_ROOT, "train-images-idx3-ubyte.gz")),
    reason="needs Fashion-MNIST: apt-get update && apt-get install -y dataset-fashion-mnist",
)


def run(command, timeout=300):
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout


def accelerate_launch(num_processes):
    """`accelerate launch --multi_gpu` on CPU (gloo) with a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]


def check_outputs(output_dir, stdout):
    with open(os.path.join(output_dir, "repair_results.json")) as f:
        report = json.load(f)
    assert report["metrics"]["num_verified"] == 90 and report["metrics"]["adopted"]
    assert report["metrics"]["alpha"] in (1.0, 100.0, 1e4)
    assert os.path.exists(os.path.join(output_dir, "model.safetensors"))
    assert "held-out verified accuracy" in stdout and "test accuracy" in stdout


@needs_fashion_mnist
def test_example_with_python(tmp_path, monkeypatch):
    output_dir = str(tmp_path / "out")
    stdout = run([sys.executable, EXAMPLE, "--output_dir", output_dir, "--report_to", "tensorboard", *TINY])
    check_outputs(output_dir, stdout)
    events = glob.glob(os.path.join(output_dir, "runs", "**", "events.out.tfevents.*"), recursive=True)
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for path in events:  # TensorBoardCallback opens a new file for the evaluations after training
        accumulator = EventAccumulator(path)
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"train/repair/accuracy_after", "train/repair/alpha", "test/repaired_accuracy"} <= tags


@needs_fashion_mnist
def test_example_with_accelerate_launch(tmp_path):
    output_dir = str(tmp_path / "out")
    stdout = run([*accelerate_launch(2), EXAMPLE, "--output_dir", output_dir, *TINY])
    check_outputs(output_dir, stdout)
    assert stdout.count("held-out verified accuracy") == 1  # only the main process prints


@needs_fashion_mnist
def test_example_fine_tunes_under_accelerate_launch(tmp_path):
    output_dir = str(tmp_path / "out")
    retention = ["--method", "projection+retention", "--score", "loss", "--flag_rule", "budget", "--flag_fraction", "0.3",
                 "--retention_epochs", "0.5"]
    stdout = run([*accelerate_launch(2), EXAMPLE, "--output_dir", output_dir, *TINY, *retention])
    check_outputs(output_dir, stdout)
    with open(os.path.join(output_dir, "repair_results.json")) as f:
        metrics = json.load(f)["metrics"]
    # the Trainer's training set (256 rows), batched per device as training was (8 by default)
    assert metrics["num_train"] == 256 and metrics["num_flagged"] == round(0.3 * 256)
    assert metrics["batch_size"] == 8 and metrics["max_steps"] == 8  # 0.5 * 256 / (8 x 2 processes)
    assert "projection+retention: adopted" in stdout


def test_example_flags_cover_data_training_and_repair(monkeypatch):
    spec = importlib.util.spec_from_file_location("train_vit_noisy_labels", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, example)  # dataclasses resolve annotations through it
    spec.loader.exec_module(example)  # defines, does not run: main() is behind __name__ == "__main__"
    parser = HfArgumentParser((example.ExampleArguments, TrainingArguments, RepairConfig))
    text = parser.format_help()
    for flag in ("--num_verified", "--noise_rate", "--learning_rate", "--target_modules", "--repair_seed", "--alphas"):
        assert flag in text
    with pytest.raises(ValueError, match="--noise must be one of"):
        example.ExampleArguments(noise="salt")


@pytest.mark.parametrize(
    "name, distributed_type, check",
    [
        ("multi_gpu", DistributedType.MULTI_GPU, lambda c: True),
        ("fsdp2", DistributedType.FSDP,
         lambda c: c.fsdp_config["fsdp_version"] == 2
         and c.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "ViTLayer"),
        ("deepspeed_zero3", DistributedType.DEEPSPEED,
         lambda c: c.deepspeed_config["zero_stage"] == 3 and c.deepspeed_config["zero3_save_16bit_model"]),
    ],
)
def test_accelerate_configs_load(name, distributed_type, check):
    config = load_config_from_file(os.path.join(CONFIGS, f"{name}.yaml"))
    assert config.distributed_type == distributed_type and check(config)
