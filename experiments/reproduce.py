"""``python experiments/reproduce.py ...`` = ``python -m experiments.paper.main ...`` (the
README's command; this file only puts the repository root on the path)."""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from experiments.paper.main import main

    main()
