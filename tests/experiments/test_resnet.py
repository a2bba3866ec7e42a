"""The ResNet-20 experiment end to end in --quick mode: every method on two seeds through the
public API, the files load back with the float factory, a second run resumes without retraining, the
report renders the section, and the CLI reaches it."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch

import sgsc
from sgsc.cli import build_parser
from sgsc.cli.experiment import resnet_settings
from sgsc.experiments import report, resnet, targets

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

# the --quick preset (digits, 4/8/16 channels, one block per stage) with fewer steps: a few seconds per seed
TEST = dict(seeds=(0, 1), float_steps=40, steps=20, progress=False)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("results")
    started = time.perf_counter()
    result = resnet.run(resnet.quick_settings(**TEST), out)
    print(f"\nquick resnet run: {time.perf_counter() - started:.1f}s")
    torch.set_num_threads(threads)
    return result, out


def test_full_model_is_resnet20():
    model = resnet.resnet20()
    assert resnet.parameter_count(model) == 272186  # ~0.27M, with two 1x1 projection shortcuts
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == 20  # 19 3x3 convs and the classifier
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_every_method_on_every_seed_measured_from_its_file(quick):
    result, out = quick
    assert [s["seed"] for s in result["seeds"]] == [0, 1]
    for seed in result["seeds"]:
        assert list(seed["methods"]) == list(resnet.METHODS)
        for name, row in seed["methods"].items():
            assert set(resnet.TABLE_KEYS) <= set(row)
            assert 0 < row["test_accuracy"] <= 1 and row["latency_batch256_ms"] > 0
            path = out / f"resnet-seed{seed['seed']}" / row["file"]
            assert path.stat().st_size == row["file_bytes"]
            if name != "float":
                loaded = sgsc.load_packed(path, model=resnet.resnet20(1, 10, (4, 8, 16), 1))
                assert resnet.parameter_count(loaded) == row["parameters"]
                assert row["pruning"]["parameters_after"] <= row["pruning"]["parameters_before"]
        assert seed["methods"]["qat_2"]["average_bits"] <= 2.0 + 1e-6
        assert seed["methods"]["ptq_int4"]["file_bytes"] < seed["methods"]["ptq_int8"]["file_bytes"]
        assert seed["methods"]["float"]["pct_of_float"] == 100.0
    for name, stats in result["table"].items():
        assert stats["test_accuracy"]["n"] == 2
    assert result["table"]["sgsc"]["file_bytes"]["mean"] < result["table"]["float"]["file_bytes"]["mean"]
    assert set(result["targets"]["versus"]) == set(targets.RESNET_RIVALS)


def test_a_second_run_resumes_and_a_new_gamma_reruns_only_what_depends_on_it(quick, tmp_path, monkeypatch):
    result, out = quick
    ran = []
    run_method = resnet.run_method
    monkeypatch.setattr(resnet, "run_method", lambda name, *args: ran.append(name) or run_method(name, *args))
    again = resnet.run(resnet.quick_settings(**TEST), out)
    assert ran == []  # every method read back: nothing trained again
    for before, after in zip(result["seeds"], again["seeds"]):
        for name, row in before["methods"].items():
            kept = {k: v for k, v in row.items() if k != "latency_batch256_ms"}
            assert {k: after["methods"][name][k] for k in kept} == kept
    # a new gamma reruns SGSC and unsafe only; float, PTQ and QAT are read back
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    changed = resnet.run(resnet.quick_settings(**{**TEST, "gamma": 0.6, "seeds": (0,)}), copy)["seeds"][0]["methods"]
    assert sorted(ran) == ["sgsc", "unsafe"]
    first = result["seeds"][0]["methods"]
    for name in ("float", "ptq_int8", "ptq_int4", "qat_2"):
        assert changed[name]["train_seconds"] == first[name]["train_seconds"]  # read back
    assert all(changed[name]["train_seconds"] != first[name]["train_seconds"] for name in ("sgsc", "unsafe"))


def test_targets_judge_the_means():
    def row(accuracy, size, pct=None):
        return {"test_accuracy": {"mean": accuracy}, "file_bytes": {"mean": size}, "pct_of_float": {"mean": pct}}

    table = {"float": row(0.90, 1000, 100), "sgsc": row(0.896, 55, 5.5), "ptq_int4": row(0.89, 150, 15),
             "qat_2": row(0.897, 56, 5.6)}
    t = targets.resnet_targets(table)
    assert t["accuracy_met"] and t["size_met"] and t["versus"]["ptq_int4"]["met"]
    assert not t["versus"]["qat_2"]["met"]  # equal size, but less accurate
    table["sgsc"] = row(0.894, 70, 7.0)
    t = targets.resnet_targets(table)
    assert not t["accuracy_met"] and not t["size_met"]


def test_report_renders_the_section(quick, tmp_path):
    result, out = quick
    text = report.render(out, tmp_path / "RESULTS.md")
    assert "## ResNet-20 on Fashion-MNIST" in text
    for label in resnet.METHODS.values():
        assert f"| {label} |" in text
    assert f"{100 * result['table']['sgsc']['test_accuracy']['mean']:.2f} ±" in text
    assert result["command"] in text and json.loads((out / "resnet.json").read_text())["experiment"] == "resnet"


def test_cli_flags_reach_the_settings():
    args = build_parser().parse_args(["experiment", "resnet", "--quick", "--seeds", "3", "--steps", "7",
                                      "--gamma", "0.5", "--no-progress", "--out", "x"])
    settings = resnet_settings(args)
    assert settings.quick and settings.seeds == (3,) and settings.steps == 7 and settings.gamma == 0.5
    assert not settings.progress and args.func.__name__ == "_run_resnet"
    full = resnet_settings(build_parser().parse_args(["experiment", "resnet", "--data-dir", "d"]))
    assert full.data_dir == "d" and full.steps == resnet.ResNetSettings().steps


@pytest.mark.parametrize("workers", [0, True, 1.5])
def test_a_bad_worker_count_is_refused_before_anything_is_written(tmp_path, workers):
    with pytest.raises(ValueError, match="workers must be an int >= 1"):
        resnet.run(resnet.quick_settings(**TEST), tmp_path / "out", workers=workers)
    assert not (tmp_path / "out").exists()
