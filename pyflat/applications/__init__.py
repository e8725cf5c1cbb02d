"""What pyflat's measurements are for: the demo, the paper's experiments, the sharpness
report of a user's model, and the benchmark sweep.

The layer above the analysis and below the command line. Its modules:

* :mod:`~pyflat.applications.digits`: the one loader of scikit-learn's bundled digits;
* :mod:`~pyflat.applications.training`: the one trainer (full-batch Adam on cross-entropy
  plus mu/2 |theta|^2) and accuracy;
* :mod:`~pyflat.applications.models`: the MLPs and the digits CNN the applications build;
* :mod:`~pyflat.applications.demo`: ``pyflat demo``, the paper's central finding;
* :mod:`~pyflat.applications.experiments`: the paper's further experiments
  (``python -m pyflat.paper``);
* :mod:`~pyflat.applications.user_model`: ``pyflat sharpness``, a user's entry point,
  checkpoint and batches;
* :mod:`~pyflat.applications.sweep` and :mod:`~pyflat.applications.timing`: ``pyflat
  bench`` and the timing pieces the benchmarks share;
* :mod:`~pyflat.applications.usage`: :class:`UsageError`, the error a user can fix, and
  the checks of where results go.

The command line (``pyflat.cli``, ``pyflat.paper``) parses arguments and calls these
functions; they take plain arguments and can be called from Python as well.
"""
