"""Safety-guided self-compression of your own model in your own training loop.

A small ResNet (basic blocks, BatchNorm, 1x1 shortcuts) built from plain ``nn`` modules, trained on
Fashion-MNIST when ``shared/data/fashion-mnist`` (or ``$SGSC_DATA_DIR``) holds it, else on
scikit-learn's 8x8 digits. Nothing here is sgsc's zoo: the model is quantized with
``sgsc.quantize_model``, the preservation set is chosen with ``sgsc.train.preservation.build``, a
guard set is held out of the training data (the loop never trains on it), and ``SelfCompression``
adds the size penalty and the safety checks to an ordinary PyTorch loop: the model it leaves is
within ``--max-drop`` of the model as compression started, on the guard. The
result is saved as a packed file and loaded back into a fresh ``SmallResNet`` on the packed runtime,
which computes from the bit-packed codes. Without a loop of your own,
``sgsc.compress(model, (x, y), preserve=0.05, steps=..., gamma=...)`` runs the same algorithm
in the zoo trainer's loop (its own guard split, seeded batches, checkpoints, resume, DDP).

    python examples/own_model.py                 # about a minute on one CPU thread
    python examples/own_model.py --single-adam   # the old recipe: one Adam at 1e-3 for everything
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import sgsc
from sgsc.nn.packed import packed_weight_bytes
from sgsc.train import SelfCompression, evaluate, param_groups, preservation
from sgsc.train.data import load_vision


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, in_channels: int, classes: int, stem_stride: int, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stem_stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.layer1 = BasicBlock(width, width, 1)
        self.layer2 = BasicBlock(width, 2 * width, 2)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.layer2(self.layer1(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(features, 1).flatten(1))


def batches(x: torch.Tensor, y: torch.Tensor, size: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    while True:
        pick = torch.randint(0, len(x), (size,), generator=generator)
        yield x[pick], y[pick]


def _data_source(args) -> tuple[str | None, str]:
    """``load_vision``'s arguments: the IDX files beside the checkout when present, else its own search."""
    if args.data == "digits":
        return None, "digits"
    beside = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist"
    directory = args.data_dir or (str(beside) if beside.is_dir() else None)
    return (directory, "fashion-mnist") if directory else (None, "auto")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=("auto", "digits"), default="auto", help="auto: Fashion-MNIST if found")
    parser.add_argument("--data-dir", default=None, help="the Fashion-MNIST IDX files (default: ../shared/data)")
    parser.add_argument("--warmup", type=int, default=200, help="steps of plain training before compressing")
    parser.add_argument("--steps", type=int, default=300, help="steps of self-compression")
    parser.add_argument("--gamma", type=float, default=0.03)
    parser.add_argument("--max-drop", type=float, default=0.01, help="the contract: accuracy the guard may lose")
    parser.add_argument("--single-adam", action="store_true", help="one Adam at 1e-3 over every parameter")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/own_model/model.sgsc", help="where the packed file goes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()

    data = load_vision(*_data_source(args))
    # the guard: 10% of the training data (at most 3,000), which no step below trains on
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(1))
    held = order[:min(3000, len(order) // 10)]
    x, y = (t[order[len(held):]] for t in data.train.tensors)
    guard = tuple(t[held] for t in data.train.tensors)
    # 28x28 images start with a stride-2 stem, so the example stays about a minute on one thread
    architecture = dict(in_channels=data.in_channels, classes=data.num_classes,
                        stem_stride=2 if data.image_size > 16 else 1)
    # every Conv2d and Linear now learns its bits per output channel
    model = sgsc.quantize_model(SmallResNet(**architecture))

    # 1. plain training, at the rates SelfCompression will use (sgsc.train.param_groups)
    optimizer = torch.optim.Adam(param_groups(model, lr=3e-3))
    stream = batches(x, y, 64, seed=0)
    for _ in range(args.warmup):
        inputs, targets = next(stream)
        loss = F.cross_entropy(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    before = evaluate(model, data.test)["accuracy"]

    # 2. the preservation set: 5% of (up to) 5,000 training examples, by Grad-CAM, uncertainty, diversity
    pool = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:5000]
    keep = pool[preservation.build(model, (x[pool], y[pool]), fraction=0.05)]
    print(f"{data.source}: {len(x)} training examples; preserving {len(keep)}; "
          f"test accuracy {before:.4f} at {sgsc.model_bits_report(model)['average_bits']:.2f} bits")

    # 3. self-compression in the same loop: one penalty term and one call per step
    parameters = sum(p.numel() for p in model.parameters())
    comp = SelfCompression(model, preserve=(x[keep], y[keep]), guard=guard, gamma=args.gamma, k=50,
                           max_drop=args.max_drop)
    if args.single_adam:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(args.steps):
        inputs, targets = next(stream)
        loss = F.cross_entropy(model(inputs), targets) + comp.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        event = comp.step(optimizer)
        if event is not None:
            check = event["guard"]
            print(f"step {event['step']:4d}: guard accuracy {check['value']:.3f} (reference {check['reference']:.3f}, "
                  f"drop bound {check['bound']:+.3f}): {event['verdict']}, {float(comp.terms['size']):.2f} bits, "
                  f"{describe(event)}")
    contract = comp.finish(optimizer)  # the model becomes the last state within max_drop on the guard
    print(f"returned the state of step {contract['returned_step']}"
          + ("" if contract["returned"] is not None else " (the reference: no compressed state met max_drop)"))

    report = sgsc.model_bits_report(model)
    after = evaluate(model, data.test)["accuracy"]
    print(f"test accuracy {before:.4f} -> {after:.4f}; {report['average_bits']:.2f} bits per weight, "
          f"{parameters} -> {sum(p.numel() for p in model.parameters())} parameters, "
          f"{report['pruned_groups']} zero-bit groups left (masked), weights {report['compression_ratio']:.1f}x smaller "
          f"than float32; {time.perf_counter() - started:.0f} s")

    # 4. deployment: the packed file, loaded into a fresh (unpruned) SmallResNet on the packed runtime
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    summary = sgsc.save_packed(model.eval(), args.out)
    packed = sgsc.load_packed(args.out, model=SmallResNet(**architecture), runtime="packed")
    floats = sgsc.load_packed(args.out, model=SmallResNet(**architecture))
    print(f"{args.out}: {summary.file_bytes} bytes; on the packed runtime test accuracy "
          f"{evaluate(packed, data.test)['accuracy']:.4f} (float runtime {evaluate(floats, data.test)['accuracy']:.4f}), "
          f"weights resident {packed_weight_bytes(packed)} bytes against {sum(p.numel() * 4 for p in floats.parameters())} "
          "bytes of float32 parameters")


def describe(event: dict) -> str:
    """A safety check's outcome: rolled back, waited, or units pruned (and zero-bit ones that had to stay)."""
    if "rolled_back_to" in event:
        return f"rolled back to step {event['rolled_back_to']}, slowed {sorted(event['slowed'])}"
    if event["verdict"] == "uncertain":
        return "waiting for evidence"
    count = lambda units: sum(len(groups) for groups in units.values())  # noqa: E731
    if "masked" in event:  # torch-pruning is not installed
        return f"{count(event['masked'])} zero-bit groups masked"
    return f"pruned {count(event['pruned'])} groups, kept {count(event.get('kept', {}))}"


if __name__ == "__main__":
    main()
