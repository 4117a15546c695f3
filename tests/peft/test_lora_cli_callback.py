"""A LoRA adapter through `hf-repair` (an adapter directory in, a repaired adapter out) and through `RepairCallback`."""

import dataclasses
import json

import pytest
import torch
from transformers import Trainer, TrainingArguments

peft = pytest.importorskip("peft")

from hf_repair import RepairCallback, Repairer  # noqa: E402
from hf_repair.cli import main  # noqa: E402

from lora_setup import FORCED, base_model, base_state, data, lora_config, lora_finetuned  # noqa: E402

CLI_FORCED = ["--alphas", "1", "10", "1000", "--min_improvement", "-1", "--significance_test", "none",
              "--batch_size", "16", "--repair_seed", "0", "--no_report"]


def logits(model, dataset):
    with torch.no_grad():
        return model.eval()(pixel_values=dataset[:]["pixel_values"]).logits


@pytest.fixture
def adapter_dir(tmp_path):
    """A saved base classifier, and a LoRA adapter trained on it whose config names that base."""
    base_model("vit").save_pretrained(tmp_path / "base")
    model = lora_finetuned("vit")
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    data("vit", 90, seed=2, noise=0.0).save_to_disk(str(tmp_path / "verified"))
    return tmp_path


@pytest.mark.parametrize("base_flag", [False, True])
def test_cli_repairs_an_adapter_directory_and_writes_an_adapter(adapter_dir, base_flag):
    out = adapter_dir / "out"
    argv = [adapter_dir / "adapter", "--verified", adapter_dir / "verified", "--output_dir", out, "--target_modules",
            "all", *CLI_FORCED]
    if base_flag:  # an adapter config without a (local) base needs --base_model
        config = json.loads((adapter_dir / "adapter" / "adapter_config.json").read_text())
        (adapter_dir / "adapter" / "adapter_config.json").write_text(json.dumps(dict(config, base_model_name_or_path=None)))
        argv += ["--base_model", adapter_dir / "base"]
    assert main([str(a) for a in argv]) == 0

    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").is_file()
    repaired = peft.PeftModel.from_pretrained(base_model("vit"), out)
    # the same repair in Python, on the adapter loaded the same way
    reference = peft.PeftModel.from_pretrained(base_model("vit"), adapter_dir / "adapter", is_trainable=True)
    Repairer(reference, dataclasses.replace(FORCED, target_modules="all")).repair(data("vit", 90, seed=2, noise=0.0))
    test = data("vit", 24, seed=3)
    torch.testing.assert_close(logits(repaired, test), logits(reference, test), rtol=0, atol=1e-6)
    original = peft.PeftModel.from_pretrained(base_model("vit"), adapter_dir / "adapter")
    assert not torch.allclose(logits(repaired, test), logits(original, test))
    assert json.loads((out / "repair_results.json").read_text())["metrics"]["peft_adapter_saveable"] is True


def test_cli_refuses_an_adapter_without_a_local_base(adapter_dir, capsys):
    config = json.loads((adapter_dir / "adapter" / "adapter_config.json").read_text())
    (adapter_dir / "adapter" / "adapter_config.json").write_text(
        json.dumps(dict(config, base_model_name_or_path="someone/not-here")))
    with pytest.raises(SystemExit) as exit_:
        main([str(adapter_dir / "adapter"), "--verified", str(adapter_dir / "verified"), "--output_dir",
              str(adapter_dir / "out"), *CLI_FORCED])
    assert exit_.value.code == 2
    assert "--base_model" in capsys.readouterr().err and not (adapter_dir / "out").exists()


def test_callback_repairs_a_lora_model_that_trainer_saves_as_an_adapter(tmp_path):
    model = peft.get_peft_model(base_model("vit"), lora_config("vit"))
    frozen = base_state(model)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, max_steps=8, per_device_train_batch_size=16,
                             learning_rate=1e-2, report_to="none", save_strategy="no", disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data("vit", 96, seed=1))
    callback = RepairCallback(dataclasses.replace(FORCED, target_modules="all"), data("vit", 90, seed=2, noise=0.0))
    callback.attach(trainer)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))

    assert callback.error is None and callback.result.adopted
    assert any(record.kind == "lora_linear" for record in callback.result.layers.values())
    assert all(torch.equal(v, frozen[k]) for k, v in base_state(model).items())
    test = data("vit", 24, seed=3)
    saved = peft.PeftModel.from_pretrained(base_model("vit"), tmp_path / "saved")
    torch.testing.assert_close(logits(saved, test), logits(model, test), rtol=0, atol=1e-6)


def test_a_repair_that_changed_the_base_is_saved_merged(tmp_path, caplog):
    from transformers import ViTForImageClassification

    from hf_repair.cli.command import save_model

    model = lora_finetuned("vit")
    with torch.no_grad():  # what a repair reaching the frozen base leaves
        model.base_model.model.vit.layers[0].attention.k_proj.weight.mul_(1.5)
    result = Repairer(model, FORCED).repair(data("vit", 30, seed=2))
    assert result.metrics["peft_adapter_saveable"] is True  # the change came before the repair...
    result.metrics["peft_adapter_saveable"] = False  # ...as if the repair had made it
    test = data("vit", 24, seed=3)
    expected = logits(model, test)
    save_model(model, result, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file() and not (tmp_path / "out" / "adapter_config.json").exists()
    merged = ViTForImageClassification.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(logits(merged, test), expected, rtol=0, atol=1e-5)
    assert "merged model" in caplog.text
