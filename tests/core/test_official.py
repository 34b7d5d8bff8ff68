"""The released parameter names in and out: ``from_official`` and ``to_official``."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from rada_mma.modules import MultiModalAdapter, RationalMask
from rada_mma.official import OFFICIAL_METHODS, from_official, to_official
from tests.helpers.tensors import randomize_

DIM = 32

# Non-default sizes where the tensors must tell them: reduction, bottleneck, hidden.
MAKERS = {
    "rada": lambda: RationalMask(dim=DIM),
    "rada+adapter": lambda: RationalMask(dim=DIM, adapter_reduction=8, regularizer="mse", adapter_init="released"),
    "mma": lambda: MultiModalAdapter(dim=DIM, bottleneck=12),
    "mma-master": lambda: MultiModalAdapter(dim=DIM, variant="master", hidden=8),
}


def official_state(method: str, seed: int = 0) -> dict[str, torch.Tensor]:
    return to_official(method, randomize_(MAKERS[method](), seed=seed))


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), name


def test_official_methods_are_covered():
    assert sorted(MAKERS) == sorted(OFFICIAL_METHODS)


@pytest.mark.parametrize("method", OFFICIAL_METHODS)
def test_round_trip_is_bit_exact(method):
    state = official_state(method)
    module = from_official(method, state)
    assert_same_state(to_official(method, module), state)


@pytest.mark.parametrize("method", OFFICIAL_METHODS)
def test_from_official_rebuilds_the_module(method):
    original = randomize_(MAKERS[method](), seed=1)
    module = from_official(method, to_official(method, original))
    # sizes are read from the tensors (bottleneck 0 means the default D / 4)
    assert dataclasses.replace(module.config, bottleneck=module.config.mma_width) == dataclasses.replace(
        original.config, bottleneck=original.config.mma_width
    )
    assert_same_state(module.state_dict(), original.state_dict())
    g = torch.Generator().manual_seed(2)
    image, text = torch.randn(2, DIM, generator=g), torch.randn(3, DIM, generator=g)
    assert torch.equal(module(image, text, 100.0), original(image, text, 100.0))


def test_official_names_are_the_released_ones():
    assert sorted(official_state("rada")) == sorted(
        f"mha.{layer}.{p}"
        for layer in ("q_proj1", "q_proj2", "q_proj3", "k_proj", "v_proj", "out_proj")
        for p in ("weight", "bias")
    )
    adapters = set(official_state("rada+adapter")) - set(official_state("rada"))
    assert adapters == {f"adapter_{side}.fc.{i}.weight" for side in ("image", "text") for i in (0, 2)}
    assert "adapter.mha.in_proj_weight" in official_state("mma")
    assert "adapter.upsampler.2.bias" in official_state("mma-master")


def test_the_blend_form_is_named_and_recognised_as_the_authors_name_it():
    """rada.py's commented-out lines and adapter_mask.py keep the blend weights as CustomCLIP.alpha and .beta."""
    blend = randomize_(RationalMask(dim=DIM, adapter_reduction=8, adapter_init="blend"), seed=3)
    state = to_official("rada+adapter", blend)
    assert set(state) - set(official_state("rada+adapter")) == {"alpha", "beta"}
    assert state["alpha"].shape == () and torch.equal(state["beta"], blend.text_adapter.ratio.detach())
    module = from_official("rada+adapter", {f"model.{k}": v for k, v in state.items()})
    assert module.config.adapter_init == "blend"
    assert_same_state(module.state_dict(), blend.state_dict())
    assert from_official("rada+adapter", official_state("rada+adapter")).config.adapter_init == "released"
    # the tensors cannot tell "small" from "released": the option can
    assert from_official("rada+adapter", official_state("rada+adapter"), adapter_init="small").config.adapter_init == "small"


def test_options_the_tensors_cannot_tell_are_passed_through():
    module = from_official("rada", official_state("rada"), temperature=0.5, heads=4, alpha=0.3, softmax="row")
    c = module.config
    assert (c.temperature, c.heads, c.alpha, c.softmax) == (0.5, 4, 0.3, "row")
    mma = from_official("mma", official_state("mma"), heads=3, blend=0.3)
    assert (mma.config.mma_heads, mma.config.blend, mma.config.mma_width) == (3, 0.3, 12)


@pytest.mark.parametrize("method", OFFICIAL_METHODS)
def test_loads_checkpoints_and_paths(method, tmp_path):
    state = official_state(method)
    checkpoint = {"state_dict": state, "epoch": 3}  # as the released (Dassl) trainers save
    path = tmp_path / "model.pth.tar-3"
    torch.save(checkpoint, path)
    for source in (checkpoint, path, str(path)):
        assert_same_state(to_official(method, from_official(method, source)), state)


@pytest.mark.parametrize("prefix", ["module.", "param."], ids=["data-parallel", "golden-file"])
def test_prefixed_keys_are_accepted(prefix):
    state = official_state("rada+adapter")
    prefixed = {f"{prefix}{name}": value for name, value in state.items()}
    assert_same_state(to_official("rada+adapter", from_official("rada+adapter", prefixed)), state)


def test_missing_path_raises():
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        from_official("rada", "/nonexistent/rada.pth")


def test_not_a_state_dict_raises():
    with pytest.raises(TypeError, match="expected a state dict"):
        from_official("rada", [1, 2, 3])


@pytest.mark.parametrize("bad", ["mma+rada", "lora"])
def test_unknown_method_raises(bad):
    with pytest.raises(ValueError, match=rf"from_official knows .* got {re.escape(repr(bad))}"):
        from_official(bad, official_state("rada"))
    with pytest.raises(ValueError, match=rf"to_official knows .* got {re.escape(repr(bad))}"):
        to_official(bad, RationalMask(dim=DIM))


@pytest.mark.parametrize(
    "method, name",
    [
        ("rada", "mha.k_proj.weight"),
        ("rada", "mha.out_proj.bias"),
        ("mma", "adapter.upsampler.bias"),
        ("mma", "adapter.mha.in_proj_weight"),
        ("mma-master", "adapter.downsampler.1.weight"),
        # the adapters' names differ only in their first part ("fc.2.weight" on both sides)
        ("rada+adapter", "adapter_text.fc.2.weight"),
        ("rada+adapter", "adapter_image.fc.0.weight"),
    ],
)
def test_missing_key_is_named(method, name):
    state = official_state(method)
    del state[name]
    with pytest.raises(KeyError, match=name.replace(".", r"\.")):
        from_official(method, state)


@pytest.mark.parametrize("method", OFFICIAL_METHODS)
def test_extra_key_is_named_unless_not_strict(method):
    state = official_state(method)
    state["prompt_learner.ctx"] = torch.zeros(4, DIM)
    with pytest.raises(ValueError, match=r"does not use: \['prompt_learner\.ctx'\].*strict=False"):
        from_official(method, state)
    module = from_official(method, state, strict=False)
    del state["prompt_learner.ctx"]
    assert_same_state(to_official(method, module), state)


WRONG_SHAPES = [
    ("rada", "mha.q_proj1.weight", (DIM, DIM + 1)),
    ("rada", "mha.out_proj.bias", (DIM - 1,)),
    ("rada", "mha.q_proj3.weight", (DIM + 1, DIM)),  # the stacked q_proj3, k_proj, v_proj
    ("rada", "mha.k_proj.weight", (DIM, DIM + 1)),
    ("rada", "mha.v_proj.bias", (DIM + 1,)),
    ("mma", "adapter.mha.out_proj.weight", (8, 9)),
    ("mma", "adapter.mha.in_proj_weight", (36, 11)),
    ("mma-master", "adapter.upsampler.0.weight", (8, 13)),
    # the tensors that tell a size: once a wrong downsampler was reported as an upsampler error
    ("mma", "adapter.downsampler.weight", (12, DIM + 4)),
    ("mma", "adapter.upsampler.weight", (DIM + 4, 12)),
    ("mma-master", "adapter.downsampler.0.weight", (8, DIM + 4)),
    ("rada+adapter", "adapter_image.fc.0.weight", (2, DIM)),
]


@pytest.mark.parametrize("method, name, shape", WRONG_SHAPES)
def test_wrong_shape_is_named(method, name, shape):
    state = official_state(method)
    state[name] = torch.zeros(shape)
    layer = name.removesuffix(".weight").removesuffix(".bias")
    with pytest.raises(ValueError, match=re.escape(layer)) as error:
        from_official(method, state)
    assert str(shape) in str(error.value), f"the error does not show the wrong shape {shape}: {error.value}"
    assert str(error.value).startswith(name), f"the error names another tensor first: {error.value}"


@pytest.mark.parametrize("method, name", [("mma", "adapter.mha.in_proj_weight"), ("rada", "mha.q_proj3.weight"),
                                          ("mma", "adapter.downsampler.bias")])
def test_tensors_of_the_wrong_rank_are_named(method, name):
    """Once an IndexError ("tuple index out of range")."""
    state = official_state(method)
    state[name] = state[name].reshape(-1) if name.endswith("weight") else state[name][None]
    with pytest.raises(ValueError, match=rf"'{re.escape(name)}' has shape .*; a layer's (weight|bias) is [12]-D"):
        from_official(method, state)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04 truncated zip"])
def test_unreadable_checkpoint_files_are_named(content, tmp_path):
    """Once a bare ``EOFError`` with an empty message for a zero-byte file."""
    path = tmp_path / "model.pth.tar-5"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"'{re.escape(str(path))}' is not a readable PyTorch checkpoint \(\w+"):
        from_official("rada", path)


@pytest.mark.parametrize(
    "method, module",
    [
        ("rada", lambda: MultiModalAdapter(dim=DIM)),
        ("rada", lambda: RationalMask(dim=DIM, adapter_reduction=4)),
        ("rada+adapter", lambda: RationalMask(dim=DIM)),
        ("mma", lambda: MultiModalAdapter(dim=DIM, variant="master")),
        ("mma-master", lambda: RationalMask(dim=DIM)),
        ("rada", lambda: torch.nn.Linear(DIM, DIM)),
    ],
)
def test_to_official_rejects_another_method(method, module):
    with pytest.raises(ValueError, match=rf"not {re.escape(repr(method))}"):
        to_official(method, module())
