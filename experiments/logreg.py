"""logreg on MNIST (paper preset) or the 8x8 digits (quick): SGD vs forward gradient descent.

Usage: ``python experiments/logreg.py --preset quick --out out/logreg``; see _classify.py.
"""

import sys

import _classify

if __name__ == "__main__":
    sys.exit(0 if _classify.main("logreg") is not None else 1)
