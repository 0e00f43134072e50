"""The experiments, in the Flax-examples shape: ``paper/`` (Baydin et al. 2022), ``quality/``
(accuracy of every estimator) and ``benchmarks/`` (cost per step), each a ``main.py`` over
its ``train.py`` and ``configs/``; ``toolkit/`` holds what they share, among it the one
training loop. Run them from the repository root, e.g. ``python -m experiments.paper.main``.
"""
