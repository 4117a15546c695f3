
import datasets
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    ViTConfig,
    ViTForImageClassification,
)

from hf_repair import RepairConfig, Repairer

from helpers import PadCollator, TinyCNN

FORCE = dict(min_improvement=-1.0, significance_test="none")  # adopt the best alpha even if it is not better, to check the update



def image_split(n=60, num_classes=3, size=8, channels=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g)
    y = torch.arange(n) % num_classes
    return datasets.Dataset.from_dict({"pixel_values": x.numpy(), "labels": y.numpy()}).with_format("torch")


def text_split(n=48, vocab=60, length=10, num_classes=2):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, length + 1, (n,), generator=g)
    ids = [torch.randint(3, vocab, (int(k),), generator=g).tolist() for k in lengths]
    return datasets.Dataset.from_dict(
        {"input_ids": ids, "labels": [i % num_classes for i in range(n)], "text": ["unused"] * n}
    )



def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(model, before):
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def check_projection_applied(model, before, result, name, transpose=False):
    """The layer's weight equals W_original @ M(alpha) of its final clean space."""
    record = result.layers[name]
    m = result.spaces[record.group].projection(result.metrics["alpha"])
    w0 = before[name + ".weight"].double()
    expected = (m.t() @ w0) if transpose else (w0.reshape(w0.shape[0], -1) @ m).reshape(w0.shape)
    now = dict(model.named_parameters())[name + ".weight"].detach().double()
    torch.testing.assert_close(now, expected, rtol=1e-5, atol=1e-6)


def test_plain_cnn_conv_and_linear():
    model, split = TinyCNN(), image_split()
    before = weights(model)
    result = Repairer(model, RepairConfig(target_modules="all", seed=0, **FORCE)).repair(split)
    assert set(result.layers) == {"conv", "fc"}
    assert result.metrics["num_verified"] == len(split)
    check_projection_applied(model, before, result, "conv")
    check_projection_applied(model, before, result, "fc")
    assert result.layers["conv"].input_dim == 9 and result.layers["fc"].input_dim == 256


def test_vit_for_image_classification_shares_qkv_space():
    config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=32, num_labels=3)
    model = ViTForImageClassification(config)
    before = weights(model)
    result = Repairer(model, RepairConfig(seed=0, **FORCE)).repair(image_split())
    layer = "vit.layers.0.attention"
    groups = {result.layers[f"{layer}.{p}_proj"].group for p in ("q", "k", "v")}
    assert len(groups) == 1  # q, k, v read the same tensor: one Gram, one projection
    assert result.metrics["num_clean_spaces"] < result.metrics["num_layers"]
    check_projection_applied(model, before, result, f"{layer}.k_proj")
    check_projection_applied(model, before, result, "classifier")


def test_bert_sequence_classification_masks_padding():
    config = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, num_labels=2, max_position_embeddings=32)
    model = BertForSequenceClassification(config)
    split = text_split()
    before = weights(model)
    result = Repairer(model, RepairConfig(seed=0, **FORCE), collate_fn=PadCollator()).repair(split)
    tokens = sum(len(ids) for ids in split["input_ids"])
    query = "bert.encoder.layer.0.attention.self.query"
    assert result.spaces[result.layers[query].group].num_rows == tokens  # padded positions excluded
    check_projection_applied(model, before, result, "bert.encoder.layer.1.output.dense")


def test_gpt2_conv1d_weights_are_projected_on_their_input_side():
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=60, n_positions=32, num_labels=2,
                        pad_token_id=0)
    model = GPT2ForSequenceClassification(config)
    before = weights(model)
    result = Repairer(model, RepairConfig(seed=0, **FORCE), collate_fn=PadCollator()).repair(text_split())
    assert result.layers["transformer.h.0.attn.c_attn"].kind == "conv1d"
    check_projection_applied(model, before, result, "transformer.h.0.attn.c_attn", transpose=True)
    check_projection_applied(model, before, result, "transformer.h.0.mlp.c_proj", transpose=True)


def test_dataloader_input_and_compute_metrics():
    model, split = TinyCNN(), image_split()
    loader = DataLoader(split, batch_size=10)
    seen = []

    def compute_metrics(eval_pred):
        seen.append(eval_pred.predictions.shape)
        return {"neg_error": -float((eval_pred.predictions.argmax(-1) != eval_pred.label_ids).mean())}

    config = RepairConfig(seed=0, metric_for_selection="neg_error")
    result = Repairer(model, config, compute_metrics=compute_metrics).repair(loader)
    assert seen and seen[0][1] == 3
    assert result.metrics["num_verified"] == 60
    assert result.metrics["neg_error_after"] >= result.metrics["neg_error_before"]


def test_never_worse_leaves_a_perfect_model_bit_identical():
    model, split = TinyCNN(), image_split()
    with torch.no_grad():  # relabel so the trained model is already perfect on the verified split
        preds = model(pixel_values=split[:]["pixel_values"]).logits.argmax(-1)
    split = split.with_format(None).map(lambda _, i: {"labels": int(preds[i])}, with_indices=True)
    split = split.with_format("torch")
    before = weights(model)
    result = Repairer(model, RepairConfig(seed=0)).repair(split)
    assert result.metrics["accuracy_before"] == 1.0
    assert not result.adopted and result.metrics["alpha"] is None
    assert_same_weights(model, before)


def test_adopted_repair_beats_the_unrepaired_model_and_undo_is_exact():
    model, split = TinyCNN(), image_split(n=90)
    before = weights(model)
    result = Repairer(model, RepairConfig(seed=0, **FORCE)).repair(split)
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    result.undo()
    assert_same_weights(model, before)

    result = Repairer(model, RepairConfig(seed=0)).repair(split)
    if result.adopted:
        assert result.metrics["accuracy_after"] > result.metrics["accuracy_before"]
    else:
        assert_same_weights(model, before)


def test_seed_makes_the_repair_reproducible():
    split = image_split(n=90)
    a, b = TinyCNN(), TinyCNN()
    b.load_state_dict(a.state_dict())
    ra = Repairer(a, RepairConfig(seed=3, **FORCE)).repair(split)
    rb = Repairer(b, RepairConfig(seed=3, **FORCE)).repair(split)
    assert ra.metrics["alpha"] == rb.metrics["alpha"]
    assert_same_weights(b, weights(a))


# ------------------------------------------------------------------------------------------
# bad input: a clear error, and not one weight touched


@pytest.mark.parametrize(
    "make_split, message",
    [
        (lambda: image_split().rename_column("labels", "label_ids"), "no 'labels' column"),
        (lambda: image_split().select(range(0)), "empty"),
        (lambda: image_split(n=4), "at least 6"),
        (lambda: image_split().with_format(None).map(lambda r: {"labels": r["labels"] + 5}).with_format("torch"),
         "outside the model's 3 classes"),
        (lambda: image_split().with_format(None).map(
            lambda r, i: {"pixel_values": np.full((1, 8, 8), np.nan if i == 7 else 0.0)}, with_indices=True
        ).with_format("torch"), "NaN"),
        (lambda: image_split().remove_columns("pixel_values").add_column("noise", [0.0] * 60), "No column"),
    ],
)
def test_bad_verified_split(make_split, message):
    model = TinyCNN()
    before = weights(model)
    with pytest.raises(ValueError, match=message):
        Repairer(model, RepairConfig(seed=0)).repair(make_split())
    assert_same_weights(model, before)


def test_no_matching_layers_and_meta_device():
    with pytest.raises(ValueError, match="matched no repairable layer"):
        Repairer(TinyCNN(), RepairConfig(target_modules=["attention"])).repair(image_split())
    with torch.device("meta"):
        meta_model = TinyCNN()
    with pytest.raises(ValueError, match="meta device"):
        Repairer(meta_model, RepairConfig()).repair(image_split())


def test_exception_mid_repair_restores_every_weight():
    model, split = TinyCNN(), image_split()
    before = weights(model)
    calls = {"n": 0}

    def flaky_forward(m, inputs):
        calls["n"] += 1
        if calls["n"] > 10:  # past the capture pass: weights are being projected now
            raise RuntimeError("device lost")
        return m(**inputs).logits

    with pytest.raises(RuntimeError, match="device lost"):
        Repairer(model, RepairConfig(seed=0, batch_size=8), forward_fn=flaky_forward).repair(split)
    assert_same_weights(model, before)
    assert model.training  # the model's mode is restored too


def test_per_layer_alphas_match_or_beat_the_global_choice():
    split = image_split(n=90)
    a, b = TinyCNN(), TinyCNN()
    b.load_state_dict(a.state_dict())
    before = weights(a)
    glob = Repairer(a, RepairConfig(target_modules="all", seed=0, **FORCE)).repair(split)
    per_layer = Repairer(b, RepairConfig(target_modules="all", alpha_scope="layer", seed=0, **FORCE)).repair(split)
    assert per_layer.metrics["accuracy_after"] >= glob.metrics["accuracy_after"]
    for name, record in per_layer.layers.items():
        assert record.alpha is None or record.alpha in per_layer.config.alphas
        if record.alpha is None:  # "no projection" won for this layer: it is exactly as trained
            assert torch.equal(dict(b.named_parameters())[name + ".weight"], before[name + ".weight"])
    assert {r.alpha for r in glob.layers.values()} == {glob.metrics["alpha"]}


def test_per_layer_search_scores_no_choice_twice():
    split = image_split(n=60)
    passes = []

    def forward(model, inputs):
        passes.append(len(inputs["pixel_values"]))
        return model(**inputs).logits

    config = RepairConfig(target_modules=["fc"], alpha_scope="layer", alpha_search="grid", seed=0, **FORCE)
    Repairer(TinyCNN(), config, forward_fn=forward).repair(split)
    # The capture pass, then one pass per alpha of the grid. With one clean space every per-layer trial
    # (each alpha, and no projection) is a choice the global search or the capture pass already scored.
    assert sum(passes) == (1 + len(config.alphas)) * 60


def test_image_model_refuses_pixel_values_without_channel_dimension_before_any_change():
    config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, num_labels=3)
    model = ViTForImageClassification(config).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flat = image_split().map(lambda row: {"pixel_values": row["pixel_values"][0]})  # (8, 8): no channel axis
    with pytest.raises(ValueError, match=r"pixel_values has shape \(\d+, 8, 8\).*\(batch, 1, height, width\)"):
        Repairer(model, RepairConfig(target_modules="all-linear")).repair(flat)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_result_repr_is_one_short_line(tmp_path):
    model = TinyCNN()
    result = Repairer(model, RepairConfig(target_modules="all", **FORCE)).repair(image_split())
    result.save_pretrained(tmp_path / "repair")
    for shown in (repr(result), repr(type(result).from_pretrained(tmp_path / "repair"))):
        assert "\n" not in shown and len(shown) < 200 and shown.startswith("RepairResult(method='projection'")
    assert "no undo" in repr(type(result).from_pretrained(tmp_path / "repair"))
