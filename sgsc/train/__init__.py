"""The trainer layer: Algorithm 1 on a model and data set, with safety checks, checkpoints and DDP.

- :mod:`~sgsc.train.config`: ``TrainConfig`` and its checks;
- :mod:`~sgsc.train.data`: the IDX, digits and names readers (nothing is downloaded);
- :mod:`~sgsc.train.task`: data sets with their model, the loss, evaluation;
- :mod:`~sgsc.train.preservation`: Grad-CAM, uncertainty and k-means preservation sets;
- :mod:`~sgsc.train.safety`: restore and prune, with the run's typed state;
- :mod:`~sgsc.train.selfcompress`: ``SelfCompression``, Algorithm 1 inside the caller's own loop;
- :mod:`~sgsc.train.batches`, :mod:`~sgsc.train.distributed`, :mod:`~sgsc.train.checkpoint`;
- :mod:`~sgsc.train.loop`: ``compress``, the loop itself, and ``train``, the zoo's client of it;
  :mod:`~sgsc.train.plots`: its figures.

Imports :mod:`sgsc.ops`, :mod:`sgsc.nn` and :mod:`sgsc.export` (to write the run's packed file).
"""

from sgsc.train.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from sgsc.train.config import DATA_NAMES, LR_SCHEDULES, TrainConfig, unsafe
from sgsc.train.loop import compress, make_optimizer, train
from sgsc.train.safety import (
    Decision,
    Policy,
    Pruner,
    RunState,
    bits_snapshot,
    carry_out,
    default_pruner,
    graph_pruner,
    judge,
)
from sgsc.train.selfcompress import SelfCompression, param_groups
from sgsc.train.task import Data, evaluate, load_data, new_model, task_loss

__all__ = [
    "DATA_NAMES",
    "LR_SCHEDULES",
    "Data",
    "Decision",
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
    "make_optimizer",
    "model_from_checkpoint",
    "new_model",
    "param_groups",
    "save_checkpoint",
    "task_loss",
    "train",
    "unsafe",
]
