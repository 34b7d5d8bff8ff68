"""Feature cache: fingerprints, stale caches, file contents, augmented views, and the key
check that training from cached features is training through the encoders, bit for bit.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torchvision import transforms as T

from rada_mma import wrap
from rada_mma.fewshot.cache import (
    Features,
    default_augment,
    encode_class_texts,
    extract_image_features,
    fingerprint_parts,
    load_features,
    save_features,
)
from rada_mma.fewshot.data import ImageDataset, load_data
from tests.helpers import tiny_models

CLASSES = ("cat", "dog", "red_fox")
PER_CLASS = 4


@pytest.fixture
def splits(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", PER_CLASS), ("test", 1)):
        for name in CLASSES:
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return load_data(tmp_path / "data")


@pytest.fixture
def model():
    return wrap(tiny_models.open_clip_model(), method="rada")


@pytest.fixture
def preprocess():
    return open_clip.image_transform(tiny_models.IMAGE_SIZE, is_train=False)


def extract(model, splits, preprocess, **kwargs):
    kwargs.setdefault("batch_size", 4)
    kwargs.setdefault("progress", False)
    return extract_image_features(model, splits, splits.train, preprocess, **kwargs)


def test_features_are_the_encoders_output(model, splits, preprocess):
    features = extract(model, splits, preprocess)
    assert features.image.shape == (12, tiny_models.EMBED_DIM) and features.image.dtype == torch.float32
    assert features.labels.tolist() == [item.label for item in splits.train] and features.labels.dtype == torch.int64
    images = torch.stack([preprocess(splits.load_image(item)) for item in splits.train[:4]])
    assert torch.equal(features.image[:4], model.encode_image(images))
    assert features.views == 0 and len(features) == 12


# -- fingerprints ------------------------------------------------------------------------------


def test_fingerprint_follows_weights_transform_views_and_data(model, splits, preprocess):
    def parts(**kwargs):
        args = dict(model=model, splits=splits, items=splits.train, transform=preprocess)
        args.update(kwargs)
        return fingerprint_parts(args.pop("model"), args.pop("splits"), args.pop("items"), args.pop("transform"), **args)

    reference = parts()
    assert parts() == reference  # stable across calls

    with torch.no_grad():
        model.base.visual.conv1.weight[0, 0, 0, 0] += 1e-6  # one parameter nudged
    nudged = parts()
    assert {k for k in reference if reference[k] != nudged[k]} == {"weights"}
    with torch.no_grad():
        model.base.visual.conv1.weight[0, 0, 0, 0] -= 1e-6

    other_size = open_clip.image_transform(tiny_models.IMAGE_SIZE, is_train=False, interpolation="bilinear")
    changes = {
        "preprocessing": parts(transform=other_size),
        "views": parts(views=2),
        "data": parts(items=splits.train[:-1]),
        "extra": parts(extra={"dataset_version": 2}),
    }
    for expected, changed in changes.items():
        assert {k for k in reference if reference[k] != changed[k]} == {expected}, expected
    assert parts(views=2, seed=1)["views"] != parts(views=2)["views"]

    # the same file list, one image rewritten
    path = splits.path(splits.train[0])
    Image.new("RGB", (40, 36), "white").save(path)
    os.utime(path, ns=(1, 1))
    assert {k for k in reference if reference[k] != parts()[k]} == {"data"}


def test_fingerprint_ignores_memory_addresses(model, splits):
    def to_rgb(image):
        return image.convert("RGB")

    transform = T.Compose([T.Lambda(to_rgb), T.Resize(32), T.ToTensor()])
    again = T.Compose([T.Lambda(lambda image: image.convert("RGB")), T.Resize(32), T.ToTensor()])
    one = fingerprint_parts(model, splits, splits.train, transform)["preprocessing"]
    assert fingerprint_parts(model, splits, splits.train, T.Compose(list(transform.transforms)))["preprocessing"] == one
    assert fingerprint_parts(model, splits, splits.train, again)["preprocessing"] == one  # lambdas: by name only


# -- the cache file ----------------------------------------------------------------------------


def test_cache_is_written_then_loaded(model, splits, preprocess, tmp_path, caplog, monkeypatch):
    path = tmp_path / "cache" / "train.safetensors"
    built = extract(model, splits, preprocess, cache_path=path)
    with safe_open(str(path), framework="pt") as fh:
        assert sorted(fh.keys()) == ["image", "labels"]
        meta = fh.metadata()
    assert meta["format"] == "rada_mma.features" and meta["fingerprint"] == built.fingerprint
    assert not [p for p in path.parent.iterdir() if p != path]  # no temporary file left

    def no_encoding(images):
        raise AssertionError("a fresh cache must not encode anything")

    monkeypatch.setattr(model, "encode_image", no_encoding)
    with caplog.at_level(logging.INFO, logger="rada_mma.fewshot.cache"):
        loaded = extract(model, splits, preprocess, cache_path=path)
    assert "loaded (12, 32) cached image features" in caplog.text
    assert torch.equal(loaded.image, built.image) and torch.equal(loaded.labels, built.labels)


@pytest.mark.parametrize("change", ["weights", "views", "data"])
def test_stale_cache_is_rebuilt_with_a_warning(model, splits, preprocess, tmp_path, caplog, change):
    path = tmp_path / "train.safetensors"
    old = extract(model, splits, preprocess, cache_path=path)
    kwargs = {}
    if change == "weights":
        with torch.no_grad():
            model.base.visual.proj.add_(0.5)
    elif change == "views":
        kwargs["views"] = 2
    else:
        splits.train = splits.train[1:]
    with caplog.at_level(logging.INFO, logger="rada_mma.fewshot.cache"):
        new = extract(model, splits, preprocess, cache_path=path, **kwargs)
    stale = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(stale) == 1 and f"is stale ({change} changed" in stale[0].getMessage()
    assert "loaded" not in caplog.text
    assert new.fingerprint != old.fingerprint
    fresh = extract(model, splits, preprocess, **kwargs)  # no cache at all
    assert torch.equal(new.image, fresh.image)
    assert load_features(path).fingerprint == new.fingerprint


def test_foreign_file_is_not_overwritten(model, splits, preprocess, tmp_path):
    path = tmp_path / "adapter.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path), metadata={"format": "rada_mma.adapter"})
    before = path.read_bytes()
    with pytest.raises(ValueError, match="not a rada_mma feature cache .* choose another cache_path"):
        extract(model, splits, preprocess, cache_path=path)
    assert path.read_bytes() == before


def test_unreadable_cache_is_rebuilt(model, splits, preprocess, tmp_path, caplog):
    path = tmp_path / "train.safetensors"
    path.write_bytes(b"\x00" * 7)
    with caplog.at_level(logging.WARNING, logger="rada_mma.fewshot.cache"):
        features = extract(model, splits, preprocess, cache_path=path)
    assert "unreadable" in caplog.text and load_features(path).fingerprint == features.fingerprint


def test_save_load_round_trip(tmp_path):
    features = Features(image=torch.randn(5, 3, 8), labels=torch.arange(5), fingerprint="abc")
    loaded = load_features(save_features(features, tmp_path / "f.safetensors"))
    assert torch.equal(loaded.image, features.image) and torch.equal(loaded.labels, features.labels)
    assert loaded.fingerprint == "abc" and loaded.views == 3
    with pytest.raises(FileNotFoundError, match="no feature file"):
        load_features(tmp_path / "missing.safetensors")


def test_trainable_backbone_cannot_be_cached(splits, preprocess):
    model = wrap(tiny_models.open_clip_model(), method="rada", freeze_backbone=False)
    with pytest.raises(ValueError, match="freeze_backbone=False.*cannot be cached"):
        extract(model, splits, preprocess)
    with pytest.raises(TypeError, match="wrap the model first"):
        extract(tiny_models.open_clip_model(), splits, preprocess)


# -- augmented views ---------------------------------------------------------------------------


def test_default_augment_replaces_the_fixed_crop(preprocess):
    augment = default_augment(preprocess)
    kinds = [type(step) for step in augment.transforms]
    assert kinds[:2] == [T.RandomResizedCrop, T.RandomHorizontalFlip]
    assert augment.transforms[0].size == (32, 32) and augment.transforms[0].scale == (0.08, 1.0)
    assert augment.transforms[0].interpolation == T.InterpolationMode.BICUBIC
    assert kinds[2:] == [type(s) for s in preprocess.transforms[2:]]  # to RGB, to tensor, normalise
    other = default_augment(preprocess, scale=(0.5, 1.0), interpolation="bilinear").transforms[0]
    assert (other.scale, other.interpolation) == ((0.5, 1.0), T.InterpolationMode.BILINEAR)
    with pytest.raises(ValueError, match="pass augment="):
        default_augment(lambda image: image)


def test_views_are_seeded_per_image_and_view(model, splits, preprocess):
    torch.manual_seed(123)
    first = extract(model, splits, preprocess, views=2)
    torch.manual_seed(456)  # the global RNG does not matter
    second = extract(model, splits, preprocess, views=2, batch_size=5, num_workers=0)
    assert first.image.shape == (12, 2, tiny_models.EMBED_DIM) and first.views == 2
    # same crops whatever the batching; the encoder itself may round differently per batch size
    torch.testing.assert_close(first.image, second.image, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first.image[:, 0], first.image[:, 1])  # two different views
    plain = extract(model, splits, preprocess)
    assert not torch.allclose(first.image[:, 0], plain.image)  # every view is augmented
    other_seed = extract(model, splits, preprocess, views=2, seed=1)
    assert not torch.allclose(first.image, other_seed.image)
    # an item's views do not depend on which other items are extracted with it
    alone = extract_image_features(model, splits, splits.train[5:6], preprocess, views=2, progress=False)
    torch.testing.assert_close(alone.image[0], first.image[5], rtol=1e-5, atol=1e-5)


# -- text --------------------------------------------------------------------------------------


def test_class_texts_per_template(model, tmp_path, caplog):
    tokenizer = tiny_models.tokenizer()
    names, templates = ["cat", "red fox"], ["a photo of a {}.", "{} texture."]
    path = tmp_path / "text.safetensors"
    text = encode_class_texts(model, names, templates, tokenizer=tokenizer, batch_size=3, cache_path=path)
    assert text.shape == (2, 2, tiny_models.EMBED_DIM)
    expected = model.encode_text(tokenizer(["{} texture.".format("red fox")]))
    torch.testing.assert_close(text[1, 1], expected[0])
    with caplog.at_level(logging.INFO, logger="rada_mma.fewshot.cache"):
        assert torch.equal(encode_class_texts(model, names, templates, tokenizer=tokenizer, cache_path=path), text)
        assert "loaded cached class text features" in caplog.text
        encode_class_texts(model, names, templates[:1], tokenizer=tokenizer, cache_path=path)
        assert "stale (tokens, shape changed since it was built)" in caplog.text
    # set_classes ensembles the T templates exactly as from names
    model.set_classes(text_features=text)
    from_cache = model.class_features.clone()
    model.set_classes(names, tokenizer=tokenizer, templates=templates)
    torch.testing.assert_close(from_cache, model.class_features)


def test_class_texts_take_the_templates_set_classes_takes(model):
    tokenizer = tiny_models.tokenizer()
    names, templates = ["cat", "red fox"], ["a photo of a {}.", lambda c: f"art of the {c}."]
    text = encode_class_texts(model, names, templates, tokenizer=tokenizer)
    assert torch.equal(text, model.encode_class_names(names, tokenizer=tokenizer, templates=templates))
    with pytest.raises(ValueError, match=r"template 'a photo\.' must hold exactly one \{\}"):
        encode_class_texts(model, names, ["a photo."], tokenizer=tokenizer)


def test_text_cache_fingerprints_the_tokenizers_rows(model, tmp_path):
    """The tokens' digest is that of the tokenizer's (K·T, L) output, as it always was: old caches stay valid."""
    import hashlib

    def tokens_digest(ids: torch.Tensor) -> str:  # the digest's definition, as 0.1 wrote it
        digest = hashlib.sha256(f"input_ids|{ids.dtype}|{tuple(ids.shape)};".encode())
        digest.update(ids.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    tokenizer, names, templates = tiny_models.tokenizer(), ["cat", "red fox"], ["a photo of a {}.", "{} texture."]
    path = tmp_path / "text.safetensors"
    encode_class_texts(model, names, templates, tokenizer=tokenizer, cache_path=path)
    with safe_open(str(path), framework="pt") as fh:
        parts = json.loads(fh.metadata()["parts"])
    assert parts["tokens"] == tokens_digest(tokenizer([t.format(c) for c in names for t in templates]))


# -- training from the cache is training through the encoders ----------------------------------


def _adapted(base: nn.Module, method: str, names, seed: int = 7):
    model = wrap(base, method=method, generator=torch.Generator().manual_seed(seed))
    model.set_classes(names, tokenizer=tiny_models.tokenizer())
    if method == "rada":  # a zero output map hides every upstream difference: start from a non-zero one
        with torch.no_grad():
            model.adapter.to_out.weight.copy_(0.01 * torch.randn(model.adapter.to_out.weight.shape,
                                                                 generator=torch.Generator().manual_seed(seed)))
    return model


@pytest.mark.parametrize("method", ["rada", "mma"])
def test_training_from_cache_equals_training_through_encoders(splits, preprocess, method):
    base = tiny_models.open_clip_model()
    through, cached = _adapted(base, method, splits.classnames), _adapted(base, method, splits.classnames)
    batch = 4
    order = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(0)).tolist()
    items = [splits.train[i] for i in order]  # one shuffled epoch: the cache is extracted in training order
    features = extract_image_features(cached, splits, items, preprocess, batch_size=batch, progress=False)
    loader = torch.utils.data.DataLoader(ImageDataset(splits, items, preprocess), batch_size=batch, shuffle=False)

    optimisers = [torch.optim.AdamW(m.trainable_parameters(), lr=1e-2) for m in (through, cached)]
    for step, (images, labels) in enumerate(loader):
        rows = slice(step * batch, (step + 1) * batch)
        assert torch.equal(labels, features.labels[rows])
        logits_a = through(images)
        logits_b = cached.logits_from_features(features.image[rows])
        assert torch.equal(logits_a, logits_b), f"step {step}: logits differ"
        for model, logits, optimiser in zip((through, cached), (logits_a, logits_b), optimisers, strict=True):
            loss = model.loss(logits, labels)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    assert step == 2  # three optimiser steps
    for (name, a), b in zip(through.adapter.named_parameters(), cached.adapter.parameters(), strict=True):
        assert torch.equal(a, b), name
    start = _adapted(base, method, splits.classnames).adapter.state_dict()
    assert any(not torch.equal(start[k], v) for k, v in cached.adapter.state_dict().items())  # it did train
    images = torch.stack([preprocess(splits.load_image(item)) for item in items[:batch]])
    assert torch.equal(through(images), cached.logits_from_features(features.image[:batch]))


def test_processor_outputs_and_bad_devices(model, splits, preprocess):
    """A Hugging Face processor's {"pixel_values": (1, C, H, W)} counts as the image tensor."""
    def processor(image):
        return {"pixel_values": preprocess(image)[None]}

    assert torch.equal(extract(model, splits, processor).image, extract(model, splits, preprocess).image)
    with pytest.raises(ValueError, match="the model is on cpu but device=meta"):
        extract(model, splits, preprocess, device="meta")


# -- never stale, never damaged ----------------------------------------------------------------


def _same_size_edit(path: Path) -> None:
    """Change one pixel of a PNG's bytes without changing its size or modification time."""
    stat = path.stat()
    image = np.array(Image.open(path))
    image[18, 20] = 255 - image[18, 20]  # the centre: never cropped away by the preprocessing
    Image.fromarray(image).save(path)
    assert path.stat().st_size == stat.st_size, "the edit changed the size; pick another pixel"
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_same_size_edit_with_its_mtime_restored_is_noticed(model, splits, preprocess, tmp_path, caplog):
    """The fingerprint once held each image's size and mtime only, and reused the stale features."""
    path = tmp_path / "train.safetensors"
    old = extract(model, splits, preprocess, cache_path=path)
    _same_size_edit(splits.path(splits.train[0]))
    with caplog.at_level(logging.WARNING, logger="rada_mma.fewshot.cache"):
        new = extract(model, splits, preprocess, cache_path=path)
    assert "is stale (data changed" in caplog.text
    assert not torch.equal(new.image[0], old.image[0]) and torch.equal(new.image[1:], old.image[1:])
    # "stat" is the cheap opt-out, blind to exactly this edit
    stat_path = tmp_path / "stat.safetensors"
    stale = extract(model, splits, preprocess, cache_path=stat_path, data_hash="stat")
    _same_size_edit(splits.path(splits.train[0]))
    assert torch.equal(extract(model, splits, preprocess, cache_path=stat_path, data_hash="stat").image, stale.image)


def _flip_a_feature_byte(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    header = int.from_bytes(blob[:8], "little")
    blob[8 + header + 5] ^= 0x40  # inside the first tensor's data: the file stays a valid safetensors file
    path.write_bytes(bytes(blob))


def test_altered_cache_bytes_are_detected(model, splits, preprocess, tmp_path, caplog):
    """A flipped bit in a cache file's tensors was once used undetected."""
    path = tmp_path / "train.safetensors"
    built = extract(model, splits, preprocess, cache_path=path)
    _flip_a_feature_byte(path)
    with pytest.raises(ValueError, match="is damaged: its tensors do not match the checksum"):
        load_features(path)
    with caplog.at_level(logging.WARNING, logger="rada_mma.fewshot.cache"):
        again = extract(model, splits, preprocess, cache_path=path)
    assert "is damaged" in caplog.text and "rebuilding it" in caplog.text
    assert torch.equal(again.image, built.image) and torch.equal(load_features(path).image, built.image)


def test_altered_text_cache_bytes_are_detected(model, tmp_path, caplog):
    path = tmp_path / "text.safetensors"
    tok = tiny_models.tokenizer()
    text = encode_class_texts(model, ["cat", "dog"], ["a {}."], tokenizer=tok, cache_path=path)
    _flip_a_feature_byte(path)
    with caplog.at_level(logging.WARNING, logger="rada_mma.fewshot.cache"):
        again = encode_class_texts(model, ["cat", "dog"], ["a {}."], tokenizer=tok, cache_path=path)
    assert "is damaged" in caplog.text and torch.equal(again, text)
