"""EDM vs EDM+GAGA at equal budget on a CPU: pilot, side-by-side resumable training, shipping, evaluation.

    python equal_budget.py pilot --candidates nf=64,n_layers=4 nf=128,n_layers=4 --cpu_minutes 3
    python equal_budget.py train --epochs 60 --hours 2.5     # continue until epoch 60, at most 2.5 h now
    python equal_budget.py status | curves | snapshot
    python equal_budget.py ship --epochs 60                  # pretrained/<run>/ at the budget
    python equal_budget.py evaluate --n_samples 1000 --iterations 3

The conditional (alpha) study runs the same commands with ``--study cond_alpha`` (before the command):

    python equal_budget.py --study cond_alpha train --epochs 20 --hours 2.5
    python equal_budget.py --study cond_alpha evaluate --iterations 100 --batch_size 100 --jobs 2

See training/study.py, training/conditional_study.py and pretrained/README.md.
"""
import sys

from configs.errors import cli_errors
from training.study import main

if __name__ == "__main__":
    sys.exit(cli_errors(main)())
