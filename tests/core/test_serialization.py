"""Adapter files: exact round trips for every method, what a file holds, every error, atomic writes."""

from __future__ import annotations

import json
import os
import resource
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import rada_mma
import rada_mma.io
from rada_mma import (
    METHODS,
    AdapterConfig,
    build_adapter,
    load_adapter,
    read_adapter_config,
    save_adapter,
    wrap,
)
from tests.helpers import tiny_models as tm

# Non-default options per method, so that a file that lost them could not round-trip.
OPTIONS = {
    "rada": dict(heads=4, temperature=0.5, alpha=0.1),
    "rada+adapter": dict(reduction=2, alpha=0.1, adapter_init="blend"),
    "mma": dict(bottleneck=16, blend=0.3),
    "mma-master": dict(hidden=16, mma_heads=2),
    "mma+rada": dict(heads=4, mma_heads=2, alpha=0.1, softmax="row"),
}
assert set(OPTIONS) == set(METHODS)


def fresh(method: str = "rada", *, seed: int = 0, **options):
    """A fresh tiny open_clip (same weights every call) wrapped with ``method``, four classes set."""
    options = OPTIONS[method] if not options else options
    model = wrap(tm.open_clip_model(), method, generator=torch.Generator().manual_seed(seed), **options)
    return model.set_classes(["cat", "dog", "bird", "fish"], tokenizer=tm.tokenizer())


def trained(method: str = "rada", steps: int = 3, **options):
    model = fresh(method, **options)
    # weight decay moves every parameter, even the ones without a gradient (rada+adapter's adapters)
    tm.train_steps(model, tm.images(8), torch.arange(8) % 4, steps, weight_decay=0.1)
    return model


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


def assert_same_state(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = module.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


# -- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_round_trip_is_exact(method, tmp_path):
    model = trained(method)
    path = model.save_adapter(tmp_path / "adapter.safetensors")
    assert path == tmp_path / "adapter.safetensors"
    other = fresh(method, seed=1)  # a fresh base, another adapter initialisation
    x = tm.images(5, seed=3)
    with torch.no_grad():
        expected = model(x)
        assert not torch.equal(other(x), expected)
        assert other.load_adapter(path) is other
        assert torch.equal(other(x), expected)
    assert_same_state(other.adapter, model.adapter.state_dict())


@pytest.mark.parametrize("method", METHODS)
def test_bare_module_round_trip(method, tmp_path):
    adapter = trained(method).adapter
    path = save_adapter(adapter, tmp_path / "bare.safetensors")
    assert read_adapter_config(path) == adapter.config
    loaded = load_adapter(path)  # built from the file's configuration
    assert type(loaded) is type(adapter) and loaded.config == adapter.config
    assert_same_state(loaded, adapter.state_dict())
    image, text = torch.randn(3, tm.EMBED_DIM), torch.randn(4, tm.EMBED_DIM)
    with torch.no_grad():
        assert torch.equal(loaded(image, text, 20.0), adapter(image, text, 20.0))
    into = build_adapter(adapter.config, generator=torch.Generator().manual_seed(7))
    assert load_adapter(path, into) is into
    assert_same_state(into, adapter.state_dict())


@pytest.mark.parametrize("method", METHODS)
def test_file_holds_only_the_adapter_and_its_configuration(method, tmp_path):
    model = trained(method)
    path = model.save_adapter(tmp_path / "adapter.safetensors")
    with safe_open(str(path), framework="pt") as fh:
        names, metadata = set(fh.keys()), fh.metadata()
        tensors = {name: fh.get_tensor(name) for name in names}
    assert names == set(model.adapter.state_dict())
    assert not any(name.startswith("base.") or name.startswith("adapter.") for name in names)
    assert all(t.is_contiguous() and t.dtype == torch.float32 for t in tensors.values())
    config = model.adapter.config
    assert rada_mma.BaseIdentity.from_json(metadata.pop("base")) == model.base_identity()
    assert metadata == {
        "format": "rada_mma.adapter",
        "format_version": "1",
        "rada_mma_version": rada_mma.__version__,
        "method": method,
        "dim": str(tm.EMBED_DIM),
        "config": config.to_json(),
        "user.backend": "open_clip",
    }
    assert AdapterConfig(**json.loads(metadata["config"])) == config
    assert all(json.loads(metadata["config"])[k] == v for k, v in OPTIONS[method].items())
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert path.stat().st_size < tensor_bytes + 4096  # nothing but the tensors and a header


def test_non_contiguous_parameters_are_saved(tmp_path):
    adapter = trained("rada").adapter
    with torch.no_grad():
        weight = adapter.query_image.weight
        weight.data = weight.data.t().contiguous().t()  # same values, transposed strides
    assert not adapter.query_image.weight.is_contiguous()
    path = save_adapter(adapter, tmp_path / "a.safetensors")
    assert torch.equal(load_file(path)["query_image.weight"], adapter.query_image.weight)


# -- errors that name the difference -------------------------------------------------------------


def _rewrite(path: Path, edit: Callable[[dict, dict], None]) -> Path:
    """Re-save ``path``'s tensors and metadata after ``edit(tensors, metadata)``."""
    with safe_open(str(path), framework="pt") as fh:
        metadata = dict(fh.metadata())
        tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    edit(tensors, metadata)
    out = path.with_name("edited.safetensors")
    save_file(tensors, out, metadata=metadata)
    return out


def _other_dim(path: Path) -> Path:
    return save_adapter(build_adapter(AdapterConfig.for_method("rada", 16)), path.with_name("d16.safetensors"))


def _other_method(path: Path) -> Path:
    return fresh("mma").save_adapter(path.with_name("mma.safetensors"))


def _other_options(**options) -> Callable[[Path], Path]:
    return lambda path: fresh("rada", **options).save_adapter(path.with_name("options.safetensors"))


def _bytes(data: Callable[[Path], bytes]) -> Callable[[Path], Path]:
    def write(path: Path) -> Path:
        out = path.with_name("broken.safetensors")
        out.write_bytes(data(path))
        return out

    return write


def _pickle(path: Path) -> Path:
    out = path.with_name("pickle.safetensors")
    torch.save(fresh("rada").adapter.state_dict(), out)
    return out


def _no_metadata(path: Path) -> Path:
    out = path.with_name("plain.safetensors")
    save_file(load_file(path), out)
    return out


def _set(key: str, value: str):
    return lambda tensors, metadata: metadata.__setitem__(key, value)


NOT_SAFETENSORS = "is not a readable safetensors file"
# Each case makes a bad file from a good "rada" file (heads=4, temperature=0.5, alpha=0.1) and
# loads it into a model wrapped with those options.
LOAD_ERRORS = {
    "another method": (_other_method, ValueError, "holds a 'mma' adapter, but this model uses 'rada'"),
    "another width": (_other_dim, ValueError, "embedding width 16, but this model's width is 32"),
    "other heads": (_other_options(heads=8, temperature=0.5, alpha=0.1), ValueError,
                    "other adapter options \\(heads: file 8 vs model 4\\)"),
    "other temperature": (_other_options(heads=4, temperature=2.0, alpha=0.1), ValueError,
                          "temperature: file 2.0 vs model 0.5"),
    "other format version": (lambda p: _rewrite(p, _set("format_version", "3")), ValueError,
                             "format version '3' .* reads versions '1', '2'"),
    "newer config field": (lambda p: _rewrite(p, lambda t, m: m.__setitem__(
        "config", json.dumps({**json.loads(m["config"]), "gate": 1}))), ValueError,
                           r"unknown field\(s\) \['gate'\].* upgrade rada_mma"),
    "missing tensor": (lambda p: _rewrite(p, lambda t, m: t.pop("to_out.bias")), ValueError,
                       r"missing tensors \['to_out.bias'\], extra tensors \[\]"),
    "extra tensor": (lambda p: _rewrite(p, lambda t, m: t.__setitem__("gate.weight", torch.ones(2))), ValueError,
                     r"missing tensors \[\], extra tensors \['gate.weight'\]"),
    "wrong shape": (lambda p: _rewrite(p, lambda t, m: t.__setitem__("to_out.bias", torch.zeros(31))), ValueError,
                    r"tensor 'to_out.bias' has shape \(31,\), expected \(32,\)"),
    "truncated": (_bytes(lambda p: p.read_bytes()[: p.stat().st_size // 2]), ValueError, NOT_SAFETENSORS),
    "random bytes": (_bytes(lambda p: os.urandom(1000)), ValueError, NOT_SAFETENSORS),
    "empty": (_bytes(lambda p: b""), ValueError, NOT_SAFETENSORS),
    "torch.save pickle": (_pickle, ValueError, NOT_SAFETENSORS),
    "no rada_mma metadata": (_no_metadata, ValueError, "a safetensors file but not a rada_mma adapter"),
    "missing file": (lambda p: p.with_name("nothing.safetensors"), FileNotFoundError, "no adapter file at"),
    # once silently accepted: the flat metadata contradicting the config, integer tensors cast, NaN weights
    "metadata method contradicts config": (lambda p: _rewrite(p, _set("method", "mma")), ValueError,
                                           "its metadata says method='mma' but its config says method='rada'"),
    "metadata dim contradicts config": (lambda p: _rewrite(p, _set("dim", "64")), ValueError,
                                        "its metadata says dim='64' but its config says dim='32'"),
    "integer tensor": (lambda p: _rewrite(p, lambda t, m: t.__setitem__("to_out.bias", t["to_out.bias"].long())),
                       ValueError, r"tensor 'to_out.bias' is stored as I64; adapter tensors are floating point"),
    "NaN weights": (lambda p: _rewrite(p, lambda t, m: t["to_out.weight"].view(-1)[7:9].fill_(float("nan"))),
                    ValueError, r"tensor\(s\) \['to_out.weight'\] hold NaN or infinite values"),
    # once: a 100 KB file claiming dim=16384 allocated 6.8 GB before any shape was checked; 2^40 overflowed
    "crafted width": (lambda p: _rewrite(p, _claim_width(8192)), ValueError,
                      r"(expected \(.*8192|embedding width 8192)"),
    "absurd width": (lambda p: _rewrite(p, _claim_width(1 << 40)), ValueError, "dim must be a positive int up to 65536"),
}
# Whatever the module, these are wrong in the file itself.
FILE_ERRORS = ("other format version", "newer config field", "truncated", "random bytes", "empty",
               "torch.save pickle", "no rada_mma metadata", "missing file", "metadata method contradicts config",
               "metadata dim contradicts config", "integer tensor", "crafted width", "absurd width")


def _claim_width(dim: int):
    def edit(tensors, metadata):
        metadata["config"] = json.dumps({**json.loads(metadata["config"]), "dim": dim})
        metadata["dim"] = str(dim)

    return edit


@pytest.fixture
def good_file(tmp_path) -> Path:
    return trained("rada").save_adapter(tmp_path / "good.safetensors")


@pytest.mark.parametrize("case", list(LOAD_ERRORS))
def test_load_errors_name_the_difference(case, good_file):
    make, error, message = LOAD_ERRORS[case]
    bad = make(good_file)
    model = fresh("rada")
    before = state(model.adapter)
    with pytest.raises(error, match=message):
        model.load_adapter(bad)
    assert_same_state(model.adapter, before)  # a rejected file changes nothing
    if case in FILE_ERRORS:
        with pytest.raises(error, match=message):
            load_adapter(bad)
        with pytest.raises(error, match=message):
            read_adapter_config(bad)


def test_a_crafted_width_allocates_nothing(good_file):
    """The header is checked before any module is built: a file claiming dim=8192 (RAda: 1.6 GB) costs nothing."""
    bad = _rewrite(good_file, _claim_width(8192))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for read in (load_adapter, read_adapter_config):
        with pytest.raises(ValueError, match="expected"):
            read(bad)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000


def test_wider_tensors_load_with_a_warning(good_file):
    """A float64 file loads into a float32 adapter (what a user may mean), but not silently."""
    wide = _rewrite(good_file, lambda t, m: t.update({k: v.double() for k, v in t.items()}))
    with pytest.warns(UserWarning, match="stores torch.float64 tensors, loaded into a torch.float32 adapter"):
        module = load_adapter(wide)
    assert_same_state(module, state(load_adapter(good_file)))


def test_non_finite_adapters_are_never_saved(tmp_path):
    module = build_adapter(AdapterConfig.for_method("mma", 32))
    with torch.no_grad():
        module.up.bias[3] = float("inf")
    with pytest.raises(ValueError, match=r"tensor\(s\) \['up.bias'\] hold NaN or infinite values .* nothing was written"):
        save_adapter(module, tmp_path / "diverged.safetensors")
    assert os.listdir(tmp_path) == []


def test_metadata_without_config_is_a_clear_error(good_file):
    bad = _rewrite(good_file, lambda t, m: m.pop("config"))
    with pytest.raises(ValueError, match="config"):
        read_adapter_config(bad)


def test_only_adapters_are_saved_and_loaded(tmp_path, good_file):
    model = fresh("rada")
    with pytest.raises(TypeError, match="save_adapter takes a rada_mma adapter module, got AdaptedCLIP"):
        save_adapter(model, tmp_path / "whole.safetensors")
    with pytest.raises(TypeError, match="loads into a rada_mma adapter module, got Linear"):
        load_adapter(good_file, torch.nn.Linear(2, 2))
    assert os.listdir(tmp_path) == ["good.safetensors"]


# -- never overwrite silently; never leave a half-written file ------------------------------------


def test_saving_never_overwrites_silently(tmp_path):
    path = tmp_path / "adapter.safetensors"
    first = trained("rada", steps=2)
    first.save_adapter(path)
    old = path.read_bytes()
    second = trained("rada", steps=4)
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        second.save_adapter(path)
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        save_adapter(second.adapter, path)
    assert path.read_bytes() == old
    second.save_adapter(path, overwrite=True)
    assert path.read_bytes() != old
    assert_same_state(fresh("rada").load_adapter(path).adapter, second.adapter.state_dict())
    assert os.listdir(tmp_path) == ["adapter.safetensors"]


def test_saving_into_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; create it first"):
        fresh("rada").save_adapter(tmp_path / "no" / "such" / "adapter.safetensors")


@pytest.mark.parametrize("existing", [True, False], ids=["replacing", "new file"])
@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt("disk full")],
                         ids=["OSError", "KeyboardInterrupt"])
def test_a_failed_save_leaves_the_destination_untouched(existing, failure, tmp_path, monkeypatch):
    path = tmp_path / "adapter.safetensors"
    if existing:
        trained("rada", steps=2).save_adapter(path)
    old = path.read_bytes() if existing else None

    def failing_fsync(fd):  # the bytes are written, then the disk gives up
        raise failure

    monkeypatch.setattr(rada_mma.io.os, "fsync", failing_fsync)
    with pytest.raises(type(failure), match="disk full"):
        fresh("rada").save_adapter(path, overwrite=True)
    assert os.listdir(tmp_path) == (["adapter.safetensors"] if existing else [])  # no temporary file left
    if existing:
        assert path.read_bytes() == old


def test_saved_file_has_the_usual_permissions(tmp_path):
    reference = tmp_path / "plain"
    reference.write_bytes(b"")
    path = fresh("rada").save_adapter(tmp_path / "adapter.safetensors")
    assert oct(path.stat().st_mode & 0o777) == oct(reference.stat().st_mode & 0o777)


def test_training_only_options_do_not_block_loading(tmp_path):
    # alpha and the regulariser only enter the loss: a file trained with them loads into a model
    # that evaluates (or goes on training) with its own choice, and gives the same logits.
    trained = rada_mma.RationalMask(dim=32, heads=4, alpha=0.3, regularizer="l1", generator=torch.Generator().manual_seed(1))
    torch.nn.init.normal_(trained.to_out.weight, std=0.1)
    path = save_adapter(trained, tmp_path / "a.safetensors")
    fresh = load_adapter(path, rada_mma.RationalMask(dim=32, heads=4))
    assert fresh.config.alpha == 0.0 and fresh.config.regularizer == "linf"
    f, h = torch.randn(3, 32), torch.randn(5, 32)
    assert torch.equal(fresh(f, h, 100.0), trained(f, h, 100.0))


def test_rada_adapter_files_from_before_adapter_init_load_as_the_released_form(tmp_path):
    """0.1 and 0.2 files hold no adapter_init: their adapters are the released W2 = 0 ones, and load as such."""
    released = rada_mma.RationalMask(dim=32, adapter_reduction=4, adapter_init="released")
    torch.nn.init.normal_(released.to_out.weight, std=0.1)
    path = save_adapter(released, tmp_path / "new.safetensors")
    with safe_open(str(path), "pt") as fh:
        meta = dict(fh.metadata())
    config = json.loads(meta["config"])
    del config["adapter_init"]
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(path)), str(old), metadata={**meta, "config": json.dumps(config)})
    assert read_adapter_config(old).adapter_init == "released"
    loaded = load_adapter(old)
    f, h = torch.randn(3, 32), torch.randn(5, 32)
    assert torch.equal(loaded(f, h, 100.0), released(f, h, 100.0))
    with pytest.raises(ValueError, match="adapter_init"):  # the default form has no such file's tensors
        load_adapter(old, rada_mma.RationalMask(dim=32, adapter_reduction=4, adapter_init="blend"))
