"""The settings beside base-to-new, run for real on a tiny open_clip model and tiny datasets: few-shot on all
classes (its run folder, shot sweeps drawn as Dassl draws), transfer (on the source's own test set it gives the
source run's accuracy; ImageNet-A's classes are its own), and test-time training runs (the adapter file
untouched; predictions independent of the batch size and of the order of the images)."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

import rada_mma
from rada_mma.fewshot import RunSpec, load_data, read_results, read_run_record
from rada_mma.fewshot.settings import adapter_setting, evaluate, run_all_classes, run_shot_sweep, run_transfer
from rada_mma.fewshot.tta import TTAConfig, adapt_dataset, run_tta
from tests.helpers import protocols, runs

CLASSES = ["ant", "bee", "cat", "dog"]
TTA = TTAConfig(views=6, keep=0.5, lr=0.05, augment="crop")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("settings")
    config, weights = runs.write_model(root / "model")
    data = runs.image_folder(root / "toy", CLASSES, {"train": 7, "val": 2, "test": 4})
    spec = RunSpec(data=str(data), model_config=config, pretrained=weights, shots=4, device="cpu", progress=False,
                   train={"epochs": 2}, out=str(root / "run"))
    torch.set_num_threads(1)
    return {"root": root, "spec": spec, "rows": run_all_classes(spec)}


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- all classes ---------------------------------------------------------------------------------


def test_all_classes_writes_the_run_folder(toy):
    out = toy["spec"].out_dir
    assert {"adapter.safetensors", "run.json", "results.json", "results.md", "adapter.png", "training.png",
            "train_config.json", "split"} <= {p.name for p in out.iterdir()}
    zero, rada = read_results(out)
    assert (zero["setting"], zero["method"], zero["shots"], rada["method"], rada["shots"]) == ("all", "zero-shot", 0, "rada", 4)
    assert zero["classes"] == rada["classes"] == 4 and 0 <= rada["accuracy"] <= 100
    record = read_run_record(out)
    assert (record["setting"], record["dataset"], record["method"], record["shots"]) == ("all", "toy", "rada", 4)
    assert record["epochs"] == 2 and record["lr"] == 1e-3  # the preset, with the override
    assert record["prompt_templates"] == ["a photo of a {}."] and record["adapter"]["method"] == "rada"
    assert {"rada_mma_version", "torch_version", "steps_per_epoch", "augmentation"} <= set(record)
    drawn = json.loads((out / "split" / "shot_4-seed_1.json").read_text())
    assert len(drawn["train"]) == 4 * len(CLASSES)  # every class trains
    assert (out / "results.md").read_text().startswith("| dataset | method | 0-shot | 4-shot |")


def test_eval_runs_the_adapters_setting(toy, tmp_path):
    spec = toy["spec"]
    assert adapter_setting(spec) == "all"  # its own folder: the fit's setting
    record = (spec.out_dir / "run.json").read_text()
    assert evaluate(spec) == toy["rows"]
    assert (spec.out_dir / "run.json").read_text() == record  # re-evaluating keeps the training record
    elsewhere = spec.replace(out=str(tmp_path / "x"), adapter=str(spec.out_dir / "adapter.safetensors"))
    assert adapter_setting(elsewhere) == "transfer"
    base2new = tmp_path / "b2n"
    base2new.mkdir()
    shutil.copy(spec.out_dir / "adapter.safetensors", base2new)  # no run.json: an adapter of an older version
    assert adapter_setting(spec.replace(out=str(base2new))) == "base2new"


# -- transfer ----------------------------------------------------------------------------------------


def test_transfer_on_the_source_gives_the_source_runs_accuracy(toy, tmp_path):
    spec = toy["spec"]
    adapter = spec.out_dir / "adapter.safetensors"
    before = sha256(adapter)
    rows = run_transfer(spec.replace(out=str(tmp_path / "t"), adapter=str(adapter)))  # its own cache: encoded again
    assert [(r["setting"], r["source"], r["dataset"]) for r in rows] == [("transfer", "toy", "toy")] * 2
    assert [r["accuracy"] for r in rows] == [r["accuracy"] for r in toy["rows"]]
    assert sha256(adapter) == before
    assert read_run_record(tmp_path / "t")["adapter_run"]["setting"] == "all"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    shutil.copy(adapter, foreign)
    with pytest.raises(ValueError, match="give source=NAME"):
        run_transfer(spec.replace(out=str(tmp_path / "u"), adapter=str(foreign / "adapter.safetensors")))
    assert run_transfer(spec.replace(out=str(tmp_path / "u"), adapter=str(foreign / "adapter.safetensors")),
                        source="elsewhere", setting="dg")[1]["source"] == "elsewhere"


def test_imagenet_variant_is_scored_among_its_own_classes(toy, tmp_path, monkeypatch):
    """A 5-class "ImageNet" in CoOp's layout and a 3-class "ImageNet-A": the adapter scores A among its 3 classes,
    named from classnames.txt, in ImageNet's (sorted WordNet id) order."""
    names = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark",
             "n01491361": "tiger shark", "n01494475": "hammerhead"}
    imagenet = runs.imagenet_layout(tmp_path / "imagenet", names, {"train": 3, "val": 2})
    adversarial = runs.variant_layout(tmp_path / "imagenet-adversarial", "imagenet-a",
                                      {"n01494475": 4, "n01443537": 1, "n01491361": 3}, names, count=3)
    target = load_data(adversarial)
    assert (target.name, target.classnames) == ("ImageNetA", ["goldfish", "tiger shark", "hammerhead"])
    assert (target.train, target.val, len(target.test)) == ([], [], 9)
    assert load_data(imagenet).classnames == [names[w] for w in sorted(names)]
    source = toy["spec"].replace(data=str(imagenet), out=str(tmp_path / "in"), shots=2)
    run_all_classes(source)
    shapes = []
    original = rada_mma.AdaptedCLIP.logits_from_features

    def spy(self, *args, **kwargs):
        logits = original(self, *args, **kwargs)
        shapes.append(tuple(logits.shape))
        return logits

    monkeypatch.setattr(rada_mma.AdaptedCLIP, "logits_from_features", spy)
    rows = run_transfer(source.replace(data=str(adversarial), out=str(tmp_path / "a"),
                                       adapter=str(tmp_path / "in" / "adapter.safetensors")))
    assert shapes and {s[1] for s in shapes} == {3}
    assert [(r["source"], r["dataset"], r["classes"]) for r in rows] == [("ImageNet", "ImageNetA", 3)] * 2
    with pytest.raises(ValueError, match="ImageNetA has no training images"):
        run_all_classes(source.replace(data=str(adversarial), out=str(tmp_path / "b")))


# -- shot sweeps ---------------------------------------------------------------------------------------


def test_shot_sweep_draws_each_k_as_dassl_does(toy, tmp_path):
    spec = toy["spec"].replace(train={"epochs": 1})
    rows = run_shot_sweep(spec, [(spec.data, None)], shots=(1, 3), methods=["rada"], seeds=[2], out=tmp_path)
    assert [(r["method"], r["shots"]) for r in rows] == [("zero-shot", 0), ("rada", 1), ("rada", 3)]
    splits = load_data(spec.data)
    drawn = {}
    for k in (1, 3):
        saved = json.loads((tmp_path / "toy" / f"rada-{k}shot-seed2" / "split" / f"shot_{k}-seed_2.json").read_text())
        drawn[k] = [tuple(x) for x in saved["train"]]
        assert drawn[k] == [(i.source, i.label) for i in protocols.dassl_draw(splits.train, k, seed=2)]
    first_of_three = [drawn[3][3 * c] for c in range(len(CLASSES))]
    assert drawn[1] != first_of_three  # each K is its own draw: the 1-shot draw is no prefix of a larger one
    table = (tmp_path / "results.md").read_text()
    assert table.startswith("| dataset | method | 0-shot | 1-shot | 3-shot |")
    assert (tmp_path / "results.png").read_bytes().startswith(b"\x89PNG")


# -- test-time training runs ---------------------------------------------------------------------------


def test_tta_run_leaves_the_adapter_file_and_writes_its_folder(toy, tmp_path):
    spec = toy["spec"]
    adapter = spec.out_dir / "adapter.safetensors"
    before = sha256(adapter)
    rows = run_tta(spec.replace(out=str(tmp_path / "t"), adapter=str(adapter)), TTA)
    assert sha256(adapter) == before
    assert [(r["method"], r["tta"], r["start"]) for r in rows] == [
        ("zero-shot", False, "zero-shot"), ("rada", False, "few-shot"), ("rada", True, "few-shot")]
    assert rows[1]["accuracy"] == toy["rows"][1]["accuracy"]  # the adapter without TTA: the fit's accuracy
    assert rows[2]["seconds_per_image"] > 0 and rows[2]["tta_config"]["views"] == 6 and rows[2]["source"] == "toy"
    assert {"results.json", "results.md", "run.json", "tta.png"} <= {p.name for p in (tmp_path / "t").iterdir()}
    assert read_run_record(tmp_path / "t")["tta"]["augment"] == "crop"
    untrained = run_tta(spec.replace(out=str(tmp_path / "z")), TTA)
    assert [(r["method"], r["tta"], r["start"]) for r in untrained] == [("zero-shot", False, "zero-shot"),
                                                                        ("rada", True, "zero-shot")]


def test_tta_predictions_do_not_depend_on_batch_size_or_order(toy, tmp_path):
    """The same test images listed in reverse (a CoOp split file), encoded 3 or 64 at a time: every image is
    predicted the same."""
    spec = toy["spec"].replace(adapter=str(toy["spec"].out_dir / "adapter.safetensors"))
    splits = load_data(spec.data)
    coop = tmp_path / "reversed"
    coop.mkdir()
    (coop / "images").symlink_to(splits.root)
    listing = {part: [[i.source, i.label, i.classname] for i in items]
               for part, items in (("train", splits.train), ("test", splits.test[::-1]))}
    (coop / "split_zhou_toy.json").write_text(json.dumps(listing))
    outcomes = [adapt_dataset(spec.replace(data=str(data), out=str(tmp_path / f"o{n}"), extract_batch_size=n), TTA)
                for data, n in ((spec.data, 64), (spec.data, 3), (coop, 5))]
    predictions = [{i.source: int(p) for i, p in zip(o.items, o.after.argmax(-1), strict=True)} for o in outcomes]
    assert predictions[0] == predictions[1] == predictions[2]
    assert outcomes[2].items[0] == outcomes[0].items[-1]


def test_imagenet_variants_load_as_coops_classes_read_them(tmp_path):
    listing = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark"}
    v2 = runs.variant_layout(tmp_path / "imagenetv2", "imagenetv2-matched-frequency-format-val", {"0": 0, "2": 2},
                             listing, count=2)
    splits = load_data(v2)
    assert splits.name == "ImageNetV2" and splits.classnames == ["tench", "goldfish", "great white shark"]
    assert sorted({i.label for i in splits.test}) == [0, 2]  # the folder is the label, the class set all 1000 (3)
    sketch = runs.variant_layout(tmp_path / "imagenet-sketch", "images", {w: i for i, w in enumerate(listing)},
                                 listing, count=1)
    assert load_data(sketch).name == "ImageNetSketch"
    (tmp_path / "imagenet-r" / "imagenet-r" / "n01443537").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="copy ImageNet's classnames.txt there"):
        load_data(tmp_path / "imagenet-r")
