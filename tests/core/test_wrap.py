"""``wrap()``: backends, composition, freezing, classes, training, errors and ``torch.compile``.

Every CLIP family runs through the same generic tests from the ``CASES`` table
(peft's ``TEST_CASES``): the tiny models of ``tiny_models`` with random weights.
"""

from __future__ import annotations

import ast
import copy
import gc
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rada_mma
from rada_mma import METHODS, AdapterConfig, wrap
from tests.helpers import tiny_models as tm

NAMES = ["cat", "dog", "bird", "fish", "car", "tree"]
GENERIC_SCALE = 50.0
RADA_FAMILY = ("rada", "rada+adapter", "mma+rada")


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- the table of models -----------------------------------------------------------------------


def open_clip_tokens(k: int) -> Tensor:
    return tm.tokenizer()([f"a photo of a {name}." for name in NAMES[:k]])  # (K, L)


def generic_tokens(k: int) -> Tensor:
    return torch.randint(0, 100, (k, 8), generator=seeded(1))


def scaled_cosine(image: Tensor, text: Tensor, scale: Tensor | float, bias: Tensor | None = None) -> Tensor:
    """Zero-shot CLIP written out: ``s · normalize(f) @ normalize(h)ᵀ (+ b)``, in fp32."""
    logits = scale * F.normalize(image.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T
    return logits if bias is None else logits + bias


def encoders_zero_shot(base: nn.Module, images: Tensor, tokens: Tensor) -> Tensor:
    """open_clip (with SigLIP's bias) and OpenAI: from the base model's own encoders and scale."""
    bias = getattr(base, "logit_bias", None)
    return scaled_cosine(base.encode_image(images), base.encode_text(tokens), base.logit_scale.exp(), bias)


def hf_zero_shot(base: nn.Module, images: Tensor, tokens: Tensor) -> Tensor:
    """Hugging Face: the model's own forward."""
    return base(input_ids=tokens, pixel_values=images).logits_per_image


def generic_zero_shot(base: nn.Module, images: Tensor, tokens: Tensor) -> Tensor:
    return scaled_cosine(base.encode_image(images), base.encode_text(tokens), GENERIC_SCALE)


@dataclass(frozen=True)
class Case:
    make: Callable[[], nn.Module]  # a fresh base model, same weights every call
    backend: str  # what detection must pick
    tokens: Callable[[int], Any]  # token ids for the first k classes
    zero_shot: Callable[[nn.Module, Tensor, Any], Tensor]  # the base model's logits, computed here
    options: dict[str, Any] = field(default_factory=dict)  # what wrap needs beyond the model
    dim: int = tm.EMBED_DIM


CASES = {
    "open_clip": Case(tm.open_clip_model, "open_clip", open_clip_tokens, encoders_zero_shot),
    "open_clip_siglip": Case(partial(tm.open_clip_model, siglip=True), "open_clip", open_clip_tokens,
                             encoders_zero_shot),
    "hf_clip": Case(tm.hf_clip_model, "hf", tm.hf_tokens, hf_zero_shot),
    "hf_siglip": Case(tm.hf_siglip_model, "hf", tm.hf_tokens, hf_zero_shot),
    "openai": Case(tm.FakeOpenAICLIP, "openai", open_clip_tokens, encoders_zero_shot),
    "openai_fp16": Case(partial(tm.FakeOpenAICLIP, half=True), "openai", open_clip_tokens, encoders_zero_shot),
    "generic": Case(partial(tm.GenericDualEncoder, dim=48), "generic", generic_tokens, generic_zero_shot,
                    dict(dim=48, logit_scale=GENERIC_SCALE), dim=48),
}
each_case = pytest.mark.parametrize("name", list(CASES))


def wrapped(name: str = "open_clip", method: str = "rada", k: int = 4, **options: Any):
    """A fresh base model of ``CASES[name]``, wrapped with ``method`` and its first ``k`` classes set."""
    case = CASES[name]
    base = case.make()
    model = wrap(base, method, generator=seeded(0), **case.options, **options)
    return model.set_classes(case.tokens(k)), base


def labels_for(k: int, n: int = 8) -> Tensor:
    return torch.arange(n) % k


def clones(module: nn.Module) -> dict[str, Tensor]:
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


def changed(module: nn.Module, before: dict[str, Tensor]) -> set[str]:
    return {name for name, t in module.state_dict().items() if not torch.equal(t, before[name])}


# -- backends --------------------------------------------------------------------------------


@each_case
def test_detects_backend(name):
    model, _ = wrapped(name)
    assert model.backend.name == CASES[name].backend
    assert model.adapter.dim == CASES[name].dim


@pytest.mark.parametrize("name", ["open_clip", "openai"])
def test_backend_override_gives_the_same_logits(name):
    """Both models also have plain encode_image/encode_text, so the generic backend must agree."""
    model, base = wrapped(name)
    forced = wrap(base, "rada", backend="generic", generator=seeded(0)).set_classes(CASES[name].tokens(4))
    x = tm.images(3)
    assert forced.backend.name == "generic"
    with torch.no_grad():
        assert torch.equal(forced(x), model(x))


def _wrap_held_base(**options: Any) -> tuple[nn.Module, nn.Module]:
    """Wrap a base model that a live wrapper already holds."""
    base = tm.open_clip_model()
    held = wrap(base)
    return held, wrap(base, **options)


WRAP_ERRORS = {
    "unknown backend": (lambda: wrap(tm.open_clip_model(), backend="tensorflow"), ValueError,
                        "unknown backend 'tensorflow'; choose one of open_clip, hf, openai, generic"),
    "not a module": (lambda: wrap(object()), TypeError, "takes a torch.nn.Module"),
    "no encoders": (lambda: wrap(nn.Linear(4, 4)), TypeError, "no encode_image/encode_text methods"),
    "hf single tower": (lambda: wrap(tm.hf_clip_model().text_model), TypeError,
                        "no get_image_features; wrap a CLIPModel or SiglipModel"),
    "generic without dim": (lambda: wrap(tm.GenericDualEncoder(), logit_scale=GENERIC_SCALE), ValueError,
                            "cannot tell the embedding width .* pass dim="),
    "generic without logit_scale": (lambda: wrap(tm.GenericDualEncoder(), dim=24), ValueError,
                                    "has no logit_scale; pass logit_scale="),
    "unknown method": (lambda: wrap(tm.open_clip_model(), "lora"), ValueError, "unknown method 'lora'"),
    "unknown option": (lambda: wrap(tm.open_clip_model(), head=4), TypeError, r"unknown adapter option\(s\) \['head'\]"),
    "heads not dividing": (lambda: wrap(tm.open_clip_model(), heads=5), ValueError,
                           "heads=5 must be a positive divisor of the embedding width"),
    "config and options": (lambda: wrap(tm.open_clip_model(), config=AdapterConfig.for_method("rada", 32), heads=4),
                           TypeError, "either config= or method options"),
    "already wrapped": (lambda: wrap(wrap(tm.open_clip_model())), TypeError,
                        r"already an AdaptedCLIP .*; use it as is, or call wrap\(model.unwrap\(\), ...\)"),
    "already wrapped, as generic": (lambda: wrap(wrap(tm.open_clip_model()), backend="generic", dim=32, logit_scale=1.0),
                                    TypeError, "already an AdaptedCLIP"),
    "shared base, other freezing": (lambda: _wrap_held_base(freeze_backbone=False), ValueError,
                                    "already wrapped with freeze_backbone=True; wrappers sharing a base"),
    "negative logit_scale": (lambda: wrap(tm.GenericDualEncoder(), dim=24, logit_scale=-100.0), ValueError,
                             r"logit_scale must be a finite number > 0 .* got -100.0"),
    "NaN logit_scale": (lambda: wrap(tm.GenericDualEncoder(), dim=24, logit_scale=float("nan")), ValueError,
                        r"logit_scale must be a finite number > 0 .* got nan"),
    "the model's scale overflows": (lambda: wrap(_with_log_scale(tm.open_clip_model(), 1e4)), ValueError,
                                    r"logit_scale must be a finite number > 0 .* got inf"),
}


def _with_log_scale(model: nn.Module, value: float) -> nn.Module:
    with torch.no_grad():
        model.logit_scale.fill_(value)
    return model


@pytest.mark.parametrize("case", list(WRAP_ERRORS))
def test_wrap_errors(case):
    call, error, message = WRAP_ERRORS[case]
    with pytest.raises(error, match=message):
        call()


def test_not_a_module_with_backend_override():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        wrap("not a model", backend="generic", dim=8, logit_scale=1.0)


def test_config_instead_of_method():
    config = AdapterConfig.for_method("mma", tm.EMBED_DIM, blend=0.5)
    model = wrap(tm.open_clip_model(), config=config)
    assert model.adapter.config == config


def test_public_api_is_exported():
    assert rada_mma.wrap is wrap and rada_mma.AdaptedCLIP is type(wrapped()[0])


@pytest.mark.parametrize("module", ["wrapper", "backends", "serialization", "config", "modules"])
def test_user_input_is_never_checked_with_assert(module):
    """``python -O`` strips asserts, and AssertionError tells the user nothing: checks raise errors."""
    source = Path(rada_mma.__file__).with_name(f"{module}.py").read_text()
    asserts = [node.lineno for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Assert)]
    assert asserts == [], f"rada_mma/{module}.py has assert statements on lines {asserts}"


def test_generic_takes_dim_and_logit_scale():
    model, _ = wrapped("generic")
    assert model.adapter.dim == 48
    assert model.multiplicative_scale().item() == GENERIC_SCALE


# -- composition, not monkey-patching ------------------------------------------------------------


def _anatomy(base: nn.Module) -> dict[str, Any]:
    """Per submodule: its class, its attribute names and how many hooks it has."""
    return {
        name: (type(m), sorted(vars(m)), [len(v) for k, v in sorted(vars(m).items()) if k.endswith("hooks")])
        for name, m in base.named_modules()
    }


@each_case
def test_wrap_composes_without_patching(name):
    base = CASES[name].make()
    before = _anatomy(base)
    model = wrap(base, "rada", **CASES[name].options).set_classes(CASES[name].tokens(3))
    with torch.no_grad():
        model(tm.images(2))
    assert model.base is base
    assert _anatomy(base) == before
    for method in ("forward", "encode_image", "encode_text", "get_image_features", "get_text_features"):
        if hasattr(type(base), method):
            assert getattr(base, method).__func__ is getattr(type(base), method), method


@each_case
def test_backbone_frozen_and_kept_in_eval(name):
    model, base = wrapped(name)
    assert not any(p.requires_grad for p in base.parameters())
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.adapter.parameters()}
    model.train()
    assert model.training and all(m.training for m in model.adapter.modules())
    assert not any(m.training for m in base.modules())
    assert not model.encode_image(tm.images(2)).requires_grad
    model.eval()
    assert not any(m.training for m in model.modules())


@each_case
def test_unwrap_restores_the_untouched_base(name):
    base = CASES[name].make().train()
    caller_frozen = next(iter(base.parameters()))
    caller_frozen.requires_grad_(False)  # the caller's own choice, which unwrap must give back
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    before = clones(base)
    model = wrap(base, "rada", generator=seeded(0), **CASES[name].options).set_classes(CASES[name].tokens(3))
    tm.train_steps(model, tm.images(6), labels_for(3, 6), 3)
    assert model.unwrap() is base
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags
    assert base.training and all(m.training for m in base.modules())
    assert changed(base, before) == set()


def test_unwrap_restores_each_submodules_mode():
    base = tm.open_clip_model().train()
    base.visual.eval()  # e.g. a tower whose dropout and norm statistics the caller keeps off
    modes = {n: m.training for n, m in base.named_modules()}
    wrap(base, "rada").unwrap()
    assert {n: m.training for n, m in base.named_modules()} == modes


def _callers_base() -> tuple[nn.Module, dict[str, bool], dict[str, bool]]:
    """A base model in train mode with one tower in eval and one parameter frozen by the caller; its flags."""
    base = tm.open_clip_model().train()
    base.visual.eval()
    next(iter(base.parameters())).requires_grad_(False)
    return base, {n: p.requires_grad for n, p in base.named_parameters()}, {n: m.training for n, m in base.named_modules()}


@pytest.mark.parametrize("first", ["a", "b"])
def test_two_wrappers_of_one_base_give_back_the_callers_flags(first):
    base, flags, modes = _callers_base()
    a, b = wrap(base, "rada"), wrap(base, "mma")  # b sees the base as a left it: frozen, in eval
    assert a.training and b.training  # both start in the caller's mode
    early, late = (a, b) if first == "a" else (b, a)
    with pytest.warns(UserWarning, match="still held by 1 other AdaptedCLIP"):
        assert early.unwrap() is base
    assert not any(p.requires_grad for p in base.parameters())  # the other wrapper still trains on it
    assert {id(p) for p in late.trainable_parameters()} == {id(p) for p in late.adapter.parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert late.unwrap() is base
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags
    assert {n: m.training for n, m in base.named_modules()} == modes


def test_a_dropped_wrapper_no_longer_holds_the_base():
    base, flags, modes = _callers_base()
    a = wrap(base, "rada")
    wrap(base, "mma")  # never unwrapped, and gone
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a.unwrap()
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags
    assert {n: m.training for n, m in base.named_modules()} == modes
    b = wrap(base, "rada")  # after the last unwrap, a new wrap starts from the flags as they are now
    assert b.unwrap() is base and {n: p.requires_grad for n, p in base.named_parameters()} == flags


@pytest.mark.parametrize(("method", "freeze_backbone"), [("rada", True), ("mma+rada", True), ("rada", False)])
def test_deepcopy_after_a_training_step_behaves_identically(method, freeze_backbone):
    base = tm.open_clip_model()
    model = wrap(base, method, alpha=0.5, freeze_backbone=freeze_backbone, generator=seeded(0))
    model.set_classes(open_clip_tokens(4))
    x, y = tm.images(8), labels_for(4)
    tm.train_steps(model, x, y, 2, lr=1e-3)
    model.train()
    loss = model.loss(model(x), y)  # the model keeps this forward's regulariser, a node of the graph
    twin = copy.deepcopy(model)
    assert twin.base is not base
    assert torch.equal(twin.regularization(), model.regularization().detach()) and twin.regularization() > 0
    assert not twin.regularization().requires_grad
    loss.backward()  # the original's graph is untouched
    state = model.state_dict()
    assert all(torch.equal(t, state[name]) for name, t in twin.state_dict().items())
    with torch.no_grad():
        assert torch.equal(twin(x), model(x))
        assert torch.equal(twin.regularization(), model.regularization())
    before = clones(model)
    tm.train_steps(twin, x, y, 2, lr=1e-3)
    assert changed(model, before) == set()
    assert all(p.requires_grad for p in twin.unwrap().parameters())  # the copy gives back its own base
    assert all(p.requires_grad != freeze_backbone for n, p in base.named_parameters() if n.startswith("visual."))


@each_case
def test_disable_adapter_gives_the_base_models_zero_shot_logits(name):
    case = CASES[name]
    model, base = wrapped(name, "mma")  # MMA's logits differ from zero-shot from the start
    x, tokens = tm.images(5), case.tokens(4)
    with torch.no_grad():
        expected = case.zero_shot(base, x, tokens)
        adapted = model(x)
        with model.disable_adapter():
            zero_shot = model(x)
    assert zero_shot.dtype == torch.float32 and zero_shot.shape == (5, 4)
    torch.testing.assert_close(zero_shot, expected.float(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(adapted, expected.float(), atol=1e-3)


def test_disable_adapter_is_reenabled_after_an_exception():
    model, _ = wrapped("open_clip", "mma")
    x = tm.images(3)
    with torch.no_grad():
        adapted = model(x)
        with model.disable_adapter():
            zero_shot = model(x)
            with model.disable_adapter():  # nested: still disabled after the inner one ends
                pass
            assert torch.equal(model(x), zero_shot)
        with pytest.raises(RuntimeError, match="inside the context"):
            with model.disable_adapter():
                raise RuntimeError("inside the context")
        assert torch.equal(model(x), adapted)
    assert not torch.equal(adapted, zero_shot)


@pytest.mark.parametrize("name", ["open_clip", "open_clip_siglip", "hf_clip"])
@pytest.mark.parametrize("method, options", [("rada", {}), ("rada+adapter", {"adapter_init": "released"})])
def test_fresh_rada_is_zero_shot(name, method, options):
    """W_o (and the released adapters' W_2) start at zero: the mask is exactly 1 and the logits zero-shot CLIP's."""
    model, _ = wrapped(name, method, **options)
    x = tm.images(5)
    with torch.no_grad():
        logits = model(x)
        _, mask = model.adapter(model.encode_image(x), model.class_features, model.multiplicative_scale(), return_mask=True)
        with model.disable_adapter():
            zero_shot = model(x)
    assert torch.equal(mask, torch.ones_like(mask))
    torch.testing.assert_close(logits, zero_shot, rtol=1e-6, atol=1e-6)


def test_fresh_mma_rada_is_mma_not_zero_shot():
    mma_rada, _ = wrapped("open_clip", "mma+rada")
    mma, _ = wrapped("open_clip", "mma")  # same generator: the same MMA weights
    x = tm.images(5)
    with torch.no_grad():
        with mma.disable_adapter():
            zero_shot = mma(x)
        torch.testing.assert_close(mma_rada(x), mma(x), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(mma(x), zero_shot, atol=1e-3)


# -- parameters and training ---------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_trainable_parameters_are_the_adapters(method, capsys):
    model, base = wrapped("open_clip", method)
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.adapter.parameters()}
    model.print_trainable_parameters()
    printed = capsys.readouterr().out
    found = re.fullmatch(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ([\d.]+)\n", printed)
    assert found, printed
    trainable, total, percent = int(found[1].replace(",", "")), int(found[2].replace(",", "")), float(found[3])
    assert trainable == sum(p.numel() for p in model.adapter.parameters()) > 0
    assert total == trainable + sum(p.numel() for p in base.parameters())
    assert percent == pytest.approx(100 * trainable / total, abs=1e-4)


# The released form's W_2 starts at zero behind a ReLU, whose gradient at 0 is 0 in PyTorch:
# neither map of its adapters ever gets a gradient, in the released code as here.
STAY_AT_INIT = {f"{side}_adapter.{layer}.weight" for side in ("image", "text") for layer in ("down", "up")}
ADAPTER_CASES = [(m, {}) for m in METHODS] + [("rada+adapter", {"adapter_init": "released"}),
                                              ("rada+adapter", {"adapter_init": "blend"})]


@pytest.mark.parametrize("method, form", ADAPTER_CASES, ids=[m + "-" + "-".join(f.values()) for m, f in ADAPTER_CASES])
def test_only_adapter_parameters_change(method, form):
    options = dict(alpha=0.1, **form) if method in RADA_FAMILY else {}
    model, base = wrapped("open_clip", method, **options)
    x, y = tm.images(8), labels_for(4)
    base_before, adapter_before = clones(base), clones(model.adapter)
    features_before = model.class_features.clone()
    losses = tm.train_steps(model, x, y, 3)
    assert changed(base, base_before) == set()
    dead = STAY_AT_INIT if form.get("adapter_init") == "released" else set()
    assert changed(model.adapter, adapter_before) == set(adapter_before) - dead
    assert torch.equal(model.class_features, features_before)
    losses += tm.train_steps(model, x, y, 17)
    # the tiny CLIP's class prompts are near-parallel: MMA (λ = 0.2) moves the loss the least
    assert losses[-1] < losses[0] - 0.01, losses


@pytest.mark.parametrize("method", METHODS)
def test_regularization(method):
    model, _ = wrapped("open_clip", method, **({"alpha": 0.1} if method in RADA_FAMILY else {}))
    x, y = tm.images(8), labels_for(4)
    model(x)
    assert torch.equal(model.regularization(), torch.zeros(()))  # mask ≡ 1 at init; no mask for MMA
    tm.train_steps(model, x, y, 3)
    logits = model(x)
    regularization = model.regularization()
    if method not in RADA_FAMILY:
        assert torch.equal(regularization, torch.zeros(()))
        return
    assert regularization.item() > 0 and regularization.requires_grad
    _, mask = model.adapter(model.encode_image(x), model.text_features(), model.multiplicative_scale(), return_mask=True)
    assert torch.equal(regularization, model.adapter.regularization(mask))
    assert torch.equal(model.loss(logits, y), F.cross_entropy(logits, y) + regularization)
    with model.disable_adapter():
        model(x)
    assert torch.equal(model.regularization(), torch.zeros(()))


@pytest.mark.parametrize("method", ["mma", "mma-master"])
def test_options_mean_the_same_in_wrap_and_modules(method):
    # MMA's only attention is its own: heads= is its heads, in wrap() as in MultiModalAdapter(heads=...)
    model, _ = wrapped("open_clip", method, heads=2)
    assert model.adapter.config.mma_heads == 2
    with pytest.raises(TypeError, match=r"option\(s\) \['alpha', 'temperature'\] do not apply to method"):
        wrapped("open_clip", method, alpha=0.1, temperature=0.5)


def test_regularization_is_zero_without_alpha():
    model, _ = wrapped("open_clip", "rada", alpha=0.0)
    x, y = tm.images(8), labels_for(4)
    tm.train_steps(model, x, y, 3)
    model(x)
    assert torch.equal(model.regularization(), torch.zeros(()))


LABEL_ERRORS = {
    "too large": (torch.tensor([0, 1, 2, 4]), ValueError, r"labels must lie in \[0, 4\) .* got values in \[0, 4\]"),
    "negative": (torch.tensor([0, -1, 2, 3]), ValueError, r"labels must lie in \[0, 4\)"),
    "float": (torch.tensor([0.0, 1.0, 2.0, 3.0]), TypeError, "labels must be an integer tensor"),
    "wrong length": (torch.tensor([0, 1]), ValueError, r"labels must be \(B,\) = \(4,\)"),
}


@pytest.mark.parametrize("case", list(LABEL_ERRORS))
def test_loss_rejects_bad_labels(case):
    labels, error, message = LABEL_ERRORS[case]
    model, _ = wrapped("open_clip")
    logits = model(tm.images(4))
    with pytest.raises(error, match=message):
        model.loss(logits, labels)


def test_loss_is_cross_entropy_plus_regularization():
    model, _ = wrapped("open_clip", "rada", alpha=0.5)
    x, y = tm.images(8), labels_for(4)
    tm.train_steps(model, x, y, 2)
    logits = model(x)
    assert model.regularization().item() > 0
    assert torch.equal(model.loss(logits, y), F.cross_entropy(logits, y) + model.regularization())


def test_one_loss_function_behind_both_loss_methods():
    from rada_mma.modules import classification_loss

    model, _ = wrapped("open_clip", "rada", alpha=0.5)
    x, y = tm.images(8), labels_for(4)
    tm.train_steps(model, x, y, 2)
    logits = model(x)
    regularization = model.regularization()
    expected = F.cross_entropy(logits, y) + regularization
    assert torch.equal(classification_loss(logits, y, regularization), expected)
    assert torch.equal(model.loss(logits, y), expected)
    _, mask = model.adapter(model.encode_image(x), model.text_features(), model.multiplicative_scale(), return_mask=True)
    assert torch.equal(model.adapter.loss(logits, y, mask), classification_loss(logits, y, model.adapter.regularization(mask)))
    half = logits.detach().half()
    assert torch.equal(classification_loss(half, y), F.cross_entropy(half.float(), y))  # fp32 cross-entropy
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        classification_loss(logits, y + 4)
    with pytest.raises(IndexError):  # check=False leaves the labels to cross_entropy
        classification_loss(logits, y + 4, check=False)


# -- RAda-FT: freeze_backbone=False ---------------------------------------------------------------


def test_unfrozen_backbone_trains_both_encoders():
    base = tm.open_clip_model(siglip=True)
    model = wrap(base, "rada", freeze_backbone=False, generator=seeded(0))
    model.set_classes(NAMES[:4], tokenizer=tm.tokenizer())
    frozen = {n for n, p in base.named_parameters() if not p.requires_grad}
    assert frozen == {"logit_scale", "logit_bias"}
    encoders = {n for n, p in base.named_parameters() if p.requires_grad}
    assert {id(p) for p in model.trainable_parameters()} == (
        {id(p) for p in model.adapter.parameters()} | {id(p) for n, p in base.named_parameters() if n in encoders}
    )
    model.train()
    assert base.training
    x, y = tm.images(8), labels_for(4)
    F.cross_entropy(model(x), y).backward()
    no_gradient = {n for n, p in base.named_parameters() if n in encoders and (p.grad is None or not p.grad.any())}
    assert no_gradient == set()
    assert any(n.startswith("text.") for n in encoders) and any(n.startswith("visual.") for n in encoders)
    before = clones(base)
    tm.train_steps(model, x, y, 3, lr=1e-3)
    assert changed(base, before) == {n for n in encoders}


def test_unfrozen_backbone_evaluates_with_the_trained_text_encoder():
    base = tm.open_clip_model()
    model = wrap(base, "rada", freeze_backbone=False, generator=seeded(0)).set_classes(open_clip_tokens(4))
    x = tm.images(8)
    tm.train_steps(model, x, labels_for(4), 3, lr=1e-3)
    with torch.no_grad():
        evaluated = model(x)
    torch.testing.assert_close(evaluated, model(x).detach(), rtol=1e-6, atol=1e-6)


# -- set_classes ----------------------------------------------------------------------------------


def test_token_ids_give_the_raw_text_features():
    model, base = wrapped("open_clip", k=1)
    tokens = open_clip_tokens(5)  # (K, L)
    model.set_classes(tokens)
    with torch.no_grad():
        assert torch.equal(model.class_features, base.encode_text(tokens))


def test_token_ids_with_templates_are_ensembled():
    model, base = wrapped("open_clip", k=1)
    tok = tm.tokenizer()
    texts = [f"{t} {name}." for name in NAMES[:3] for t in ("a photo of a", "a drawing of a")]
    tokens = tok(texts).reshape(3, 2, -1)  # (K, T, L)
    model.set_classes(tokens)
    with torch.no_grad():
        each = F.normalize(base.encode_text(tok(texts)), dim=-1).reshape(3, 2, -1)
    torch.testing.assert_close(model.class_features, F.normalize(each.mean(1), dim=-1), rtol=1e-6, atol=1e-6)


TEMPLATES = {
    "format strings": ["a photo of a {}.", "a blurry drawing of the {}.", "itap of a {}."],
    "callables": [lambda c: f"a photo of a {c}.", lambda c: f"a {c} in the wild."],
}


@pytest.mark.parametrize("kind", list(TEMPLATES))
def test_names_match_open_clips_zero_shot_classifier(kind):
    model, base = wrapped("open_clip", k=1)
    tok, templates = tm.tokenizer(), TEMPLATES[kind]
    model.set_classes(NAMES, tokenizer=tok, templates=templates, batch_size=4)  # batches split classes
    with torch.no_grad():
        weights = open_clip.zero_shot_classifier.build_zero_shot_classifier(
            base, tok, NAMES, templates, num_classes_per_batch=4, device="cpu"
        )  # (D, K), normalised
    assert model.num_classes == len(NAMES)
    torch.testing.assert_close(F.normalize(model.class_features, dim=-1), weights.T, rtol=0, atol=1e-6)


def test_one_template_keeps_the_raw_features():
    model, base = wrapped("open_clip", k=1)
    tok = tm.tokenizer()
    model.set_classes(NAMES[:4], tokenizer=tok)  # default template "a photo of a {}."
    with torch.no_grad():
        assert torch.equal(model.class_features, base.encode_text(open_clip_tokens(4)))
    model.set_classes(NAMES[:4], tokenizer=tok, templates=[lambda c: f"itap of a {c}."])
    with torch.no_grad():
        assert torch.equal(model.class_features, base.encode_text(tok([f"itap of a {c}." for c in NAMES[:4]])))


def test_text_features_are_used_as_given_or_ensembled():
    model, _ = wrapped("open_clip", k=1)
    features = torch.randn(5, 3, tm.EMBED_DIM, generator=seeded(2))
    model.set_classes(text_features=features[:, 0])  # (K, D): raw
    assert torch.equal(model.class_features, features[:, 0])
    model.set_classes(text_features=features)  # (K, T, D)
    expected = F.normalize(F.normalize(features, dim=-1).mean(1), dim=-1)
    torch.testing.assert_close(model.class_features, expected, rtol=1e-6, atol=1e-6)
    assert model(tm.images(2)).shape == (2, 5)


def test_changing_classes_is_one_call():
    model, _ = wrapped("open_clip", "mma", k=3)
    x = tm.images(4)
    with torch.no_grad():
        assert model(x).shape == (4, 3)
        model.set_classes(open_clip_tokens(6))  # base -> new classes
        new = model(x)
        fresh, _ = wrapped("open_clip", "mma", k=6)
        assert new.shape == (4, 6)
        assert torch.equal(new, fresh(x))


def test_forward_before_set_classes_says_what_to_do():
    model = wrap(tm.open_clip_model())
    with pytest.raises(RuntimeError, match="no classes set: call model.set_classes"):
        model(tm.images(2))


LONG = torch.long
SET_CLASSES_ERRORS = {
    "nothing": (lambda m: m.set_classes(), ValueError, "exactly one of"),
    "tokens and features": (lambda m: m.set_classes(open_clip_tokens(2), text_features=torch.randn(2, 32)),
                            ValueError, "exactly one of"),
    "K = 0 token ids": (lambda m: m.set_classes(torch.zeros(0, tm.CONTEXT, dtype=LONG)), ValueError, "K = 0"),
    "K = 0 names": (lambda m: m.set_classes([], tokenizer=tm.tokenizer()), ValueError, "K = 0"),
    "K = 0 features": (lambda m: m.set_classes(text_features=torch.zeros(0, 32)), ValueError, "K = 0"),
    "feature width": (lambda m: m.set_classes(text_features=torch.randn(3, 16)), ValueError,
                      "text_features have width 16, the adapter expects 32"),
    "1-D features": (lambda m: m.set_classes(text_features=torch.randn(32)), ValueError,
                     r"must be a \(K, D\) or \(K, T, D\) tensor, got \(32,\)"),
    "NaN features": (lambda m: m.set_classes(text_features=torch.full((2, 32), float("nan"))), ValueError, "NaN"),
    "an all-zero class": (lambda m: m.set_classes(text_features=torch.cat([torch.randn(1, 32), torch.zeros(1, 32)])),
                          ValueError, r"all-zero row\(s\) \(e.g. row 1\)"),
    "names without tokenizer": (lambda m: m.set_classes(["cat", "dog"]), ValueError,
                                "class names need a tokenizer: set_classes\\(names, tokenizer="),
    "single string": (lambda m: m.set_classes("cat", tokenizer=tm.tokenizer()), TypeError,
                      "a list of class names, not a single string"),
    "1-D token ids": (lambda m: m.set_classes(torch.zeros(5, dtype=LONG)), ValueError,
                      r"token ids must be \(K, L\) or \(K, T, L\), got shape \(5,\)"),
    "token ids with templates": (lambda m: m.set_classes(open_clip_tokens(2), templates=["{}"]), ValueError,
                                 "go with class names"),
    "not tokens": (lambda m: m.set_classes(3.5), TypeError, "classes must be token ids"),
    "template without {}": (lambda m: m.set_classes(["cat"], tokenizer=tm.tokenizer(), templates=["a photo."]),
                            ValueError, r"template 'a photo.' must hold exactly one \{\} where the class name goes"),
    "template with two {}": (lambda m: m.set_classes(["cat"], tokenizer=tm.tokenizer(), templates=["a {} of a {}."]),
                             ValueError, r"must hold exactly one \{\}"),
    "template with a stray brace": (lambda m: m.set_classes(["cat"], tokenizer=tm.tokenizer(), templates=["a {} {"]),
                                    ValueError, r"must hold exactly one \{\}"),
    "template not text": (lambda m: m.set_classes(["cat"], tokenizer=tm.tokenizer(), templates=[3]), TypeError,
                          "a template must be a string with one {} or a callable"),
    "no templates": (lambda m: m.set_classes(["cat"], tokenizer=tm.tokenizer(), templates=[]), ValueError,
                     "templates is empty"),
}


@pytest.mark.parametrize("case", list(SET_CLASSES_ERRORS))
def test_set_classes_errors(case):
    call, error, message = SET_CLASSES_ERRORS[case]
    model, _ = wrapped("open_clip", k=2)
    before = model.class_features.clone()
    with pytest.raises(error, match=message):
        call(model)
    assert torch.equal(model.class_features, before)  # a rejected call changes nothing


def test_encode_class_names_gives_each_prompts_raw_features():
    model, base = wrapped("open_clip", k=1)
    tok, templates = tm.tokenizer(), TEMPLATES["format strings"]
    texts = [t.format(c) for c in NAMES[:4] for t in templates]  # class-major
    tokens = model.tokenize_prompts(NAMES[:4], tokenizer=tok, templates=templates)
    assert torch.equal(tokens, tok(texts).reshape(4, 3, tm.CONTEXT))  # (K, T, L)
    text = model.encode_class_names(NAMES[:4], tokenizer=tok, templates=templates, batch_size=5)
    assert text.shape == (4, 3, tm.EMBED_DIM) and text.dtype == torch.float32 and not text.requires_grad
    with torch.no_grad():
        expected = base.encode_text(tok(texts)).reshape(4, 3, -1)
    torch.testing.assert_close(text, expected, rtol=1e-6, atol=1e-6)
    # names, their tokens and their features set the same classes
    model.set_classes(NAMES[:4], tokenizer=tok, templates=templates)
    from_names = model.class_features.clone()
    model.set_classes(tokens)
    assert torch.equal(model.class_features, from_names)
    model.set_classes(text_features=text)
    torch.testing.assert_close(model.class_features, from_names, rtol=1e-6, atol=1e-6)


def test_encode_class_names_has_a_gradient_only_when_the_text_encoder_trains():
    tok = tm.tokenizer()
    frozen = wrap(tm.open_clip_model()).encode_class_names(NAMES[:2], tokenizer=tok)
    trained = wrap(tm.open_clip_model(), freeze_backbone=False).encode_class_names(NAMES[:2], tokenizer=tok)
    assert frozen.shape == trained.shape == (2, 1, tm.EMBED_DIM)
    assert not frozen.requires_grad and trained.requires_grad
    torch.testing.assert_close(frozen, trained.detach(), rtol=0, atol=0)


# -- Hugging Face and OpenAI specifics ------------------------------------------------------------


def test_hf_batch_encoding_with_padding():
    from transformers import BatchEncoding

    model, base = wrapped("hf_clip", k=1)
    encoding = tm.hf_tokenizer()(["a photo of a cat", "dog", "the bird ."], padding=True, return_tensors="pt")
    assert isinstance(encoding, BatchEncoding) and not encoding["attention_mask"].all()
    model.set_classes(encoding)
    with torch.no_grad():
        expected = base.get_text_features(**encoding).pooler_output
    assert torch.equal(model.class_features, expected)
    assert model(tm.images(2)).shape == (2, 3)


@pytest.mark.parametrize("name", ["hf_clip", "hf_siglip"])
def test_hf_names_with_a_transformers_tokenizer(name):
    model, base = wrapped(name, k=1)
    tokenizer, templates = tm.hf_tokenizer(), ["a photo of a {} .", "the {}"]
    model.set_classes(NAMES, tokenizer=tokenizer, templates=templates)
    texts = [t.format(c) for c in NAMES for t in templates]
    with torch.no_grad():
        each = base.get_text_features(**tokenizer(texts, padding=True, return_tensors="pt")).pooler_output
    expected = F.normalize(F.normalize(each, dim=-1).reshape(len(NAMES), 2, -1).mean(1), dim=-1)
    torch.testing.assert_close(model.class_features, expected, rtol=1e-6, atol=1e-6)


def test_hf_prompts_per_template():
    model, base = wrapped("hf_clip", k=1)
    tokenizer, templates = tm.hf_tokenizer(), ["a photo of a {} .", "the {}"]
    tokens = model.tokenize_prompts(NAMES, tokenizer=tokenizer, templates=templates)
    assert tokens["input_ids"].shape[:2] == tokens["attention_mask"].shape[:2] == (len(NAMES), 2)
    text = model.encode_class_names(NAMES, tokenizer=tokenizer, templates=templates, batch_size=5)
    texts = [t.format(c) for c in NAMES for t in templates]
    with torch.no_grad():
        each = base.get_text_features(**tokenizer(texts, padding=True, return_tensors="pt")).pooler_output
    torch.testing.assert_close(text, each.reshape(len(NAMES), 2, -1), rtol=1e-6, atol=1e-6)
    model.set_classes(tokens)
    from_tokens = model.class_features.clone()
    model.set_classes(NAMES, tokenizer=tokenizer, templates=templates)
    assert torch.equal(model.class_features, from_tokens)


@pytest.mark.parametrize("name", ["hf_clip", "hf_siglip"])
def test_hf_transformers_4_tensors(name, monkeypatch):
    """transformers 4 returns plain tensors from get_*_features; 5 returns output objects."""
    model, base = wrapped(name, "mma")
    x = tm.images(3)
    with torch.no_grad():
        v5 = model(x)
    calls = []

    def returning_tensors(method: Callable[..., Any]) -> Callable[..., Tensor]:
        def features(**inputs: Tensor) -> Tensor:
            calls.append(method.__name__)
            return method(**inputs).pooler_output

        return features

    for method in ("get_text_features", "get_image_features"):
        monkeypatch.setattr(base, method, returning_tensors(getattr(base, method)))
    v4 = wrap(base, "mma", generator=seeded(0)).set_classes(CASES[name].tokens(4))
    with torch.no_grad():
        assert torch.equal(v4(x), v5)
    assert calls == ["get_text_features", "get_image_features"]


def test_hf_images_as_batch_feature():
    from transformers import BatchFeature

    model, _ = wrapped("hf_clip", "mma")
    x = tm.images(3)
    with torch.no_grad():
        assert torch.equal(model(BatchFeature({"pixel_values": x})), model(x))


def test_openai_fp16_features_run_the_adapter_in_fp32():
    model, base = wrapped("openai_fp16", "rada+adapter")
    x, tokens = tm.images(4), open_clip_tokens(4)
    assert base.encode_image(x).dtype == torch.float16
    tm.train_steps(model, x, labels_for(4, 4), 2)  # the mask moves away from 1
    with torch.no_grad():
        logits = model(x)
        expected = model.adapter(base.encode_image(x).float(), base.encode_text(tokens).float(), base.logit_scale.exp())
    assert model.class_features.dtype == logits.dtype == torch.float32
    assert model.adapter.to_qkv_rational.weight.dtype == torch.float32
    assert torch.equal(logits, expected)


# -- dtypes ---------------------------------------------------------------------------------------


# logits are s · cos with s = 100; the kernels keep norms and softmax statistics in fp32
HALF_ATOL = {torch.float16: 0.02, torch.bfloat16: 0.15}


@pytest.mark.parametrize("dtype", list(HALF_ATOL), ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_half_precision_model_gives_fp32_logits(method, dtype):
    options = dict(alpha=0.1) if method in RADA_FAMILY else {}
    model, _ = wrapped("open_clip", method, **options)
    x, y = tm.images(4), labels_for(4, 4)
    tm.train_steps(model, x, y, 2)  # RAda's mask moves away from 1
    with torch.no_grad():
        expected = model(x)
        with model.disable_adapter():
            expected_zero_shot = model(x)
    assert (model.half() if dtype == torch.float16 else model.to(dtype)) is model
    assert {p.dtype for p in model.parameters()} == {dtype} and model.class_features.dtype == dtype
    logits = model(x)  # fp32 images, as a preprocess gives them
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits.detach(), expected, rtol=0, atol=HALF_ATOL[dtype])
    model.loss(logits, y).backward()
    assert {p.grad.dtype for p in model.trainable_parameters() if p.grad is not None} == {dtype}
    with torch.no_grad(), model.disable_adapter():
        zero_shot = model(x)
    assert zero_shot.dtype == torch.float32
    torch.testing.assert_close(zero_shot, expected_zero_shot, rtol=0, atol=HALF_ATOL[dtype])
    model.set_classes(NAMES[:4], tokenizer=tm.tokenizer())  # classes set after the cast keep its dtype
    assert model.class_features.dtype == dtype


# -- torch.compile --------------------------------------------------------------------------------


def _logits_and_grads(
    model: nn.Module, forward: Callable[[], Tensor], regularization: Callable[[], Tensor] = lambda: 0.0
) -> tuple[Tensor, list[Tensor]]:
    model.zero_grad()
    logits = forward()
    (F.cross_entropy(logits, labels_for(logits.shape[1], logits.shape[0])) + regularization()).backward()
    return logits.detach(), [p.grad.clone() for p in model.adapter.parameters()]


def _assert_grads_close(got: list[Tensor], want: list[Tensor]) -> None:
    assert any(g.any() for g in want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch._dynamo.reset()
    model, _ = wrapped("open_clip", "rada", alpha=0.1)  # the regulariser is a side output of forward
    x = tm.images(6)
    tm.train_steps(model, x, labels_for(4, 6), 2)  # W_o leaves zero, so every layer has a gradient
    model.train()
    eager, eager_grads = _logits_and_grads(model, lambda: model(x), model.regularization)
    eager_regularization = model.regularization().detach()
    compiled = torch.compile(model, backend="aot_eager")  # open_clip's encoders may break the graph
    logits, grads = _logits_and_grads(model, lambda: compiled(x), model.regularization)
    torch.testing.assert_close(logits, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.regularization().detach(), eager_regularization, rtol=1e-5, atol=1e-7)
    assert eager_regularization > 0
    _assert_grads_close(grads, eager_grads)


@pytest.mark.slow
def test_adapter_compiles_as_one_graph():
    torch._dynamo.reset()
    model, _ = wrapped("open_clip", "rada")
    tm.train_steps(model, tm.images(6), labels_for(4, 6), 2)
    features = model.encode_image(tm.images(6))
    text, scale = model.class_features, model.multiplicative_scale()
    eager, eager_grads = _logits_and_grads(model, lambda: model.adapter(features, text, scale))
    compiled = torch.compile(model.adapter, backend="aot_eager", fullgraph=True)
    logits, grads = _logits_and_grads(model, lambda: compiled(features, text, scale))
    torch.testing.assert_close(logits, eager, rtol=1e-5, atol=1e-5)
    _assert_grads_close(grads, eager_grads)


def test_zero_shot_logits_refuse_what_the_adapter_refuses():
    """The zero-shot path (``disable_adapter``) once gave NaN for an all-zero image row, silently."""
    model, _ = wrapped("open_clip", k=2)
    features = torch.randn(3, tm.EMBED_DIM)
    features[2] = 0
    with model.disable_adapter(), pytest.raises(ValueError, match=r"image_features has 1 all-zero row\(s\) \(e.g. row 2\)"):
        model.logits_from_features(features)
