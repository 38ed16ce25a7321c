"""Train EDM (or EDM with GAGA's truncated training, --max_t) on QM9. EDM's command line.

    python main_qm9.py --exp_name edm_qm9 --diffusion_noise_schedule polynomial_2 ...
    torchrun --nproc_per_node 2 main_qm9.py ...      # DistributedDataParallel
    python main_qm9.py --resume outputs/edm_qm9      # continue a run

See training/args.py for every flag.
GeoLDM (latent diffusion, or its autoencoder alone) with GeoLDM's flags: --train_diffusion,
--ae_path, --trainable_ae, --latent_nf, --kl_weight (training/latent_args.py, README section GeoLDM).
"""
import functools

from configs.errors import cli_errors
from training.run import main as train_main

# One-line errors (status 2 for bad flags or run folders, 1 for a full/read-only disk) instead of tracebacks.
main = cli_errors(functools.partial(train_main, script="qm9"))

if __name__ == "__main__":
    main()
