"""`sgsc demo`: the main job end to end, compress a CNN, write the packed file, load it back.

Trains the paper's CNN with safety-guided self-compression on Fashion-MNIST when its IDX files
are found (``$SGSC_DATA_DIR`` or ``../shared/data``), else on scikit-learn's bundled digits, then
prints the packed file's per-layer table, saves the accuracy-against-bytes plot, checks that the
model loaded from the file scores exactly what the trained model scored, and prints what to run on
one's own model. The default length keeps the whole command under two minutes of compute on two
cores (1,200 steps, five evaluations; 97 s on an idle 2-core Zen 4); ``--steps`` trades time for a smaller file.
"""

from __future__ import annotations

import time
from pathlib import Path

from sgsc import export
from sgsc.nn import quantized_layers
from sgsc.train import TrainConfig, evaluate, load_data, new_model, train
from sgsc.train.trainer import PACKED

# What to try next, on one's own model: the same method through the public API (README "Your own model").
NEXT_STEPS = """next, on your own model (a classifier, train_set a Dataset of (input, label) pairs):

    import sgsc
    model = sgsc.quantize_model(my_model)                          # learnable bits per output channel
    result = sgsc.compress(model, train_set, preserve=0.05, max_drop=0.01, steps=2000, out_dir="runs/mine")
    sgsc.save_packed(result.model, "mine.sgsc")                    # then: sgsc inspect mine.sgsc
"""


DEMO_POOL = 10_000


def _float32_bytes(model) -> int:
    """Bytes of ``model``'s state in float32, without the quantizers' own bits and exponents."""
    quantizers = {id(p) for _, layer in quantized_layers(model) for p in (layer.bits, layer.exponent)}
    return 4 * sum(t.numel() for t in model.state_dict(keep_vars=True).values() if id(t) not in quantizers)


def run(args) -> int:
    # the preservation set is chosen from a pool of DEMO_POOL examples: scoring all 54,000 would take a
    # quarter of the demo's time
    config = TrainConfig(data=args.data, data_dir=args.data_dir, steps=args.steps, warmup_steps=args.steps // 4,
                         eval_every=max(args.steps // 5, 1), out_dir=args.out, threads=args.threads, seed=args.seed,
                         preservation_pool=DEMO_POOL)
    data = load_data(config)
    print(f"compressing the paper's CNN on {data.source} for {config.steps} steps -> {config.out_dir}")
    result = train(config, data=data)
    packed = Path(config.out_dir) / PACKED
    summary = export.summarize(packed)
    print("\n" + export.format_summary(summary) + "\n")
    started = time.perf_counter()
    loaded = export.load_packed(packed)
    loaded_in = time.perf_counter() - started
    scores = evaluate(loaded, data.test)
    same = scores["accuracy"] == result.scores["test_accuracy"]
    float_bytes = _float32_bytes(new_model(config, data))
    from sgsc.train import plots

    plot = plots.plot_accuracy_vs_bytes(result.history, Path(config.out_dir) / "accuracy_vs_bytes.png",
                                        file_bytes=summary.file_bytes, file_accuracy=scores["accuracy"],
                                        float_bytes=float_bytes)
    print(
        f"trained model: test accuracy {result.scores['test_accuracy']:.4f} at {result.average_bits:.2f} bits per "
        f"weight after {result.seconds:.0f}s of training\n"
        f"{packed}: {summary.file_bytes} bytes ({100 * summary.file_bytes / float_bytes:.1f}% of the original model's "
        f"{float_bytes} float32 bytes), "
        f"loaded in {loaded_in * 1000:.0f} ms, test accuracy {scores['accuracy']:.4f} "
        f"({'identical to' if same else 'DIFFERS from'} the trained model)\n"
        f"accuracy against bytes through training: {plot}\n"
    )
    print(NEXT_STEPS)
    return 0 if same else 1


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="compress a CNN, export it packed, load it back and score it")
    parser.add_argument("--data", default="auto", choices=("auto", "digits", "fashion-mnist", "mnist"),
                        help="data set (default: Fashion-MNIST when found, else digits)")
    parser.add_argument("--data-dir", help="directory of the four IDX files")
    parser.add_argument("--steps", type=int, default=1200, help="training steps (default: %(default)s)")
    parser.add_argument("--out", default="runs/demo", help="output directory (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)
