"""The trainer layer: Algorithm 1 on a model and data set, with safety checks, checkpoints and DDP.

- :mod:`~sgsc.train.config`: ``CompressConfig`` (every hyper-parameter, once) and ``TrainConfig`` (a zoo run);
- :mod:`~sgsc.train.data`: the IDX, digits and names readers (nothing is downloaded);
- :mod:`~sgsc.train.task`: data sets with their model, the loss, evaluation;
- :mod:`~sgsc.train.preservation`: Grad-CAM, uncertainty and k-means preservation sets (scored by
  :mod:`~sgsc.train.preservation_scores`, stored by :mod:`~sgsc.train.preservation_files`);
- :mod:`~sgsc.train.guard`: the guard check, paired against the reference at a stated confidence;
- :mod:`~sgsc.train.safety`: pass and prune, or roll back and slow the culprits, with the run's typed state;
- :mod:`~sgsc.train.pruners`: physical removal of zero-bit units (the zoo's, torch-pruning's);
- :mod:`~sgsc.train.selfcompress`: ``SelfCompression``, Algorithm 1 inside the caller's own loop;
- :mod:`~sgsc.train.batches`, :mod:`~sgsc.train.distributed`, :mod:`~sgsc.train.checkpoint`;
- :mod:`~sgsc.train.loop`: ``compress``, the loop itself (its arguments read by
  :mod:`~sgsc.train.compress_inputs`, its history logged by :mod:`~sgsc.train.metrics_log`);
  :mod:`~sgsc.train.trainer`: ``train``, the zoo's client of it;
  :mod:`~sgsc.train.plots`: its figures.

Imports :mod:`sgsc.ops`, :mod:`sgsc.nn` and :mod:`sgsc.export` (to write the run's packed file).
"""

from sgsc.train.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from sgsc.train.config import DATA_NAMES, LR_SCHEDULES, CompressConfig, TrainConfig, unsafe
from sgsc.train.guard import Check, Outcomes
from sgsc.train.loop import CompressResult, compress
from sgsc.train.pruners import Pruner, default_pruner, graph_pruner
from sgsc.train.safety import Decision, Policy, RunState, bits_snapshot, carry_out, judge
from sgsc.train.selfcompress import SelfCompression, param_groups
from sgsc.train.task import Data, evaluate, load_data, new_model, task_loss
from sgsc.train.trainer import train

__all__ = [
    "DATA_NAMES",
    "LR_SCHEDULES",
    "Check",
    "CompressConfig",
    "CompressResult",
    "Data",
    "Decision",
    "Outcomes",
    "Policy",
    "Pruner",
    "RunState",
    "SelfCompression",
    "TrainConfig",
    "bits_snapshot",
    "carry_out",
    "compress",
    "default_pruner",
    "evaluate",
    "graph_pruner",
    "judge",
    "load_checkpoint",
    "load_data",
    "model_from_checkpoint",
    "new_model",
    "param_groups",
    "save_checkpoint",
    "task_loss",
    "train",
    "unsafe",
]
