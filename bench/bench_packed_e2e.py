"""End to end: whole models on the packed runtime against the float runtime, both loaded from one file.

Each model is quantized (``sgsc.quantize_model`` or the zoo's own quantized layers), given a spread of
per-group bit depths (drawn from a fixed seed: 0 bits for ~10% of the groups, otherwise uniform 1..7,
with each group's exponent re-fitted so its largest weight lands on its top code; no training, no
data), written once with ``sgsc.save_packed`` to a temporary directory, and loaded twice with
``sgsc.load_packed(path, runtime="float")`` and ``runtime="packed"``. Cases:

* ``decoder``: the zoo's CharDecoder (default config: 2 blocks, 64 wide, block size 16) generating
  ``--tokens`` tokens one at a time at batch 1, greedy (argmax), from the same prompt; the model has
  no KV cache, so each step runs the last ``block_size`` tokens (up to 16 rows per linear).
  Reports tokens/s of each runtime and whether both generated the same tokens (fp32 summation order
  may flip a near-tie argmax: then the first differing step is reported).
* ``decoder-wide``: the same loop on a wider CharDecoder (4 blocks, 512 wide, MLP 2048, block size 16):
  the same rows per linear, 8-64x larger weights.
* ``decoder-xl``: the same loop at 2048 wide (2 blocks, MLP 8192: 100M weights, 400 MB in float32),
  weights no cache holds, as in a language model served from memory.
* ``cnn``: the zoo's PaperCNN (1x28x28, channels 32/64), batch 1 and 256.
* ``resnet18``: a ResNet-18 built here from plain ``nn`` modules (BasicBlock x [2, 2, 2, 2], widths
  64-512, BatchNorm, 1x1 downsampling shortcuts) with a CIFAR-style stem (3x3 conv, no max-pool) on
  3x32x32 inputs so that batch 256 fits the time budget; batch 1 and 256. It loads with
  ``load_packed(path, model=<float architecture built on the meta device>)``.

Timing: the two runtimes, and the packed one with int8 activations in its ``PackedLinear`` layers
(``packed-int8``: ``activations="int8"``; its stream layers and convolutions keep float activations),
run interleaved in one process (the order alternates every repeat), inside
``torch.inference_mode()``; medians with min-max, the ratio of the medians (``float / packed``: above 1
means the packed runtime is faster) and the median of the per-repeat ratios. Each row runs
``--repeats`` rounds (one call of each runtime), or stops after ``--budget-s`` seconds (at least 3 rounds).

Memory, per model and runtime: (a) the bytes of the model's tensors (parameters and buffers, each
storage once), of its quantized layers' weights (float32 on the float runtime; on the packed runtime
``sgsc.nn.packed.packed_weight_bytes``, the codes and layout tables) and ``workspace_bytes`` (the float32
buffer the packed convolutions share); (b) the RSS growth of a fresh subprocess that imports torch and
sgsc, warms up (saves, loads and runs tiny models of each kind: imports and one-time initialisation),
then loads the file and runs one batch-1 forward: ``VmRSS`` after minus before, the peak ``VmHWM``
(reset before the load), and ``VmRSS`` again after ``malloc_trim(0)``, which returns the heap memory
glibc keeps from freed temporaries (what is left is live). Ratios are against the file's packed weight bytes
(``sgsc.summarize(path).packed_bytes``, the codes stream), and for the resident weights also against those
plus the file's per-group widths and float32 scales (``group_metadata_bytes``, 5 bytes a group), which a
model with one group per row of a narrow layer needs as much as its codes. Writes
``bench/results/packed_e2e_<device>-<threads>t_<commit>[_<cases>].json`` (the cases when not all of them).

    python bench/bench_packed_e2e.py
    python bench/bench_packed_e2e.py --cases cnn,resnet18 --repeats 7 --threads 1
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_bitpack import commit, cpu_info
from bench_pruned_speed import ResNet
from torch import nn

import sgsc
from sgsc.nn import packed as packed_nn
from sgsc.nn import quantized_layers
from sgsc.nn.zoo import CharDecoder, CharDecoderConfig, PaperCNN, PaperCNNConfig

CASES = ("decoder", "decoder-wide", "decoder-xl", "cnn", "resnet18")
RUNTIMES = ("float", "packed")
# Timed side by side: the two runtimes, and the packed one with int8 activations in its PackedLinear layers
# (sgsc.nn.pack_model(activations="int8")'s choice; stream layers and convolutions keep float activations).
TIMED = (*RUNTIMES, "packed-int8")

# ---- models -----------------------------------------------------------------------------------


def resnet18() -> nn.Module:
    """ResNet-18 (11.2M parameters) with a CIFAR stem: 3x3 conv, stride 1, no max-pool."""
    return ResNet(widths=(64, 128, 256, 512))


WIDE_DECODER = {"n_embd": 512, "n_layer": 4, "head_dim": 64}  # block size 16, as the zoo default
# 2048 wide, 2 blocks: 100M weights, 400 MB in float32, too large for any cache (the regime of the
# 4096x4096 layer of bench_packed_runtime.py, where reading fewer bytes pays).
XL_DECODER = {"n_embd": 2048, "n_layer": 2, "head_dim": 128}
DECODER_CONFIGS = {"decoder": {}, "decoder-wide": WIDE_DECODER, "decoder-xl": XL_DECODER}


def build(case: str) -> nn.Module:
    """The quantized model of ``case`` (random weights), before its bit depths are spread."""
    if case in DECODER_CONFIGS:
        return CharDecoder(CharDecoderConfig(**DECODER_CONFIGS[case]))
    if case == "cnn":
        return PaperCNN()
    if case == "resnet18":
        return sgsc.quantize_model(resnet18())
    raise ValueError(f"unknown case {case!r}; one of {CASES}")


def architecture(case: str) -> nn.Module | None:
    """What ``load_packed`` needs as ``model=``: the float architecture, on the meta device (no storage)."""
    if case != "resnet18":
        return None  # zoo files name their model
    with torch.device("meta"):
        return resnet18()


def example_input(case: str, batch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(batch)
    if case.startswith("decoder"):
        config = CharDecoderConfig(**DECODER_CONFIGS[case])
        return torch.randint(0, config.vocab_size, (batch, config.block_size), generator=gen)
    if case == "cnn":
        return torch.randn(batch, 1, 28, 28, generator=gen)
    return torch.randn(batch, 3, 32, 32, generator=gen)


@torch.no_grad()
def spread_bits(model: nn.Module, seed: int, zero_fraction: float = 0.1) -> None:
    """Per group: 0 bits with probability ``zero_fraction``, else uniform 1..7; exponents re-fitted so each
    group's largest weight maps to its top code (``sgsc.nn.layers.initial_exponent``'s rule, per group)."""
    gen = torch.Generator().manual_seed(seed)
    for _, layer in quantized_layers(model):
        groups = layer.quant_groups
        bits = torch.randint(1, 8, (groups,), generator=gen).float()
        bits[torch.rand(groups, generator=gen) < zero_fraction] = 0
        peak = layer.grouped(layer.weight).abs().amax(dim=1)
        top_code = torch.clamp(2 ** (bits - 1) - 1, min=1)
        exponent = torch.where(peak > 0, torch.ceil(torch.log2(peak / top_code)), torch.zeros_like(peak))
        layer.bits.copy_(bits)
        layer.exponent.copy_(exponent)


# ---- timing -------------------------------------------------------------------------------------


def side_by_side(fns: dict, repeats: int, budget_s: float) -> tuple[dict, int]:
    """Each provider's per-call times, called in turn (order alternating), after one warm-up call each.

    Stops after ``repeats`` rounds, or after 3 once ``budget_s`` has passed."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names, start, rounds = list(fns), time.perf_counter(), 0
    while rounds < repeats and (rounds < 3 or time.perf_counter() - start < budget_s):
        for name in names if rounds % 2 == 0 else names[::-1]:
            begin = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - begin)
        rounds += 1
    return times, rounds


def stats(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def generate(model: nn.Module, prompt: torch.Tensor, tokens: int) -> list[int]:
    """Greedy decoding, one token at a time, the context cut to the block size (as language.sample does)."""
    block_size = model.config.block_size
    ids = prompt
    for _ in range(tokens):
        logits = model(ids[:, -block_size:])[:, -1]
        ids = torch.cat([ids, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return ids[0, prompt.shape[1]:].tolist()


def time_decoder(case: str, models: dict, args) -> list[dict]:
    vocab = models["float"].config.vocab_size
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(args.seed))
    outputs: dict[str, list[int]] = {}

    def run(runtime):
        def call():
            outputs[runtime] = generate(models[runtime], prompt, args.tokens)
        return call

    times, repeats = side_by_side({runtime: run(runtime) for runtime in TIMED}, args.repeats, args.budget_s)
    same = outputs["float"] == outputs["packed"]
    first_diff = None if same else next(
        i for i, (a, b) in enumerate(zip(outputs["float"], outputs["packed"])) if a != b)
    context = torch.cat([prompt, torch.tensor([outputs["float"]])], dim=1)[:, -models["float"].config.block_size:]
    logits = {runtime: models[runtime](context) for runtime in TIMED}
    row = time_row(case, 1, times, repeats)
    row.update({
        "tokens": args.tokens, "prompt": args.prompt,
        "float_tokens_per_s": args.tokens / row["float"]["median_s"],
        "packed_tokens_per_s": args.tokens / row["packed"]["median_s"],
        "same_tokens": same, "first_differing_step": first_diff,
        "distinct_tokens": len(set(outputs["float"])),
        "max_abs_logit_diff": float((logits["float"] - logits["packed"]).abs().max()),
        "int8_same_tokens": outputs["packed-int8"] == outputs["float"],
        "int8_max_abs_logit_diff": float((logits["float"] - logits["packed-int8"]).abs().max()),
        "float_tokens": outputs["float"], "packed_tokens": outputs["packed"],
    })
    return [row]


def time_row(case: str, batch: int, times: dict, repeats: int) -> dict:
    ratios = [f / p for f, p in zip(times["float"], times["packed"])]
    row = {"case": case, "batch": batch, "repeats": repeats, **{runtime: stats(times[runtime]) for runtime in TIMED}}
    row["float_over_packed"] = row["float"]["median_s"] / row["packed"]["median_s"]
    row["float_over_packed_int8"] = row["float"]["median_s"] / row["packed-int8"]["median_s"]
    row["median_pair_ratio"] = statistics.median(ratios)
    return row


def time_forward(case: str, models: dict, batches: list[int], args) -> list[dict]:
    rows = []
    for batch in batches:
        x = example_input(case, batch)
        diff = float((models["float"](x) - models["packed"](x)).abs().max())
        diff_int8 = float((models["float"](x) - models["packed-int8"](x)).abs().max())
        times, repeats = side_by_side({runtime: (lambda m=models[runtime]: m(x)) for runtime in TIMED},
                                      args.repeats, args.budget_s)
        rows.append({**time_row(case, batch, times, repeats), "max_abs_output_diff": diff,
                     "int8_max_abs_output_diff": diff_int8})
    return rows


# ---- memory -------------------------------------------------------------------------------------


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model``, each storage once."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def weight_bytes(model: nn.Module, runtime: str) -> int:
    """Resident bytes of the quantized layers' weights: float32 matrices, or packed codes and tables."""
    if runtime == "packed":
        return packed_nn.packed_weight_bytes(model)
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
               if isinstance(m, (nn.Linear, nn.Conv2d)) and not m.weight.is_meta)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _small_record_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 2))


def _warm_up() -> None:
    """Save, load (both runtimes) and run tiny models of each kind: every import and one-time
    initialisation that loading and running a model triggers, paid before the measured load."""
    tiny = {"decoder": CharDecoder(CharDecoderConfig(n_embd=16, n_layer=1, head_dim=8)),
            "cnn": PaperCNN(PaperCNNConfig(channels=[2, 2])), "resnet18": sgsc.quantize_model(_small_record_net())}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, model in tiny.items():
            path = Path(tmp) / f"{kind}.sgsc"
            sgsc.save_packed(model, path)
            for runtime in RUNTIMES:
                architecture_arg = _small_record_net() if kind == "resnet18" else None
                loaded = sgsc.load_packed(path, runtime=runtime, model=architecture_arg)
                with torch.inference_mode():
                    loaded(example_input(kind, 1))


def _trim() -> bool:
    """Give the heap memory glibc keeps from freed temporaries back to the system; False without glibc."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def child_rss(case: str, path: str, runtime: str, threads: int) -> dict:
    """In a fresh process: RSS and peak RSS growth from loading ``path`` on ``runtime`` and one forward."""
    torch.set_num_threads(threads)
    _warm_up()
    _trim()  # the warm-up's garbage returned first, so that the trim after the load frees only the load's
    reset_peak = True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        reset_peak = False
    before = _status_kib("VmRSS")
    model = sgsc.load_packed(path, runtime=runtime, model=architecture(case))
    loaded = _status_kib("VmRSS")
    with torch.inference_mode():
        model(example_input(case, 1))
    after = _status_kib("VmRSS")
    peak = _status_kib("VmHWM")
    trimmed = 1024 * (_status_kib("VmRSS") - before) if _trim() else None
    return {"rss_before_kib": before, "rss_growth_load_bytes": 1024 * (loaded - before),
            "rss_growth_bytes": 1024 * (after - before), "rss_growth_trimmed_bytes": trimmed,
            "peak_growth_bytes": 1024 * (peak - before) if reset_peak else None}


def measure_memory(case: str, path: Path, models: dict, summary, threads: int) -> list[dict]:
    rows = []
    for runtime in RUNTIMES:
        script = [sys.executable, __file__, "--child", case, str(path), runtime, "--threads", str(threads)]
        child = subprocess.run(script, capture_output=True, text=True)
        if child.returncode:
            raise RuntimeError(f"memory subprocess for {case} ({runtime}) failed:\n{child.stderr}")
        rss = json.loads(child.stdout.strip().splitlines()[-1])
        model = models[runtime]
        rows.append({
            "case": case, "runtime": runtime, "file_bytes": summary.file_bytes,
            "packed_weight_bytes": summary.packed_bytes, "group_metadata_bytes": summary.group_metadata_bytes,
            "average_bits": summary.average_bits,
            "tensor_bytes": tensor_bytes(model), "weight_bytes": weight_bytes(model, runtime),
            "workspace_bytes": packed_nn.workspace_bytes(model) if runtime == "packed" else 0, **rss,
        })
    return rows


# ---- report -------------------------------------------------------------------------------------


def mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def report(timing: list[dict], memory: list[dict], header: str) -> str:
    lines = [header, "", "| model | batch | repeats | float ms (min-max) | packed ms (min-max) | float / packed | "
             "median pair ratio | tokens/s float / packed | packed-int8 ms | float / packed-int8 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in timing:
        f, p, q = r["float"], r["packed"], r["packed-int8"]
        tokens = (f"{r['float_tokens_per_s']:.0f} / {r['packed_tokens_per_s']:.0f}" if "tokens" in r else "")
        lines.append(f"| {r['case']}{' (generate)' if 'tokens' in r else ''} | {r['batch']} | {r['repeats']} | "
                     f"{1e3 * f['median_s']:.3f} ({1e3 * f['min_s']:.3f}-{1e3 * f['max_s']:.3f}) | "
                     f"{1e3 * p['median_s']:.3f} ({1e3 * p['min_s']:.3f}-{1e3 * p['max_s']:.3f}) | "
                     f"{r['float_over_packed']:.2f} | {r['median_pair_ratio']:.2f} | {tokens} | "
                     f"{1e3 * q['median_s']:.3f} | {r['float_over_packed_int8']:.2f} |")
    for r in timing:
        if "tokens" in r:
            verdict = "same tokens" if r["same_tokens"] else f"tokens differ from step {r['first_differing_step']}"
            lines.append(f"\n{r['case']}: {r['tokens']} greedy tokens from a {r['prompt']}-token prompt: {verdict} "
                         f"({r['distinct_tokens']} distinct); max |logit difference| {r['max_abs_logit_diff']:.2e}; "
                         f"int8 activations: {'same' if r['int8_same_tokens'] else 'different'} tokens, max |logit "
                         f"difference| {r['int8_max_abs_logit_diff']:.2e}")
    if not memory:
        return "\n".join(lines)
    lines += ["", "| model | runtime | packed weights in file (MB) | weights resident (MB) | x packed | "
              "x packed + widths and scales | workspace (MB) | all tensors (MB) | x packed | RSS growth (MB) | "
              "x packed | peak RSS growth (MB) | x packed | RSS growth after malloc_trim (MB) | x packed |",
              "|---" * 15 + "|"]
    for r in memory:
        packed = r["packed_weight_bytes"]
        peak, trimmed = r["peak_growth_bytes"], r["rss_growth_trimmed_bytes"]
        lines.append(
            f"| {r['case']} | {r['runtime']} | {mb(packed)} | {mb(r['weight_bytes'])} | "
            f"{r['weight_bytes'] / packed:.2f} | {r['weight_bytes'] / (packed + r['group_metadata_bytes']):.2f} | "
            f"{mb(r['workspace_bytes'])} | {mb(r['tensor_bytes'])} | {r['tensor_bytes'] / packed:.2f} | "
            f"{mb(r['rss_growth_bytes'])} | {r['rss_growth_bytes'] / packed:.2f} | {mb(peak)} | "
            f"{'-' if peak is None else f'{peak / packed:.2f}'} | {mb(trimmed)} | "
            f"{'-' if trimmed is None else f'{trimmed / packed:.2f}'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--batches", default="1,256", help="batch sizes of the cnn and resnet18 cases")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per decoder call")
    parser.add_argument("--prompt", type=int, default=4, help="prompt length (tokens) of the decoder cases")
    parser.add_argument("--repeats", type=int, default=51, help="rounds (one call of each runtime) per row, at most")
    parser.add_argument("--budget-s", type=float, default=20.0,
                        help="a row stops after this many seconds (at least 3 rounds)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--child", nargs=3, metavar=("CASE", "PATH", "RUNTIME"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child_rss(*args.child, args.threads)))
        return
    cases = args.cases.split(",")
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; choose from {CASES}")
    device = platform.processor() or platform.machine()
    batches = [int(b) for b in args.batches.split(",")]

    load_at_start = os.getloadavg()
    timing, memory = [], []
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for case in cases:
            torch.manual_seed(args.seed)
            with torch.inference_mode(False):
                model = build(case)
                spread_bits(model, args.seed)
                path = Path(tmp) / f"{case}.sgsc"
                summary = sgsc.save_packed(model.eval(), path)
                del model
            models = {runtime: sgsc.load_packed(path, runtime=runtime, model=architecture(case))
                      for runtime in RUNTIMES}
            models["packed-int8"] = sgsc.load_packed(path, runtime="packed", model=architecture(case))
            for module in models["packed-int8"].modules():
                if isinstance(module, packed_nn.PackedLinear):
                    module.activations = "int8"
            print(f"{case}: {summary.file_bytes:,} bytes on disk, {summary.packed_bytes:,} of packed weights "
                  f"({summary.average_bits:.2f} bits per weight)", file=sys.stderr)
            if case.startswith("decoder"):
                timing += time_decoder(case, models, args)
            else:
                timing += time_forward(case, models, batches, args)
            if not args.no_memory:
                memory += measure_memory(case, path, models, summary, args.threads)

    load = os.getloadavg()
    header = (f"{device}, {args.threads} threads, torch {torch.__version__}, commit {commit()}, load average "
              f"(1 / 5 / 15 min) {' / '.join(f'{v:.2f}' for v in load_at_start)} at the start, "
              f"{' / '.join(f'{v:.2f}' for v in load)} at the end")
    print(report(timing, memory, header))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    subset = "" if set(cases) == set(CASES) else "_" + "-".join(cases)  # a run of some cases keeps the others' file
    path = out_dir / f"packed_e2e_{device.replace(' ', '_')}-{args.threads}t_{commit()}{subset}.json"
    path.write_text(json.dumps({"device": device, "cpu": cpu_info(), "commit": commit(), "torch": torch.__version__,
                                "load_average_start": load_at_start, "load_average_end": load,
                                "args": vars(args), "timing": timing, "memory": memory}, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
