"""Training: the options and their defaults, the Trainer, and the pieces any training loop can use.

- :mod:`~nd_plugin.training.config`: :class:`~nd_plugin.training.config.TrainConfig`, the one
  owner of every default (the CLI, the benchmarks, :func:`~nd_plugin.wrap` and
  :func:`~nd_plugin.training.optim.param_groups` read theirs from it), the presets and the schedules;
- :mod:`~nd_plugin.training.trainer`: :class:`~nd_plugin.training.trainer.Trainer`, one loop for
  CPU, GPU and ``torchrun``;
- :mod:`~nd_plugin.training.steps`: the training step, eager, compiled or replayed as a CUDA graph;
- :mod:`~nd_plugin.training.optim`: the optimiser's parameter groups (network, gates);
- :mod:`~nd_plugin.training.bn`: BatchNorm recalibration with eval-time gates;
- :mod:`~nd_plugin.training.distributed`: DistributedDataParallel per phase, path statistics
  gathered over ranks.

Each name is imported from its own module; this package imports none of them, so that
:mod:`nd_plugin.decoupled` can read :class:`~nd_plugin.training.config.TrainConfig`'s defaults
without loading the Trainer.
"""
