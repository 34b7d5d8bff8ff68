"""The world's data for the other settings (a second task, WorldShapes in held-out styles) and ``rada-mma demo
--setting`` end to end on tiny versions of them. The base-to-new demo and its task are untouched."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rada_mma import cli, demo
from rada_mma.demo import runner, world
from rada_mma.fewshot import data
from rada_mma.fewshot.evaluation import read_results


def test_the_base_to_new_demo_keeps_its_one_task():
    assert list(world.TASKS) == ["WorldShapes"] and cli.build_parser().parse_args(["demo"]).setting == "base2new"


def test_shifts_are_worldshapes_classes_in_held_out_styles():
    source = world.TASKS["WorldShapes"]
    for name, task in world.SHIFTS.items():
        assert set(task.classnames) <= set(source.classnames)
        assert task.classnames == [c for c in source.classnames if c in task.classnames]  # in the source's order
        assert task.counts[:2] == (0, 0)  # test images only, as ImageNet's variants
        if name != "WorldShapes-V2":
            assert task.style not in (world.Style(), source.style)  # neither the pretraining's nor the source's
    assert len(world.SHIFTS["WorldShapes-A"].classes) == len(world.SHIFTS["WorldShapes-R"].classes) == 8
    texture = world.TARGETS["WorldTextures"]
    assert not set(texture.classnames) & set(source.classnames) and texture.classnames[0] == "striped diamond"


def test_a_test_only_task_loads_as_a_target(tmp_path):
    shift = dataclasses.replace(world.SHIFTS["WorldShapes-A"], counts=(0, 0, 2))
    splits = data.load_data(demo.write_task(shift, tmp_path), name=shift.name)
    assert (splits.train, splits.val, len(splits.test)) == ([], [], 16) and splits.classnames == shift.classnames
    with pytest.raises(ValueError, match="no training images"):
        data.few_shot(splits, 2, 1)


@pytest.fixture
def tiny_world(monkeypatch):
    """One tiny source, target and shift; a sweep of 1 and 2 shots."""
    source = dataclasses.replace(world.TASKS["WorldShapes"], counts=(3, 1, 1))
    monkeypatch.setitem(world.TASKS, "WorldShapes", source)
    monkeypatch.setattr(world, "TARGETS", {"WorldTextures": dataclasses.replace(world.TARGETS["WorldTextures"],
                                                                                counts=(0, 0, 1))})
    monkeypatch.setattr(world, "SHIFTS", {"WorldShapes-A": dataclasses.replace(world.SHIFTS["WorldShapes-A"],
                                                                               counts=(0, 0, 2))})
    monkeypatch.setattr(runner, "DEMO_SHOTS", (1, 2))
    torch.set_num_threads(1)


@pytest.mark.parametrize("setting, datasets", [
    ("all", {"WorldShapes"}),
    ("cross-dataset", {"WorldShapes", "WorldTextures"}),
    ("dg", {"WorldShapes", "WorldShapes-A"}),
    ("tta", {"WorldShapes-A"}),
])
def test_demo_settings_end_to_end(tiny_world, tmp_path, capsys, setting, datasets):
    args = cli.build_parser().parse_args(
        ["demo", "--setting", setting, "--out", str(tmp_path), "--seeds", "1", "--methods", "rada", "--shots", "2",
         "--epochs", "1", "--tta-views", "4", "--no-progress"])
    args.func(args)
    printed = capsys.readouterr().out
    rows = read_results(tmp_path)
    assert {r["dataset"] for r in rows} == datasets and {r.get("setting", "base2new") for r in rows} != {"base2new"}
    assert f"setting {setting}" in printed and (tmp_path / "results.png").is_file() and (tmp_path / "world.png").is_file()
    assert "82.16" not in printed  # the published base-to-new averages belong to the base-to-new demo only
    if setting == "tta":
        assert [(r["tta"], r["start"]) for r in rows] == [(False, "zero-shot"), (True, "zero-shot"),
                                                          (False, "few-shot"), (True, "few-shot")]
        assert rows[1]["tta_config"]["augment"] == "crop"  # the shifts stand for ImageNet's variants
