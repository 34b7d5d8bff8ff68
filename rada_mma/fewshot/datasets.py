"""Prompt templates and class-name fixes of the 11 few-shot benchmark datasets.

The few-shot CLIP literature (CoOp, CoCoOp, MaPLe, MMA, RAda) evaluates on the
same 11 datasets, each with one hand-written prompt template and a few class
names rewritten into words. :data:`DATASETS` holds them under canonical names;
:func:`find_dataset` recognises a dataset from a name, an alias, a folder name
or a CoOp split file name; :func:`templates_for` and :func:`clean_classname`
are what the data loader and the trainer call.

>>> templates_for("oxford_pets")
['a photo of a {}, a type of pet.']
>>> clean_classname("AnnualCrop", "EuroSAT")
'Annual Crop Land'
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from types import MappingProxyType

__all__ = [
    "DATASETS",
    "DEFAULT_TEMPLATE",
    "IMAGENET_VARIANTS",
    "DatasetInfo",
    "VariantInfo",
    "clean_classname",
    "clip_imagenet_templates",
    "find_dataset",
    "find_variant",
    "imagenet_classnames",
    "templates_for",
]

DEFAULT_TEMPLATE = "a photo of a {}."


@dataclass(frozen=True)
class DatasetInfo:
    """What the few-shot literature fixes for one benchmark dataset.

    Args:
        name: canonical name, as CoOp spells its dataset classes (``"OxfordPets"``).
        templates: CoOp's prompt template(s) for the dataset, each with one ``{}``.
        classname_fixes: raw class name (folder name) -> the name CoOp prompts with.
        aliases: other names it goes by, lower case (folder names, torchvision names).
        ignored_folders: class folders that are not classes (Caltech101's background).
        split_file: file name of CoOp's split (``split_zhou_<Name>.json``), if CoOp has one.
        image_dir: the image folder inside CoOp's dataset folder; split paths are relative to it.
        camel_case: class folders are CamelCase words (UCF101's ``ApplyEyeMakeup``) to split.
    """

    name: str
    templates: tuple[str, ...] = (DEFAULT_TEMPLATE,)
    classname_fixes: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    aliases: tuple[str, ...] = ()
    ignored_folders: tuple[str, ...] = ()
    split_file: str | None = None
    image_dir: str = "images"
    camel_case: bool = False


def _info(name: str, **kwargs) -> DatasetInfo:
    fixes = kwargs.pop("classname_fixes", {})
    return DatasetInfo(name=name, classname_fixes=MappingProxyType(dict(fixes)), **kwargs)


# CoOp's templates and class-name rewrites; the split and image folder names are those of
# CoOp's DATASETS.md layout (e.g. oxford_pets/images + oxford_pets/split_zhou_OxfordPets.json).
DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        _info(
            "ImageNet",
            aliases=("imagenet", "imagenet1k", "imagenet-1k", "ilsvrc", "ilsvrc2012"),
            image_dir="images",
        ),
        _info(
            "Caltech101",
            classname_fixes={"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"},
            aliases=("caltech101", "caltech-101", "caltech_101", "caltech"),
            ignored_folders=("BACKGROUND_Google", "Faces_easy"),
            split_file="split_zhou_Caltech101.json",
            image_dir="101_ObjectCategories",
        ),
        _info(
            "OxfordPets",
            templates=("a photo of a {}, a type of pet.",),
            aliases=("oxford_pets", "oxfordpets", "oxford-iiit-pet", "oxfordiiitpet", "pets"),
            split_file="split_zhou_OxfordPets.json",
            image_dir="images",
        ),
        _info(
            "StanfordCars",
            aliases=("stanford_cars", "stanfordcars", "cars"),
            split_file="split_zhou_StanfordCars.json",
            image_dir="",
        ),
        _info(
            "Flowers102",
            templates=("a photo of a {}, a type of flower.",),
            aliases=("oxford_flowers", "oxfordflowers", "oxford_flowers102", "flowers102", "flowers"),
            split_file="split_zhou_OxfordFlowers.json",
            image_dir="jpg",
        ),
        _info(
            "Food101",
            templates=("a photo of {}, a type of food.",),
            aliases=("food101", "food-101", "food_101", "food"),
            split_file="split_zhou_Food101.json",
            image_dir="images",
        ),
        _info(
            "FGVCAircraft",
            templates=("a photo of a {}, a type of aircraft.",),
            aliases=("fgvc_aircraft", "fgvcaircraft", "fgvc-aircraft", "aircraft"),
            image_dir="images",
        ),
        _info(
            "SUN397",
            aliases=("sun397", "sun"),
            split_file="split_zhou_SUN397.json",
            image_dir="SUN397",
        ),
        _info(
            "DTD",
            templates=("{} texture.",),
            aliases=("dtd", "describabletextures", "describable_textures", "textures"),
            split_file="split_zhou_DescribableTextures.json",
            image_dir="images",
        ),
        _info(
            "EuroSAT",
            templates=("a centered satellite photo of {}.",),
            classname_fixes={
                "AnnualCrop": "Annual Crop Land",
                "Forest": "Forest",
                "HerbaceousVegetation": "Herbaceous Vegetation Land",
                "Highway": "Highway or Road",
                "Industrial": "Industrial Buildings",
                "Pasture": "Pasture Land",
                "PermanentCrop": "Permanent Crop Land",
                "Residential": "Residential Buildings",
                "River": "River",
                "SeaLake": "Sea or Lake",
            },
            aliases=("eurosat", "euro_sat"),
            split_file="split_zhou_EuroSAT.json",
            image_dir="2750",
        ),
        _info(
            "UCF101",
            templates=("a photo of a person doing {}.",),
            aliases=("ucf101", "ucf-101", "ucf_101", "ucf"),
            split_file="split_zhou_UCF101.json",
            image_dir="UCF-101-midframes",
            camel_case=True,
        ),
    )
}


@dataclass(frozen=True)
class VariantInfo:
    """A test-only ImageNet variant in CoOp's DATASETS.md layout: ``<folder>/<image_dir>/`` and ``<folder>/classnames.txt``.

    Args:
        name: CoOp's dataset class name (``"ImageNetA"``).
        folder: the dataset folder CoOp names (``"imagenet-adversarial"``).
        image_dir: the image folder inside it, one folder per class (``"imagenet-a"``).
        numbered: the class folders are ImageNet labels ``0`` ... ``999`` (ImageNetV2), not WordNet ids.
        aliases: other names it goes by, lower case.
    """

    name: str
    folder: str
    image_dir: str
    numbered: bool = False
    aliases: tuple[str, ...] = ()


# Domain-generalisation targets: ImageNet's classes (or 200 of them, for -A and -R) in other domains.
# Their prompts are ImageNet's; the class order is ImageNet's (the sorted WordNet ids).
IMAGENET_VARIANTS: dict[str, VariantInfo] = {
    info.name: info
    for info in (
        VariantInfo("ImageNetV2", "imagenetv2", "imagenetv2-matched-frequency-format-val", numbered=True,
                    aliases=("imagenet-v2", "imagenet_v2", "imagenetv2-matched-frequency")),
        VariantInfo("ImageNetSketch", "imagenet-sketch", "images", aliases=("imagenet_sketch",)),
        VariantInfo("ImageNetA", "imagenet-adversarial", "imagenet-a", aliases=("imagenet-a", "imagenet_a")),
        VariantInfo("ImageNetR", "imagenet-rendition", "imagenet-r", aliases=("imagenet-r", "imagenet_r")),
    )
}


def find_variant(name: str | PurePath | None) -> VariantInfo | None:
    """The ImageNet variant that ``name`` (a name, alias or CoOp folder, or a path ending in one) refers to.

    Example:
        >>> find_variant("/data/imagenet-adversarial").name
        'ImageNetA'
    """
    if name is None or not str(name).rstrip("/\\"):
        return None
    key = _key(PurePath(str(name).rstrip("/\\")).name)
    for info in IMAGENET_VARIANTS.values():
        if key in {_key(k) for k in (info.name, info.folder, *info.aliases)}:
            return info
    return None


def _key(name: str) -> str:
    """Lower case, letters and digits only: ``"Oxford_Pets"`` and ``"oxford-pets"`` meet."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _lookup() -> dict[str, DatasetInfo]:
    table: dict[str, DatasetInfo] = {}
    for info in DATASETS.values():
        keys = [info.name, *info.aliases]
        if info.split_file:
            keys.append(info.split_file.removeprefix("split_zhou_").removesuffix(".json"))
        for key in keys:
            table[_key(key)] = info
    return table


def find_dataset(name: str | PurePath | None) -> DatasetInfo | None:
    """The benchmark dataset that ``name`` refers to, or ``None``.

    Matching ignores case, ``_``, ``-`` and spaces, and knows the aliases, the
    last component of a path and CoOp's split file names.

    Args:
        name: ``"OxfordPets"``, ``"oxford_pets"``, ``"pets"``, ``"/data/oxford_pets"``,
            ``"split_zhou_OxfordPets.json"``, ...

    Example:
        >>> find_dataset("split_zhou_DescribableTextures.json").name
        'DTD'
    """
    if name is None:
        return None
    text = str(name).rstrip("/\\")
    if not text:
        return None
    base = PurePath(text).name or text
    for candidate in (base, re.sub(r"^split_zhou_", "", re.sub(r"\.json$", "", base))):
        found = _lookup().get(_key(candidate))
        if found is not None:
            return found
    return None


def _dataset(dataset: str | DatasetInfo | None) -> DatasetInfo | None:
    if dataset is None or isinstance(dataset, DatasetInfo):
        return dataset
    return find_dataset(dataset)


def templates_for(
    dataset: str | DatasetInfo | None = None, templates: str | Sequence[str] | None = None
) -> list[str]:
    """The prompt templates to use: the user's if given, else the dataset's, else ``"a photo of a {}."``.

    Args:
        dataset: a dataset name or alias (unknown names fall back to the default template).
        templates: one template or a list of them, each with a ``{}`` for the class name.

    Returns:
        A non-empty list of templates.

    Example:
        >>> templates_for("dtd")
        ['{} texture.']
        >>> templates_for("dtd", templates="a sketch of a {}.")
        ['a sketch of a {}.']
    """
    if templates is not None:
        chosen = [templates] if isinstance(templates, str) else list(templates)
        if not chosen:
            raise ValueError("templates is an empty list; give at least one template such as 'a photo of a {}.'")
        for template in chosen:
            if not isinstance(template, str):
                raise TypeError(f"templates must be strings with '{{}}', got {type(template).__name__}")
            if "{}" not in template:
                raise ValueError(
                    f"template {template!r} has no '{{}}' for the class name; write it like 'a photo of a {{}}.'"
                )
        return chosen
    info = _dataset(dataset)
    return list(info.templates) if info is not None else [DEFAULT_TEMPLATE]


def clean_classname(name: str, dataset: str | DatasetInfo | None = None) -> str:
    """The class name to prompt with: the dataset's fix if it has one, ``_`` read as a space.

    Args:
        name: a raw class name (usually a folder name).
        dataset: a dataset name or alias whose fixes apply.

    Example:
        >>> clean_classname("Motorbikes", "caltech-101")
        'motorbike'
        >>> clean_classname("ApplyEyeMakeup", "UCF101")
        'Apply Eye Makeup'
    """
    info = _dataset(dataset)
    if info is not None:
        if name in info.classname_fixes:
            return info.classname_fixes[name]
        if info.camel_case and re.fullmatch(r"[A-Za-z0-9]+", name) and re.search(r"[a-z][A-Z]", name):
            name = "_".join(re.findall(r"[A-Z][^A-Z]*", name))  # CoOp's split of UCF101's folder names
    return " ".join(name.replace("_", " ").split())


def imagenet_classnames() -> list[str]:
    """ImageNet's 1000 class names, in the order of the sorted WordNet ids (open_clip's list)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def clip_imagenet_templates() -> list[str]:
    """The 80 templates of CLIP's ImageNet prompt ensemble, as strings with ``{}``."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [template("{}") for template in OPENAI_IMAGENET_TEMPLATES]
