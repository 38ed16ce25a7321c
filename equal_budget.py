"""EDM vs EDM+GAGA at equal budget on a CPU: pilot, side-by-side resumable training, status.

    python equal_budget.py pilot --candidates nf=64,n_layers=4 nf=128,n_layers=4 --cpu_minutes 8
    python equal_budget.py train --epochs 60 --hours 2.5     # continue until epoch 60, at most 2.5 h now
    python equal_budget.py status

See training/study.py and pretrained/README.md.
"""
import sys

from training.study import main

if __name__ == "__main__":
    sys.exit(main())
