"""Hugging Face transformers models through sgsc: a GPT-2-style and a Llama-style model built from a config.

No weights are downloaded: each model is built from a small config and trained briefly on a synthetic
next-token task (repeating token patterns), then compressed with ``sgsc.compress``, saved, reloaded into a
fresh ``from_config`` model, and run with ``generate()``, on the packed runtime and in onnxruntime. Needs
``pip install 'sgsc[hf,onnx]'``.

    python examples/hugging_face.py               # both models, about two minutes on one CPU
    python examples/hugging_face.py --model gpt2  # or llama
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # configs only: nothing is fetched

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

import sgsc  # noqa: E402
from sgsc.nn.packed import resident_bytes  # noqa: E402

VOCAB, TIME = 96, 16


class Logits(nn.Module):
    """Token ids in, logits out: what ``compress`` trains (a transformers model returns a ModelOutput)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


def build(kind: str) -> Logits:
    special = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, **special)
        return Logits(transformers.GPT2LMHeadModel(config))
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True, **special)
    return Logits(transformers.LlamaForCausalLM(config))


def patterns(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences that repeat a random motif of 2-5 tokens: the next token is predictable from the context."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        motif = torch.randint(1, VOCAB, (int(torch.randint(2, 6, (1,), generator=generator)),), generator=generator)
        rows.append(motif.repeat(TIME // len(motif) + 2)[:TIME + 1])
    sequences = torch.stack(rows)
    return sequences[:, :-1], sequences[:, 1:]


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def run(kind: str, steps: int, out: Path) -> None:
    torch.manual_seed(0)
    model = sgsc.quantize_model(build(kind), init_bits=8)  # warns if any weight matrix stays float
    float_bytes = sum(4 * p.numel() for p in build(kind).parameters())
    x, y = patterns(2048, seed=1)
    result = sgsc.compress(model, (x, y), steps=steps, warmup_steps=steps // 4, gamma=0.05, k=50, lr=3e-3,
                           task_loss=next_token_loss, metric="loss", max_drop=0.2, preserve=0.05, progress=False)
    compressed = result.model.eval()
    path = out / f"{kind}.sgsc"
    sgsc.save_packed(compressed, path)
    returned = result.contract["returned"]
    guard = "the reference returned" if returned is None else f"loss {returned['drop']:+.3f} nats against the reference"
    print(f"{kind}: {result.average_bits:.2f} bits per weight, file {path.stat().st_size} bytes "
          f"({100 * path.stat().st_size / float_bytes:.1f}% of float32), guard: {guard}")

    test, _ = patterns(8, seed=2)
    loaded = sgsc.load_packed(path, model=build(kind))  # a fresh from_config model, quantized and cut as recorded
    with torch.no_grad():
        same = torch.equal(loaded(test), compressed(test))
        tokens = loaded.model.generate(test[:1, :8], max_new_tokens=8, do_sample=False)
        packed = sgsc.load_packed(path, model=build(kind), runtime="packed")
        gap = float((packed(test) - loaded(test)).abs().max() / loaded(test).abs().max())
    print(f"  reloaded bit for bit: {same}; generate(): {tokens[0, 8:].tolist()} after {test[0, :8].tolist()}")
    print(f"  packed runtime: max relative gap {gap:.1e}, resident {resident_bytes(packed)} bytes "
          f"(float runtime {resident_bytes(loaded)})")
    onnx_check(kind, path, loaded, test, out)


def onnx_check(kind: str, path: Path, loaded: nn.Module, test: torch.Tensor, out: Path) -> None:
    try:
        import onnxruntime as ort
    except ImportError:
        print("  onnxruntime is not installed: pip install 'sgsc[onnx]'")
        return
    from sgsc.export.onnx import EXACT_SESSION_OPTION

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sgsc.export_onnx(path, out / f"{kind}.onnx", test, model=build(kind))
    options = ort.SessionOptions()
    if any(EXACT_SESSION_OPTION[0] in str(w.message) for w in caught):
        options.add_session_config_entry(*EXACT_SESSION_OPTION)  # the one option the export asked for
    session = ort.InferenceSession(str(out / f"{kind}.onnx"), options, providers=["CPUExecutionProvider"])
    output = torch.from_numpy(session.run(None, {"input": test.numpy()})[0])
    with torch.no_grad():
        reference = loaded(test)
    print(f"  onnxruntime: max relative gap {float((output - reference).abs().max() / reference.abs().max()):.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["gpt2", "llama", "both"], default="both")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as out:
        for kind in (["gpt2", "llama"] if args.model == "both" else [args.model]):
            run(kind, args.steps, Path(out))


if __name__ == "__main__":
    main()
