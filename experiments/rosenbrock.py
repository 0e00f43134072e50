"""Rosenbrock function (paper Fig. 2): FGD vs gradient descent, trajectories, loss vs time.

Usage: ``python experiments/rosenbrock.py --preset quick --out out/rosenbrock``
"""

import _functions

if __name__ == "__main__":
    _functions.main(name="rosenbrock")
