"""`sgsc experiment vision|language|resnet|frontier|report`: the paper's tables, measured, and RESULTS.md rendered
from them.

`vision` is Table I (:mod:`sgsc.experiments.vision`), `language` Table II
(:mod:`sgsc.experiments.language`), `resnet` the ResNet-20 table (any-model, public API)
(:mod:`sgsc.experiments.resnet`), `frontier` accuracy against bytes over seeds with the contract table
(:mod:`sgsc.experiments.frontier`), `report` renders RESULTS.md from the JSON files they write. The
experiments are imported when their command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sgsc.experiments import targets
from sgsc.nn.zoo import HEAD_GROUPS
from sgsc.ops.spec import ROUNDING_MODES
from sgsc.train.config import LR_SCHEDULES
from sgsc.train.data import VISION_NAMES, find_names_file


def positive_int(text: str) -> int:
    """argparse type of a count: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _grid_point(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    bad_steps = len(values) >= 3 and (values[2] < 2 or values[2] != int(values[2]))
    bad_exponent_lr = len(values) == 4 and not values[3] > 0
    if len(values) not in (2, 3, 4) or bad_steps or bad_exponent_lr:
        raise argparse.ArgumentTypeError(
            f"expected GAMMA,QUANT_LR[,STEPS[,EXPONENT_LR]] such as 0.05,0.1 or 0.05,0.1,800,0.01, got {text!r}"
        )
    return values


def _add_vision(subparsers) -> None:
    parser = subparsers.add_parser(
        "vision", help="Table I: the paper's CNN, SGSC vs unsafe self-compression, PTQ, QAT, magnitude pruning",
        description="Train the float baseline and every compression method per seed, export and measure each, "
        "run the ablations, the gamma sweep and the robustness checks; write <out>/vision.json and "
        "<out>/vision_pareto.png. Flags left out take the full-run defaults, or the --quick preset's.",
    )
    parser.add_argument("--data", choices=VISION_NAMES, help="data set (default: auto, or digits with --quick)")
    parser.add_argument("--data-dir", help="directory of the four IDX files (Fashion-MNIST or MNIST)")
    parser.add_argument("--quick", action="store_true", help="digits, a small CNN and tens of steps: a smoke test")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds of the main table (default 0 1 2; quick 0 1)")
    parser.add_argument("--steps", type=positive_int, help="compression / fine-tuning steps of every method")
    parser.add_argument("--float-steps", type=positive_int, help="float training steps before the snapshot")
    parser.add_argument("--gamma", type=float, help="SGSC/unsafe size-term weight")
    parser.add_argument("--sized-unsafe-gamma", type=float, help="gamma of the second unsafe run, whose files "
                        "should be about SGSC's size (the equal-size comparison)")
    parser.add_argument("--lr", type=float, help="Adam learning rate of the weights")
    parser.add_argument("--quant-lr", type=float, help="Adam learning rate of bits and exponents")
    parser.add_argument("--exponent-lr", type=float, help="Adam learning rate of exponents apart from bits "
                        "(default: --quant-lr)")
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, help="learning-rate schedule of every run")
    parser.add_argument("--sweep-gammas", type=float, nargs="*", help="extra gammas of the sweep (first seed)")
    parser.add_argument("--rounding", choices=ROUNDING_MODES, help="rounding of SGSC/unsafe (the ablation runs the other)")
    parser.add_argument("--head-groups", choices=HEAD_GROUPS, help="the classifier's bit-depth groups: one per "
                        "conv feature map it reads (channel, the default) or one per class (output, the paper's)")
    parser.add_argument("--no-ablations", dest="ablations", action="store_false", help="skip the rounding and "
                        "preservation ablations")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="training device (latency is always CPU)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch CPU threads per process (default: %(default)s)")
    parser.add_argument("--workers", type=positive_int, default=1,
                        help="processes training seeds at once; latency is timed afterwards in one (default: %(default)s)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument("--tune", type=_grid_point, nargs="+", metavar="GAMMA,QUANT_LR[,STEPS[,EXPONENT_LR]]",
                        help="instead of the table: SGSC at each setting on the first seed (steps and exponent "
                        "rate default to --steps and --exponent-lr), scored on the validation split, written to <out>/vision_tuning.json")
    parser.add_argument("--out", default="results", help="output directory (default: %(default)s)")
    parser.set_defaults(func=_run_vision)


def vision_settings(args: argparse.Namespace):
    """The VisionSettings the parsed flags describe: the preset, with every given flag on top."""
    from sgsc.experiments import vision

    keys = ("data", "data_dir", "seeds", "steps", "float_steps", "gamma", "sized_unsafe_gamma", "lr", "quant_lr", "exponent_lr", "lr_schedule",
            "sweep_gammas", "rounding", "head_groups", "device")
    overrides = {key: getattr(args, key) for key in keys if getattr(args, key) is not None}
    if args.data_dir is not None and args.data is None:
        overrides["data"] = "auto"  # the IDX files of --data-dir, also under --quick
    overrides.update(ablations=args.ablations, progress=args.progress)
    return vision.quick_settings(**overrides) if args.quick else vision.VisionSettings(**overrides)


def _run_vision(args: argparse.Namespace) -> int:
    from sgsc.experiments import vision, vision_tune

    torch.set_num_threads(args.threads)
    if args.tune:
        tuning = vision_tune.tune(vision_settings(args), args.tune, args.out, workers=args.workers)
        choice = tuning["choice"]
        exponent_lr = "shared" if choice["exponent_lr"] is None else f"{choice['exponent_lr']:g}"
        print(f"wrote {Path(args.out) / vision_tune.TUNING_FILE}; chosen on validation: gamma {choice['gamma']:g}, "
              f"quant_lr {choice['quant_lr']:g}, exponent lr {exponent_lr}, {choice['steps']} steps "
              f"({100 * choice['val_accuracy']:.2f}% val at {choice['pct_of_float']:.1f}% of the float bytes)")
        return 0
    result = vision.run(vision_settings(args), args.out, workers=args.workers)
    print(f"wrote {Path(args.out) / vision.RESULT_FILE} and {Path(args.out) / vision.PLOT_FILE}")
    _print_targets(result["targets"], targets.VISION_ACCURACY_POINTS, targets.VISION_SIZE_PERCENT)
    return 0


def _print_targets(verdict: dict, points: float, percent: float) -> None:
    """One line: SGSC's distance from float and its size, against the experiment's targets."""
    print(f"SGSC - float: {verdict['accuracy_gap_points']:+.2f} points at {verdict['pct_of_float']:.2f}% of the "
          f"float32 bytes (targets: >= -{points:g} points {'met' if verdict['accuracy_met'] else 'MISSED'}, "
          f"<= {percent:g}% {'met' if verdict['size_met'] else 'MISSED'})")


def _add_report(subparsers) -> None:
    parser = subparsers.add_parser("report", help="render RESULTS.md from the experiments' JSON files",
                                   description="Render RESULTS.md from <results>/vision.json, "
                                   "<results>/language.json and <results>/resnet.json (whichever exist); nothing "
                                   "is typed by hand.")
    parser.add_argument("--results", default="results", help="directory of the JSON files (default: %(default)s)")
    parser.add_argument("-o", "--output", default="RESULTS.md", help="markdown file to write (default: %(default)s)")
    parser.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from sgsc.experiments import report

    path = report.write(args.results, args.output)
    print(f"wrote {path}")
    return 0


def _report(markdown: str, *written: Path) -> int:
    """Print an experiment's markdown section and the files it wrote; the command's exit status."""
    print(markdown)
    print(f"wrote {' and '.join(map(str, written))}")
    return 0


def _run_language(args: argparse.Namespace) -> int:
    from sgsc.experiments import language

    corpus = args.corpus if args.corpus is not None else find_names_file()
    if corpus is None:
        raise SystemExit(
            "sgsc experiment language: no names corpus found (looked in $SGSC_DATA_DIR and ../shared/data "
            "beside the checkout); pass --corpus PATH/names.txt (one name per line)"
        )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = language.run(corpus, quick=args.quick, seeds=args.seeds, steps=args.steps, out_dir=args.out)
    return _report(language.markdown(result), Path(args.out) / language.RESULT_FILE)


def _add_language(subparsers) -> None:
    parser = subparsers.add_parser("language", help="Table II: char decoder on names, float vs unsafe vs SGSC",
                                   description="Table II: the character-level decoder on the names corpus, "
                                   "float vs unsafe self-compression vs SGSC, over seeds; writes <out>/language.json.")
    parser.add_argument("--corpus", default=None,
                        help="names file, one name per line (default: names.txt in $SGSC_DATA_DIR or ../shared/data)")
    parser.add_argument("--quick", action="store_true", help="tiny decoder, a few dozen steps: a smoke test")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2; 0 with --quick)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="steps per method and seed (default: the full run's, or the quick preset's)")
    parser.add_argument("--out", default="results", help="directory for language.json and the model files")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    parser.set_defaults(func=_run_language)


def _add_resnet(subparsers) -> None:
    parser = subparsers.add_parser(
        "resnet",
        help="ResNet-20 on Fashion-MNIST through the public API: float, unsafe, SGSC, PTQ int8/int4, 2-bit QAT",
        description="Train a float ResNet-20 per seed, then unsafe self-compression, SGSC and 2-bit QAT from its "
        "snapshot and PTQ of the final model; prune, save, load back and measure each; write <out>/resnet.json. "
        "Resumable: methods whose <out>/resnet-seed<N>/<method>.json exists are read back, not rerun.",
    )
    parser.add_argument("--quick", action="store_true", help="digits, a small ResNet, tens of steps: a smoke test")
    parser.add_argument("--data-dir", help="directory of the Fashion-MNIST IDX files")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1)")
    parser.add_argument("--steps", type=positive_int, help="steps of unsafe, SGSC and QAT from the float snapshot")
    parser.add_argument("--float-steps", type=positive_int, help="float steps before the snapshot")
    parser.add_argument("--gamma", type=float, help="size-term weight of SGSC and unsafe")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch CPU threads per process (default: %(default)s)")
    parser.add_argument("--workers", type=positive_int, default=1,
                        help="processes running seeds at once; latency is timed afterwards in one "
                        "(default: %(default)s)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument("--out", default="results", help="output directory (default: %(default)s)")
    parser.set_defaults(func=_run_resnet)


def resnet_settings(args: argparse.Namespace):
    """The ResNetSettings the parsed flags describe: the preset, with every given flag on top."""
    from sgsc.experiments import resnet

    keys = ("data_dir", "seeds", "steps", "float_steps", "gamma")
    overrides = {key: getattr(args, key) for key in keys if getattr(args, key) is not None}
    if args.data_dir is not None:
        overrides["data"] = "fashion-mnist"  # the IDX files of --data-dir, also under --quick
    overrides["progress"] = args.progress
    return resnet.quick_settings(**overrides) if args.quick else resnet.ResNetSettings(**overrides)


def _run_resnet(args: argparse.Namespace) -> int:
    from sgsc.experiments import resnet

    torch.set_num_threads(args.threads)
    result = resnet.run(resnet_settings(args), args.out, workers=args.workers)
    print(f"wrote {Path(args.out) / resnet.RESULT_FILE}")
    _print_targets(result["targets"], targets.RESNET_ACCURACY_POINTS, targets.RESNET_SIZE_PERCENT)
    return 0


def _add_frontier(subparsers) -> None:
    parser = subparsers.add_parser(
        "frontier", help="accuracy against bytes over seeds: SGSC (three preservation terms), unsafe, QAT, PTQ, "
        "and the contract table",
        description="Per seed, a float model (the paper CNN or ResNet-20), then SGSC and unsafe at every gamma, "
        "fixed-bit QAT and PTQ from its snapshot; each exported, loaded back and scored on test; writes "
        "<out>/frontier.json and <out>/frontier.png (ResNet-20: frontier_resnet20.*). Resumable: runs whose "
        "<out>/frontier[-resnet20]-seed<N>/<run>.json exists are read back.")
    parser.add_argument("--model", choices=("paper_cnn", "resnet20"), default="paper_cnn",
                        help="the model (default %(default)s; resnet20 brings its own steps, k, gammas and terms)")
    parser.add_argument("--quick", action="store_true", help="digits, a small CNN, tens of steps: a smoke test")
    parser.add_argument("--data", choices=VISION_NAMES, help="data set (default fashion-mnist; quick: digits)")
    parser.add_argument("--data-dir", help="directory of the four IDX files")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2)")
    parser.add_argument("--gammas", type=float, nargs="+", help="size-term weights of SGSC and unsafe")
    parser.add_argument("--steps", type=positive_int, help="steps of every method from the float snapshot")
    parser.add_argument("--float-steps", type=positive_int, help="float steps before the snapshot")
    parser.add_argument("--max-drop", type=float, help="the contract of the SGSC runs (accuracy, a fraction)")
    parser.add_argument("--terms", nargs="+", choices=("task", "distill", "none"),
                        help="the preservation terms SGSC runs with (default: all three; resnet20: distill)")
    parser.add_argument("--preservation-batch", type=positive_int,
                        help="preservation examples per step of the SGSC runs (default: the library's)")
    parser.add_argument("--patience", type=positive_int,
                        help="failed checks in a row before an SGSC run rolls back (default: the library's)")
    parser.add_argument("--workers", type=positive_int, default=1, help="processes at once (default: %(default)s)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument("--out", default="results", help="output directory (default: %(default)s)")
    parser.set_defaults(func=_run_frontier)


def _run_frontier(args: argparse.Namespace) -> int:
    from sgsc.experiments import frontier, frontier_report

    keys = ("model", "data", "data_dir", "seeds", "gammas", "steps", "float_steps", "max_drop", "terms",
            "preservation_batch", "patience")
    overrides = {key: getattr(args, key) for key in keys if getattr(args, key) is not None}
    overrides["progress"] = args.progress
    settings = (frontier.quick_settings if args.quick else frontier.default_settings)(**overrides)
    result = frontier.run(settings, args.out, workers=args.workers)
    result_file, plot_file = frontier.result_names(settings)
    return _report(frontier_report.markdown(result), Path(args.out) / result_file, Path(args.out) / plot_file)


def register(subparsers) -> None:
    """Add `sgsc experiment` with its `vision`, `language`, `resnet`, `frontier` and `report` subcommands."""
    parser = subparsers.add_parser("experiment", help="reproduce the paper's tables and render RESULTS.md",
                                   description="Reproduce the paper's tables side by side with the usual "
                                   "alternatives, and render RESULTS.md from the results.")
    experiments = parser.add_subparsers(dest="experiment", required=True)
    _add_vision(experiments)
    _add_language(experiments)
    _add_resnet(experiments)
    _add_frontier(experiments)
    _add_report(experiments)
