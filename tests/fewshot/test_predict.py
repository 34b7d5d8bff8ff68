"""``predict_images``: image files classified with a saved adapter, one line per image in .jsonl or .csv,
an unreadable image reported on its line while the run goes on."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from rada_mma import wrap
from rada_mma.fewshot import RunSpec, load_clip, predict_images, with_adapter_base

NAMES = ["red square", "green square", "blue square"]
CONFIG = {"embed_dim": 32,
          "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
          "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny open_clip on disk (config + weights), adapters saved with and without classes, and an image folder."""
    import open_clip

    root = tmp_path_factory.mktemp("predict")
    config = root / "tiny-predict-clip.json"
    config.write_text(json.dumps(CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    weights = root / "tiny-predict-clip.pt"
    torch.save(open_clip.create_model("tiny-predict-clip").state_dict(), weights)
    spec = RunSpec(model_config=str(config), pretrained=str(weights), device="cpu", progress=False)
    clip, _, tokenizer = load_clip(None, str(weights), str(config), "cpu")
    model = wrap(clip, "mma", base_name="tiny-predict-clip", pretrained=str(weights))
    model.set_classes(NAMES, tokenizer=tokenizer)
    with_classes = model.save_adapter(root / "with-classes.safetensors", include_classes=True)
    without = model.save_adapter(root / "without.safetensors")
    images = root / "images"
    (images / "nested").mkdir(parents=True)
    for i, colour in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        pixels = np.zeros((32, 32, 3), dtype="uint8") + np.array(colour, dtype="uint8")
        Image.fromarray(pixels).save(images / ("nested" if i == 2 else "") / f"{i}.png")
    (images / "1b-broken.png").write_bytes(b"not an image at all")
    return {"spec": spec, "with": with_classes, "without": without, "images": images, "model": model}


def test_one_json_line_per_image_and_a_corrupt_one_reported(setup, tmp_path):
    spec = setup["spec"].replace(adapter=str(setup["with"]))
    summary = predict_images(spec, [setup["images"]], tmp_path / "p.jsonl", k=2)
    assert (summary.images, summary.failed) == (4, 1)
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["path"].split("images/")[1] for r in rows] == ["0.png", "1.png", "1b-broken.png", "nested/2.png"]
    broken = rows[2]
    assert set(broken) == {"path", "error"} and "cannot read the image" in broken["error"]
    good = [r for r in rows if "error" not in r]
    assert all(len(r["classes"]) == 2 and set(r["classes"]) <= set(NAMES) for r in good)
    assert all(r["probabilities"][0] >= r["probabilities"][1] for r in good)
    expected = setup["model"].predict(torch.stack([_tensor(setup, p) for p in ("0.png", "1.png", "nested/2.png")]), k=2)
    assert [r["classes"] for r in good] == expected.names


def _tensor(setup, name):
    _, preprocess, _ = load_clip(None, setup["spec"].pretrained, setup["spec"].model_config, "cpu")
    with Image.open(setup["images"] / name) as image:
        return preprocess(image.convert("RGB"))


def test_csv_and_files_given_one_by_one(setup, tmp_path):
    spec = setup["spec"].replace(adapter=str(setup["with"]))
    files = [setup["images"] / "1b-broken.png", setup["images"] / "0.png"]
    predict_images(spec, files, tmp_path / "p.csv", k=5)  # k above K: all 3 classes
    header, *rows = list(csv.reader((tmp_path / "p.csv").open()))
    assert header == ["path", "class_1", "probability_1", "class_2", "probability_2", "class_3", "probability_3", "error"]
    assert rows[0][0].endswith("1b-broken.png") and rows[0][-1].startswith("cannot read") and rows[0][1] == ""
    assert sorted(rows[1][1:6:2]) == sorted(NAMES) and rows[1][-1] == ""


def test_other_classes_and_what_is_refused(setup, tmp_path):
    with_classes, without = setup["spec"].replace(adapter=str(setup["with"])), setup["spec"].replace(adapter=str(setup["without"]))
    with pytest.raises(ValueError, match="holds no classes .* give classes="):
        predict_images(without, [setup["images"]], tmp_path / "p.jsonl")
    predict_images(without.replace(templates=("a {} shape.",)), [setup["images"]], tmp_path / "p.jsonl",
                   classes=["cat", "dog"])
    assert {c for line in (tmp_path / "p.jsonl").read_text().splitlines()
            for c in json.loads(line).get("classes", [])} <= {"cat", "dog"}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        predict_images(with_classes, [setup["images"]], tmp_path / "p.jsonl")
    with pytest.raises(ValueError, match=".jsonl or .csv"):
        predict_images(with_classes, [setup["images"]], tmp_path / "p.txt")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        predict_images(with_classes, [tmp_path / "nowhere"], tmp_path / "q.jsonl")


def test_the_model_comes_from_the_adapter_file(setup):
    spec = RunSpec(adapter=str(setup["with"]))
    assert with_adapter_base(spec).model == "tiny-predict-clip" and with_adapter_base(spec).pretrained is None
    named = spec.replace(model="ViT-B-16", pretrained="openai")
    assert with_adapter_base(named) == named  # the flags win
    with pytest.raises(ValueError, match="weights of the file tiny-predict-clip.pt.* pretrained=/path/to/tiny-predict-clip.pt"):
        predict_images(with_adapter_base(spec).replace(model=None, model_config=setup["spec"].model_config),
                       [setup["images"]], setup["images"].parent / "x.jsonl")
