"""Table II (language): the --quick experiment end to end, its files, its report and its bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sgsc.cli import build_parser
from sgsc.cli import experiment as experiment_cli
from sgsc.experiments import common, language
from sgsc.export import load_packed
from sgsc.nn import quantized_layers
from sgsc.nn.zoo import build_model
from sgsc.train import evaluate, load_data, new_model
from sgsc.train.data import CharVocab, load_names

SEEDS = (0, 1)


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A 2,000-name slice of the real corpus when present, else a generated one of the same shape."""
    real = Path(__file__).resolve().parents[3] / "shared" / "data" / "names.txt"
    if real.is_file():
        names = real.read_text(encoding="utf-8").split()[:2000]
    else:
        syllables = ["an", "el", "ia", "mo", "ra", "li", "so", "ka", "be", "ty", "jo", "ne"]
        names = [syllables[i % 12] + syllables[(i * 7) % 12] + syllables[(i * 5) % 11] for i in range(2000)]
    path = tmp_path_factory.mktemp("corpus") / "names.txt"
    path.write_text("\n".join(names) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def quick(corpus, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("results")
        return out, language.run(corpus, quick=True, seeds=SEEDS, out_dir=out, progress=False)
    finally:
        torch.set_num_threads(threads)


def test_json_is_written_and_matches_the_result(quick):
    out, result = quick
    on_disk = json.loads((out / language.RESULT_FILE).read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert [(r["seed"], r["method"]) for r in result["runs"]] == [(s, m) for s in SEEDS for m in language.METHODS]
    meta = result["metadata"]
    assert meta["seeds"] == list(SEEDS) and meta["steps"] == language.QUICK.steps
    assert meta["hyper_parameters"]["gamma"] == language.QUICK.gamma
    assert "--quick" in meta["command"] and "--seeds 0 1" in meta["command"]
    assert f"--threads {meta['torch_threads']}" in meta["command"]
    for key in ("machine", "device", "torch", "commit", "torch_threads"):
        assert key in meta


def test_bytes_are_the_files_and_percentages_follow(quick):
    _, result = quick
    for run in result["runs"]:
        assert run["file_bytes"] == Path(run["file"]).stat().st_size
    for method in language.METHODS:
        rows = [r for r in result["runs"] if r["method"] == method]
        stats = result["summary"][method]
        assert stats["file_bytes"]["values"] == [r["file_bytes"] for r in rows]
        floats = {r["seed"]: r["file_bytes"] for r in result["runs"] if r["method"] == "float"}
        expected = [100 * r["file_bytes"] / floats[r["seed"]] for r in rows]
        assert stats["percent_of_float"]["values"] == pytest.approx(expected)
        assert stats["test_loss"]["mean"] == pytest.approx(sum(r["test_loss"] for r in rows) / len(rows))
        float_loss = {r["seed"]: r["test_loss"] for r in result["runs"] if r["method"] == "float"}
        assert stats["test_loss_vs_float"]["values"] == [r["test_loss"] - float_loss[r["seed"]] for r in rows]
    target = result["summary"]["target"]
    assert target["loss_margin"] == pytest.approx(
        result["summary"]["sgsc"]["test_loss"]["mean"] - result["summary"]["float"]["test_loss"]["mean"])
    assert target["met"] == (target["loss_margin"] <= 0.02 and target["percent_of_float"] <= 25)
    # the compressed decoders start at 8 bits and the size term pushes them lower; in this tiny
    # model the float embeddings and the file header are a large share of the bytes
    for method in ("unsafe", "sgsc"):
        assert result["summary"][method]["average_bits"]["mean"] < 8
        assert result["summary"][method]["percent_of_float"]["mean"] < 70
    assert result["summary"]["float"]["average_bits"]["mean"] == 32


def test_loaded_files_reproduce_the_reported_test_loss(quick, corpus):
    _, result = quick
    for run in result["runs"]:
        config = language.method_config(run["method"], language.QUICK, corpus, run["seed"], Path("unused"), False)
        data = load_data(config)
        path = Path(run["file"])
        model = common.load_float(path) if run["method"] == "float" else load_packed(path)
        assert evaluate(model, data.test)["loss"] == run["test_loss"]
        # the exported file computes what the trained model computed
        assert run["test_loss"] == pytest.approx(run["trained_test_loss"], abs=1e-6)


def test_samples_are_names_over_the_vocabulary(quick, corpus):
    _, result = quick
    alphabet = set(load_names(corpus).vocab.chars[1:])
    for run in result["runs"]:
        assert len(run["samples"]) == language.SAMPLES
        assert all(isinstance(name, str) and set(name) <= alphabet for name in run["samples"])
        assert all(len(name) <= language.MAX_NAME_LENGTH for name in run["samples"])
        assert sum(map(len, run["samples"])) > 0


def test_markdown_has_every_method_and_the_command(quick):
    _, result = quick
    text = language.markdown(result)
    for method in language.METHODS:
        assert language.LABELS[method] in text
    assert result["metadata"]["command"] in text
    assert f"{result['summary']['sgsc']['test_loss']['mean']:.4f}" in text
    assert result["runs"][0]["samples"][0] in text


def test_sample_is_seeded_and_cuts_context():
    torch.manual_seed(0)
    vocab = CharVocab.from_words(["abcdefghij"])
    model = build_model("char_decoder", {"vocab_size": vocab.size, "block_size": 2, "n_embd": 8, "head_dim": 4})
    first = language.sample(model, vocab, 6, seed=3)
    assert first == language.sample(model, vocab, 6, seed=3)
    assert first != language.sample(model, vocab, 6, seed=4)
    assert all(set(name) <= set("abcdefghij") for name in first)
    # an untrained model emits the end token 1 time in 11: names run past block_size, so the context is cut
    assert max(map(len, first)) > 2


def test_float_baseline_is_frozen_and_guards_its_range(corpus, tmp_path):
    config = language.method_config("float", language.QUICK, corpus, 0, tmp_path, False)
    model = language.float_model(config, load_data(config))
    for _, layer in quantized_layers(model):
        assert not layer.bits.requires_grad and not layer.exponent.requires_grad
        assert torch.all(layer.bits == language.FLOAT_BITS)
        # the grid step is ~2^-23 of the largest weight: float32's own resolution at that weight
        step = float(layer.weight.detach().abs().max()) * 2.0**-22
        torch.testing.assert_close(layer.quantized_weight(), layer.weight, rtol=0, atol=step / 2)
    language.check_unclamped(model)
    # seeded like the trainer's own models: the same start as the compressed methods, whatever ran before
    torch.rand(7)
    again = language.float_model(config, load_data(config))
    torch.manual_seed(config.seed)
    compressed = new_model(config, load_data(config))
    for (_, a), (_, b), (_, c) in zip(quantized_layers(model), quantized_layers(again), quantized_layers(compressed)):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.weight, c.weight)
    with torch.no_grad():
        model.head.weight[0, 0] = 1e6
    with pytest.raises(RuntimeError, match="head outgrew its clamp range"):
        language.check_unclamped(model)


def test_bad_input(tmp_path, corpus):
    with pytest.raises(FileNotFoundError, match="corpus: no names file"):
        language.run(tmp_path / "nope.txt", quick=True, out_dir=tmp_path)
    with pytest.raises(TypeError, match="corpus"):
        language.run(42, quick=True, out_dir=tmp_path)
    with pytest.raises(ValueError, match="seeds"):
        language.run(corpus, quick=True, seeds=[], out_dir=tmp_path)
    with pytest.raises(ValueError, match="seeds must be distinct"):
        language.run(corpus, quick=True, seeds=[1, 1], out_dir=tmp_path)
    with pytest.raises(TypeError, match="seeds"):
        language.run(corpus, quick=True, seeds="012", out_dir=tmp_path)
    with pytest.raises(ValueError, match="steps"):
        language.run(corpus, quick=True, steps=0, out_dir=tmp_path)
    with pytest.raises(TypeError, match="quick"):
        language.run(corpus, quick="yes", out_dir=tmp_path)
    with pytest.raises(ValueError, match="method"):
        language.method_config("int4", language.QUICK, corpus, 0, tmp_path, False)
    with pytest.raises(ValueError, match="experiment 'language'"):
        language.markdown({"experiment": "vision"})
    with pytest.raises(ValueError, match="n must be"):
        language.sample(build_model("char_decoder"), CharVocab.from_words(["a"]), 0)
    assert not (tmp_path / language.RESULT_FILE).exists()


def test_cli(tmp_path, corpus, capsys, monkeypatch):
    parser = build_parser()
    args = parser.parse_args(["experiment", "language", "--corpus", str(corpus), "--quick", "--steps", "10", "--out", str(tmp_path)])
    assert args.func(args) == 0
    result = json.loads((tmp_path / language.RESULT_FILE).read_text())
    assert result["metadata"]["steps"] == 10 and result["metadata"]["seeds"] == [0]
    assert "Table II" in capsys.readouterr().out
    # without --corpus and with no names file anywhere, the error says where it looked and what to pass
    monkeypatch.setattr(experiment_cli, "find_names_file", lambda: None)
    args = parser.parse_args(["experiment", "language", "--quick", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--corpus"):
        args.func(args)


def test_the_commit_recorded_is_the_one_checked_out_when_the_run_started(corpus, tmp_path, monkeypatch):
    checked_out = iter(["started-here", "checked-out-later"])
    monkeypatch.setattr(common, "git_commit", lambda: next(checked_out))
    result = language.run(corpus, quick=True, seeds=(0,), steps=4, out_dir=tmp_path, progress=False)
    assert result["metadata"]["commit"] == "started-here"
