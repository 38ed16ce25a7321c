"""Train EDM (or EDM with GAGA's truncated training, --max_t) on GEOM-Drugs. EDM's command line.

Same flags as main_qm9.py with main_geom_drugs.py's defaults (dataset geom, nf 192, lr 5e-4,
...), plus --filter_molecule_size, --sequential and --data_file. See training/args.py.
"""
from training.run import main

if __name__ == "__main__":
    main(script="geom")
