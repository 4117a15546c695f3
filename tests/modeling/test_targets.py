import logging

import pytest
from torch import nn
from transformers import GPT2Config, GPT2ForSequenceClassification

from hf_repair import RepairConfig, find_target_modules
from hf_repair.modeling.targets import canonical_name


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(4, 4)
        self.key = nn.Linear(4, 4)
        self.out = nn.Linear(4, 4)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.depthwise = nn.Conv2d(4, 4, 3, groups=4)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(4, 2)


def names(model, target, exclude=None):
    return sorted(find_target_modules(model, target, exclude))


def test_list_matches_exact_names_and_dotted_suffixes():
    model = Net()
    assert names(model, ["query"]) == ["blocks.0.query", "blocks.1.query"]
    assert names(model, ["blocks.1.key", "head"]) == ["blocks.1.key", "head"]
    with pytest.raises(ValueError):  # suffixes are whole dotted components, not substrings
        find_target_modules(model, ["ery"])


def test_regex_is_full_match():
    model = Net()
    assert names(model, r"blocks\.\d\.(query|key)") == [
        "blocks.0.key", "blocks.0.query", "blocks.1.key", "blocks.1.query"]
    with pytest.raises(ValueError):
        find_target_modules(model, r"query")  # fullmatch: a bare suffix is not enough


def test_keywords_and_exclude(caplog):
    model = Net()
    linear = names(model, "all-linear")
    assert "conv" not in linear and len(linear) == 7
    with caplog.at_level(logging.WARNING):
        everything = names(model, "all")
    assert "conv" in everything and "depthwise" not in everything
    assert "depthwise" in caplog.text  # skipped grouped conv is named
    assert names(model, "all-linear", exclude=["head", "key"]) == [
        "blocks.0.out", "blocks.0.query", "blocks.1.out", "blocks.1.query"]


def test_no_match_lists_candidates():
    with pytest.raises(ValueError, match="blocks.0.query") as err:
        find_target_modules(Net(), ["attention"])
    assert "distinct suffixes" in str(err.value)


def test_wrapper_prefixes_are_ignored():
    class Compiled(nn.Module):  # what torch.compile / FSDP wrappers look like from outside
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    wrapped = Compiled(Net())
    assert names(wrapped, ["blocks.0.query"]) == ["blocks.0.query"]
    assert canonical_name("_fsdp_wrapped_module.encoder._fsdp_wrapped_module.fc") == "encoder.fc"
    assert canonical_name("module.encoder.module.fc") == "encoder.module.fc"


def test_tied_weights_are_never_projected(caplog):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.hidden = nn.Linear(4, 4)
            self.lm_head = nn.Linear(4, 10, bias=False)
            self.lm_head.weight = self.embed.weight

    with caplog.at_level(logging.WARNING):
        assert names(Tied(), "all-linear") == ["hidden"]
    assert "lm_head" in caplog.text and "tied" in caplog.text
    with pytest.raises(ValueError):
        find_target_modules(Tied(), ["lm_head"])


def test_gpt2_conv1d_layers_are_linear_targets():
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32, num_labels=2)
    found = find_target_modules(GPT2ForSequenceClassification(config), "all-linear")
    kinds = {name.rsplit(".", 1)[-1]: adapter.kind for name, (_, adapter) in found.items()}
    assert kinds["c_attn"] == "conv1d" and kinds["score"] == "linear"


def test_config_unwraps_keyword_from_command_line_list():
    assert RepairConfig(target_modules=["all-linear"]).target_modules == "all-linear"
    assert RepairConfig(target_modules=["query", "key"]).target_modules == ["query", "key"]
    with pytest.raises(ValueError, match="num_folds"):
        RepairConfig(num_folds=1)
    with pytest.raises(ValueError, match="alpha"):
        RepairConfig(alphas=[0.5])
    with pytest.raises(ValueError, match="method"):
        RepairConfig(method="magic")
