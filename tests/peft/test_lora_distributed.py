"""A LoRA fine-tune repaired by 2 processes under `accelerate launch` (CPU, gloo): both end with the same adapter."""

import dataclasses

import pytest
import torch

peft = pytest.importorskip("peft")

from hf_repair import Repairer  # noqa: E402

from helpers import launch_two_processes  # noqa: E402
from lora_setup import FORCED, base_state, data, lora_finetuned  # noqa: E402


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_distributed")
    launch_two_processes("distributed_lora.py", out)
    return out


def ranks(out, method):
    return [torch.load(out / f"{method}_rank{rank}.pt") for rank in range(2)]


@pytest.mark.parametrize("method", ["projection", "erase"])
def test_both_processes_end_with_the_same_adapter_and_an_untouched_base(launched, method):
    first, second = ranks(launched, method)
    assert first["adapter"].keys() == second["adapter"].keys()
    assert all(torch.equal(first["adapter"][k], second["adapter"][k]) for k in first["adapter"])
    drop_times = lambda m: {k: v for k, v in m.items() if not k.endswith("_time_s")}  # noqa: E731
    assert drop_times(first["metrics"]) == drop_times(second["metrics"])
    assert first["metrics"]["adopted"] and first["metrics"]["peft_adapter_saveable"]
    trained = lora_finetuned("vit")
    untouched = base_state(trained)
    assert all(torch.equal(first["base"][k], v) for k, v in untouched.items())
    before = peft.get_peft_model_state_dict(trained)
    assert any(not torch.equal(first["adapter"][k], v) for k, v in before.items())


def test_the_projection_matches_one_process(launched):
    (first, _) = ranks(launched, "projection")
    model = lora_finetuned("vit")
    result = Repairer(model, dataclasses.replace(FORCED, target_modules="all")).repair(data("vit", 61, seed=2, noise=0.0))
    assert first["metrics"]["alpha"] == result.metrics["alpha"]
    for key, value in peft.get_peft_model_state_dict(model).items():
        torch.testing.assert_close(first["adapter"][key], value, rtol=1e-5, atol=1e-6)
