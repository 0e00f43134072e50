"""Beale function (paper Fig. 2): FGD vs gradient descent, trajectories, loss vs time.

Usage: ``python experiments/beale.py --preset quick --out out/beale``
"""

import _functions

if __name__ == "__main__":
    _functions.main(name="beale")
