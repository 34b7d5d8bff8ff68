"""Parity with the authors' released code, through the golden files it produced.

Each ``*.safetensors`` file in ``$RADA_MMA_GOLDEN`` holds inputs, parameters
under the released names, and the released code's logits, mask, losses and
gradients (the methods: ``docs/methods.md``). The parameters go through
:func:`rada_mma.official.from_official`; our gradients come back through
:func:`rada_mma.official.to_official`, so the name mapping is tested as well.

Unset variable: skipped. Set, but the folder is missing, empty or holds an
unreadable file: failed, never skipped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from rada_mma import kernels
from rada_mma.official import from_official
from tests.helpers.tensors import assert_grads_close, attention_path, official_grads

ENV = "RADA_MMA_GOLDEN"
FOLDER = os.environ.get(ENV)
UNSET = f"set {ENV}=/path/to/golden (the folder of golden *.safetensors files) to check parity"


def golden_params():
    if not FOLDER:
        return [pytest.param(None, id="unset", marks=pytest.mark.skip(reason=UNSET))]
    folder = Path(FOLDER)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return [pytest.param(None, id="no-golden-files")]  # fails in the test, with the reason
    return [pytest.param(path, id=path.stem) for path in files]


def test_golden_folder_has_files():
    if not FOLDER:
        pytest.skip(UNSET)
    folder = Path(FOLDER)
    assert folder.is_dir(), f"{ENV}={FOLDER!r} is not a folder"
    assert sorted(folder.glob("*.safetensors")), f"{ENV}={FOLDER!r} holds no *.safetensors files"


def load_case(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(path), "pt") as handle:
        case = json.loads(handle.metadata()["case"])
    return case, load_file(str(path))


def our_method(case: dict, path: Path) -> str:
    if case["method"] == "rada":
        return "rada"
    if case["method"] == "rada_adapter":
        return "rada+adapter"
    assert case["method"] == "mma", f"unknown golden method {case['method']!r}"
    return "mma-master" if "master" in path.name else "mma"


@pytest.mark.parametrize("path", golden_params())
def test_matches_released_code(path):
    if path is None:
        pytest.fail(f"{ENV}={FOLDER!r}: no golden *.safetensors files there")
    case, tensors = load_case(path)
    method = our_method(case, path)
    options = {"heads": case["heads"]}
    if method.startswith("rada"):
        options.update(temperature=case["temperature"], alpha=case["alpha"], regularizer=case["regularizer"])
    params = {name: t for name, t in tensors.items() if name.startswith("param.")}
    # RAda's attentions have two exact paths: PyTorch's flash kernels (CPU) and the portable one
    for attention in ("flash", "portable", "plain") if method.startswith("rada") else ("flash",):
        with attention_path(attention):
            check_parity(from_official(method, params, **options), case, tensors, f"{attention} attention")


def check_parity(module, case: dict, tensors: dict[str, torch.Tensor], where: str) -> None:
    scale = torch.tensor(case["logit_scale_log"]).exp()
    image, text = tensors["input.image_features"], tensors["input.text_features"]
    labels = tensors["input.labels"]
    if module.has_mask:
        logits, mask = module(image, text, scale, return_mask=True)
        err = (mask - tensors["output.mask"]).abs().max()
        assert err <= 1e-4, f"{where}: mask off by {err:.3g}"
    else:
        logits, mask = module(image, text, scale), None
    err = (logits - tensors["output.logits"]).abs().max()
    assert err <= 1e-4, f"{where}: logits off by {err:.3g}"

    def close(got: torch.Tensor, name: str, atol: float) -> None:
        want = tensors[name].reshape(())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=atol, msg=lambda m: f"{where}, {name}: {m}")

    loss = module.loss(logits, labels, mask)
    close(loss, "output.loss", 1e-5)
    if "output.loss_ce" in tensors:
        close(F.cross_entropy(logits, labels), "output.loss_ce", 1e-5)
    if "output.loss_reg" in tensors:  # unweighted: loss = ce + alpha * reg
        close(kernels.regularizer(mask, case["regularizer"]), "output.loss_reg", 1e-6)

    loss.backward()
    want = {name.removeprefix("grad."): g for name, g in tensors.items() if name.startswith("grad.")}
    # Relative error with an absolute floor (1e-6 of the largest gradient): with
    # K = 1 the softmaxes are constant, so the released gradients of the query and
    # key maps are exactly 0, while ours reach ~1e-9 by float rounding.
    assert_grads_close(official_grads(module), want, rtol=1e-3, floor=1e-6, where=where)
