"""Train a property classifier for EDM's conditional evaluation (EDM's main_qm9_prop.py).

From the repository root:

    python qm9/property_prediction/main_qm9_prop.py --num_workers 2 --lr 5e-4 --property alpha \
        --exp_name exp_class_alpha --model_name egnn            # the classifier
    python qm9/property_prediction/main_qm9_prop.py --lr 5e-4 --property alpha \
        --exp_name exp_class_alpha_numnodes --model_name numnodes   # the #Atoms baseline

Writes qm9/property_prediction/outputs/<exp_name>/{args.pickle, best_checkpoint.npy, losess.json,
resume_state.pt}; ``--resume`` continues a run. The logic is qm9/property_prediction/train_classifier.py.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from configs.errors import cli_errors  # noqa: E402
from qm9.property_prediction.train_classifier import main as _main  # noqa: E402

main = cli_errors(_main)

if __name__ == "__main__":
    main(sys.argv[1:])
