"""The frontier experiment: the envelope and its interpolation by hand, and a --quick run end to end
(every run measured from its file, the contract rows, a second run read back, the report)."""

from __future__ import annotations

import json

import pytest
import torch

from sgsc.experiments import frontier, frontier_models, frontier_report, report

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_envelope_keeps_each_point_more_accurate_than_every_smaller_one():
    points = [(10.0, 0.90), (5.0, 0.88), (7.0, 0.86), (12.0, 0.89), (15.0, 0.91)]
    assert frontier.envelope(points) == [(5.0, 0.88), (10.0, 0.90), (15.0, 0.91)]
    assert frontier.at_budget(points, 7.5) == pytest.approx(0.88 + 0.02 * 2.5 / 5)
    assert frontier.at_budget(points, 5.0) == 0.88 and frontier.at_budget(points, 20.0) == 0.91
    assert frontier.at_budget(points, 4.0) is None  # no file that small


def test_the_interval_is_students_t_over_seeds():
    got = frontier.interval([0.90, 0.91, 0.95])
    # t(0.975, 2) = 4.3027; sd of the three = 0.026458
    assert got["mean"] == pytest.approx(0.92) and got["ci95"] == pytest.approx(4.3027 * 0.026458 / 3**0.5, rel=1e-4)
    assert frontier.interval([0.9])["ci95"] is None


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("frontier")
    settings = frontier.quick_settings(progress=False)
    result = frontier.run(settings, out)
    torch.set_num_threads(threads)
    return settings, result, out


@pytest.mark.slow
def test_every_run_is_measured_from_its_file_and_summarized(quick):
    settings, result, out = quick
    saved = json.loads((out / frontier.RESULT_FILE).read_text())
    assert saved["summary"] == result["summary"] and (out / frontier.PLOT_FILE).read_bytes()[:4] == b"\x89PNG"
    for seed in result["seeds"]:
        rows = seed["rows"]
        names = {"float", "reference", *(f"ptq_{b}" for b in settings.ptq_bits),
                 *(name for _, name, _ in frontier.method_jobs(settings))}
        assert set(rows) == names
        for name, row in rows.items():
            assert (out / f"frontier-seed{seed['seed']}" / row["file"]).is_file()
            assert row["pct_of_float"] == pytest.approx(100 * row["file_bytes"] / rows["float"]["file_bytes"])
        assert all(rows[f"unsafe_g{g:g}"]["family"] == "unsafe" for g in settings.gammas)
        assert rows["sgsc_g0.05"]["contract"]["max_drop"] == settings.max_drop
        assert rows["one_run"]["contract"]["max_drop"] == settings.one_run_max_drop
    for family in frontier.FAMILIES:  # each budget's cell is the mean of the per-seed frontier values
        for budget, cell in result["summary"]["table"][family].items():
            per_seed = [frontier.at_budget(frontier.family_points(s["rows"], family), float(budget))
                        for s in result["seeds"]]
            assert cell["per_seed"] == per_seed
            if None not in per_seed:
                assert cell["mean"] == pytest.approx(sum(per_seed) / len(per_seed))
    sgsc_runs = sum(1 for s in result["seeds"] for row in s["rows"].values() if row.get("contract"))
    assert len(result["contract"]) == sgsc_runs == len(settings.seeds) * (3 * len(settings.gammas) + 1)


@pytest.mark.slow
def test_a_second_run_reads_every_run_back_and_the_report_renders_it(quick, tmp_path, monkeypatch):
    settings, result, out = quick
    ran = []
    monkeypatch.setattr(frontier.vision, "train_float", lambda *args: ran.append("float"))
    monkeypatch.setattr(frontier.sgsc, "compress", lambda *args, **kwargs: ran.append("compress"))
    again = frontier.run(settings, out)
    assert ran == [] and again["summary"] == result["summary"]
    text = report.render(out, tmp_path / "RESULTS.md")
    assert "## Accuracy against bytes: frontiers over seeds, and the contract" in text
    assert f"Within the bound in {sum(r['within'] for r in result['contract'])} of {len(result['contract'])}" in text


@pytest.mark.slow
def test_resnet20_runs_through_the_public_api_into_its_own_files(tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    settings = frontier.quick_settings(model="resnet20", seeds=(0,), gammas=(0.2,), qat_bits=(2,), progress=False)
    loaded = []
    load_packed = frontier_models.sgsc.load_packed
    monkeypatch.setattr(frontier_models.resnet.sgsc, "load_packed",
                        lambda path, **kwargs: loaded.append(type(kwargs["model"]).__name__) or load_packed(path, **kwargs))
    try:
        result = frontier.run(settings, tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "frontier_resnet20.json").is_file() and not (tmp_path / frontier.RESULT_FILE).exists()
    rows = result["seeds"][0]["rows"]
    assert set(rows) == {"float", "reference", "ptq_4", "ptq_8", "sgsc_distill_g0.2", "unsafe_g0.2", "qat_2", "one_run"}
    assert all((tmp_path / "frontier-resnet20-seed0" / row["file"]).is_file() for row in rows.values())
    assert set(loaded) == {"ResNet20"} and len(loaded) == len(rows) - 1  # every packed file, rebuilt as a ResNet-20
    assert set(result["summary"]["table"]) == {"sgsc_distill", "unsafe", "qat", "ptq"}  # only the families run
    curve = result["seeds"][0]["float_training"]["loss_curve"]
    assert len(curve) == -(-(settings.float_steps + settings.steps) // 50) and curve[-1] < curve[0]
    text = frontier_report.markdown(result)
    assert "(ResNet-20)" in text and "--model resnet20" in text and "in the last 150 steps" in text
