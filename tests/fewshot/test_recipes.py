"""The released training recipes, knob by knob, against transcriptions of the authors' code.

Every expected value comes from ``tests/helpers/recipes.py`` (our restatement of
Dassl's, khufia/RAda's and dqmis/clip-mma's behaviour, with scikit-learn itself for
MMA's draw), never from the package: the RAda YAML's optimiser, Dassl's schedule,
training transform and ``drop_last`` loader, RAda's prompt, one fresh augmented view
per image and epoch, and MMA's class-first stratified draw, item by item.
"""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torchvision import transforms as T

from rada_mma import METHODS, wrap
from rada_mma.fewshot import RunSpec, data, run_record
from rada_mma.fewshot.cache import augment_view, default_augment, extract_image_features
from rada_mma.fewshot.datasets import clean_classname
from rada_mma.fewshot.protocol import FeatureStore, adapter_templates, base_classes, zero_shot_templates
from rada_mma.fewshot.train import fit, learning_rate, preset, steps_per_epoch
from tests.helpers import recipes, tiny_models

RADA_FAMILY = ("rada", "rada+adapter", "mma+rada")
YAML = recipes.RADA_YAML


def photo(seed: int, size: tuple[int, int] = (300, 240)) -> Image.Image:
    """A non-square RGB image with structure everywhere, so that every crop differs."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """An ImageFolder of 3 classes x 5 training images (uneven sizes), 1 test image each."""
    root = tmp_path_factory.mktemp("recipes")
    for split, count in (("train", 5), ("test", 1)):
        for c, name in enumerate(("ant", "bee", "cat")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                photo(100 * c + i, (40 + 3 * i, 36)).save(folder / f"{i}.png")
    return data.load_data(root)


# -- the optimiser and its schedule --------------------------------------------------------------


@pytest.mark.parametrize("method", RADA_FAMILY)
def test_rada_presets_are_the_yaml_where_it_was_not_overridden(method):
    c = preset(method)
    assert (c.optimizer, c.weight_decay) == (YAML["OPTIM.NAME"], YAML["OPTIM.WEIGHT_DECAY"])
    assert (c.schedule, c.warmup_epochs, c.warmup_lr) == (
        YAML["OPTIM.LR_SCHEDULER"], YAML["OPTIM.WARMUP_EPOCH"], YAML["OPTIM.WARMUP_CONS_LR"])
    assert c.select == "last" and YAML["TEST.FINAL_MODEL"] == "last_step" and c.patience == 0
    assert c.drop_last and c.views == "per_epoch"
    assert ((c.crop_scale, 1.0), c.interpolation) == (YAML["INPUT.RRCROP_SCALE"], YAML["INPUT.INTERPOLATION"])
    assert c.prompt == "released" and not c.amp and not c.extract_amp  # fp32, as the CPU-loaded CLIP ran
    # batch and epochs: the YAML's own values (the launch scripts' were never published); lr is ours
    assert (c.batch_size, c.epochs) == (YAML["DATALOADER.TRAIN_X.BATCH_SIZE"], YAML["OPTIM.MAX_EPOCH"])


@pytest.mark.parametrize("lr, epochs", [(1e-3, 5), (0.1, 5), (2e-3, 10), (1.0, 2)])
def test_learning_rates_are_dassls_warmup_wrapped_cosine(lr, epochs):
    config = preset("rada", lr=lr, epochs=epochs)
    ours = [learning_rate(config, e) for e in range(epochs)]
    assert ours == pytest.approx(recipes.dassl_epoch_lrs(lr, epochs), rel=1e-12, abs=1e-15)


def captured_optimizers(config, features, labels) -> list[torch.optim.Optimizer]:
    seen: list[torch.optim.Optimizer] = []
    handle = register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: seen.append(optimizer))
    try:
        model = wrap(tiny_models.GenericDualEncoder(dim=8), method="rada", dim=8, logit_scale=100.0)
        model.set_classes(text_features=torch.randn(3, 8, generator=torch.Generator().manual_seed(0)))
        fit(model, features, labels, config=config, progress=False)
    finally:
        handle.remove()
    return seen


def test_the_optimiser_is_dassls_adam_with_the_yamls_weight_decay():
    g = torch.Generator().manual_seed(0)
    optimizers = captured_optimizers(preset("rada", epochs=1), torch.randn(40, 8, generator=g), torch.arange(40) % 3)
    optimizer = optimizers[0]
    assert type(optimizer) is torch.optim.Adam and all(o is optimizer for o in optimizers)
    group = optimizer.param_groups[0]
    assert group["weight_decay"] == YAML["OPTIM.WEIGHT_DECAY"]
    assert group["betas"] == (YAML["OPTIM.ADAM_BETA1"], YAML["OPTIM.ADAM_BETA2"])
    assert group["eps"] == 1e-8 and not group["amsgrad"]  # torch's defaults, which Dassl leaves


@pytest.mark.parametrize("images", [7, 31, 32, 33, 64, 100, 8 * 16, 500 * 16])
@pytest.mark.parametrize("method", ["rada", "mma"])
def test_steps_per_epoch_follow_dassls_drop_last(images, method):
    c = preset(method)
    expected = recipes.dassl_batches_per_epoch(images, c.batch_size) if c.drop_last else -(-images // c.batch_size)
    assert steps_per_epoch(c, images) == expected


def test_fit_takes_exactly_those_steps():
    g = torch.Generator().manual_seed(1)
    for images in (20, 70):  # fewer than a batch: one step; 70 = 2 x 32 + 6: the 6 are dropped
        config = preset("rada", epochs=2, views=0)
        steps = captured_optimizers(config, torch.randn(images, 8, generator=g), torch.arange(images) % 3)
        assert len(steps) == 2 * recipes.dassl_batches_per_epoch(images, 32) == 2 * steps_per_epoch(config, images)


# -- the augmentation ----------------------------------------------------------------------------


def rada_augment(size: int = 224):
    c = preset("rada")
    return default_augment(open_clip.image_transform(size, is_train=False), scale=(c.crop_scale, 1.0),
                           interpolation=c.interpolation)


def test_the_augmentation_is_dassls_training_transform():
    ours, theirs = rada_augment().transforms, recipes.dassl_train_transform().transforms
    crop, their_crop = ours[0], theirs[0]
    assert type(crop) is type(their_crop) is T.RandomResizedCrop
    for name in ("size", "scale", "ratio", "interpolation", "antialias"):
        assert getattr(crop, name) == getattr(their_crop, name), name
    assert type(ours[1]) is type(theirs[1]) is T.RandomHorizontalFlip and ours[1].p == theirs[1].p == 0.5
    norm, their_norm = ours[-1], theirs[-1]
    assert (tuple(norm.mean), tuple(norm.std)) == (tuple(their_norm.mean), tuple(their_norm.std))


@pytest.mark.parametrize("seed", range(4))
def test_the_augmented_pixels_are_dassls_under_the_same_random_draws(seed):
    """Same generator state, same image: the same crop, flip and normalised tensor as Dassl's pipeline."""
    image = photo(seed)
    torch.manual_seed(seed)
    theirs = recipes.dassl_train_transform()(image)
    torch.manual_seed(seed)
    ours = rada_augment()(image)
    assert theirs.shape == ours.shape == (3, 224, 224) and torch.equal(ours, theirs)


def test_one_distinct_view_per_image_and_epoch_is_what_an_on_the_fly_loader_sees(toy):
    """The cache holds, for epoch e, exactly the crop that augmenting on the fly at epoch e draws."""
    model = wrap(tiny_models.open_clip_model(), method="rada")
    preprocess = open_clip.image_transform(tiny_models.IMAGE_SIZE, is_train=False)
    config = preset("rada", epochs=3)
    augment = default_augment(preprocess, scale=(config.crop_scale, 1.0), interpolation=config.interpolation)
    cached = extract_image_features(model, toy, toy.train, preprocess, views=config.view_count, augment=augment,
                                    seed=7, batch_size=4, progress=False)
    assert cached.image.shape == (15, 3, tiny_models.EMBED_DIM)
    for epoch in range(3):
        pixels = torch.stack([augment_view(augment, toy.load_image(item), seed=7, item=item, view=epoch)
                              for item in toy.train])
        torch.testing.assert_close(cached.image[:, epoch], model.encode_image(pixels), rtol=1e-5, atol=1e-5)
    for a, b in ((0, 1), (0, 2), (1, 2)):  # every epoch a fresh crop of every image
        assert not torch.isclose(cached.image[:, a], cached.image[:, b]).all(-1).any()


def test_fit_reads_view_e_in_epoch_e():
    n, epochs = 12, 3
    features = torch.randn(n, epochs, 8, generator=torch.Generator().manual_seed(0))
    seen: list[torch.Tensor] = []
    model = wrap(tiny_models.GenericDualEncoder(dim=8), method="rada", dim=8, logit_scale=100.0)
    model.set_classes(text_features=torch.randn(3, 8, generator=torch.Generator().manual_seed(1)))
    plain = model.logits_from_features
    model.logits_from_features = lambda feats: seen.append(feats.detach().clone()) or plain(feats)
    fit(model, features, torch.arange(n) % 3, config=preset("rada", epochs=epochs, batch_size=4), progress=False)
    assert len(seen) == epochs * 3
    for step, batch in enumerate(seen):
        epoch = step // 3
        for row in batch:  # each image of the batch is its view of this epoch
            assert any(torch.equal(row, features[i, epoch]) for i in range(n)), (step, epoch)
    with pytest.raises(ValueError, match="need 4 views per image"):
        fit(model, features, torch.arange(n) % 3, config=preset("rada", epochs=4), progress=False)


def test_the_views_are_seeded_by_the_run(toy, tmp_path):
    """The run's seed draws them: a rerun (or resume, or another rank) sees the same, another seed others."""
    model = wrap(tiny_models.open_clip_model(), method="rada")
    preprocess = open_clip.image_transform(tiny_models.IMAGE_SIZE, is_train=False)
    config = preset("rada", epochs=2)

    def views(seed: int, folder: str):
        spec = RunSpec(out=str(tmp_path / folder), seed=seed, shots=2, device="cpu", progress=False)
        return FeatureStore(spec, model, preprocess, tiny_models.tokenizer()).images(toy, "train", "t", config).image

    first = views(1, "a")
    assert torch.equal(views(1, "b"), first) and not torch.allclose(views(2, "c"), first)
    path = tmp_path / "a" / "cache" / "t-train-v2-rrc0.08-bicubic.safetensors"
    with safe_open(str(path), "pt") as fh:  # the file's fingerprint names the views it holds
        named = json.loads(fh.metadata()["parts"])["views"]
    for part in ("2/seed=1/", "RandomResizedCrop(size=(32, 32), scale=(0.08, 1.0)", "interpolation=bicubic",
                 "RandomHorizontalFlip(p=0.5)"):
        assert part in named, named


# -- the prompt ----------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, dataset", [("british_shorthair", "OxfordPets"), ("AnnualCrop", "EuroSAT"),
                                          ("banded", "DescribableTextures"), ("Faces", "Caltech101")])
def test_rada_prompts_with_its_released_string_and_zero_shot_with_coops(raw, dataset):
    name = clean_classname(raw, dataset)  # the class name the dataset classes hand to CustomCLIP
    for method in RADA_FAMILY:
        spec = RunSpec(method=method)
        (template,) = adapter_templates(spec, spec.train_config(), dataset)
        assert template.format(name) == recipes.released_rada_prompt(name)
    coop = zero_shot_templates(RunSpec(method="rada"), dataset)
    assert coop == [recipes.COOP_TEMPLATES[dataset]]
    spec = RunSpec(method="mma")
    assert adapter_templates(spec, spec.train_config(), dataset) == coop  # MMA trains with CoOp's
    mine = RunSpec(method="rada", templates=("a sketch of a {}.",))
    assert adapter_templates(mine, mine.train_config(), dataset) == zero_shot_templates(mine, dataset) == ["a sketch of a {}."]


# -- MMA's draw ----------------------------------------------------------------------------------


def splits_with_labels(labels: list[int], classes: int) -> data.Splits:
    items = [data.Item(f"img/{i}.png", y, f"class {y}") for i, y in enumerate(labels)]
    return data.Splits(name="toy", classnames=[f"class {c}" for c in range(classes)], train=items, val=[], test=items[:2])


@pytest.mark.parametrize("case", range(6))
def test_mma_draw_is_sklearns_item_by_item(case):
    """Uneven classes in a shuffled order: counts follow class frequency, order follows the permutations."""
    rng = random.Random(case)
    classes = rng.randint(2, 9)
    labels = [c for c in range(classes) for _ in range(rng.randint(5, 40))]
    rng.shuffle(labels)
    shots = rng.randint(1, 2)
    seed = 42 if case < 3 else case
    splits = splits_with_labels(labels, classes)
    drawn = data.mma_draw(splits, shots, seed)
    train, val = recipes.mma_train_val_indices(labels, shots, seed)
    assert [item.source for item in drawn.train] == [f"img/{i}.png" for i in train]
    assert [item.source for item in drawn.val] == [f"img/{i}.png" for i in val]
    assert len(drawn.train) == len(drawn.val) == shots * classes and drawn.test == splits.test


def test_mma_protocol_subsamples_classes_first_then_draws(tmp_path):
    """RunSpec(draw="mma"): clip-mma's subsample_classes (floor(C/2)), then its draw; saved and reused."""
    rng = random.Random(3)
    classes = 7
    labels = [c for c in range(classes) for _ in range(rng.randint(34, 50))]
    rng.shuffle(labels)
    splits = splits_with_labels(labels, classes)
    spec = RunSpec(out=str(tmp_path / "run"), draw="mma", shots=16, seed=42)
    assert spec.base_rounding == "floor"
    base = base_classes(spec, splits)
    kept, mapping = recipes.mma_base_indices(labels)
    train, val = recipes.mma_train_val_indices([mapping[labels[i]] for i in kept], 16, 42)
    assert base.classnames == [f"class {c}" for c in range(3)]
    assert [item.source for item in base.train] == [f"img/{kept[i]}.png" for i in train]
    assert [item.source for item in base.val] == [f"img/{kept[i]}.png" for i in val]
    assert [item.label for item in base.train] == [mapping[labels[kept[i]]] for i in train]
    saved = tmp_path / "run" / "split" / "mma-shot_16-seed_42.json"
    assert saved.is_file() and base_classes(spec, splits).train == base.train  # reused as drawn
    with pytest.raises(ValueError, match="lower --shots"):
        base_classes(dataclasses.replace(spec, shots=40, out=str(tmp_path / "other")), splits)


# -- what a run records --------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_the_record_states_the_recipe(method):
    spec = RunSpec(method=method, seed=2, shots=16, model="ViT-B-16", pretrained="openai", device="cpu")
    config = spec.train_config()
    adapter = wrap(tiny_models.GenericDualEncoder(dim=32), method=method, dim=32, logit_scale=100.0).adapter.config
    record = run_record(spec, config, adapter, setting="base2new", dataset="OxfordPets",
                        prompt_templates=adapter_templates(spec, config, "OxfordPets"),
                        zero_shot_templates=zero_shot_templates(spec, "OxfordPets"), train_images=8 * 16 + 5)
    rada = method in RADA_FAMILY
    assert record["prompt_templates"] == (["a photo of a {}."] if rada else ["a photo of a {}, a type of pet."])
    assert record["zero_shot_templates"] == ["a photo of a {}, a type of pet."]
    expected = ({"kind": "random_resized_crop+flip", "scale": [0.08, 1.0], "interpolation": "bicubic",
                 "views": "per_epoch"} if rada else {"kind": "none", "views": 0})
    assert record["augmentation"] == expected
    assert (record["weight_decay"], record["drop_last"]) == ((5e-4, True) if rada else (1e-4, False))
    assert record["steps_per_epoch"] == (4 if rada else 1)  # 133 images: 4 full batches of 32, or one of 256
    assert record["feature_dtype"] == record["train_dtype"] == "float32"  # on the CPU, always
    assert (record["draw"], record["rounding"], record["setting"]) == ("coop", "ceil", "base2new")
    assert record["adapter"]["method"] == method and record["seed"] == 2
