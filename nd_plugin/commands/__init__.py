"""The commands layer: the workflows that the ``nd`` CLI runs on a run directory.

- :mod:`~nd_plugin.commands.decoupling`: :func:`~nd_plugin.commands.decoupling.decouple`
  (``nd decouple``): build, wrap, train, write the run directory;
- :mod:`~nd_plugin.commands.analyze`: :func:`~nd_plugin.commands.analyze.build_report`
  (``nd analyze``): analyse a run's paths and write its report;
- :mod:`~nd_plugin.commands.pruning`: :func:`~nd_plugin.commands.pruning.prune_run` (``nd prune``):
  prune, decide per layer what the runtime skips, measure every engine, export;
- :mod:`~nd_plugin.commands.detect`: :func:`~nd_plugin.commands.detect.run_detection`
  (``nd detect``): fit or load the detectors, attack, evaluate, write ``detect.json``.

Each is imported from its own module (they pull in scikit-learn, matplotlib, torch-pruning, so
this package imports none of them). The run directory's format, :class:`~nd_plugin.run.Run` and
:func:`~nd_plugin.run.open_run` live one layer down, in :mod:`nd_plugin.run`: the Trainer writes
its checkpoints through it too. The method modules the workflows call take modules, tensors,
loaders and path statistics, return objects, and write files only through those objects'
``save()`` methods; nothing below this package imports it.
"""
