"""Hostile and broken training inputs: every damaged or crafted checkpoint is refused with one line naming
the problem, before anything large is built, and nothing in one runs code; bad training data is named
before anything trains; a run whose loss turns NaN stops and keeps its last good checkpoint."""

from __future__ import annotations

import os
import tracemalloc

import pytest
import torch

from sgsc.cli import main
from sgsc.export import architecture
from sgsc.nn.zoo import build_model
from sgsc.train import TrainConfig, load_checkpoint, model_from_checkpoint, train

SMALL = {"channels": [4, 8]}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A real checkpoint of a tiny zoo run."""
    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(steps=2, model_config=SMALL, out_dir=str(out), progress=False, plots=False, restore=False,
                      lambda_=0.0))
    return out / "checkpoint.pt"


def _crafted(tmp_path, written, **changes) -> str:
    record = torch.load(written, weights_only=True)
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        target = record
        for key in path:
            target = target[key]
        target[last] = value
    torch.save(record, tmp_path / "crafted.pt")
    return str(tmp_path / "crafted.pt")


def test_a_real_checkpoint_loads_and_rebuilds(written):
    assert model_from_checkpoint(load_checkpoint(written)).config.channels == [4, 8]


def test_an_empty_or_truncated_file_is_refused_in_one_line(tmp_path, written, capsys):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty \\(0 bytes\\)"):
        load_checkpoint(empty)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(written.read_bytes()[: written.stat().st_size // 2])
    with pytest.raises(ValueError, match="not a readable sgsc training checkpoint"):
        load_checkpoint(cut)
    for path in (empty, cut):
        assert main(["export", str(path), "-o", str(tmp_path / "out.sgsc")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and not (tmp_path / "out.sgsc").exists()


class _Payload:
    def __reduce__(self):
        return (os.makedirs, (os.environ["SGSC_TEST_MARKER"],))


def test_a_pickled_object_is_refused_and_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setenv("SGSC_TEST_MARKER", str(marker))
    torch.save({"format": "sgsc.train", "payload": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="holds objects other than tensors and plain containers"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("config", [1, 2], "field 'config' must be a dict"),
    ("world_size", 0, "world_size must be >= 1"),
    ("state__step", 10**15, "past the 2 steps its run was configured for"),
    ("state__step", -1, "state step must be an int >= 0"),
    ("model_state__conv", "weights", "is not a named tensor"),
    ("model_name", 7, "model_name must be a zoo model's name"),
])
def test_a_field_of_the_wrong_kind_is_named(tmp_path, written, field, value, message):
    with pytest.raises(ValueError, match=message):
        load_checkpoint(_crafted(tmp_path, written, **{field: value}))


def test_an_architecture_bigger_than_the_file_pays_for_is_refused_before_it_is_built(tmp_path, written):
    path = _crafted(tmp_path, written, model_config={**load_checkpoint(written)["model_config"],
                                                     "channels": [5000, 5000]})
    tracemalloc.start()
    with pytest.raises(ValueError, match="model_config builds [0-9,]+ bytes of tensors from a"):
        load_checkpoint(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 << 20  # built on the meta device: no 2 GB of weights
    with pytest.raises(ValueError, match="does not describe a paper_cnn"):
        load_checkpoint(_crafted(tmp_path, written, model_config={"channels": "many"}))


def test_a_decoder_of_many_layers_stops_building_at_the_files_budget(tmp_path, monkeypatch):
    out = tmp_path / "names"
    model = build_model("char_decoder", {"vocab_size": 5, "block_size": 4, "n_embd": 4, "n_layer": 1, "head_dim": 4})
    record = {"format": "sgsc.train", "config": {"steps": 1}, "model_name": "char_decoder",
              "model_config": {**{k: v for k, v in vars(model.config).items()}, "n_layer": 20_000,
                               "n_heads": [1] * 20_000, "mlp_hidden": [16] * 20_000},
              "model_state": {}, "optimizer_state": {}, "state": {"step": 0}, "rng": {}, "world_size": 1}
    out.mkdir()
    torch.save(record, out / "checkpoint.pt")
    created = []
    count = architecture.SkipInitOnMeta.__torch_function__

    def counted(self, *args, **kwargs):
        result = count(self, *args, **kwargs)
        created.append(self.created)
        return result

    monkeypatch.setattr(architecture.SkipInitOnMeta, "__torch_function__", counted)
    with pytest.raises(ValueError, match="builds more than [0-9]+ tensors"):
        load_checkpoint(out / "checkpoint.pt")
    assert max(created) < 2000  # stopped at the budget, not after 20,000 blocks


def test_device_cuda_without_cuda_is_named():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="device='cuda', but this torch sees no CUDA device"):
        train(TrainConfig(steps=1, model_config=SMALL, device="cuda", progress=False, plots=False))


def _resnet_data(digits_split):
    from own_models import TinyResNet

    import sgsc

    (x, y), _ = digits_split
    torch.manual_seed(0)
    return sgsc.quantize_model(TinyResNet()), x[:200], y[:200]


@pytest.mark.parametrize(("change", "error", "message"), [
    (lambda x, y: (x, torch.where(y == 3, 10, y)), ValueError, "targets run from 0 to 10, but the model scores 10 classes"),
    (lambda x, y: (x, torch.where(y == 3, -2, y)), ValueError, "targets run from -2 to 9"),
    (lambda x, y: (x, y.float()), TypeError, "targets are torch.float32; the default loss, cross-entropy"),
    (lambda x, y: (x.double(), y), TypeError, "train_data: the model cannot run on its inputs \\(torch.float64"),
    (lambda x, y: (x.long(), y), TypeError, "train_data: the model cannot run on its inputs \\(torch.int64"),
])
def test_bad_training_data_is_named_before_anything_trains(digits_split, tmp_path, change, error, message):
    from sgsc.train import compress

    model, x, y = _resnet_data(digits_split)
    with pytest.raises(error, match=message):
        compress(model, change(x, y), steps=2, gamma=0.1, batch_size=16, out_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_loss_that_turns_nan_stops_the_run_and_keeps_the_last_good_checkpoint(digits_split, tmp_path, capsys):
    import json

    from sgsc.train import compress
    from sgsc.train.task import task_loss as cross_entropy

    model, x, y = _resnet_data(digits_split)
    calls = []

    def diverging(logits, targets):  # the 7th step's loss is NaN, as a run that diverged
        calls.append(1)
        loss = cross_entropy(logits, targets)
        return loss * float("nan") if len(calls) == 7 else loss

    with pytest.raises(FloatingPointError, match=r"step 6: the loss is nan \(task nan, size .*\) or a gradient is not "
                                                 r"finite, on the batch of train_data examples \["):
        compress(model, (x, y), steps=20, gamma=0.1, batch_size=16, task_loss=diverging, eval_every=2,
                 checkpoint_every=3, out_dir=tmp_path, progress=False)
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["state"]["step"] == 6  # the step-6 checkpoint, written before the step that diverged
    assert all(torch.isfinite(t).all() for t in saved["model_state"].values() if t.is_floating_point())
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 6
