"""Data layer: loading ImageFolder trees, CoOp split files and torch datasets; the few-shot
protocol; base-to-new splits; the benchmark datasets' templates and class names.

Every dataset here is a few 8x8 PNGs written to ``tmp_path``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rada_mma.fewshot.data import ImageDataset, Item, Splits, few_shot, load_data, subsample_classes
from rada_mma.fewshot.datasets import (
    DATASETS,
    clean_classname,
    clip_imagenet_templates,
    find_dataset,
    imagenet_classnames,
    templates_for,
)
from tests.helpers.protocols import dassl_fewshot

# -- builders ----------------------------------------------------------------------------------


def write_image(path: Path, seed: int, *, size: int = 8, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)


def image_folder(root: Path, classes: dict[str, int], *, splits=("train", "test"), test_per_class: int = 2) -> Path:
    """``root/<split>/<class>/<i>.png``: ``classes[name]`` training images per class."""
    seed = 0
    for split in splits:
        for name, count in classes.items():
            for i in range(count if split == "train" else test_per_class):
                seed += 1
                write_image(root / split / name / f"{i}.png", seed)
    return root


def coop_folder(root: Path, classes: list[str], *, per_class: int = 6, image_dir: str = "images",
                split_name: str = "split_zhou_OxfordPets.json", val: bool = True) -> Path:
    """CoOp's layout: ``root/<image_dir>/<class>_<i>.png`` and ``root/<split_name>``."""
    rows = {"train": [], "val": [], "test": []}
    for label, name in enumerate(classes):
        for i in range(per_class):
            rel = f"{name}_{i}.png"
            write_image(root / image_dir / rel, 100 * label + i)
            split = "train" if i < per_class - 2 else ("val" if i == per_class - 2 and val else "test")
            rows[split].append([rel, label, name])
    (root / split_name).write_text(json.dumps(rows))
    return root


CLASSES = {"cat": 6, "dog": 6, "red_fox": 6}


@pytest.fixture
def folder(tmp_path) -> Path:
    return image_folder(tmp_path / "animals", CLASSES)


# -- templates and class names -----------------------------------------------------------------

COOP_TEMPLATES = {
    "ImageNet": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "OxfordPets": "a photo of a {}, a type of pet.",
    "StanfordCars": "a photo of a {}.",
    "Flowers102": "a photo of a {}, a type of flower.",
    "Food101": "a photo of {}, a type of food.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "SUN397": "a photo of a {}.",
    "DTD": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "UCF101": "a photo of a person doing {}.",
}


@pytest.mark.parametrize("name, template", sorted(COOP_TEMPLATES.items()))
def test_each_benchmark_has_coops_template(name, template):
    assert DATASETS[name].name == name
    assert DATASETS[name].templates == (template,)
    assert templates_for(name) == [template]


def test_the_eleven_benchmarks_and_nothing_else():
    assert sorted(DATASETS) == sorted(COOP_TEMPLATES)


@pytest.mark.parametrize(
    "query, expected",
    [
        ("oxford_pets", "OxfordPets"), ("pets", "OxfordPets"), ("OXFORD-PETS", "OxfordPets"),
        ("split_zhou_OxfordPets.json", "OxfordPets"), ("/data/oxford_pets/", "OxfordPets"),
        ("imagenet", "ImageNet"), ("dtd", "DTD"), ("split_zhou_DescribableTextures.json", "DTD"),
        ("eurosat", "EuroSAT"), ("caltech-101", "Caltech101"), ("flowers", "Flowers102"),
        ("oxford_flowers", "Flowers102"), ("split_zhou_OxfordFlowers.json", "Flowers102"),
        ("food-101", "Food101"), ("fgvc_aircraft", "FGVCAircraft"), ("sun397", "SUN397"),
        ("stanford_cars", "StanfordCars"), ("ucf101", "UCF101"),
    ],
)
def test_find_dataset_knows_names_aliases_folders_and_split_files(query, expected):
    assert find_dataset(query).name == expected


@pytest.mark.parametrize("query", ["cifar10", "", "my_photos", None])
def test_find_dataset_unknown_is_none(query):
    assert find_dataset(query) is None
    assert templates_for(query) == ["a photo of a {}."]


def test_user_templates_win_and_need_a_placeholder():
    assert templates_for("dtd", templates="a sketch of a {}.") == ["a sketch of a {}."]
    assert templates_for(None, templates=["a {}.", "the {}."]) == ["a {}.", "the {}."]
    with pytest.raises(ValueError, match=r"has no '\{\}' for the class name"):
        templates_for("dtd", templates=["a photo of a {}.", "a photo"])
    with pytest.raises(ValueError, match="empty"):
        templates_for(templates=[])


@pytest.mark.parametrize(
    "raw, dataset, cleaned",
    [
        ("AnnualCrop", "EuroSAT", "Annual Crop Land"),
        ("HerbaceousVegetation", "eurosat", "Herbaceous Vegetation Land"),
        ("Highway", "EuroSAT", "Highway or Road"),
        ("Industrial", "EuroSAT", "Industrial Buildings"),
        ("Pasture", "EuroSAT", "Pasture Land"),
        ("PermanentCrop", "EuroSAT", "Permanent Crop Land"),
        ("Residential", "EuroSAT", "Residential Buildings"),
        ("SeaLake", "EuroSAT", "Sea or Lake"),
        ("Forest", "EuroSAT", "Forest"),
        ("River", "EuroSAT", "River"),
        ("airplanes", "Caltech101", "airplane"),
        ("Faces", "caltech-101", "face"),
        ("Leopards", "Caltech101", "leopard"),
        ("Motorbikes", "Caltech101", "motorbike"),
        ("american_bulldog", "OxfordPets", "american bulldog"),
        ("ApplyEyeMakeup", "UCF101", "Apply Eye Makeup"),
        ("Apply_Eye_Makeup", "UCF101", "Apply Eye Makeup"),
        ("SeaLake", None, "SeaLake"),
        ("red_fox", None, "red fox"),
    ],
)
def test_clean_classname(raw, dataset, cleaned):
    assert clean_classname(raw, dataset) == cleaned


def test_caltech_ignores_background_folders():
    assert set(DATASETS["Caltech101"].ignored_folders) == {"BACKGROUND_Google", "Faces_easy"}


def test_imagenet_names_and_clip_templates_come_from_open_clip():
    names, templates = imagenet_classnames(), clip_imagenet_templates()
    assert len(names) == 1000 and names[0] == "tench"
    assert len(templates) == 80 and all("{}" in t for t in templates)


# -- ImageFolder -------------------------------------------------------------------------------


def test_image_folder_loads_sorted_classes(folder):
    splits = load_data(folder)
    assert splits.classnames == ["cat", "dog", "red fox"] and splits.num_classes == 3
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 0, 6)
    assert splits.root == folder and splits.name == "animals"
    first = splits.train[0]
    assert first == Item("train/cat/0.png", 0, "cat")
    assert Counter(i.label for i in splits.train) == {0: 6, 1: 6, 2: 6}
    image = splits.load_image(splits.test[-1])
    assert image.mode == "RGB" and image.size == (8, 8)


def test_image_folder_with_val_and_dataset_fixes(tmp_path):
    root = image_folder(tmp_path / "eurosat", {"AnnualCrop": 3, "SeaLake": 3}, splits=("train", "val", "test"))
    splits = load_data(root)
    assert splits.name == "EuroSAT"
    assert splits.classnames == ["Annual Crop Land", "Sea or Lake"]
    assert len(splits.val) == 4


def test_image_folder_caltech_skips_ignored_folders(tmp_path):
    root = image_folder(tmp_path / "data", {"BACKGROUND_Google": 2, "Faces": 2, "Faces_easy": 2, "airplanes": 2})
    splits = load_data(root, name="caltech101")
    assert splits.classnames == ["face", "airplane"]
    assert {i.source.split("/")[1] for i in splits.train} == {"Faces", "airplanes"}


def test_image_folder_imagenet_layout(tmp_path):
    """train/ and val/ only: val/ is the test split; classnames.txt names WordNet-id folders."""
    root = image_folder(tmp_path / "imagenet", {"n01440764": 2, "n01443537": 2}, splits=("train", "val"))
    (root / "classnames.txt").write_text("n01440764 tench\nn01443537 goldfish\n")
    splits = load_data(root)
    assert splits.name == "ImageNet" and splits.classnames == ["tench", "goldfish"]
    assert splits.val == [] and len(splits.test) == 4 and splits.test[0].source.startswith("val/")


def test_image_folder_errors(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_data(tmp_path / "nowhere")
    (tmp_path / "flat" / "cat").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no train/ folder.*move them into train/"):
        load_data(tmp_path / "flat")
    (folder / "train" / "empty_class").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*train/empty_class has no images"):
        load_data(folder)
    (folder / "train" / "empty_class").rmdir()
    write_image(folder / "test" / "wolf" / "0.png", 7)
    with pytest.raises(ValueError, match="test has class folders that train/ lacks: wolf"):
        load_data(folder)


def test_image_folder_without_test(tmp_path):
    root = image_folder(tmp_path / "d", {"a": 2}, splits=("train",))
    with pytest.raises(FileNotFoundError, match="no test/"):
        load_data(root)


def test_given_classnames_must_match(folder):
    assert load_data(folder, classnames=["A", "B", "C"]).classnames == ["A", "B", "C"]
    with pytest.raises(ValueError, match="classnames has 2 names but .* has 3 classes"):
        load_data(folder, classnames=["A", "B"])


# -- CoOp split files --------------------------------------------------------------------------


def test_coop_split_file_beside_the_image_folder(tmp_path):
    root = coop_folder(tmp_path / "oxford_pets", ["abyssinian", "american_bulldog", "beagle"])
    splits = load_data(root)
    assert splits.name == "OxfordPets"
    assert splits.root == root / "images"
    assert splits.classnames == ["abyssinian", "american bulldog", "beagle"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 3, 3)
    assert splits.train[0] == Item("abyssinian_0.png", 0, "abyssinian")
    assert splits.load_image(splits.val[0]).mode == "RGB"
    # the same, given explicitly, or through the split file itself
    explicit = load_data(root / "images", split_file=root / "split_zhou_OxfordPets.json")
    assert explicit.train == splits.train and explicit.name == "OxfordPets"
    assert load_data(root / "split_zhou_OxfordPets.json").test == splits.test


def test_coop_split_file_finds_the_datasets_image_folder(tmp_path):
    root = coop_folder(tmp_path / "eurosat", ["AnnualCrop", "SeaLake"], image_dir="2750",
                       split_name="split_zhou_EuroSAT.json")
    splits = load_data(root)
    assert splits.root == root / "2750" and splits.classnames == ["Annual Crop Land", "Sea or Lake"]


def _rewrite(path: Path, edit) -> None:
    rows = json.loads(path.read_text())
    edit(rows)
    path.write_text(json.dumps(rows))


def test_split_file_naming_missing_images(tmp_path):
    root = coop_folder(tmp_path / "oxford_pets", ["a", "b"])
    for name in ("a_4.png", "a_5.png", "b_5.png"):
        (root / "images" / name).unlink()
    with pytest.raises(FileNotFoundError, match=r"names 3 images that are not in .*images \(e.g. a_4.png, a_5.png, b_5.png\)"):
        load_data(root)

    elsewhere = tmp_path / "elsewhere"  # a split file away from its images
    elsewhere.mkdir()
    (elsewhere / "split_zhou_OxfordPets.json").write_text((root / "split_zhou_OxfordPets.json").read_text())
    with pytest.raises(FileNotFoundError, match="cannot find the images of .*give the image folder as source"):
        load_data(elsewhere)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r["test"][0].__setitem__(2, "zebra"), r"label 0 is named both 'a' and 'zebra'"),
        (lambda r: r.update(train=[x for x in r["train"] if x[1] != 1]), r"classes 'b' \(labels \[1\]\) appear in val/test"),
        (lambda r: r["train"][0].__setitem__(1, "0"), r"train\[0\] is .* integer label"),
        (lambda r: r.update(extra=[]), "unexpected entries"),
        (lambda r: r.pop("test"), "not a CoOp split file"),
        (lambda r: [x.__setitem__(1, 2) for s in r.values() for x in s if x[1] == 1], r"no item has label\(s\) \[1\]"),
        # once read from wherever they pointed
        (lambda r: r["train"][0].__setitem__(0, "../../outside.png"), r"train\[0\] has path '../../outside.png', which leaves"),
        (lambda r: r["test"][1].__setitem__(0, "/etc/hostname"), r"test\[1\] has path '/etc/hostname', which leaves"),
        (lambda r: r["val"][0].__setitem__(0, "sub/../../x.png"), r"val\[0\] has path .* which leaves the image folder"),
    ],
)
def test_split_file_inconsistencies(tmp_path, edit, message):
    root = coop_folder(tmp_path / "oxford_pets", ["a", "b"])
    _rewrite(root / "split_zhou_OxfordPets.json", edit)
    with pytest.raises(ValueError, match=message):
        load_data(root)


def test_several_split_files_need_a_choice(tmp_path):
    root = coop_folder(tmp_path / "d", ["a", "b"])
    (root / "split_zhou_Other.json").write_text("{}")
    with pytest.raises(ValueError, match="several split files"):
        load_data(root)


def test_fgvc_aircraft_variant_files(tmp_path):
    root = tmp_path / "fgvc_aircraft"
    (root / "images").mkdir(parents=True)
    (root / "variants.txt").write_text("707-320\nA300B4\n")
    for split, ids in {"train": [(1, "707-320"), (2, "A300B4")], "val": [(3, "A300B4")], "test": [(4, "707-320")]}.items():
        (root / f"images_variant_{split}.txt").write_text("".join(f"{i:07d} {v}\n" for i, v in ids))
        for i, _ in ids:
            write_image(root / "images" / f"{i:07d}.jpg", i)
    splits = load_data(root)
    assert splits.name == "FGVCAircraft" and splits.classnames == ["707-320", "A300B4"]
    assert splits.train == [Item("images/0000001.jpg", 0, "707-320"), Item("images/0000002.jpg", 1, "A300B4")]
    assert len(splits.val) == 1 and len(splits.test) == 1


# -- torch datasets ----------------------------------------------------------------------------


class Pictures(torch.utils.data.Dataset):
    """(uint8 HWC array, label) samples and a ``targets`` list, like torchvision's datasets."""

    def __init__(self, labels: list[int], seed: int = 0):
        self.targets = labels
        self.seed = seed

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        pixels = np.random.default_rng(self.seed + i).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        return pixels, self.targets[i]


def test_torch_dataset_sources():
    train, test = Pictures([0, 1, 1, 0, 2, 2]), Pictures([2, 0], seed=50)
    splits = load_data({"train": train, "test": test}, classnames=["cat", "dog", "red_fox"])
    assert splits.classnames == ["cat", "dog", "red fox"]
    assert [i.source for i in splits.test] == [6, 7]  # indices into the concatenation train + test
    assert splits.test[0] == Item(6, 2, "red fox")
    assert np.array_equal(np.asarray(splits.load_image(splits.test[1])), test[1][0])
    alone = load_data(train, classnames=["a", "b", "c"])
    assert len(alone.train) == 6 and alone.test == [] and alone.dataset is train


def test_torch_dataset_errors():
    with pytest.raises(ValueError, match="pass classnames="):
        load_data(Pictures([0, 1]))
    with pytest.raises(ValueError, match="sample 2 has label 5, outside 0..1"):
        load_data(Pictures([0, 1, 5]), classnames=["a", "b"])
    with pytest.raises(ValueError, match=r"classes 'c' \(labels \[2\]\) have no training sample"):
        load_data(Pictures([0, 1]), classnames=["a", "b", "c"])
    with pytest.raises(ValueError, match="train required"):
        load_data({"test": Pictures([0])}, classnames=["a"])


def test_image_dataset_gives_transformed_images_and_labels(tmp_path, folder):
    write_image(folder / "test" / "cat" / "grey.png", 3, mode="L")
    splits = load_data(folder)
    grey = next(i for i in splits.test if i.source.endswith("grey.png"))
    dataset = ImageDataset(splits, [grey, splits.train[7]], lambda im: torch.tensor(np.asarray(im)))
    image, label = dataset[0]
    assert image.shape == (8, 8, 3) and label == 0
    assert len(dataset) == 2 and dataset[1][1] == 1


def test_a_link_loop_in_a_class_folder_is_refused(folder, tmp_path):
    """Once 8 images became 1,288 items, other classes' images among them under this class's label."""
    (folder / "train" / "cat" / "loop").symlink_to(folder / "train", target_is_directory=True)
    with pytest.raises(ValueError, match=r"cat/loop links to .*/train, a folder that contains it: a loop"):
        load_data(folder)
    (folder / "train" / "cat" / "loop").unlink()
    (folder / "train" / "cat" / "self").symlink_to(folder / "train" / "cat", target_is_directory=True)
    with pytest.raises(ValueError, match=r"cat/self links to .*/cat, a folder that contains it"):
        load_data(folder)


def test_linked_folders_are_followed_and_counted_once(folder, tmp_path):
    more = image_folder(tmp_path / "more", {"cat": 2}, splits=("train",)) / "train" / "cat"
    (folder / "train" / "cat" / "more").symlink_to(more, target_is_directory=True)
    (folder / "train" / "cat" / "again").symlink_to(more, target_is_directory=True)
    cats = [i for i in load_data(folder).train if i.classname == "cat"]
    assert len(cats) == CLASSES["cat"] + 2


def test_a_truncated_image_names_its_file(folder):
    """PIL's "image file is truncated" once named no file."""
    splits = load_data(folder)
    path = folder / splits.train[0].source
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is not a readable image \(.*truncated.*\); replace"):
        splits.load_image(splits.train[0])


def test_missing_image_says_so(folder):
    splits = load_data(folder)
    (folder / splits.train[0].source).unlink()
    with pytest.raises(FileNotFoundError, match="is missing"):
        splits.load_image(splits.train[0])


# -- few-shot ----------------------------------------------------------------------------------


def big_splits(classes: int = 4, per_class: int = 10, val_per_class: int = 6) -> Splits:
    """Synthetic splits (no files needed for sampling): class c has per_class train items."""
    def items(prefix, count):
        return [Item(f"{prefix}/{c}/{i}.png", c, f"c{c}") for c in range(classes) for i in range(count)]

    return Splits(name="synthetic", classnames=[f"c{c}" for c in range(classes)], train=items("train", per_class),
                  val=items("val", val_per_class), test=items("test", 3), root=Path("/nowhere"))


@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
def test_few_shot_counts_and_dassl_parity(shots):
    splits = big_splits()
    small = few_shot(splits, shots, seed=1)
    per_class = min(shots, 10)
    assert Counter(i.label for i in small.train) == {c: per_class for c in range(4)}
    assert Counter(i.label for i in small.val) == {c: min(shots, 4) for c in range(4)}
    assert small.test == splits.test and small.classnames == splits.classnames
    state = random.getstate()
    try:
        random.seed(1)  # what Dassl's set_random_seed(1) does before CoOp builds the dataset
        assert small.train == dassl_fewshot(splits.train, shots)
        assert small.val == dassl_fewshot(splits.val, min(shots, 4))
    finally:
        random.setstate(state)


def test_few_shot_is_deterministic_per_seed():
    splits = big_splits()
    assert few_shot(splits, 2, seed=1).train == few_shot(splits, 2, seed=1).train
    draws = {tuple(i.source for i in few_shot(splits, 2, seed=s).train) for s in (1, 2, 3)}
    assert len(draws) == 3


def test_few_shot_all_when_shots_is_zero_and_never_when_negative():
    """``shots=-3`` once meant "all images" too: a sign typo trained on the whole training split."""
    splits = big_splits()
    assert few_shot(splits, 0, seed=1).train == splits.train
    with pytest.raises(ValueError, match=r"shots must be >= 0 \(0 keeps every training image\), got -3"):
        few_shot(splits, -3, seed=1)


def test_few_shot_val_from_unused_training_items(caplog):
    splits = big_splits(per_class=7)
    splits.val = []
    with caplog.at_level(logging.INFO, logger="rada_mma.fewshot.data"):
        small = few_shot(splits, 4, seed=2)
    assert "no validation split" in caplog.text
    assert Counter(i.label for i in small.val) == {c: 3 for c in range(4)}  # 7 - 4 left per class
    assert not set(small.val) & set(small.train)
    assert set(small.val) <= set(splits.train)


def test_few_shot_saves_and_reuses_the_draw(tmp_path, caplog):
    splits = big_splits()
    small = few_shot(splits, 2, seed=3, save_dir=tmp_path)
    saved = tmp_path / "shot_2-seed_3.json"
    record = json.loads(saved.read_text())
    assert record["train"] == [[i.source, i.label] for i in small.train]
    # the file, not the generator, decides: edit it and the edit comes back
    record["train"][0] = [splits.train[9].source, 0]
    saved.write_text(json.dumps(record))
    with caplog.at_level(logging.INFO, logger="rada_mma.fewshot.data"):
        again = few_shot(splits, 2, seed=3, save_dir=tmp_path)
    assert "reusing the few-shot draw" in caplog.text
    assert again.train[0] == splits.train[9] and again.train[1:] == small.train[1:]
    assert again.val == small.val


def test_few_shot_file_naming_vanished_items_is_an_error(tmp_path):
    splits = big_splits()
    drawn = few_shot(splits, 2, seed=1, save_dir=tmp_path)
    fewer = dataclasses.replace(splits, train=[i for i in splits.train if i != drawn.train[0]])
    with pytest.raises(ValueError, match=r"names 1 items that are not in the data .*delete .*shot_2-seed_1.json"):
        few_shot(fewer, 2, seed=1, save_dir=tmp_path)


def test_few_shot_from_files_end_to_end(folder, tmp_path):
    splits = load_data(folder)
    small = few_shot(splits, 3, seed=1, save_dir=tmp_path / "fs")
    assert len(small.train) == 9 and len(small.val) == 9  # val: min(3, 4) from the 3 left per class
    assert few_shot(load_data(folder), 3, seed=1, save_dir=tmp_path / "fs").train == small.train


# -- base-to-new -------------------------------------------------------------------------------


@pytest.mark.parametrize("classes, rounding, base", [(5, "ceil", 3), (5, "floor", 2), (4, "ceil", 2), (4, "floor", 2)])
def test_base_to_new(classes, rounding, base):
    splits = big_splits(classes=classes, per_class=2, val_per_class=1)
    b = subsample_classes(splits, "base", rounding=rounding)
    n = subsample_classes(splits, "new", rounding=rounding)
    assert b.classnames == [f"c{c}" for c in range(base)]
    assert n.classnames == [f"c{c}" for c in range(base, classes)]
    for part, offset in ((b, 0), (n, base)):
        for split in ("train", "val", "test"):
            items = part.split(split)
            assert {i.label for i in items} == set(range(part.num_classes))
            assert all(i.classname == f"c{i.label + offset}" for i in items)
            assert all(i.source.split("/")[1] == str(i.label + offset) for i in items)
    assert len(b.train) + len(n.train) == len(splits.train)
    assert subsample_classes(splits, "all") is splits
    assert base == (math.ceil(classes / 2) if rounding == "ceil" else classes // 2)


def test_base_to_new_arguments():
    splits = big_splits(classes=1, per_class=2)
    with pytest.raises(ValueError, match="'base' half is empty"):
        subsample_classes(splits, "base", rounding="floor")
    with pytest.raises(ValueError, match="subset must be"):
        subsample_classes(splits, "novel")
    with pytest.raises(ValueError, match="rounding must be"):
        subsample_classes(splits, "base", rounding="round")
