"""Repairing LoRA fine-tunes (peft): what is repaired, that the adapter saves and reloads, and what is refused."""

import dataclasses
import logging
import subprocess
import sys

import pytest
import torch

peft = pytest.importorskip("peft")

from hf_repair import RepairConfig, Repairer, RepairResult, find_target_modules  # noqa: E402

from lora_setup import FORCED, base_model, base_state, data, lora_config, lora_finetuned  # noqa: E402


def logits(model, dataset):
    with torch.no_grad():
        batch = {k: v for k, v in dataset[:].items() if k != "labels"}
        return model.eval()(**batch).logits


def reloaded(kind, model, directory):
    """The saved adapter loaded onto a fresh base, as a user would (the base alone, built anew)."""
    model.save_pretrained(directory)
    return peft.PeftModel.from_pretrained(base_model(kind), directory).eval()


def lora_weights(model, part):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if f".{part}." in k}


def test_targets_are_the_lora_layers_and_the_head_never_their_parts(caplog):
    model = lora_finetuned("vit", steps=1)
    targets = find_target_modules(model, "all")
    per_layer = ["attention.q_proj", "attention.v_proj", "mlp.fc1"]
    expected = ["classifier", "vit.embeddings.patch_embeddings.projection",
                *[f"vit.layers.{i}.{name}" for i in range(2) for name in per_layer]]
    assert sorted(targets) == sorted(expected)  # no base_layer, lora_A, lora_B, original_module
    assert {name: adapter.kind for name, (_, adapter) in targets.items()}["vit.layers.0.attention.q_proj"] == "lora_linear"
    assert targets["vit.embeddings.patch_embeddings.projection"][1].kind == "lora_conv2d"
    assert targets["classifier"][0] is model.base_model.model.classifier.modules_to_save["default"]
    assert "vit.embeddings.patch_embeddings.projection" not in find_target_modules(model, "all-linear")
    # names as on the bare model; a frozen base layer is skipped with a warning, alone it matches nothing
    assert sorted(find_target_modules(model, ["q_proj", "k_proj"])) == ["vit.layers.0.attention.q_proj",
                                                                        "vit.layers.1.attention.q_proj"]
    assert "vit.layers.0.attention.k_proj" in caplog.text and "frozen" in caplog.text
    with pytest.raises(ValueError, match="LoRA layers and modules_to_save.*q_proj"):
        find_target_modules(model, ["k_proj"])


def test_every_layer_of_a_block_in_modules_to_save_is_a_target():
    model = peft.get_peft_model(base_model("vit"), lora_config(
        "vit", target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="layers",
        modules_to_save=["classifier", "vit.layers.1"]))
    block = [f"vit.layers.1.{name}" for name in ("attention.q_proj", "attention.k_proj", "attention.v_proj",
                                                  "attention.o_proj", "mlp.fc1", "mlp.fc2")]
    targets = find_target_modules(model, "all-linear")
    assert sorted(targets) == sorted(["classifier", "vit.layers.0.attention.q_proj", *block])
    trained_copy = model.base_model.model.vit.layers[1].modules_to_save["default"]
    assert targets["vit.layers.1.mlp.fc1"][0] is trained_copy.mlp.fc1


@pytest.mark.parametrize("kind", ["vit", "bert"])
def test_projection_writes_a_times_m_and_the_adapter_reloads_with_the_same_logits(kind, tmp_path):
    model = lora_finetuned(kind)
    frozen, a_before, b_before = base_state(model), lora_weights(model, "lora_A"), lora_weights(model, "lora_B")
    verified, test = data(kind, 90, seed=2, noise=0.0), data(kind, 24, seed=3)
    result = Repairer(model, dataclasses.replace(FORCED, target_modules="all")).repair(verified)

    assert result.adopted and result.metrics["peft_adapter_saveable"] is True
    assert all(torch.equal(v, frozen[k]) for k, v in base_state(model).items())  # the frozen base is untouched
    assert all(torch.equal(v, b_before[k]) for k, v in lora_weights(model, "lora_B").items())
    # every LoRA layer's A became A M with M = U diag(lambda(alpha)) U^T of its clean space
    lora_layers = [name for name, record in result.layers.items() if record.kind.startswith("lora_")]
    assert len(lora_layers) == len(a_before)
    for name in lora_layers:
        record = result.layers[name]
        space = result.spaces[record.group]
        module = find_target_modules(model, [name])[name][0]
        key = next(k for k in a_before if k.startswith(f"base_model.model.{name}.lora_A."))
        before = a_before[key].double().reshape(a_before[key].shape[0], -1)
        expected = before @ space.basis @ torch.diag(space.importance(record.alpha)) @ space.basis.t()
        after = module.lora_A["default"].weight.detach().double().reshape(expected.shape)
        torch.testing.assert_close(after, expected, rtol=0, atol=1e-5)
        assert not torch.allclose(after, before)

    again = reloaded(kind, model, tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    torch.testing.assert_close(logits(again, test), logits(model, test), rtol=0, atol=1e-6)
    assert not torch.allclose(logits(again, test), logits(base_model(kind), test))


def test_saved_projection_reapplies_to_the_reloaded_adapter(tmp_path):
    trained = lora_finetuned("vit")
    trained.save_pretrained(tmp_path / "trained")
    result = Repairer(trained, dataclasses.replace(FORCED, target_modules="all")).repair(data("vit", 90, seed=2))
    result.save_pretrained(tmp_path / "repair")
    fresh = peft.PeftModel.from_pretrained(base_model("vit"), tmp_path / "trained")
    RepairResult.from_pretrained(tmp_path / "repair").apply_to(fresh)
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in fresh.state_dict().items())


@pytest.mark.parametrize("method", ["erase", "head_refit"])
def test_other_methods_change_only_what_the_adapter_saves(method, tmp_path):
    model = lora_finetuned("vit")
    frozen, adapter_before = base_state(model), model.state_dict()
    adapter_before = {k: v.clone() for k, v in adapter_before.items() if k not in frozen}
    config = RepairConfig(method=method, flag_rule="budget", flag_fraction=0.3, retention_epochs=2.0,
                          retention_learning_rate=3e-3, **{k: getattr(FORCED, k) for k in (
                              "batch_size", "min_improvement", "significance_test", "repair_disable_tqdm", "seed")})
    train = data("vit", 96, seed=1) if method == "erase" else None
    result = Repairer(model, config).repair(data("vit", 90, seed=2, noise=0.0), train_dataset=train)

    assert result.adopted and result.metrics["peft_adapter_saveable"] is True
    assert all(torch.equal(v, frozen[k]) for k, v in base_state(model).items())
    changed = {k for k, v in adapter_before.items() if not torch.equal(model.state_dict()[k], v)}
    assert changed and all(".lora_" in k or ".modules_to_save." in k for k in changed)
    if method == "erase":  # the fine-tune trained the LoRA weights, not only the head
        assert any(".lora_" in k for k in changed)
    test = data("vit", 24, seed=3)
    torch.testing.assert_close(logits(reloaded("vit", model, tmp_path / "a"), test), logits(model, test), rtol=0, atol=1e-6)


def test_head_refit_of_a_lora_head_is_refused():
    model = lora_finetuned("vit", steps=1, target_modules=["q_proj", "classifier"], modules_to_save=None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="modules_to_save"):
        Repairer(model, dataclasses.replace(FORCED, method="head_refit")).repair(data("vit", 60, seed=2))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _ia3(model):
    return peft.get_peft_model(model, peft.IA3Config(target_modules=["q_proj", "fc1"], feedforward_modules=["fc1"]))


def _loha(model):
    return peft.get_peft_model(model, peft.LoHaConfig(target_modules=["q_proj"]))


def _dora(model):
    return peft.get_peft_model(model, lora_config("vit", use_dora=True))


def _two_active(model):
    wrapped = peft.get_peft_model(model, lora_config("vit", modules_to_save=None))
    wrapped.add_adapter("other", lora_config("vit", modules_to_save=None))
    wrapped.base_model.set_adapter(["default", "other"])
    return wrapped


def _prompt_tuning(model):
    return peft.get_peft_model(model, peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2))


@pytest.mark.parametrize(("kind", "wrap", "message"), [
    ("vit", _ia3, "IA3"), ("vit", _loha, "LoHa|LOHA"), ("vit", _dora, "DoRA"), ("vit", _two_active, "2 active"),
    ("bert", _prompt_tuning, "PROMPT_TUNING"),
])
@pytest.mark.parametrize("method", ["projection", "erase"])
def test_unsupported_adapters_fail_before_anything_changes(kind, wrap, message, method):
    model = wrap(base_model(kind))
    with torch.no_grad():  # make every adapter weight non-trivial, so a change would show
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = dataclasses.replace(FORCED, method=method, target_modules="all")
    train = data(kind, 32, seed=1) if method == "erase" else None
    with pytest.raises(ValueError, match=message) as err:
        Repairer(model, config).repair(data(kind, 30, seed=2), train_dataset=train)
    assert "LoRA (peft LoraConfig" in str(err.value)  # says what is supported
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_changed_frozen_base_is_reported_and_not_saveable_as_an_adapter(caplog):
    model = lora_finetuned("vit", steps=1)
    frozen = model.base_model.model.vit.layers[0].attention.k_proj.weight  # a frozen base layer, not in the adapter

    def forward(m, batch):  # a repair that reaches the base (what loading another run's checkpoints would do)
        with torch.no_grad():
            frozen.mul_(1.0001)
        return m(**batch).logits

    with caplog.at_level(logging.WARNING):
        result = Repairer(model, FORCED, forward_fn=forward).repair(data("vit", 30, seed=2))
    assert result.metrics["peft_adapter_saveable"] is False
    assert "merge_and_unload" in caplog.text


def test_hf_repair_imports_and_repairs_without_peft():
    code = ("import sys; sys.modules['peft'] = None\n"  # peft cannot be imported at all
            "import torch; from hf_repair import Repairer, find_target_modules\n"
            "model = torch.nn.Sequential(torch.nn.Linear(3, 3))\n"
            "assert list(find_target_modules(model, 'all-linear')) == ['0']\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
