"""``rada_mma.export``: every method as one graph, images in, logits out, equal to the eager model's,
in ``torch.export`` and ONNX (run with onnxruntime), with a dynamic batch size; what cannot export says why.

Exporting is slow (seconds per graph), so the five methods go through one graph together.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rada_mma
from rada_mma import METHODS, wrap
from rada_mma.exporting import ImageClassifier
from tests.helpers import tiny_models as tm
from tests.helpers.tensors import randomize_

TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def adapted(method: str, base: nn.Module | None = None) -> rada_mma.AdaptedCLIP:
    """``method`` on ``base`` (default: a linear image encoder, quick to trace) with random weights, five classes."""
    if base is None:
        model = wrap(tm.GenericDualEncoder(dim=32), method, dim=32, logit_scale=50.0)
        model.set_classes(torch.randint(0, 100, (5, 4), generator=torch.Generator().manual_seed(0)))
    else:
        model = wrap(base, method).set_classes(["cat", "dog", "bird", "fish", "car"], tokenizer=tm.tokenizer())
    randomize_(model.adapter, seed=1)  # zero-initialised layers would hide the adapter
    return model


class Stacked(nn.Module):
    """Several classifiers as one graph (one trace instead of five)."""

    def __init__(self, classifiers: list[ImageClassifier]):
        super().__init__()
        self.classifiers = nn.ModuleList(classifiers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([c(images) for c in self.classifiers])  # (methods, B, K)


def no_private_kernels(program: torch.export.ExportedProgram) -> None:
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert not [t for t in targets if "flash" in t or "autograd_function" in t], targets


@pytest.mark.slow
def test_every_method_exports_to_torch_and_onnx_with_eager_logits(tmp_path):
    import onnxruntime

    models = [adapted(method) for method in METHODS]
    stacked = Stacked([ImageClassifier(m).eval() for m in models]).eval()
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(stacked, (tm.images(2),), dynamic_shapes={"images": {0: batch}})
    no_private_kernels(program)
    images = tm.images(5, seed=1)  # another batch size than traced
    with torch.no_grad():
        eager = torch.stack([m(images) for m in models])
        torch.testing.assert_close(program.module()(images), eager, **TOLERANCE)

    onnx_program = torch.onnx.export(program, (tm.images(2),), dynamic_shapes={"images": {0: batch}},
                                     input_names=["images"], opset_version=18, dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(onnx_program.model_proto.SerializeToString())
    got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    torch.testing.assert_close(got, eager, **TOLERANCE)


@pytest.mark.slow
def test_export_writes_a_program_that_loads_and_runs(tmp_path):
    model = adapted("rada", base=tm.open_clip_model())  # the image size comes from the model
    path = rada_mma.export(model, tmp_path / "rada.pt2")
    program = torch.export.load(path)
    no_private_kernels(program)
    images = tm.images(3, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(images), model(images), **TOLERANCE)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        rada_mma.export(model, path)
    with model.disable_adapter():  # zero-shot CLIP exports too
        rada_mma.export(model, path, overwrite=True)
        with torch.no_grad():
            torch.testing.assert_close(torch.export.load(path).module()(images), model(images), **TOLERANCE)


@pytest.mark.slow
def test_export_onnx_runs_in_onnxruntime(tmp_path):
    import onnxruntime

    model = adapted("mma+rada")
    path = rada_mma.export(model, tmp_path / "m.onnx", format="onnx", example=tm.images(2))
    session = onnxruntime.InferenceSession(str(path))
    assert [i.name for i in session.get_inputs()] == ["images"] and session.get_outputs()[0].name == "logits"
    images = tm.images(7, seed=3)
    with torch.no_grad():
        expected = model(images)
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"images": images.numpy()})[0]), expected, **TOLERANCE)


def test_what_cannot_export_says_why(tmp_path):
    model = adapted("rada")
    cases = [
        (lambda: rada_mma.export(model.base, tmp_path / "a"), TypeError, "takes an AdaptedCLIP"),
        (lambda: rada_mma.export(model, tmp_path / "a", format="tflite"), ValueError, "'torch', 'onnx'"),
        (lambda: rada_mma.export(model, tmp_path / "a", format="onnx", opset=16), ValueError, "at least 17"),
        (lambda: rada_mma.export(model, tmp_path / "a"), ValueError, "cannot tell the image size.*example="),
        (lambda: rada_mma.export(model, tmp_path / "a", example=tm.images(1)), ValueError, "B >= 2"),
        (lambda: rada_mma.export(wrap(tm.open_clip_model(), "mma"), tmp_path / "a"), ValueError, "no classes"),
        (lambda: rada_mma.export(adapted("mma").half(), tmp_path / "a"), ValueError, "model.adapter.float()"),
    ]
    for make, error, message in cases:
        with pytest.raises(error, match=message):
            make()
    assert not list(tmp_path.iterdir())
