"""The training loop: compression works, restore reacts, resume is exact, the CLI writes its files."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import TensorDataset

from sgsc import export
from sgsc.cli import build_parser, main
from sgsc.cli.train import config_from_args
from sgsc.nn import quantized_layers
from sgsc.nn.zoo import build_model
from sgsc.train import (
    Policy,
    RunState,
    TrainConfig,
    bits_snapshot,
    carry_out,
    default_pruner,
    evaluate,
    judge,
    load_checkpoint,
    load_data,
    model_from_checkpoint,
    param_groups,
    train,
    unsafe,
)
from sgsc.train.guard import outcomes, per_example
from sgsc.train.loop import guard_split
from sgsc.train.preservation import random_subset
from sgsc.train.safety import keep_passed

SMALL_CNN = {"channels": [8, 16]}


pytestmark = pytest.mark.usefixtures("one_thread")


def _quick(**overrides) -> TrainConfig:
    settings = dict(steps=40, warmup_steps=10, k=10, eval_every=20, model_config=SMALL_CNN, progress=False,
                    gamma=0.1, quant_lr=0.1, lr=3e-3, guard_fraction=0.2, max_drop=0.05)
    return TrainConfig(**{**settings, **overrides})


def _optimizer(model, config: TrainConfig) -> torch.optim.Adam:
    return torch.optim.Adam(param_groups(model, config.lr, config.quant_lr, config.exponent_lr))


def _total_bits(model):
    return sum(float(layer.bits.detach().clamp(min=0).sum()) for _, layer in quantized_layers(model))


def _evals(history):
    return {r["step"]: r for r in history if r["kind"] == "eval"}


@pytest.fixture(scope="module")
def compressed():
    """One real run on digits: 100 plain steps, then 200 steps of safety-guided compression."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    config = TrainConfig(steps=300, warmup_steps=100, k=25, eval_every=100, model_config={"channels": [16, 32]},
                         gamma=0.05, quant_lr=0.1, lr=3e-3, progress=False, guard_fraction=0.2, max_drop=0.05)
    result = train(config)
    torch.set_num_threads(threads)
    return config, result


def test_bits_fall_while_accuracy_holds(compressed):
    config, result = compressed
    evals = [r for r in result.history if r["kind"] == "eval"]
    before, after = _evals(result.history)[100], evals[-1]  # the last: the model returned
    print(f"\nbits {before['bits']:.2f} -> {after['bits']:.2f}, test accuracy {before['test_accuracy']:.4f} -> "
          f"{after['test_accuracy']:.4f}, bytes {before['bytes']} -> {after['bytes']}, {result.contract}")
    assert before["bits"] > 8.0  # the uncompressed model, at the end of the plain phase
    assert after["bits"] < 5.0 and result.average_bits == after["bits"]
    assert after["bytes"] < 0.7 * before["bytes"]
    assert before["test_accuracy"] > 0.95
    test_error = (before["test_accuracy"] * (1 - before["test_accuracy"]) / len(load_data(config).test)) ** 0.5
    assert after["test_accuracy"] >= before["test_accuracy"] - config.max_drop - 2 * test_error  # the contract
    assert result.contract["returned"]["bound"] <= config.max_drop
    assert evaluate(result.model, load_data(config).test)["accuracy"] == result.scores["test_accuracy"]
    train_size = len(load_data(config).train)
    assert len(result.guard) == round(0.2 * train_size)  # held out: neither batches nor the preservation set
    assert len(result.preservation) == round(0.05 * (train_size - len(result.guard)))
    assert not set(result.guard) & set(result.preservation)


def _broken_copy(result, value):
    """The trained model with every group of the first conv cut to ``value`` bits, and the healthy state."""
    model = build_model("paper_cnn", dataclasses.asdict(result.model.config))
    model.load_state_dict(result.model.state_dict())
    healthy = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    snapshot = bits_snapshot(model)
    with torch.no_grad():
        model.blocks[0][0].bits.clamp_(max=value)
    return model, snapshot, healthy


def _guard(config, result) -> TensorDataset:
    return TensorDataset(*(t[result.guard] for t in load_data(config).train.tensors))


@pytest.mark.parametrize("value", [1.0, 0.0])
def test_a_failed_check_rolls_the_zoo_model_back_and_slows_the_broken_layer(compressed, value):
    config, result = compressed
    guard, score = _guard(config, result), per_example("accuracy", None)
    model, snapshot, healthy = _broken_copy(result, value)
    optimizer = _optimizer(model, config)
    state = RunState(step=7, snapshot=snapshot, reference=outcomes(result.model, guard, score))
    keep_passed(result.model, None, state, None)  # the healthy model is the last state that passed
    policy = Policy(config.max_drop, pruner=default_pruner(lambda: guard.tensors[0][:2]))

    decision = judge(model, state, policy, lambda examples=None: outcomes(model, guard, score, examples=examples))
    assert decision.check.verdict == "fail" and decision.check.low > config.max_drop
    assert decision.rollback and decision.slow == ["blocks.0.0"]
    event = carry_out(model, optimizer, state, decision, pruner=policy.pruner)
    assert event["rolled_back_to"] == 7 and event["slowed"] == {"blocks.0.0": 0.5}
    assert all(torch.equal(model.state_dict()[key], tensor) for key, tensor in healthy.items())
    assert evaluate(model, guard)["accuracy"] == evaluate(result.model, guard)["accuracy"]


def test_unsafe_baseline_has_no_guard_and_never_rolls_back(compressed):
    config, result = compressed
    model, snapshot, _ = _broken_copy(result, 1.0)
    baseline = unsafe(config)
    assert baseline.lambda_ == 0 and baseline.restore is False and baseline.gamma == config.gamma
    inputs = _guard(config, result).tensors[0][:2]
    decision = judge(model, RunState(snapshot=snapshot), Policy(None, pruner=default_pruner(lambda: inputs)), None)
    assert decision.check is None and not decision.rollback


def test_compression_past_the_contract_rolls_back_in_the_loop():
    result = train(_quick(steps=100, warmup_steps=50, gamma=2.0, quant_lr=0.3, fraction=0.1, max_drop=0.0))
    checks = [r for r in result.history if r["kind"] == "check"]
    rollbacks = [r for r in checks if "rolled_back_to" in r]
    assert rollbacks, checks
    assert all(r["verdict"] == "fail" and r["guard"]["drop"] > 0 for r in rollbacks)  # only a failed check does
    assert result.contract["max_drop"] == 0.0 and (result.contract["returned"] or {"bound": 0.0})["bound"] <= 0.0


def test_zero_bit_groups_are_removed_and_the_model_keeps_training():
    torch.manual_seed(0)
    config = _quick(steps=30)
    model = build_model("paper_cnn", {"image_size": 8, **SMALL_CNN})
    with torch.no_grad():
        model.blocks[0][0].bits[[1, 5]] = 0
        model.blocks[1][0].bits[[0, 2, 3]] = 0
    result = train(config, model=model)
    pruned = [r["pruned"] for r in result.history if r["kind"] == "check" and r.get("pruned")]
    assert pruned and pruned[0] == {"blocks.0.0": [1, 5], "blocks.1.0": [0, 2, 3]}
    assert result.model is model and model.config.channels[0] <= 6 and model.config.channels[1] <= 13
    assert model.blocks[0][0].weight.shape[0] == model.config.channels[0]


def test_channel_grouped_head_prunes_unread_channels_in_the_loop_and_exports_exactly(tmp_path):
    torch.manual_seed(0)
    model = build_model("paper_cnn", {"image_size": 8, **SMALL_CNN, "head_groups": "channel"})
    with torch.no_grad():
        model.head.bits[[2, 7, 11]] = 0  # the head stops reading these channels; their conv keeps its bits
    result = train(_quick(steps=30), model=model)
    pruned = [r["pruned"] for r in result.history if r["kind"] == "check" and r.get("pruned")]
    assert pruned and set(pruned[0]["head"]) >= {2, 7, 11}
    assert model.config.channels[1] <= 13 and model.head.bits.numel() == model.config.channels[1]
    path = tmp_path / "channel-head.sgsc"
    export.save_packed(model.eval(), path)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(export.load_packed(path)(x), model(x))


def test_resume_continues_bit_exactly(tmp_path):
    def run(out, steps, resume=False):
        torch.manual_seed(0)
        model = build_model("paper_cnn", {"image_size": 8, **SMALL_CNN})
        with torch.no_grad():  # a group that gets pruned before the checkpoint: resume rebuilds shapes
            model.blocks[1][0].bits[3] = 0
        config = _quick(steps=steps, out_dir=str(out), checkpoint_every=30, resume=resume, plots=False)
        return train(config, model=None if resume else model)

    straight = run(tmp_path / "straight", 60)
    run(tmp_path / "split", 30)
    resumed = run(tmp_path / "split", 60, resume=True)
    assert resumed.model.config.channels == straight.model.config.channels != SMALL_CNN["channels"]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.history == straight.history
    opt_a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")["optimizer_state"]["state"]
    opt_b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")["optimizer_state"]["state"]
    assert all(torch.equal(opt_a[i][key], opt_b[i][key]) for i in opt_a for key in opt_a[i])
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == straight.history


def test_resume_accepts_a_checkpoint_written_before_newer_fields(tmp_path):
    train(_quick(steps=2, warmup_steps=0, out_dir=str(tmp_path), plots=False))
    path = tmp_path / "checkpoint.pt"
    record = load_checkpoint(path)
    for name in ("preservation_method", "exponent_lr"):  # fields added after the first checkpoints
        del record["config"][name]
    torch.save(record, path)
    assert train(_quick(steps=4, warmup_steps=0, out_dir=str(tmp_path), plots=False, resume=True)).steps == 4


def test_resume_refuses_a_different_config_or_a_missing_checkpoint(tmp_path):
    train(_quick(steps=10, warmup_steps=0, out_dir=str(tmp_path), plots=False))
    with pytest.raises(ValueError, match=r"gamma=0\.1 in the checkpoint, 0\.5 now"):
        train(_quick(steps=20, warmup_steps=0, out_dir=str(tmp_path), gamma=0.5, resume=True))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        train(_quick(out_dir=str(tmp_path / "elsewhere"), resume=True))


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("gamma", -0.1, ValueError),
        ("alpha", -1, ValueError),
        ("lambda_", -0.5, ValueError),
        ("fraction", 0.0, ValueError),
        ("fraction", 1.5, ValueError),
        ("k", 0, ValueError),
        ("steps", -1, ValueError),
        ("lr", 0.0, ValueError),
        ("max_drop", float("nan"), ValueError),
        ("max_drop", -0.01, ValueError),
        ("confidence", 0.4, ValueError),
        ("guard_fraction", 1.0, ValueError),
        ("preservation_loss", "kl", ValueError),
        ("data", "cifar", ValueError),
        ("rounding", "up", ValueError),
        ("preservation_method", "gradcam", ValueError),
        ("preservation_method", None, ValueError),
        ("exponent_lr", 0.0, ValueError),
        ("exponent_lr", -0.01, ValueError),
        ("exponent_lr", float("inf"), ValueError),
        ("exponent_lr", "0.1", TypeError),
        ("lr_schedule", "linear", ValueError),
        ("data_dir", "/nonexistent/idx", FileNotFoundError),
        ("init_from", "/nonexistent/ckpt.pt", FileNotFoundError),
        ("resume", True, ValueError),  # without out_dir
    ],
)
def test_bad_settings_name_the_argument(field, value, error):
    with pytest.raises(error, match=field if field != "resume" else "resume needs out_dir"):
        TrainConfig(**{field: value})


def test_random_preservation_is_the_seeded_random_subset_of_the_same_size():
    config = _quick(steps=1, warmup_steps=0, seed=3, fraction=0.05)
    n = len(load_data(config).train)
    # the documented rule: round(fraction * N) distinct indices of the N examples training may see (not the
    # guard's), random_subset drawn with the run's seed
    _, seen = guard_split(n, config.guard_fraction, seed=3)
    expected = [seen[i] for i in random_subset(len(seen), round(0.05 * len(seen)), seed=3).tolist()]
    drawn = train(dataclasses.replace(config, preservation_method="random")).preservation
    assert drawn == expected
    assert train(config).preservation != expected  # the criteria choose otherwise


def test_a_given_model_trains_with_the_configs_rounding():
    torch.manual_seed(0)
    model = build_model("paper_cnn", {"image_size": 8, **SMALL_CNN, "rounding": "floor"})
    result = train(_quick(steps=2, warmup_steps=0, rounding="nearest"), model=model)
    assert result.model is model and model.config.rounding == "nearest"
    assert {layer.rounding for _, layer in quantized_layers(model)} == {"nearest"}

    def rebuilt(rounding):
        copy = build_model("paper_cnn", {**dataclasses.asdict(model.config), "rounding": rounding})
        copy.load_state_dict(model.state_dict())
        return copy.eval()

    x = load_data(_quick()).test.tensors[0][:32]
    with torch.no_grad():
        out = model.eval()(x)
        assert torch.equal(out, rebuilt("nearest")(x))
        assert not torch.allclose(out, rebuilt("floor")(x))  # the check above can tell the modes apart


def test_exponent_lr_gives_exponents_their_own_adam_group():
    torch.manual_seed(0)
    model = build_model("paper_cnn", {"image_size": 8, **SMALL_CNN})
    layers = [layer for _, layer in quantized_layers(model)]
    default = _optimizer(model, _quick(quant_lr=0.1))
    assert [(g["name"], g["lr"]) for g in default.param_groups] == [("weights", 3e-3), ("quantizers", 0.1)]

    optimizer = _optimizer(model, _quick(quant_lr=0.1, exponent_lr=0.01))
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert [(name, g["lr"]) for name, g in groups.items()] == [("weights", 3e-3), ("bits", 0.1), ("exponents", 0.01)]
    assert [id(p) for p in groups["bits"]["params"]] == [id(layer.bits) for layer in layers]
    assert [id(p) for p in groups["exponents"]["params"]] == [id(layer.exponent) for layer in layers]

    generator = torch.Generator().manual_seed(1)
    signs = {}
    for layer in layers:
        for p in (layer.bits, layer.exponent):
            signs[p] = torch.randint(0, 2, p.shape, generator=generator) * 2.0 - 1
            p.grad = signs[p] * (0.5 + torch.rand(p.shape, generator=generator))  # |g| well above Adam's eps
    before = {p: p.detach().clone() for p in model.parameters()}
    optimizer.step()
    # Adam's first step is lr * g / (|g| + eps): the group's lr against the gradient's sign
    for layer in layers:
        for p, lr in ((layer.bits, 0.1), (layer.exponent, 0.01)):
            torch.testing.assert_close(p.detach() - before[p], -lr * signs[p], rtol=0, atol=1e-6)
    assert all(torch.equal(p, before[p]) for p in groups["weights"]["params"])  # no gradient, no step


def test_cosine_schedule_decays_every_group_from_its_own_rate():
    seen = []

    def record(optimizer, args, kwargs):
        seen.append({g["name"]: g["lr"] for g in optimizer.param_groups})

    handle = register_optimizer_step_pre_hook(record)
    try:
        train(_quick(steps=8, warmup_steps=2, k=3, lr=3e-3, quant_lr=0.1, exponent_lr=0.02, lr_schedule="cosine"))
    finally:
        handle.remove()
    assert len(seen) == 8
    for step, rates in enumerate(seen):
        factor = (1 + math.cos(math.pi * step / 8)) / 2  # cosine from 1 at step 0 towards 0 at step 8
        expected = {"weights": 3e-3 * factor, "bits": 0.1 * factor, "exponents": 0.02 * factor}
        assert rates == pytest.approx(expected, rel=1e-12)


def test_constant_schedule_keeps_the_configured_rates():
    seen = []
    handle = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: seen.append([g["lr"] for g in optimizer.param_groups]))
    try:
        train(_quick(steps=5, warmup_steps=1, lr=3e-3, quant_lr=0.1))
    finally:
        handle.remove()
    assert seen == [[3e-3, 0.1]] * 5


def test_resume_under_a_decaying_schedule_keeps_the_steps(tmp_path):
    train(_quick(steps=4, warmup_steps=0, out_dir=str(tmp_path), plots=False, lr_schedule="cosine"))
    with pytest.raises(ValueError, match="steps=4 in the checkpoint, 8 now"):
        train(_quick(steps=8, warmup_steps=0, out_dir=str(tmp_path), plots=False, lr_schedule="cosine", resume=True))


def test_cli_exposes_the_preservation_method_and_exponent_lr():
    args = build_parser().parse_args(["train", "--preservation-method", "random", "--exponent-lr", "0.01",
                                      "--lr-schedule", "cosine"])
    config = config_from_args(args)
    assert config.preservation_method == "random" and config.exponent_lr == 0.01 and config.lr_schedule == "cosine"
    defaults = config_from_args(build_parser().parse_args(["compress"]))
    assert defaults.preservation_method == "criteria" and defaults.exponent_lr is None
    assert defaults.lr_schedule == "constant"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--preservation-method", "gradcam"])


def test_missing_idx_files_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        train(_quick(data="fashion-mnist", data_dir=str(tmp_path)))


def test_language_model_uses_preservation_loss():
    config = _quick(data="names", model_config={"n_embd": 16, "n_layer": 1, "head_dim": 8, "block_size": 8},
                    steps=20, batch_size=16, eval_every=20)
    data = load_data(config)
    # about 16 preserved examples, whether the full corpus or the small embedded fallback was found
    result = train(dataclasses.replace(config, fraction=min(1.0, 16 / len(data.train))), data=data)
    checks = [r for r in result.history if r["kind"] == "check"]
    assert checks and all(r["guard"]["value"] > 0.5 for r in checks)  # a loss in nats, not an accuracy
    assert 0 < result.scores["test_accuracy"] < 1 and result.scores["test_loss"] < 3.3  # below uniform over 27 chars


def test_cli_trains_compresses_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--steps", "30", "--warmup-steps", "10", "-k", "10", "--eval-every", "10", "--no-progress",
            "--model-config", json.dumps(SMALL_CNN), "--gamma", "0.1", "--quant-lr", "0.1"]
    assert main(["train", *args, "--out", str(out), "--checkpoint-every", "20"]) == 0
    assert "bits/weight" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [10, 20, 30]
    assert {r["kind"] for r in records} == {"train", "eval", "check", "final"}
    for name in ("training.png", "weights.png", "bits.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = load_checkpoint(out / "checkpoint.pt")
    assert record["state"]["step"] == 30 and record["config"]["steps"] == 30
    assert (out / "preservation.json").is_file()

    assert main(["train", *args[2:], "--steps", "40", "--out", str(out), "--resume"]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["state"]["step"] == 40

    squeezed = tmp_path / "compressed"
    assert main(["compress", "--init-from", str(out / "checkpoint.pt"), "--steps", "10", "-k", "5", "--no-progress",
                 "--unsafe", "--no-plots", "--out", str(squeezed), "--gamma", "0.5"]) == 0
    record = load_checkpoint(squeezed / "checkpoint.pt")
    assert record["config"]["lambda_"] == 0 and record["config"]["restore"] is False
    start = model_from_checkpoint(load_checkpoint(out / "checkpoint.pt"))
    end = model_from_checkpoint(record)
    assert _total_bits(end) < _total_bits(start)


def test_compress_refuses_a_checkpoint_for_other_data(tmp_path):
    train(_quick(steps=2, warmup_steps=0, out_dir=str(tmp_path), plots=False))
    digits = load_data(_quick())
    bigger = dataclasses.replace(digits, model_config={**digits.model_config, "image_size": 28})  # as Fashion-MNIST
    with pytest.raises(ValueError, match="image_size=8 in the checkpoint, 28 in the data"):
        train(_quick(init_from=str(tmp_path / "checkpoint.pt")), data=bigger)


def test_cli_rejects_bad_values(tmp_path, capsys):
    assert main(["train", "--gamma", "-1", "--out", str(tmp_path)]) == 2
    assert "gamma" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compress", "--out", str(tmp_path)])
