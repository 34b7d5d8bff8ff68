"""Few-shot datasets the way CoOp and Dassl build them, from data already on disk.

Three kinds of source, one result (:class:`Splits`: class names and train /
val / test lists of :class:`Item`):

- an ImageFolder root: ``train/``, optional ``val/``, ``test/``, one folder per
  class, the folder name the class name (``_`` read as a space);
- a CoOp dataset folder: ``split_zhou_<Dataset>.json`` (lists of ``[relative
  path, label, class name]``) beside the image folder, e.g.
  ``oxford_pets/split_zhou_OxfordPets.json`` + ``oxford_pets/images``; also
  FGVC-Aircraft's ``images_variant_{train,val,test}.txt`` + ``variants.txt``;
- any torch ``Dataset`` of ``(image, label)`` with the class names.

Nothing is ever downloaded. :func:`few_shot` draws K shots per class with a
seeded sampler as Dassl does and saves the draw so a run repeats exactly;
:func:`subsample_classes` makes CoOp's base-to-new split.

>>> splits = load_data("/data/oxford_pets")                   # finds split_zhou_OxfordPets.json
>>> splits = few_shot(splits, shots=16, seed=1, save_dir=Path("/data/oxford_pets/split_fewshot"))
>>> base = subsample_classes(splits, "base")
>>> loader = DataLoader(ImageDataset(base, base.train, preprocess), batch_size=32, shuffle=True)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import ConcatDataset, Dataset

from ..io import write_json
from .datasets import (
    IMAGENET_VARIANTS,
    DatasetInfo,
    VariantInfo,
    clean_classname,
    find_dataset,
    find_variant,
    imagenet_classnames,
)
from .distributed import is_main

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "Item",
    "Splits",
    "few_shot",
    "image_files",
    "load_data",
    "mma_draw",
    "subsample_classes",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SPLIT_NAMES = ("train", "val", "test")
FEW_SHOT_FORMAT = "rada_mma.few_shot"
_WNID = re.compile(r"n\d{8}")
_DRIVE = re.compile(r"[A-Za-z]:")  # a Windows drive: "C:/data/x.jpg" is not relative


@dataclass(frozen=True)
class Item:
    """One labelled image.

    Args:
        source: a path relative to :attr:`Splits.root` (``"images/Abyssinian_1.jpg"``, always
            with ``/``), or an index into :attr:`Splits.dataset`.
        label: class index into :attr:`Splits.classnames`.
        classname: the (cleaned) class name, for reading; the label is what counts.
    """

    source: str | int
    label: int
    classname: str


@dataclass
class Splits:
    """A labelled dataset cut into train, val and test items.

    Args:
        name: the dataset's name (canonical, e.g. ``"OxfordPets"``, when it is a benchmark dataset).
        classnames: cleaned class names; ``classnames[label]``.
        train: training items.
        val: validation items (empty when the source has none; :func:`few_shot` then draws them
            from the training items).
        test: test items.
        root: the folder that string sources are relative to.
        dataset: what integer sources index: one indexable of ``(image, label)`` samples. For a
            source given as several torch datasets (train / val / test) it is their
            ``ConcatDataset`` in that order, so every item of every split has one integer index.
    """

    name: str
    classnames: list[str]
    train: list[Item]
    val: list[Item]
    test: list[Item]
    root: Path | None = None
    dataset: Any = None

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def split(self, name: str) -> list[Item]:
        """The items of split ``"train"``, ``"val"`` or ``"test"``."""
        if name not in SPLIT_NAMES:
            raise ValueError(f"unknown split {name!r}; choose one of {', '.join(SPLIT_NAMES)}")
        return getattr(self, name)

    def path(self, item: Item) -> Path:
        """The file of an item with a path source."""
        if not isinstance(item.source, str):
            raise TypeError(f"item {item.source!r} is an index into a dataset, not a file")
        if self.root is None:
            raise ValueError(f"item {item.source!r} is a relative path but these splits have no root folder")
        return self.root / item.source

    def load_image(self, item: Item) -> Image.Image:
        """The item's image as an RGB ``PIL.Image``."""
        if isinstance(item.source, str):
            path = self.path(item)
            try:
                with Image.open(path) as image:
                    return image.convert("RGB")
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"image {path} is missing (item {item.source!r} of {self.name}); was the dataset moved or "
                    "deleted? Load the data again from its current folder"
                ) from None
            except (UnidentifiedImageError, OSError, SyntaxError) as err:  # PIL: "image file is truncated", ...
                raise ValueError(
                    f"{path} is not a readable image ({' '.join(str(err).split()) or type(err).__name__}); "
                    "replace or remove the file"
                ) from err
        if self.dataset is None:
            raise ValueError(f"item {item.source!r} is an index but these splits hold no dataset")
        sample = self.dataset[item.source]
        image = sample[0] if isinstance(sample, (tuple, list)) else sample
        return _to_pil(image)

    def __repr__(self) -> str:
        return (
            f"Splits(name={self.name!r}, classes={self.num_classes}, train={len(self.train)}, "
            f"val={len(self.val)}, test={len(self.test)}, root={self.root})"
        )


class ImageDataset(Dataset):
    """``(transform(image), label)`` for a list of items: what a ``DataLoader`` wants.

    Args:
        splits: the splits the items come from (they know how to load them).
        items: e.g. ``splits.train``.
        transform: the model's preprocessing (``None`` gives the PIL image).
    """

    def __init__(self, splits: Splits, items: Sequence[Item], transform: Callable[[Image.Image], Any] | None = None):
        self.splits = splits
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        item = self.items[index]
        image = self.splits.load_image(item)
        return (self.transform(image) if self.transform is not None else image), item.label


# -- loading ---------------------------------------------------------------------------------


def load_data(
    source: str | os.PathLike | Dataset | Mapping[str, Dataset],
    *,
    split_file: str | os.PathLike | None = None,
    classnames: Sequence[str] | None = None,
    name: str | None = None,
) -> Splits:
    """Read a dataset's splits from disk or from torch datasets; nothing is downloaded.

    Args:
        source: one of
            - an ImageFolder root holding ``train/``, ``test/`` and optionally ``val/``,
              one folder per class (only ``train/`` and ``val/``, as ImageNet ships: ``val/``
              becomes the test split); a ``classnames.txt`` of ``folder name`` lines, as CoOp
              ships for ImageNet, names the classes;
            - a CoOp dataset folder holding ``split_zhou_*.json`` and the image folder, or the
              image folder itself with ``split_file=``, or the split file itself;
            - a folder with FGVC-Aircraft's ``images_variant_*.txt`` and ``variants.txt``;
            - a torch ``Dataset`` of ``(image, label)`` (the training split), or a mapping
              ``{"train": ds, "val": ds, "test": ds}`` (``val`` and ``test`` optional).
        split_file: a CoOp split file; its paths are relative to ``source``.
        classnames: class names in label order; required for torch datasets, otherwise they
            replace the names read from the data (used as given, not cleaned).
        name: the dataset's name (``"oxford_pets"``, ``"EuroSAT"``, ...), which selects the class-name
            fixes; detected from the split file or folder name when not given.

    Returns:
        :class:`Splits` with cleaned class names (``_`` read as a space, the dataset's fixes).

    Example:
        >>> splits = load_data("/data/eurosat")       # eurosat/2750 + split_zhou_EuroSAT.json
        >>> splits.classnames[0]
        'Annual Crop Land'
    """
    if classnames is not None:
        if isinstance(classnames, str) or not all(isinstance(c, str) for c in classnames):
            raise TypeError("classnames must be a list of strings, one per label")
        classnames = list(classnames)
    if isinstance(source, Mapping) or _is_dataset(source):
        return _from_datasets(source, classnames=classnames, name=name)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"load_data takes a folder, a split file, a torch Dataset or a mapping of them, got {type(source).__name__}"
        )
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; give the dataset's folder (an ImageFolder root or CoOp's folder)")
    if split_file is not None:
        split_path = Path(split_file).expanduser()
        if not split_path.is_file():
            raise FileNotFoundError(f"split file {split_path} does not exist")
        if not path.is_dir():
            raise NotADirectoryError(f"with split_file=, source must be the image folder; {path} is not a folder")
        return _from_split_file(split_path, path, classnames=classnames, name=name)
    if path.is_file():
        if path.suffix != ".json":
            raise ValueError(f"{path} is a file but not a CoOp split file (.json); give the dataset's folder")
        return _from_split_file(path, None, classnames=classnames, name=name)
    found = sorted(path.glob("split_zhou_*.json"))
    if len(found) > 1:
        raise ValueError(
            f"{path} holds several split files ({', '.join(f.name for f in found)}); choose one with split_file= "
            "and give its image folder as source"
        )
    if found:
        return _from_split_file(found[0], None, classnames=classnames, name=name)
    return _from_folder(path, classnames=classnames, name=name)


def _from_folder(path: Path, *, classnames: list[str] | None, name: str | None) -> Splits:
    """A dataset folder without a CoOp split file: FGVC-Aircraft's lists, CoOp's ImageNet or one of its test-only
    variants, or an ImageFolder root."""
    if (path / "images_variant_train.txt").is_file():
        return _from_fgvc(path, classnames=classnames, name=name)
    if (path / "images" / "train").is_dir():  # CoOp's ImageNet: images/train, images/val and classnames.txt
        return _from_image_folder(path / "images", classnames=classnames, name=name or path.name,
                                  listing=path / "classnames.txt")
    variant = _imagenet_variant(path, name)
    if variant is not None:
        return _from_variant(path, variant, classnames=classnames)
    if (path / "train").is_dir():
        return _from_image_folder(path, classnames=classnames, name=name)
    hint = ""
    if any(child.is_dir() for child in path.iterdir()):
        hint = " If its subfolders are the classes, move them into train/ and test/ subfolders."
    raise FileNotFoundError(
        f"{path} is neither an ImageFolder root (no train/ folder) nor a CoOp dataset folder (no split_zhou_*.json); "
        f"give the folder that holds train/ and test/, or the image folder with split_file=.{hint}"
    )


def _detect(name: str | None, *candidates: Any) -> tuple[DatasetInfo | None, str]:
    """The benchmark dataset (if any) and the name to give the splits."""
    if name is not None:
        info = find_dataset(name)
        return info, info.name if info is not None else name
    for candidate in candidates:
        info = find_dataset(candidate)
        if info is not None:
            logger.info(
                "recognised %r as %s: its prompt template and class-name fixes apply (pass name= to choose)",
                candidate, info.name,
            )
            return info, info.name
    fallback = str(next((c for c in candidates if c), "dataset")).rsplit("/", 1)[-1]
    if fallback.startswith("split_zhou_") and fallback.endswith(".json"):  # a CoOp split file of one's own data
        fallback = fallback[len("split_zhou_") : -len(".json")]
    return None, fallback


def _check_classnames(given: list[str] | None, count: int, where: str) -> list[str] | None:
    if given is not None and len(given) != count:
        raise ValueError(f"classnames has {len(given)} names but {where} has {count} classes; give one name per class")
    return given


def _from_image_folder(root: Path, *, classnames: list[str] | None, name: str | None,
                       listing: Path | None = None) -> Splits:
    info, title = _detect(name, root.name)
    ignored = set(info.ignored_folders) if info is not None else set()
    train_dir = root / "train"
    folders = sorted(
        d.name for d in train_dir.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name not in ignored
    )
    if not folders:
        raise ValueError(f"{train_dir} has no class folders; put each class's training images in train/<class name>/")
    loose = [f.name for f in train_dir.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
    if loose:
        logger.warning("%s holds %d images outside class folders (e.g. %s); they are ignored", train_dir, len(loose), loose[0])
    labels = {folder: label for label, folder in enumerate(folders)}
    names = _check_classnames(classnames, len(folders), str(train_dir)) or _folder_classnames(
        root, folders, info, listing or root / "classnames.txt")

    def scan(split: str) -> list[Item]:
        split_dir = root / split
        present = sorted(
            d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name not in ignored
        )
        unknown = [d for d in present if d not in labels]
        if unknown:
            raise ValueError(
                f"{split_dir} has class folders that train/ lacks: {', '.join(unknown[:5])}"
                f"{' ...' if len(unknown) > 5 else ''}; every class needs training images (add them to train/ or "
                f"remove the folders)"
            )
        missing = [d for d in folders if d not in present]
        if missing and split != "train":
            logger.warning("%s has no folder for %d classes (e.g. %s)", split_dir, len(missing), missing[0])
        items = []
        for folder in present:
            files = image_files(split_dir / folder)
            if not files:
                raise ValueError(
                    f"class folder {split_dir / folder} has no images (looked for {', '.join(IMAGE_EXTENSIONS)}); "
                    "add its images or remove the folder"
                )
            label = labels[folder]
            items += [Item(f.relative_to(root).as_posix(), label, names[label]) for f in files]
        return items

    train = scan("train")
    val = scan("val") if (root / "val").is_dir() else []
    if (root / "test").is_dir():
        test = scan("test")
    elif val:
        logger.info("%s has train/ and val/ but no test/: val/ is the test split (as for ImageNet)", root)
        test, val = val, []
    else:
        raise FileNotFoundError(f"{root} has train/ but no test/ (or val/) folder; add test/<class name>/ folders")
    return Splits(name=title, classnames=names, train=train, val=val, test=test, root=root)


def image_files(folder: Path) -> list[Path]:
    """The image files under ``folder`` (by extension, any depth, hidden folders skipped), sorted. Links to
    folders are followed (datasets are often linked in), but never around a loop: a link back to a folder
    above would list other classes' images under this class."""
    files = []
    seen = set()
    for directory, subdirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(directory)
        if real in seen:  # reached again through another link: its images are listed once
            logger.warning("%s is %s, already listed; its images are counted once", directory, real)
            subdirs[:] = []
            continue
        seen.add(real)
        for d in subdirs:
            target = os.path.realpath(os.path.join(directory, d))
            if real == target or real.startswith(target.rstrip(os.sep) + os.sep):
                raise ValueError(
                    f"{Path(directory) / d} links to {target}, a folder that contains it: a loop that would list "
                    f"images again (and other classes' images under {folder.name}); remove the link"
                )
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        files += [Path(directory) / n for n in sorted(names) if Path(n).suffix.lower() in IMAGE_EXTENSIONS]
    return files


def _read_listing(listing: Path) -> dict[str, str]:
    """CoOp's ``classnames.txt``: ``folder class name`` per line, in file order."""
    table = {}
    for line in listing.read_text().splitlines():
        if line.strip():
            folder, _, classname = line.strip().partition(" ")
            table[folder] = classname.strip() or folder
    return table


def _folder_classnames(root: Path, folders: list[str], info: DatasetInfo | None, listing: Path) -> list[str]:
    if listing.is_file():  # CoOp's ImageNet: "n01440764 tench" per line
        table = _read_listing(listing)
        missing = [f for f in folders if f not in table]
        if missing:
            raise ValueError(
                f"{listing} names no class for folders {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; "
                "add a 'folder class name' line for each, or remove the file"
            )
        return [clean_classname(table[f], info) for f in folders]
    if all(_WNID.fullmatch(f) for f in folders):
        if len(folders) == 1000:
            return imagenet_classnames()  # in the order of the sorted WordNet ids
        logger.warning(
            "the class folders of %s are WordNet ids; put CoOp's classnames.txt ('wnid name' lines) in %s to "
            "prompt with words", root, root
        )
    return [clean_classname(f, info) for f in folders]


def _imagenet_variant(path: Path, name: str | None) -> VariantInfo | None:
    """The ImageNet variant whose CoOp layout ``path`` holds: named (by ``name`` or the folder's name), or found by
    its image folder's distinctive name (``imagenet-a``, ``imagenet-r``, ``imagenetv2-matched-frequency-format-val``)."""
    named = find_variant(name) or find_variant(path.name)
    if named is not None and (path / named.image_dir).is_dir():
        return named
    for info in IMAGENET_VARIANTS.values():
        if info.image_dir != "images" and (path / info.image_dir).is_dir():
            return info
    return None


def _from_variant(root: Path, info: VariantInfo, *, classnames: list[str] | None) -> Splits:
    """A test-only ImageNet variant: ImageNet's classes (or the subset its folders hold) in ImageNet's order.

    As CoOp's dataset classes read them: WordNet-id folders are labelled in sorted order, the class set being the
    folders present (200 for -A and -R); ImageNetV2's folders ``0`` ... ``999`` are ImageNet's labels, named by the
    lines of ``classnames.txt`` in file order.
    """
    image_dir, listing = root / info.image_dir, root / "classnames.txt"
    folders = sorted(d.name for d in image_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise ValueError(f"{image_dir} has no class folders; extract {info.name} there as CoOp's DATASETS.md says")
    imagenet = find_dataset("ImageNet")
    if info.numbered:
        if not all(f.isdigit() for f in folders):
            raise ValueError(f"{image_dir}: {info.name}'s class folders are ImageNet labels 0 ... 999, found {folders[0]!r}")
        raw = list(_read_listing(listing).values()) if listing.is_file() else imagenet_classnames()
        labels = {f: int(f) for f in folders}
        if max(labels.values()) >= len(raw):
            raise ValueError(f"{image_dir} has class folder {max(labels.values())} but {len(raw)} class names are known")
        names = [clean_classname(n, imagenet) for n in raw]
    else:
        if not listing.is_file() and len(folders) != 1000:
            raise FileNotFoundError(
                f"{root} has no classnames.txt to name its {len(folders)} WordNet-id classes; copy ImageNet's "
                f"classnames.txt there, as CoOp's DATASETS.md says (cp $DATA/imagenet/classnames.txt {root}/)"
            )
        labels = {f: label for label, f in enumerate(folders)}
        names = _folder_classnames(root, folders, imagenet, listing)
    names = _check_classnames(classnames, len(names), str(image_dir)) or names
    test = [Item(file.relative_to(root).as_posix(), labels[f], names[labels[f]])
            for f in folders for file in image_files(image_dir / f)]
    if not test:
        raise ValueError(f"{image_dir}'s class folders hold no images")
    logger.info("%s: %d test images of %d classes, a test-only dataset (a target)", info.name, len(test), len(names))
    return Splits(name=info.name, classnames=names, train=[], val=[], test=test, root=root)


def _from_split_file(split_path: Path, image_dir: Path | None, *, classnames: list[str] | None, name: str | None) -> Splits:
    info, title = _detect(name, split_path.name, split_path.parent.name)
    try:
        content = json.loads(split_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{split_path} is not valid JSON ({err}); is it a CoOp split file?") from err
    if not isinstance(content, dict) or "train" not in content or "test" not in content:
        raise ValueError(
            f"{split_path} is not a CoOp split file: expected a JSON object with 'train', 'val' and 'test' lists of "
            "[relative path, label, class name]"
        )
    unknown = sorted(set(content) - set(SPLIT_NAMES))
    if unknown:
        raise ValueError(f"{split_path} has unexpected entries {unknown}; a split file holds only train, val and test")
    rows: dict[str, list[tuple[str, int, str]]] = {}
    for split in SPLIT_NAMES:
        entries = content.get(split) or []
        if not isinstance(entries, list):
            raise ValueError(f"{split_path}: '{split}' must be a list of [relative path, label, class name]")
        checked = []
        for index, entry in enumerate(entries):
            if (
                not isinstance(entry, (list, tuple))
                or len(entry) != 3
                or not isinstance(entry[0], str)
                or isinstance(entry[1], bool)
                or not isinstance(entry[1], int)
                or not isinstance(entry[2], str)
            ):
                raise ValueError(
                    f"{split_path}: {split}[{index}] is {entry!r}; each entry must be [relative path, integer label, "
                    "class name]"
                )
            if not _inside(entry[0]):
                raise ValueError(
                    f"{split_path}: {split}[{index}] has path {entry[0]!r}, which leaves the image folder; paths "
                    "must be relative and stay inside it (no '..', no absolute paths)"
                )
            checked.append((entry[0], entry[1], entry[2]))
        rows[split] = checked
    if not rows["train"] and not rows["test"]:
        raise ValueError(f"{split_path} has no training items")
    raw = _label_names(rows, str(split_path))
    names = _check_classnames(classnames, len(raw), str(split_path)) or [clean_classname(n, info) for n in raw]
    if image_dir is None:
        image_dir = _find_image_dir(split_path, rows["train"] or rows["test"], info)
    missing = [path for split in SPLIT_NAMES for path, _, _ in rows[split] if not (image_dir / path).is_file()]
    if missing:
        raise FileNotFoundError(
            f"split file {split_path} names {len(missing)} images that are not in {image_dir} "
            f"(e.g. {', '.join(missing[:3])}); give the image folder the split's paths are relative to "
            "(source=<image folder>, split_file=...), or restore the missing images"
        )
    splits = {s: [Item(path, label, names[label]) for path, label, _ in rows[s]] for s in SPLIT_NAMES}
    return Splits(name=title, classnames=names, root=image_dir, **splits)


def _inside(relative: str) -> bool:
    """Whether a dataset's relative path stays inside its folder (judged by its text, before any link)."""
    parts = relative.replace("\\", "/").split("/")
    return bool(relative) and not relative.startswith(("/", "\\")) and ".." not in parts and not _DRIVE.match(relative)


def _label_names(rows: Mapping[str, list[tuple[str, int, str]]], where: str) -> list[str]:
    """Class names by label; every label has one name and training items (unless the file lists test items only),
    labels are 0..C-1."""
    table: dict[int, str] = {}
    for split in SPLIT_NAMES:
        for path, label, classname in rows[split]:
            if label < 0:
                raise ValueError(f"{where}: {path} has negative label {label}")
            known = table.setdefault(label, classname)
            if known != classname:
                raise ValueError(
                    f"{where}: label {label} is named both {known!r} and {classname!r} (e.g. at {path}); "
                    "each label must have one class name"
                )
    trained = {label for _, label, _ in rows["train"]}
    untrained = sorted(set(table) - trained)
    if untrained and rows["train"]:  # a split file with test items only is a target: it is never trained on
        raise ValueError(
            f"{where}: classes {', '.join(repr(table[y]) for y in untrained[:5])} (labels {untrained[:5]}) appear in "
            "val/test but have no training items; every class needs training images"
        )
    gaps = sorted(set(range(max(table) + 1)) - set(table))
    if gaps:
        raise ValueError(f"{where}: labels must be 0..{max(table)} without gaps; no item has label(s) {gaps[:10]}")
    return [table[y] for y in range(len(table))]


def _find_image_dir(split_path: Path, train: list[tuple[str, int, str]], info: DatasetInfo | None) -> Path:
    """The folder beside the split file that its paths are relative to."""
    folder = split_path.parent
    candidates = ([info.image_dir] if info is not None else []) + ["images", ""]
    candidates += sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    probe = [path for path, _, _ in train[:: max(1, len(train) // 5)][:5]]
    for candidate in dict.fromkeys(candidates):
        image_dir = folder / candidate if candidate else folder
        if image_dir.is_dir() and all((image_dir / p).is_file() for p in probe):
            return image_dir
    raise FileNotFoundError(
        f"cannot find the images of {split_path}: paths such as {probe[0]!r} are in none of {folder}'s folders; "
        "give the image folder as source with split_file="
    )


def _from_fgvc(root: Path, *, classnames: list[str] | None, name: str | None) -> Splits:
    info, title = _detect(name or "FGVCAircraft")
    variants_file = root / "variants.txt"
    if not variants_file.is_file():
        raise FileNotFoundError(f"{root} has images_variant_train.txt but no variants.txt (the list of class names)")
    raw = [line.strip() for line in variants_file.read_text().splitlines() if line.strip()]
    labels = {variant: label for label, variant in enumerate(raw)}
    names = _check_classnames(classnames, len(raw), str(variants_file)) or [clean_classname(n, info) for n in raw]
    splits: dict[str, list[Item]] = {}
    for split in SPLIT_NAMES:
        listing = root / f"images_variant_{split}.txt"
        items = []
        if listing.is_file():
            for line in listing.read_text().splitlines():
                if not line.strip():
                    continue
                image_id, _, variant = line.strip().partition(" ")
                if variant not in labels:
                    raise ValueError(f"{listing}: variant {variant!r} of image {image_id} is not in {variants_file}")
                if not _inside(f"images/{image_id}.jpg"):
                    raise ValueError(f"{listing}: image id {image_id!r} leaves the images/ folder")
                items.append(Item(f"images/{image_id}.jpg", labels[variant], names[labels[variant]]))
        splits[split] = items
    missing = [item.source for s in SPLIT_NAMES for item in splits[s] if not (root / item.source).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{root} lists {len(missing)} images that do not exist (e.g. {', '.join(map(str, missing[:3]))}); "
            "restore FGVC-Aircraft's images/ folder"
        )
    if not splits["train"] or not splits["test"]:
        raise ValueError(f"{root}: images_variant_train.txt and images_variant_test.txt must list images")
    return Splits(name=title, classnames=names, root=root, **splits)


def _is_dataset(source: Any) -> bool:
    return isinstance(source, Dataset) or (
        not isinstance(source, (str, bytes, os.PathLike)) and hasattr(source, "__getitem__") and hasattr(source, "__len__")
    )


def _from_datasets(source: Any, *, classnames: list[str] | None, name: str | None) -> Splits:
    parts = dict(source) if isinstance(source, Mapping) else {"train": source}
    unknown = sorted(set(parts) - set(SPLIT_NAMES))
    if unknown or "train" not in parts:
        raise ValueError(f"give datasets as {{'train': ds, 'val': ds, 'test': ds}} (train required), got keys {sorted(parts)}")
    if classnames is None:
        raise ValueError("a torch Dataset carries no class names; pass classnames=[...] (classnames[label])")
    if not classnames:
        raise ValueError("classnames is empty; give one name per label")
    info, title = _detect(name, type(parts["train"]).__name__)
    names = [clean_classname(c, info) for c in classnames]
    order = [s for s in SPLIT_NAMES if s in parts]
    splits: dict[str, list[Item]] = {s: [] for s in SPLIT_NAMES}
    offset = 0
    for split in order:
        for index, label in enumerate(_dataset_labels(parts[split])):
            if not 0 <= label < len(names):
                raise ValueError(
                    f"{split} dataset sample {index} has label {label}, outside 0..{len(names) - 1} "
                    f"({len(names)} class names given); pass one class name per label"
                )
            splits[split].append(Item(offset + index, label, names[label]))
        offset += len(parts[split])
    empty = sorted(set(range(len(names))) - {item.label for item in splits["train"]})
    if empty:
        raise ValueError(
            f"classes {', '.join(repr(names[y]) for y in empty[:5])} (labels {empty[:5]}) have no training sample; "
            "remove them from classnames or add training data"
        )
    dataset = parts["train"] if order == ["train"] else ConcatDataset([parts[s] for s in order])
    return Splits(name=title, classnames=names, dataset=dataset, **splits)


def _dataset_labels(dataset: Any) -> list[int]:
    """Labels without loading images where the dataset lists them (``targets``, ``labels``, ``_labels``)."""
    size = len(dataset)
    for attribute in ("targets", "labels", "_labels"):
        values = getattr(dataset, attribute, None)
        if values is not None and not callable(values) and len(values) == size:
            return [int(v) for v in values]
    logger.info("reading the labels of %s by loading its %d samples", type(dataset).__name__, size)
    labels = []
    for index in range(size):
        sample = dataset[index]
        if not isinstance(sample, (tuple, list)) or len(sample) < 2:
            raise ValueError(f"{type(dataset).__name__}[{index}] is not an (image, label) pair")
        labels.append(int(sample[1]))
    return labels


def _to_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        from torchvision.transforms.functional import to_pil_image

        return to_pil_image(image).convert("RGB")
    try:
        return Image.fromarray(image).convert("RGB")
    except (TypeError, AttributeError) as err:
        raise TypeError(
            f"cannot make an image of a {type(image).__name__}; the dataset must give PIL images, uint8 arrays or "
            "tensors (give it no transform: the model's preprocessing is applied later)"
        ) from err


# -- the few-shot protocol ---------------------------------------------------------------------


def few_shot(splits: Splits, shots: int, seed: int, *, save_dir: str | os.PathLike | None = None) -> Splits:
    """K shots per class, drawn as Dassl's ``generate_fewshot_dataset`` draws them.

    Items are grouped by label in order of first appearance; each class gives
    ``random.sample(items, shots)`` (all its items when it has fewer) from a
    ``random.Random(seed)``, so with the same item order the draw equals
    CoOp's after ``random.seed(seed)``. Validation then takes ``min(shots, 4)``
    per class from ``val`` with the same generator; a source without a val split
    gives them from the training items not drawn. The test split is untouched.
    Call it before :func:`subsample_classes`, as CoOp does.

    Args:
        splits: the full data.
        shots: K; ``0`` keeps every item (a negative K is an error).
        seed: the draw's seed (1, 2 and 3 by convention).
        save_dir: keep the draw in ``save_dir/shot_{K}-seed_{seed}.json`` and reuse it when present
            (checked against the data: an error if it names items the data lacks).

    Returns:
        New :class:`Splits` with the drawn train and val items.

    Example:
        >>> small = few_shot(splits, shots=16, seed=1, save_dir=Path("split_fewshot"))
    """
    if isinstance(shots, bool) or not isinstance(shots, int):
        raise TypeError(f"shots must be an integer, got {shots!r}")
    if shots < 0:  # once read as "all": a sign typo silently trained on every image
        raise ValueError(f"shots must be >= 0 (0 keeps every training image), got {shots}")
    if not splits.train:
        raise ValueError(
            f"{splits.name} has no training images (a test-only dataset, such as ImageNet-A): it can only be a "
            "target; evaluate an adapter trained elsewhere on it (rada-mma eval --adapter RUN/adapter.safetensors)"
        )
    if shots == 0:
        logger.info("shots=%d: using all %d training items", shots, len(splits.train))
        return dataclasses.replace(splits, train=list(splits.train), val=list(splits.val), test=list(splits.test))
    path = Path(save_dir) / f"shot_{shots}-seed_{seed}.json" if save_dir is not None else None
    if path is not None and path.is_file():
        train, val = _read_subset(path, splits, shots, seed)
        logger.info("reusing the few-shot draw in %s (%d train, %d val items)", path, len(train), len(val))
        return dataclasses.replace(splits, train=train, val=val, test=list(splits.test))
    rng = random.Random(seed)
    train = _per_class(splits.train, shots, rng)
    val_shots = min(shots, 4)
    if splits.val:
        val = _per_class(splits.val, val_shots, rng)
    else:
        drawn = {id(item) for item in train}
        val = _per_class([item for item in splits.train if id(item) not in drawn], val_shots, rng)
        logger.info(
            "%s has no validation split: drew %d per class from the training items left after the %d shots",
            splits.name, val_shots, shots,
        )
    short = [label for label, count in Counter(item.label for item in train).items() if count < shots]
    if short:
        logger.info("%d classes have fewer than %d training items and keep all of them", len(short), shots)
    if path is not None and is_main():
        _write_subset(path, splits, shots, seed, train, val)
    return dataclasses.replace(splits, train=train, val=val, test=list(splits.test))


def _per_class(items: Iterable[Item], shots: int, rng: random.Random) -> list[Item]:
    groups: dict[int, list[Item]] = {}
    for item in items:
        groups.setdefault(item.label, []).append(item)
    chosen: list[Item] = []
    for group in groups.values():
        chosen += rng.sample(group, shots) if len(group) >= shots else group
    return chosen


def _write_subset(
    path: Path, splits: Splits, shots: int, seed: int, train: list[Item], val: list[Item], *, draw: str = "coop"
) -> None:
    record = {
        "format": FEW_SHOT_FORMAT,
        "draw": draw,
        "dataset": splits.name,
        "num_classes": splits.num_classes,
        "shots": shots,
        "seed": seed,
        "val_from_train": not splits.val,
        "train": [[item.source, item.label] for item in train],
        "val": [[item.source, item.label] for item in val],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)
    logger.info("saved the few-shot draw to %s", path)


def _read_subset(
    path: Path, splits: Splits, shots: int, seed: int, *, draw: str = "coop"
) -> tuple[list[Item], list[Item]]:
    fix = f"delete {path} to draw again"
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); {fix}") from err
    if not isinstance(record, dict) or record.get("format") != FEW_SHOT_FORMAT:
        raise ValueError(f"{path} is not a rada_mma few-shot file; {fix}")
    if record.get("draw", "coop") != draw:
        raise ValueError(f"{path} holds a {record.get('draw')!r} draw, not {draw!r}; {fix}")
    if (record.get("shots"), record.get("seed")) != (shots, seed):
        raise ValueError(f"{path} holds shots={record.get('shots')}, seed={record.get('seed')}, not {shots}, {seed}; {fix}")
    if record.get("num_classes") != splits.num_classes:
        raise ValueError(
            f"{path} was drawn from data with {record.get('num_classes')} classes, this data has {splits.num_classes} "
            f"(draw before subsample_classes, as CoOp does); {fix}"
        )
    known_train = {(item.source, item.label): item for item in splits.train}
    # MMA's draw and a source without a val split take the validation items from the training items
    from_train = draw == "mma" or not splits.val
    known_val = known_train if from_train else {(item.source, item.label): item for item in splits.val}

    def resolve(entries: list, known: dict) -> tuple[list[Item], list]:
        found, missing = [], []
        for entry in entries:
            key = (entry[0], entry[1]) if isinstance(entry, list) and len(entry) == 2 else None
            if key in known:
                found.append(known[key])
            else:
                missing.append(entry)
        return found, missing

    train, missing_train = resolve(record.get("train", []), known_train)
    val, missing_val = resolve(record.get("val", []), known_val)
    missing = missing_train + missing_val
    if missing:
        raise ValueError(
            f"few-shot file {path} names {len(missing)} items that are not in the data (e.g. "
            f"{', '.join(repr(m) for m in missing[:3])}): the data changed since it was drawn. Restore the data, or {fix}"
        )
    return train, val


# -- MMA's draw --------------------------------------------------------------------------------


def mma_draw(splits: Splits, shots: int, seed: int, *, save_dir: str | os.PathLike | None = None) -> Splits:
    """MMA's few-shot draw: ``shots·C`` training and ``shots·C`` validation items from the training items.

    dqmis/clip-mma subsamples the classes first (call :func:`subsample_classes`
    with ``rounding="floor"`` before this) and then splits the training items
    with scikit-learn's ``train_test_split(range(N), stratify=labels,
    train_size=shots·C, test_size=shots·C)`` after ``np.random.seed(42)``. This
    draws the same items in the same order, without scikit-learn, from
    ``numpy.random.RandomState(seed)``, consumed exactly as that call consumes it:

    1. each class's share of ``shots·C`` is its fraction of the items, rounded down;
       the items still missing go to the classes with the largest remainders, ties
       broken by ``rng.choice(tied, k, replace=False)`` (largest remainder first);
       the validation shares likewise, from what each class has left;
    2. class by class, in sorted label order, ``rng.permutation`` of the class's
       items (in data order): its training share first, its validation share next;
    3. ``rng.permutation`` of all training items, then of all validation items.

    So a class gets exactly ``shots`` of each only when the classes are balanced,
    and validation comes from the training pool (the data's own val split is not
    used). The test split is untouched. ``seed=42`` is MMA's own draw.

    Args:
        splits: the base classes' data (already subsampled).
        shots: per class on average; ``shots·C`` items go to each of train and val.
        seed: seed of numpy's ``RandomState`` (MMA: 42).
        save_dir: keep the draw in ``save_dir/mma-shot_{K}-seed_{seed}.json``, reused when present.

    Returns:
        New :class:`Splits` with the drawn train and val items.

    Example:
        >>> base = mma_draw(subsample_classes(load_data("/data/dtd"), "base", rounding="floor"), 16, 42)
    """
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ValueError(f"MMA's draw takes shots >= 1 per class (shots·C items each for train and val), got {shots!r}")
    path = Path(save_dir) / f"mma-shot_{shots}-seed_{seed}.json" if save_dir is not None else None
    if path is not None and path.is_file():
        train, val = _read_subset(path, splits, shots, seed, draw="mma")
        logger.info("reusing MMA's draw in %s (%d train, %d val items)", path, len(train), len(val))
        return dataclasses.replace(splits, train=train, val=val, test=list(splits.test))
    train_index, val_index = _stratified_split(
        [item.label for item in splits.train], shots * splits.num_classes, shots * splits.num_classes, seed
    )
    train = [splits.train[i] for i in train_index]
    val = [splits.train[i] for i in val_index]
    if path is not None and is_main():
        _write_subset(path, splits, shots, seed, train, val, draw="mma")
    return dataclasses.replace(splits, train=train, val=val, test=list(splits.test))


def _stratified_split(labels: Sequence[int], n_train: int, n_val: int, seed: int) -> tuple[list[int], list[int]]:
    """Indices of a stratified train/val split drawn as scikit-learn's ``StratifiedShuffleSplit`` draws one."""
    import numpy as np

    y = np.asarray(labels)
    classes, per_item, counts = np.unique(y, return_inverse=True, return_counts=True)
    if len(y) < n_train + n_val:
        raise ValueError(
            f"MMA's draw needs {n_train} training and {n_val} validation items from the training split, which has "
            f"{len(y)}; lower --shots (the draw takes shots x classes for each)"
        )
    if counts.min() < 2:
        raise ValueError(
            f"MMA's draw stratifies by class and needs 2 training items per class at least; class(es) "
            f"{classes[counts < 2].tolist()} have one"
        )
    members = np.split(np.argsort(per_item, kind="stable"), np.cumsum(counts)[:-1])  # per class, in data order
    rng = np.random.RandomState(seed)
    train_share = _apportion(counts, n_train, rng)
    val_share = _apportion(counts - train_share, n_val, rng)
    train: list[int] = []
    val: list[int] = []
    for index, group in enumerate(members):
        shuffled = group[rng.permutation(counts[index])]
        train.extend(shuffled[: train_share[index]])
        val.extend(shuffled[train_share[index] : train_share[index] + val_share[index]])
    return rng.permutation(train).tolist(), rng.permutation(val).tolist()


def _apportion(counts: Any, draws: int, rng: Any) -> Any:
    """``draws`` split over classes in proportion to ``counts``: floors, then largest remainders (ties drawn)."""
    import numpy as np

    exact = counts / counts.sum() * draws
    share = np.floor(exact)
    missing = int(draws - share.sum())
    remainder = exact - share
    for value in np.unique(remainder)[::-1]:  # largest remainder first
        if missing <= 0:
            break
        (tied,) = np.where(remainder == value)
        take = min(len(tied), missing)
        share[rng.choice(tied, size=take, replace=False)] += 1
        missing -= take
    return share.astype(int)


# -- base-to-new -------------------------------------------------------------------------------


def subsample_classes(splits: Splits, subset: str = "all", *, rounding: str = "ceil") -> Splits:
    """CoOp's base-to-new split: the first half of the sorted labels are base, the rest new.

    Args:
        splits: the data (all three splits are subsampled).
        subset: ``"base"``, ``"new"`` or ``"all"`` (unchanged).
        rounding: ``"ceil"`` (CoOp: ``ceil(C/2)`` base classes) or ``"floor"`` (MMA: ``floor(C/2)``).

    Returns:
        New :class:`Splits` holding only that half, labels renumbered from 0 in sorted order.

    Example:
        >>> subsample_classes(splits, "new").classnames == splits.classnames[math.ceil(splits.num_classes / 2):]
        True
    """
    if subset not in ("all", "base", "new"):
        raise ValueError(f"subset must be 'all', 'base' or 'new', got {subset!r}")
    if rounding not in ("ceil", "floor"):
        raise ValueError(f"rounding must be 'ceil' (CoOp) or 'floor' (MMA), got {rounding!r}")
    if subset == "all":
        return splits
    labels = list(range(splits.num_classes))
    cut = math.ceil(len(labels) / 2) if rounding == "ceil" else len(labels) // 2
    chosen = labels[:cut] if subset == "base" else labels[cut:]
    if not chosen:
        raise ValueError(f"{splits.name} has {splits.num_classes} class(es): its {subset!r} half is empty")
    relabel = {old: new for new, old in enumerate(chosen)}

    def keep(items: list[Item]) -> list[Item]:
        return [dataclasses.replace(item, label=relabel[item.label]) for item in items if item.label in relabel]

    return dataclasses.replace(
        splits,
        classnames=[splits.classnames[y] for y in chosen],
        train=keep(splits.train),
        val=keep(splits.val),
        test=keep(splits.test),
    )

