"""Using a trained adapter: one-call load (file or peft-style folder), the base it was trained on,
the classes it carries, prediction, the logit scale as on the base model, class terms computed once."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import rada_mma
from rada_mma import METHODS, AdaptedCLIP, wrap
from tests.helpers import tiny_models as tm

NAMES = ["cat", "dog", "bird", "fish"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


def trained(method: str = "rada", *, seed: int = 0, base_name: str | None = "tiny-a") -> AdaptedCLIP:
    """A tiny open_clip (weights of ``seed``) with a ``method`` adapter trained a few steps on four named classes."""
    model = wrap(tm.open_clip_model(seed), method, generator=torch.Generator().manual_seed(1), base_name=base_name)
    model.set_classes(NAMES, tokenizer=tm.tokenizer(), templates=TEMPLATES)
    tm.train_steps(model, tm.images(8), torch.arange(8) % 4, 3, weight_decay=0.1)
    return model


def quietly(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading onto the right base warns about nothing
        return fn(*args, **kwargs)


# -- one call --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_load_gives_the_trained_model_with_its_classes(method, tmp_path):
    model = trained(method)
    path = model.save_adapter(tmp_path / "a.safetensors", include_classes=True)
    loaded = quietly(rada_mma.load, tm.open_clip_model(0), path)
    assert isinstance(loaded, AdaptedCLIP) and loaded.adapter.config == model.adapter.config
    assert loaded.class_names == tuple(NAMES) and loaded.class_templates == tuple(TEMPLATES)
    assert (loaded.base_name, loaded.base_pretrained) == ("tiny-a", None)  # taken from the file
    images = tm.images(5, seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))  # no set_classes: the file had them
    top = loaded.predict(images, k=2)
    assert top.names == [[NAMES[i] for i in row] for row in top.indices.tolist()]
    same = AdaptedCLIP.from_file(tm.open_clip_model(0), path)
    with torch.no_grad():
        assert torch.equal(same(images), model(images))


def test_a_file_without_classes_loads_without_them(tmp_path):
    path = trained().save_adapter(tmp_path / "a.safetensors")
    loaded = quietly(rada_mma.load, tm.open_clip_model(0), path)
    assert loaded.class_features is None
    with pytest.raises(RuntimeError, match="no classes set"):
        loaded.predict(tm.images(1))
    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata()["format_version"] == "1"  # what rada_mma 0.1 and 0.2 read


def test_files_of_earlier_versions_still_load(tmp_path):
    model = trained()
    path = model.save_adapter(tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as fh:
        meta, tensors = dict(fh.metadata()), {name: fh.get_tensor(name) for name in fh.keys()}
    meta.pop("base")  # as 0.1 and 0.2 wrote it
    meta["rada_mma_version"] = "0.2.0"
    save_file(tensors, tmp_path / "old.safetensors", metadata=meta)
    assert rada_mma.read_adapter(tmp_path / "old.safetensors").base is None
    loaded = quietly(rada_mma.load, tm.open_clip_model(1), tmp_path / "old.safetensors")  # nothing to check against
    loaded.set_classes(NAMES, tokenizer=tm.tokenizer(), templates=TEMPLATES)
    other = model.unwrap()
    assert torch.equal(loaded.adapter.to_out.weight, model.adapter.to_out.weight) and other is model.base


def test_another_base_warns_naming_both_and_strict_refuses(tmp_path):
    path = trained(base_name="tiny-a").save_adapter(tmp_path / "a.safetensors")
    other = tm.open_clip_model(1)
    with pytest.warns(UserWarning, match=r"trained on open_clip tiny-a, .* loaded onto open_clip tiny-b, "):
        rada_mma.load(other, path, base_name="tiny-b")
    fresh = tm.open_clip_model(1)
    flags = {name: p.requires_grad for name, p in fresh.named_parameters()}
    with pytest.raises(ValueError, match=r"tiny-a, .*fingerprint [0-9a-f]{12}.* tiny-b, "):
        rada_mma.load(fresh, path, strict=True, base_name="tiny-b")
    assert {name: p.requires_grad for name, p in fresh.named_parameters()} == flags  # left as it was
    with pytest.warns(UserWarning, match="tiny-a"):
        wrap(tm.open_clip_model(1), "rada", alpha=0.1, base_name="tiny-b").load_adapter(path)


def test_the_same_weights_in_half_precision_are_the_same_base(tmp_path):
    model = trained()
    identity = model.base_identity()
    half = wrap(tm.open_clip_model(0).half(), "rada").base_identity()
    assert half.same_weights(identity) and identity.same_weights(half)
    assert not wrap(tm.open_clip_model(1), "rada").base_identity().same_weights(identity)
    assert rada_mma.BaseIdentity.from_json(identity.to_json()) == identity


def test_load_refuses_what_cannot_work(tmp_path):
    path = trained().save_adapter(tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="embedding width 32, but the model's width is 24"):
        rada_mma.load(tm.GenericDualEncoder(dim=24), path, dim=24, logit_scale=10.0)
    with pytest.raises(TypeError, match=r"unexpected option\(s\) \['heads'\]"):
        rada_mma.load(tm.open_clip_model(0), path, heads=4)


# -- peft's names ----------------------------------------------------------------------------------


def test_save_pretrained_and_from_pretrained(tmp_path):
    model = trained("mma")
    folder = model.save_pretrained(tmp_path / "pets-mma", include_classes=True)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["method"] == "mma" and config["classes"]["names"] == NAMES
    assert config["base"]["name"] == "tiny-a" and config["config"] == json.loads(model.adapter.config.to_json())
    loaded = quietly(AdaptedCLIP.from_pretrained, tm.open_clip_model(0), folder)
    with torch.no_grad():
        assert torch.equal(loaded(tm.images(3)), model(tm.images(3)))
    with pytest.raises(FileExistsError, match="adapter_config.json exists"):
        model.save_pretrained(folder)
    config["config"]["blend"] = 0.5  # the two files disagree
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="describe different adapters"):
        rada_mma.load(tm.open_clip_model(0), folder)


# -- the logit scale -------------------------------------------------------------------------------


def test_logit_scale_is_the_stored_tensor_as_on_the_base():
    base = tm.open_clip_model()
    model = wrap(base, "rada")
    assert model.logit_scale is base.logit_scale
    assert torch.equal(model.logit_scale.exp(), base.logit_scale.exp())
    assert model.multiplicative_scale().item() == pytest.approx(base.logit_scale.exp().item())
    generic = wrap(tm.GenericDualEncoder(), "rada", dim=24, logit_scale=50.0)
    assert generic.logit_scale.exp().item() == pytest.approx(50.0)
    hf = wrap(tm.hf_clip_model(), "mma")
    assert hf.logit_scale is hf.base.logit_scale


# -- prediction ------------------------------------------------------------------------------------


def test_predict_gives_the_top_k_of_the_logits():
    model = trained("rada")
    images = tm.images(6, seed=4)
    top = model.predict(images, k=3)
    with torch.no_grad():
        probabilities = model(images).softmax(-1)
    expected = probabilities.topk(3, dim=-1)
    assert torch.equal(top.indices, expected.indices) and torch.allclose(top.probabilities, expected.values)
    assert len(top) == 6 and top.rows()[0]["classes"] == [NAMES[i] for i in expected.indices[0].tolist()]
    assert model.predict(images, k=10).indices.shape == (6, 4)  # at most K
    one = model.predict([images[0], images[1]], preprocess=lambda image: image, batch_size=1)
    assert torch.equal(one.indices, model.predict(images[:2]).indices)
    model.set_classes(text_features=model.class_features)  # features name no classes
    assert model.predict(images, k=1).names is None
    for k in (0, 1.5, True):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            model.predict(images, k=k)
    with pytest.raises(TypeError, match="unsqueeze"):
        model.predict(images[0])


def test_class_terms_are_computed_once_per_class_set():
    model = trained("mma-master")
    calls = []
    compute = model.adapter.class_terms
    model.adapter.class_terms = lambda *a: calls.append(1) or compute(*a)
    images = tm.images(4)
    model.predict(images)
    model.predict(images)
    with torch.no_grad():
        cached = model(images)
    assert len(calls) == 1
    with torch.enable_grad():
        fresh = model(images)  # training path: terms recomputed with gradients
    torch.testing.assert_close(cached, fresh.detach(), rtol=1e-5, atol=1e-5)
    calls.clear()
    tm.train_steps(model, images, torch.arange(4), 1)  # new weights: new terms
    model.predict(images)
    model.set_classes(NAMES[:2], tokenizer=tm.tokenizer())  # new classes: new terms
    model.predict(images)
    assert len(calls) == 3  # the training step (with gradients), then each new class set or weights once


def test_the_nan_check_is_opt_out():
    model = trained("rada")
    bad = torch.full((2, tm.EMBED_DIM), float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        model.logits_from_features(bad)
    model.adapter.check_finite = False
    assert torch.isnan(model.logits_from_features(bad)).all()


def test_names_for_features_and_token_ids():
    model = wrap(tm.open_clip_model(), "rada")
    tokens = tm.tokenizer()(["a cat", "a dog"])
    model.set_classes(tokens, names=["cat", "dog"])
    assert model.class_names == ("cat", "dog") and model.class_templates is None
    with pytest.raises(ValueError, match="3 names for K = 2 classes"):
        model.set_classes(tokens, names=["cat", "dog", "bird"])
    with pytest.raises(ValueError, match="name themselves"):
        model.set_classes(["cat", "dog"], tokenizer=tm.tokenizer(), names=["a", "b"])
    with pytest.raises(ValueError, match="include_classes=True but no classes"):
        wrap(tm.open_clip_model(), "rada").save_adapter("unused.safetensors", include_classes=True)
