"""Train EDM (or EDM with GAGA's truncated training, --max_t) on GEOM-Drugs. EDM's command line.

Same flags as main_qm9.py with main_geom_drugs.py's defaults (dataset geom, nf 192, lr 5e-4,
...), plus --filter_molecule_size, --sequential and --data_file. See training/args.py.
GeoLDM (latent diffusion, or its autoencoder alone) with GeoLDM's flags: --train_diffusion,
--ae_path, --trainable_ae, --latent_nf, --kl_weight (training/latent_args.py, README section GeoLDM).
"""
import functools

from configs.errors import cli_errors
from training.run import main as train_main

# One-line errors (status 2 for bad flags or run folders, 1 for a full/read-only disk) instead of tracebacks.
main = cli_errors(functools.partial(train_main, script="geom"))

if __name__ == "__main__":
    main()
