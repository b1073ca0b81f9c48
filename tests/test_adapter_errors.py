"""Every mistake a user can make with the core: one StudioError naming the module and the fix."""

import pytest
import torch

import studio.adapters as A
from builders import CASES


def _mlp():
    return CASES[0].build()


def test_unknown_method():
    listed = ", ".join(A.registry.METHODS)  # the error names every registered method, in the registry's order
    with pytest.raises(A.StudioError, match=f"unknown adapter method 'glora': choose one of {listed}$"):
        A.attach(_mlp(), "a", "glora", targets="0")


@pytest.mark.parametrize("method", ["lora", "pissa", "milora"])
@pytest.mark.parametrize("rank", [0, -2])
def test_non_positive_rank(method, rank):
    with pytest.raises(A.StudioError, match="rank must be a positive integer"):
        A.make_config(method, {"rank": rank})


@pytest.mark.parametrize("method", ["lora", "pissa", "milora"])
def test_rank_larger_than_the_layer(method):
    with pytest.raises(A.StudioError, match=r"rank 13 is larger than min\(out, in\) = 12 of module '0'.*--rank 12"):
        A.attach(_mlp(), "a", method, A.make_config(method, {"rank": 13}), "0")


@pytest.mark.parametrize("method", ["lora", "pissa", "milora", "lora_xs"])
def test_conv_rank_larger_than_the_kernel_names_conv_rank(method):
    conv = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1))  # (8, 4 * 3 * 3): min 8
    with pytest.raises(A.StudioError, match=r"rank 9 is larger than min\(out, in\) = 8 of module '0'.*--conv-rank 8 or"):
        A.attach(conv, "a", method, A.make_config(method, {"rank": 2, "conv_rank": 9}), "0")


def test_targets_matching_nothing():
    with pytest.raises(A.StudioError, match=r"match no Linear layer.*preset"):
        A.attach(_mlp(), "a", "lora", targets="unet-attn")
    with pytest.raises(A.StudioError, match="match no Linear layer"):
        A.attach(_mlp(), "a", "lora", targets="1")  # a GELU, not a Linear


def test_attaching_a_name_twice():
    model = _mlp()
    A.attach(model, "a", "lora", targets="0")
    with pytest.raises(A.StudioError, match="'a' is already attached"):
        A.attach(model, "a", "svf", targets="2")


def test_unknown_config_option():
    with pytest.raises(A.StudioError, match=r"unknown option\(s\) \['rnak'\]"):
        A.make_config("lora", {"rnak": 4})


def test_loading_weights_of_the_wrong_shape():
    model = _mlp()
    A.attach(model, "a", "lora", A.lora.Config(rank=4), "0")
    sd = A.adapter_state_dict(model, "a")
    sd["0.A"] = torch.zeros(4, 13)
    with pytest.raises(A.StudioError, match=r"'0.A' has shape \(4, 13\) but the base needs \(4, 12\)"):
        A.load_adapter(_mlp(), "b", "lora", {"rank": 4}, sd)


def test_loading_an_adapter_for_another_architecture():
    model = _mlp()
    A.attach(model, "a", "lora", targets="0")
    sd = {f"encoder.{k}": v for k, v in A.adapter_state_dict(model, "a").items()}
    with pytest.raises(A.StudioError, match="targets module 'encoder.0'.*another base"):
        A.load_adapter(_mlp(), "b", "lora", {}, sd)


def test_svf_refuses_a_different_base():
    model = _mlp()
    A.attach(model, "a", "svf", targets="0")
    sd = A.adapter_state_dict(model, "a")
    other = _mlp()  # same architecture, different weights
    with pytest.raises(A.StudioError, match="SVF adapter was trained on a different base weight for module '0'"):
        A.load_adapter(other, "b", "svf", {}, sd)
    assert A.adapter_names(other) == []  # nothing was half-attached


def test_operations_on_a_missing_adapter():
    with pytest.raises(A.StudioError, match="no adapter named 'x' is attached"):
        A.set_weight(_mlp(), "x", 0.5)
