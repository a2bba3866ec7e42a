"""Two CPU processes (gloo) train one model with DDP, prune it mid-run, and stay in lockstep."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from sgsc.nn.zoo import build_model
from sgsc.train import TrainConfig, load_checkpoint, train

pytestmark = pytest.mark.slow  # two processes each

WORLD = 2



def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.manual_seed(0)
    model = build_model("paper_cnn", {"image_size": 8, "channels": [8, 16]})
    with torch.no_grad():  # zero-bit groups, removed at the first safe check: DDP must be re-wrapped
        model.blocks[0][0].bits[[2, 6]] = 0
        model.blocks[1][0].bits[[1, 4, 9]] = 0
    config = TrainConfig(steps=24, warmup_steps=4, k=8, eval_every=8, gamma=0.2, quant_lr=0.1, lr=3e-3,
                         batch_size=32, fraction=0.1, max_drop=1.0, progress=False, plots=False, threads=1,
                         out_dir=out)
    result = train(config, model=model)
    checks = [r for r in result.history if r["kind"] == "check"]
    torch.save({"state": model.state_dict(), "channels": model.config.channels, "checks": checks},
               os.path.join(out, f"rank{rank}.pt"))


def test_two_processes_agree_on_weights_bits_and_pruning(tmp_path, free_port):
    mp.spawn(_worker, args=(free_port, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert ranks[0]["channels"] == ranks[1]["channels"] == [6, 13]
    assert ranks[0]["checks"] == ranks[1]["checks"]  # rank 0's decisions, taken by both
    assert ranks[0]["checks"][0]["pruned"] == {"blocks.0.0": [2, 6], "blocks.1.0": [1, 4, 9]}
    params = {name for name, _ in build_model("paper_cnn", {"image_size": 8, "channels": [6, 13]}).named_parameters()}
    for name in params:  # parameters, not BN running stats: those see each rank's own batches
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name
    saved = load_checkpoint(tmp_path / "checkpoint.pt")  # rank 0 alone writes the run's files
    assert saved["model_config"]["channels"] == [6, 13] and saved["state"]["step"] == 24
    assert not any(tmp_path.glob(".checkpoint.pt.*.tmp"))


def test_torchrun_runs_the_cli_with_ddp(tmp_path, free_port):
    out = tmp_path / "run"
    port = free_port
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", f"--master_port={port}"]
    command = [*launcher, "-m", "sgsc", "train", "--steps", "12", "--warmup-steps", "4", "-k", "4", "--eval-every", "6",
               "--batch-size", "32", "--model-config", '{"channels": [4, 8]}', "--threads", "1", "--no-progress",
               "--no-plots", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("test accuracy") == 1  # rank 0 alone reports
    saved = load_checkpoint(out / "checkpoint.pt")
    assert saved["state"]["step"] == 12 and saved["world_size"] == WORLD
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # every 6 steps, and at step 4 the reference's own scores (compression starts there)
    assert [r["step"] for r in records if r["kind"] == "eval" and "returned_step" not in r] == [4, 6, 12]
