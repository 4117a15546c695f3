"""Saved repairs (save -> load -> re-apply -> undo) and the atomic directory writes behind every save."""

import json
import logging
import os

import datasets
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from hf_repair import RepairConfig, Repairer, RepairResult
from hf_repair.projection.capture import GramCollector
from hf_repair.projection.saving import RepairMismatchError, weight_fingerprint
from hf_repair.utils.files import atomic_directory, check_output_directory, write_json

from helpers import TinyCNN

FORCE = dict(min_improvement=-1.0, significance_test="none")  # adopt the best alpha even if it does not beat the model, to exercise the update
NEVER = dict(min_improvement=1.0)  # no alpha can beat the model by a whole accuracy point: never adopted


# ------------------------------------------------------------------------------------------------
# atomic directories


def siblings(path):
    """Hidden leftovers next to `path` (staging or backup directories)."""
    return [p for p in os.listdir(path.parent) if p.startswith(f".{path.name}.")]


def test_atomic_directory_appears_complete_with_normal_permissions(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as staging:
        assert not target.exists()  # nothing is visible until the block succeeds
        (staging / "a.txt").write_text("a")
        (staging / "sub").mkdir()
    assert (target / "a.txt").read_text() == "a" and (target / "sub").is_dir()
    reference = tmp_path / "reference"
    reference.mkdir()
    assert target.stat().st_mode == reference.stat().st_mode
    assert siblings(target) == []


def test_atomic_directory_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_directory(target) as staging:
            (staging / "half.bin").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert not target.exists()
    assert siblings(target) == []


def test_atomic_directory_refuses_non_empty_target_before_running(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "model.safetensors").write_text("trained")
    ran = False
    with pytest.raises(FileExistsError, match="overwrite"):
        with atomic_directory(target):
            ran = True
    assert not ran
    assert (target / "model.safetensors").read_text() == "trained"
    assert siblings(target) == []


def test_atomic_directory_fills_empty_directory_and_refuses_file(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_directory(empty) as staging:
        (staging / "x").write_text("x")
    assert (empty / "x").read_text() == "x"

    a_file = tmp_path / "file"
    a_file.write_text("keep")
    with pytest.raises(NotADirectoryError):
        check_output_directory(a_file, overwrite=True)
    assert a_file.read_text() == "keep"


def test_atomic_directory_overwrite_replaces_only_on_success(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target, overwrite=True) as staging:
            (staging / "new.txt").write_text("new")
            raise RuntimeError("interrupted")
    assert sorted(os.listdir(target)) == ["old.txt"]  # the old directory survives a failed overwrite

    with atomic_directory(target, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(os.listdir(target)) == ["new.txt"]
    assert siblings(target) == []


def test_write_json_keeps_old_file_when_serialisation_fails(tmp_path):
    path = tmp_path / "repair_results.json"
    write_json(path, {"accuracy": 0.5})
    with pytest.raises(TypeError):
        write_json(path, {"accuracy": object()})  # a plain open(path, "w") would have truncated the file
    assert json.loads(path.read_text()) == {"accuracy": 0.5}
    assert siblings(path) == []


# ------------------------------------------------------------------------------------------------
# saved repairs


def tiny_bert(hidden=16, layers=1, seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(config).eval()


def token_split(n=60, length=8, num_classes=3):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (n, length), generator=g)
    return datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
         "labels": (ids[:, 0] % num_classes).tolist()}
    )



def image_split(n=60):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 1, 8, 8, generator=g)
    return datasets.Dataset.from_dict({"pixel_values": x.numpy(), "labels": (torch.arange(n) % 3).numpy()}).with_format("torch")


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def bert_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert")
    tiny_bert().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def repaired_bert(bert_checkpoint):
    model = BertForSequenceClassification.from_pretrained(bert_checkpoint).eval()
    result = Repairer(model, RepairConfig(target_modules="all-linear", **FORCE)).repair(token_split())
    return model, result


def test_round_trip_reapplies_bit_identical_weights_and_undo_restores(repaired_bert, bert_checkpoint, tmp_path):
    repaired, result = repaired_bert
    original = BertForSequenceClassification.from_pretrained(bert_checkpoint).eval()
    assert result.adopted and not same_weights(repaired, original)  # the repair really changed the weights

    result.save_pretrained(tmp_path / "repair")
    assert sorted(os.listdir(tmp_path / "repair")) == ["clean_spaces.safetensors", "repair_config.json", "repair_result.json"]
    assert siblings(tmp_path / "repair") == []
    loaded = RepairResult.from_pretrained(tmp_path / "repair")

    fresh = BertForSequenceClassification.from_pretrained(bert_checkpoint).eval()
    applied = loaded.apply_to(fresh)
    assert same_weights(fresh, repaired)
    applied.undo()
    assert same_weights(fresh, original)


def test_loaded_repair_matches_what_was_saved(repaired_bert, tmp_path):
    _, result = repaired_bert
    result.save_pretrained(tmp_path / "repair")
    loaded = RepairResult.from_pretrained(tmp_path / "repair")

    assert loaded.config == result.config
    assert loaded.metrics == result.metrics
    assert loaded.selection == result.selection
    assert loaded.groups() == result.groups() and len(loaded.groups()) < len(loaded.layers)  # q, k, v share one
    for name, record in result.layers.items():
        saved = loaded.layers[name]
        assert (saved.kind, saved.group, saved.input_dim, saved.rank) == (record.kind, record.group, record.input_dim, record.rank)
        assert saved.weight_shape == tuple(result._snapshot.original(name).shape)
        assert saved.weight_sha256 == weight_fingerprint(result._snapshot.original(name))
    for group, space in result.spaces.items():
        assert torch.equal(loaded.spaces[group].basis, space.basis.cpu())
        assert torch.equal(loaded.spaces[group].energies, space.energies.cpu())
        assert loaded.spaces[group].num_rows == space.num_rows
    with safe_open(str(tmp_path / "repair" / "clean_spaces.safetensors"), framework="pt") as f:
        assert set(f.keys()) == {f"{g}.{part}" for g in result.spaces for part in ("basis", "energies")}


def test_round_trip_conv_model(tmp_path):
    model = TinyCNN().eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    result = Repairer(model, RepairConfig(target_modules="all", **FORCE)).repair(image_split())
    assert {r.kind for r in result.layers.values()} == {"conv2d", "linear"}
    assert result.spaces["fc"].basis.shape == (256, 60)  # 60 verified images for 256 inputs: a thin space
    result.save_pretrained(tmp_path / "repair")

    fresh = TinyCNN()
    fresh.load_state_dict(original)
    applied = RepairResult.from_pretrained(tmp_path / "repair").apply_to(fresh)
    assert same_weights(fresh, model)
    applied.undo()
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in original.items())


def test_the_space_of_the_whole_split_is_decomposed_only_for_an_adopted_repair(monkeypatch):
    requested = []
    space = GramCollector.space
    monkeypatch.setattr(GramCollector, "space",
                        lambda self, leader, without=None, **kw: requested.append((leader, without)) or space(
                            self, leader, without, **kw))
    for options, adopted in ((NEVER, False), (FORCE, True)):
        requested.clear()
        result = Repairer(TinyCNN().eval(), RepairConfig(target_modules="all", **options)).repair(image_split())
        assert result.adopted == adopted
        groups = {record.group for record in result.layers.values()}
        assert sorted(leader for leader, without in requested if without is None) == (sorted(groups) if adopted else [])
        assert len([1 for _, without in requested if without is not None]) == 3 * len(groups)  # every fold's space


def test_format_1_with_complete_spaces_still_loads_and_applies(tmp_path):
    """Format 1 stored every basis d x d (a thin one completed by zero-energy directions): the same projection."""
    model = TinyCNN().eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    result = Repairer(model, RepairConfig(target_modules="all", **FORCE)).repair(image_split())
    result.save_pretrained(tmp_path / "repair")
    spaces = load_file(str(tmp_path / "repair" / "clean_spaces.safetensors"))
    thin = spaces["fc.basis"]
    complement = torch.linalg.qr(thin, mode="complete")[0][:, thin.shape[1]:]
    spaces["fc.basis"] = torch.cat([thin, complement], dim=1)
    spaces["fc.energies"] = torch.cat([spaces["fc.energies"], torch.zeros(256 - thin.shape[1], dtype=thin.dtype)])
    save_file(spaces, str(tmp_path / "repair" / "clean_spaces.safetensors"))
    report = json.loads((tmp_path / "repair" / "repair_result.json").read_text())
    (tmp_path / "repair" / "repair_result.json").write_text(json.dumps({**report, "format_version": 1}))

    loaded = RepairResult.from_pretrained(tmp_path / "repair")
    assert loaded.spaces["fc"].basis.shape == (256, 256)
    fresh = TinyCNN()
    fresh.load_state_dict(original)
    loaded.apply_to(fresh)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_applying_twice_is_refused(repaired_bert, tmp_path):
    repaired, result = repaired_bert
    result.save_pretrained(tmp_path / "repair")
    before = {k: v.clone() for k, v in repaired.state_dict().items()}
    with pytest.raises(RepairMismatchError, match="already applied"):
        RepairResult.from_pretrained(tmp_path / "repair").apply_to(repaired)
    assert all(torch.equal(repaired.state_dict()[k], v) for k, v in before.items())


def test_check_weights_false_projects_other_weights(repaired_bert, tmp_path):
    _, result = repaired_bert
    result.save_pretrained(tmp_path / "repair")
    other = tiny_bert(seed=5)  # same architecture, other weights
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(RepairMismatchError, match="check_weights=False"):
        RepairResult.from_pretrained(tmp_path / "repair").apply_to(other)
    applied = RepairResult.from_pretrained(tmp_path / "repair").apply_to(other, check_weights=False)
    changed = [n for n in result.layers if not torch.equal(other.get_submodule(n).weight, before[f"{n}.weight"])]
    assert changed == list(result.layers)
    applied.undo()
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize(
    "other, message",
    [
        (lambda: tiny_bert(hidden=32), "another weight shape"),
        (lambda: tiny_bert(layers=2), None),  # same names for layer 0, but the shapes/fingerprints differ
        (lambda: TinyCNN(), "no such layer"),
    ],
)
def test_repair_for_another_model_is_refused_with_the_mismatches(repaired_bert, tmp_path, other, message):
    _, result = repaired_bert
    result.save_pretrained(tmp_path / "repair")
    model = other()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RepairMismatchError) as err:
        RepairResult.from_pretrained(tmp_path / "repair").apply_to(model)
    if message is not None:
        assert message in str(err.value)
        assert "bert.encoder.layer.0.attention.self.query" in str(err.value)  # the mismatches are listed
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_not_adopted_repair_reapplies_as_no_op(bert_checkpoint, tmp_path, caplog):
    model = BertForSequenceClassification.from_pretrained(bert_checkpoint).eval()
    result = Repairer(model, RepairConfig(target_modules="all-linear", **NEVER)).repair(token_split())
    assert not result.adopted and result.metrics["alpha"] is None
    # Nothing was projected, so the spaces of the whole split were never decomposed: none saved, no ranks.
    assert result.spaces == {}
    assert {r.rank for r in result.layers.values()} == {None}
    assert result.layers["bert.encoder.layer.0.intermediate.dense"].input_dim == 16
    assert result.layers["bert.encoder.layer.0.output.dense"].input_dim == 32
    result.save_pretrained(tmp_path / "repair")
    assert load_file(str(tmp_path / "repair" / "clean_spaces.safetensors")) == {}

    fresh = BertForSequenceClassification.from_pretrained(bert_checkpoint).eval()
    with caplog.at_level(logging.INFO, logger="hf_repair"):
        applied = RepairResult.from_pretrained(tmp_path / "repair").apply_to(fresh)
    assert "not adopted" in caplog.text
    assert not applied.adopted and same_weights(fresh, model)


def test_interrupted_save_leaves_nothing_and_never_overwrites(repaired_bert, tmp_path, monkeypatch):
    _, result = repaired_bert
    target = tmp_path / "repair"

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr("hf_repair.results.write_json", disk_full)
        with pytest.raises(OSError, match="No space"):
            result.save_pretrained(target)
    assert not target.exists() and siblings(target) == []

    result.save_pretrained(target)
    saved = (target / "repair_result.json").read_text()
    with pytest.raises(FileExistsError):
        result.save_pretrained(target)
    result.save_pretrained(target, overwrite=True)
    assert (target / "repair_result.json").read_text() == saved


def test_loading_bad_directories(tmp_path, repaired_bert):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        RepairResult.from_pretrained(tmp_path)
    _, result = repaired_bert
    result.save_pretrained(tmp_path / "repair")
    report = json.loads((tmp_path / "repair" / "repair_result.json").read_text())
    report["format_version"] = 99
    (tmp_path / "repair" / "repair_result.json").write_text(json.dumps(report))
    with pytest.raises(ValueError, match="format 99"):
        RepairResult.from_pretrained(tmp_path / "repair")


def _writer_script(target, mode):
    """A process that starts an atomic write to `target` and then either dies (kill -9) or keeps writing."""
    finish = "os.kill(os.getpid(), signal.SIGKILL)" if mode == "killed" else "print('ready', flush=True); time.sleep(60)"
    return (
        "import os, signal, time\n"
        "from hf_repair.utils.files import atomic_directory\n"
        f"with atomic_directory({str(target)!r}) as tmp:\n"
        "    (tmp / 'weights.bin').write_bytes(b'x' * 1000)\n"
        f"    {finish}\n"
    )


def test_next_write_removes_staging_left_by_a_killed_writer_but_not_a_live_one(tmp_path):
    import subprocess
    import sys

    target = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", _writer_script(target, "killed")], capture_output=True)
    assert killed.returncode == -9
    left = siblings(target)
    assert len(left) == 1 and left[0].startswith(".out.tmp-")

    live = subprocess.Popen([sys.executable, "-c", _writer_script(tmp_path / "busy", "live")], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert live.stdout.readline().strip() == "ready"
        busy_staging = siblings(tmp_path / "busy")
        assert len(busy_staging) == 1
        with atomic_directory(target) as tmp:
            (tmp / "done.txt").write_text("ok")
        assert siblings(target) == []  # the killed writer's staging is gone
        assert (target / "done.txt").read_text() == "ok"
        with atomic_directory(tmp_path / "busy", overwrite=True) as tmp:  # same place as the live writer
            (tmp / "mine.txt").write_text("ok")
        assert busy_staging[0] in siblings(tmp_path / "busy")  # the live writer's staging is untouched
    finally:
        live.kill()
        live.wait()
