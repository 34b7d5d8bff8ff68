"""The trainer on cached features: presets, learning-rate schedule, determinism, early
stopping and best-validation selection, resumable atomic checkpoints, input checks.

Features are synthetic (class prototypes plus noise) and the model is a generic dual
encoder that is never called: fit() only ever sees embeddings. Each fit takes milliseconds.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import rada_mma.fewshot.train as train
from rada_mma import METHODS, wrap
from rada_mma.fewshot.train import CHECKPOINT, PRESETS, TrainConfig, fit, learning_rate, preset
from tests.helpers import tiny_models

K, D = 4, 16


def make_split(per_class: int, seed: int, *, noise: float = 0.4) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw image features near their class's text feature: zero-shot CLIP gets most of them right."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(K).repeat_interleave(per_class)
    return TEXT[labels] + noise * torch.randn(len(labels), D, generator=g), labels


TEXT = torch.randn(K, D, generator=torch.Generator().manual_seed(0))
TRAIN = make_split(6, seed=1)  # 24 images
VAL = make_split(3, seed=2)  # 12 images


def make_model(method: str = "rada", seed: int = 0):
    model = wrap(tiny_models.GenericDualEncoder(dim=D), method=method, dim=D, logit_scale=100.0,
                 generator=torch.Generator().manual_seed(seed))
    return model.set_classes(text_features=TEXT)


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.adapter.state_dict().items()}


def assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def small(method: str, **overrides) -> TrainConfig:
    """The method's preset at test size: few epochs, small batches, several steps per epoch."""
    defaults = dict(epochs=4, batch_size=8, lr=1e-2)
    return preset(method, **{**defaults, **overrides})


def run(method: str = "rada", config: TrainConfig | None = None, *, val: bool = True, **kwargs):
    model = make_model(method)
    config = config or small(method)
    kwargs.setdefault("progress", False)
    result = fit(model, *TRAIN, config=config, val_features=VAL[0] if val else None,
                 val_labels=VAL[1] if val else None, **kwargs)
    return model, result


# -- presets -----------------------------------------------------------------------------------


def test_presets_are_the_released_setups():
    rada = preset("rada")
    assert (rada.epochs, rada.batch_size, rada.optimizer, rada.schedule, rada.warmup_epochs) == (5, 32, "adam", "cosine", 1)
    assert (rada.patience, rada.select) == (0, "last")
    mma = preset("mma")
    assert (mma.optimizer, mma.lr, mma.weight_decay, mma.batch_size, mma.epochs) == ("adam", 5e-3, 1e-4, 256, 200)
    assert (mma.patience, mma.select, mma.schedule, mma.warmup_epochs) == (20, "best_val", "constant", 0)
    assert set(PRESETS) == set(METHODS)
    for method in METHODS:
        family = "mma" if method in ("mma", "mma-master") else "rada"
        assert preset(method) == preset(family), method


def test_every_knob_can_be_overridden():
    changes = dict(epochs=7, batch_size=3, lr=0.5, optimizer="sgd", weight_decay=0.1, momentum=0.5,
                   schedule="constant", warmup_epochs=2, warmup_lr=1e-3, patience=4, select="best_val",
                   seed=9, amp=True, drop_last=False, views=3, crop_scale=0.5, interpolation="bilinear",
                   prompt="dataset", extract_amp=True)
    assert set(changes) == {f.name for f in dataclasses.fields(TrainConfig)}  # every field is a knob
    config = preset("rada", **changes)
    assert dataclasses.asdict(config) == changes
    assert preset("rada").epochs == 5 and PRESETS["rada"].epochs == 5  # the presets themselves are unchanged
    assert preset("mma", lr=1e-3) == dataclasses.replace(preset("mma"), lr=1e-3)


def test_preset_errors():
    with pytest.raises(TypeError, match=r"unknown training option\(s\) \['epoch', 'learning_rate'\]"):
        preset("rada", epoch=3, learning_rate=0.1)
    with pytest.raises(ValueError, match="unknown method 'clip-adapter'; choose one of rada, "):
        preset("clip-adapter")
    for bad, match in [(dict(epochs=0), "epochs must be >= 1"), (dict(batch_size=0), "batch_size must be >= 1"),
                       (dict(lr=0.0), "lr must be > 0"), (dict(optimizer="rmsprop"), "optimizer must be"),
                       (dict(schedule="step"), "schedule must be"), (dict(select="test"), "select must be"),
                       (dict(patience=-1), "patience must be >= 0")]:
        with pytest.raises(ValueError, match=match):
            preset("mma", **bad)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("bad, error, match", [
    (dict(lr=NAN), ValueError, "lr must be a finite number, got nan"),
    (dict(lr=INF), ValueError, "lr must be a finite number, got inf"),
    (dict(weight_decay=NAN), ValueError, "weight_decay must be a finite number"),
    (dict(warmup_lr=-1e-5), ValueError, "warmup_lr must be >= 0"),
    (dict(momentum=-0.9), ValueError, "momentum must be >= 0"),
    (dict(epochs=2.5), TypeError, r"epochs must be an integer, got 2.5"),
    (dict(batch_size=True), TypeError, r"batch_size must be an integer, got True \(bool\)"),
    (dict(lr="1e-3"), TypeError, r"lr must be a number, got '1e-3'"),
    (dict(amp="yes"), TypeError, r"amp must be True or False"),
    (dict(seed=2**70), ValueError, r"seed must lie in \[0, 2\*\*63\)"),
    (dict(seed=-1), ValueError, r"seed must lie in"),
])
def test_every_training_option_is_checked(bad, error, match):
    """Once NaN passed ``lr <= 0`` and a string met a comparison ("'<=' not supported")."""
    with pytest.raises(error, match=match):
        preset("rada", **bad)


def test_training_stops_at_the_first_non_finite_loss(tmp_path):
    """Once the run ended "successfully" with NaN weights and a 50% accuracy."""
    config = small("mma", lr=1e30, epochs=3, patience=0)
    with pytest.raises(train.TrainingDiverged, match=r"the loss is nan at epoch 1 of 3, step 2 of 3 \(lr 1e\+30\)\. "
                                                     r"No adapter is written\. Likely causes: a learning rate too high"):
        run("mma", config, out_dir=tmp_path / "run")
    assert not (tmp_path / "run" / CHECKPOINT).exists()  # nothing of the diverged epoch is kept
    # RAda's first epoch is its warm-up at 1e-5: the loss overflows in the second
    with pytest.raises(train.TrainingDiverged, match=r"epoch 2 of 3, step \d of 3 .* keeps the last finite epoch"):
        run("rada", small("rada", lr=1e30, epochs=3), out_dir=tmp_path / "rada")


# -- learning rate -----------------------------------------------------------------------------


def test_learning_rate_is_dassls_warmup_then_cosine():
    """A constant warm-up epoch at warmup_lr, then CosineAnnealingLR(T_max=epochs) counted from the warm-up's end."""
    config = preset("rada", lr=0.1)
    lrs = [learning_rate(config, e) for e in range(config.epochs)]
    assert lrs[0] == config.warmup_lr == 1e-5
    # torch's own cosine scheduler, stepped once per epoch after the warm-up
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    expected = []
    for _ in range(config.epochs - 1):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        cosine.step()
    assert lrs[1:] == pytest.approx(expected, rel=1e-12)
    assert lrs[1:] == pytest.approx([0.1, 0.1 * (1 + math.cos(math.pi / 5)) / 2, 0.1 * (1 + math.cos(2 * math.pi / 5)) / 2,
                                     0.1 * (1 + math.cos(3 * math.pi / 5)) / 2])
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:], strict=False))  # decreasing after the warm-up
    mma = preset("mma")
    assert {learning_rate(mma, e) for e in range(mma.epochs)} == {5e-3}  # constant, no warm-up
    two = preset("rada", warmup_epochs=2, warmup_lr=1e-4, lr=1.0)
    assert [learning_rate(two, e) for e in range(3)] == [1e-4, 1e-4, 1.0]


def test_fit_steps_with_the_scheduled_learning_rate():
    seen: list[float] = []

    def record(optimizer, args, kwargs):
        seen.append(optimizer.param_groups[0]["lr"])

    config = small("rada", epochs=5, warmup_epochs=1, lr=0.01)
    handle = register_optimizer_step_pre_hook(record)
    try:
        _, result = run("rada", config, val=False)
    finally:
        handle.remove()
    steps = math.ceil(len(TRAIN[1]) / config.batch_size)
    expected = [learning_rate(config, e) for e in range(config.epochs)]
    assert seen == [lr for lr in expected for _ in range(steps)]
    assert [h["lr"] for h in result.history] == expected


# -- determinism -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["rada", "mma"])
def test_same_seed_same_weights(method):
    first, r1 = run(method)
    second, r2 = run(method)
    assert_same_params(params(first), params(second))
    assert r1.history == r2.history
    third, _ = run(method, small(method, seed=2))  # another batch order
    assert any(not torch.equal(a, b) for a, b in zip(params(first).values(), params(third).values(), strict=True))
    start = params(make_model(method))
    assert any(not torch.equal(start[k], v) for k, v in params(first).items())  # it trained


def test_amp_flag_changes_nothing_on_the_cpu():
    a, _ = run("rada", small("rada", amp=True))
    b, _ = run("rada", small("rada", amp=False))
    assert_same_params(params(a), params(b))


# -- model selection: validation only ----------------------------------------------------------


def scripted_val(monkeypatch, accuracies: list[float]) -> list[dict[str, torch.Tensor]]:
    """Make fit() see these validation accuracies, one per epoch; returns the weights at each evaluation."""
    seen: list[dict[str, torch.Tensor]] = []

    def accuracy(model, features, labels, **kwargs):
        assert torch.equal(features, VAL[0]) and torch.equal(labels, VAL[1])  # only ever the val split
        seen.append(params(model))
        return accuracies[len(seen) - 1]

    monkeypatch.setattr(train, "accuracy", accuracy)
    return seen


def test_early_stopping_restores_the_best_validation_epoch(monkeypatch):
    seen = scripted_val(monkeypatch, [40.0, 60.0, 80.0, 70.0, 80.0, 75.0, 90.0, 99.0])
    model, result = run("mma", small("mma", epochs=8, patience=3))
    # 80 at epoch 2; a tie (80 at epoch 4) is no improvement; three epochs without one stop after epoch 5
    assert result.stopped_early and len(result.history) == 6
    assert (result.best_epoch, result.best_val) == (2, 80.0)
    assert [h["val_acc"] for h in result.history] == [40.0, 60.0, 80.0, 70.0, 80.0, 75.0]
    assert_same_params(params(model), seen[2])  # the weights evaluated at epoch 2, not the last ones
    assert any(not torch.equal(seen[2][k], v) for k, v in seen[5].items())
    # ... which are the weights of a run that stops after epoch 2
    monkeypatch.undo()
    short, _ = run("mma", small("mma", epochs=3, patience=0, select="last"))
    assert_same_params(params(model), params(short))


def test_select_last_keeps_the_last_epoch(monkeypatch):
    seen = scripted_val(monkeypatch, [90.0, 10.0, 20.0, 30.0])
    model, result = run("mma", small("mma", epochs=4, patience=0, select="last"))
    assert not result.stopped_early and result.best_epoch == 3 and result.best_val == 90.0
    assert_same_params(params(model), seen[-1])


def test_best_validation_epoch_without_scripting():
    """Training labels shifted by one class: zero-shot's 100% on val falls as training proceeds."""
    model = make_model("rada")
    config = small("rada", epochs=6, select="best_val", warmup_epochs=0)
    result = fit(model, TRAIN[0], (TRAIN[1] + 1) % K, config=config, val_features=VAL[0], val_labels=VAL[1],
                 progress=False)
    accs = [h["val_acc"] for h in result.history]
    assert accs[result.best_epoch] == max(accs) and accs[-1] < max(accs)
    assert train.accuracy(model, *VAL) == result.best_val


def test_fit_has_no_test_split():
    parameters = inspect.signature(fit).parameters
    assert not [name for name in parameters if "test" in name]
    with pytest.raises(ValueError, match="config uses the validation split .* but none was given"):
        run("mma", val=False)


# -- checkpoints -------------------------------------------------------------------------------


class Interrupt:
    """Raise KeyboardInterrupt in the middle of epoch ``epoch`` (at its second batch)."""

    def __init__(self, model, config: TrainConfig, epoch: int):
        self.steps_per_epoch = math.ceil(len(TRAIN[1]) / config.batch_size)
        self.at = epoch * self.steps_per_epoch + 1
        self.calls = 0
        self.forward = model.logits_from_features
        model.logits_from_features = self

    def __call__(self, features, *args, **kwargs):
        if torch.is_grad_enabled():  # a training step, not a validation pass
            if self.calls == self.at:
                raise KeyboardInterrupt
            self.calls += 1
        return self.forward(features, *args, **kwargs)


@pytest.mark.parametrize("method", ["rada", "mma"])
def test_interrupted_run_resumes_to_the_same_weights(method, tmp_path):
    # RAda: the warm-up and cosine schedule continue; MMA: validation is flat at 100%, so with patience 3
    # the run stops after epoch 3, and only if the resumed run remembers epoch 1 was already no better
    config = small("rada", epochs=5) if method == "rada" else small("mma", epochs=6, patience=3)
    whole, expected = run(method, config)
    assert len(expected.history) == (5 if method == "rada" else 4)

    model = make_model(method)
    stop_at = len(expected.history) - 2
    Interrupt(model, config, epoch=stop_at)
    with pytest.raises(KeyboardInterrupt):
        fit(model, *TRAIN, config=config, val_features=VAL[0], val_labels=VAL[1], out_dir=tmp_path, progress=False)
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["epoch"] == stop_at - 1  # the epochs before are kept

    again = make_model(method)  # a new process: fresh weights, then the checkpoint's
    counter = Interrupt(again, config, epoch=99)
    result = fit(again, *TRAIN, config=config, val_features=VAL[0], val_labels=VAL[1], out_dir=tmp_path,
                 progress=False)
    assert counter.calls == 2 * counter.steps_per_epoch  # only the interrupted epoch and the next ran
    assert_same_params(params(again), params(whole))
    assert result == expected

    finished = make_model(method)  # a finished run resumes to its end without training
    counter = Interrupt(finished, config, epoch=99)
    fit(finished, *TRAIN, config=config, val_features=VAL[0], val_labels=VAL[1], out_dir=tmp_path, progress=False)
    assert counter.calls == 0
    assert_same_params(params(finished), params(whole))


def test_checkpoint_of_another_run_is_refused(tmp_path):
    run("rada", small("rada", epochs=2), out_dir=tmp_path)
    for config, kwargs in [(small("rada", epochs=3), {}), (small("rada", epochs=2, lr=0.5), {}),
                           (small("rada", epochs=2), {"data_fingerprint": "other data"})]:
        with pytest.raises(ValueError, match="belongs to another run .* delete the checkpoint to start over"):
            run("rada", config, out_dir=tmp_path, **kwargs)
    with pytest.raises(ValueError, match="belongs to another run"):
        run("mma", small("mma", epochs=2), out_dir=tmp_path)
    model, _ = run("rada", small("rada", epochs=3), out_dir=tmp_path, resume=False)  # starts over
    fresh, _ = run("rada", small("rada", epochs=3))
    assert_same_params(params(model), params(fresh))
    (tmp_path / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a readable checkpoint"):
        run("rada", small("rada", epochs=3), out_dir=tmp_path)


def test_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    config = small("rada", epochs=3)
    run("rada", config, out_dir=tmp_path / "done")
    assert sorted(p.name for p in (tmp_path / "done").iterdir()) == [CHECKPOINT]  # no temporary file left

    save, calls = torch.save, []

    def failing_save(obj, f, *args, **kwargs):  # the disk fills up while writing epoch 1's checkpoint
        calls.append(getattr(f, "name", f))
        if len(calls) == 2:
            f.write(b"partial")
            raise OSError("No space left on device")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        run("rada", config, out_dir=tmp_path / "full")
    monkeypatch.undo()
    assert all(str(path) != str(tmp_path / "full" / CHECKPOINT) for path in calls)  # never written in place
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == [CHECKPOINT]
    assert torch.load(tmp_path / "full" / CHECKPOINT, weights_only=True)["epoch"] == 0  # the last good one
    resumed, _ = run("rada", config, out_dir=tmp_path / "full")
    whole, _ = run("rada", config)
    assert_same_params(params(resumed), params(whole))


# -- inputs ------------------------------------------------------------------------------------


def test_augmented_views_train():
    views = torch.stack([TRAIN[0] + 0.1 * torch.randn(TRAIN[0].shape, generator=torch.Generator().manual_seed(v))
                         for v in range(3)], dim=1)  # (N, 3, D)
    config = small("rada", views=3)  # three cached views, one drawn per image and epoch
    model = make_model()
    result = fit(model, views, TRAIN[1], config=config, progress=False)
    again = make_model()
    fit(again, views, TRAIN[1], config=config, progress=False)
    assert_same_params(params(model), params(again))  # the views drawn are seeded
    first_view = make_model()
    fit(first_view, views[:, 0], TRAIN[1], config=config, progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(params(model).values(), params(first_view).values(), strict=True))
    assert len(result.history) == 4 and all(math.isfinite(h["train_loss"]) for h in result.history)


def test_input_errors():
    model = make_model()
    config = small("rada")
    x, y = TRAIN
    cases = [
        ((x, torch.where(y == 3, 4, y)), {}, ValueError, r"train labels span \[0, 4\] but the model has 4 classes"),
        ((x, y - 1), {}, ValueError, r"train labels span \[-1, 2\]"),
        ((x, y.float()), {}, TypeError, "train_labels must be a 1-d integer tensor"),
        ((x[:5], y), {}, ValueError, r"train_features must be \(N, D\) or \(N, V, D\) with N = len\(train_labels\) = 24"),
        ((x[:0], y[:0]), {}, ValueError, "the train split is empty"),
        ((x, y), dict(val_features=VAL[0][:0], val_labels=VAL[1][:0]), ValueError, "the val split is empty"),
        ((x, y), dict(val_features=VAL[0], val_labels=VAL[1] + 1), ValueError, r"val labels span \[1, 4\]"),
        ((x, y), dict(val_features=VAL[0]), ValueError, "give both val_features and val_labels"),
    ]
    for args, kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            fit(model, *args, config=config, progress=False, **kwargs)


def test_progress_bar_and_history(capsys):
    _, result = run("mma", small("mma", epochs=2), progress=True)
    assert "fit mma" in capsys.readouterr().err
    assert [sorted(h) for h in result.history] == [["epoch", "lr", "train_loss", "val_acc"]] * 2
