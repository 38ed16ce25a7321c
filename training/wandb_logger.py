"""Optional Weights & Biases logging: off unless asked for, imported lazily, never required."""
from __future__ import annotations

import argparse
import socket
from typing import Any


def _online() -> bool:
    try:
        socket.create_connection(("api.wandb.ai", 443), timeout=2).close()
        return True
    except OSError:
        return False


class RunLogger:
    """``log(dict)`` goes to wandb when enabled (rank 0 only); otherwise it does nothing."""

    def __init__(self, args: argparse.Namespace, enabled: bool, run_dir: str):
        self.run = None
        if not enabled:
            return
        try:
            import wandb
        except ImportError:
            print("note: wandb is not installed; logging to the console only (pip install wandb to use it)")
            return
        mode = "online" if getattr(args, "online", True) and _online() else "offline"
        if mode == "offline" and getattr(args, "online", True):
            print("note: no network; wandb runs in offline mode (sync later with `wandb sync`)")
        kwargs: dict[str, Any] = dict(
            project="e3_diffusion", name=args.exp_name, config=vars(args), dir=run_dir, mode=mode,
            settings=wandb.Settings(_disable_stats=True),
        )
        if getattr(args, "wandb_usr", None):
            kwargs["entity"] = args.wandb_usr
        try:
            self.run = wandb.init(**kwargs)
        except Exception as e:  # noqa: BLE001 - any wandb failure must not stop training
            print(f"note: wandb could not start ({type(e).__name__}: {e}); logging to the console only")
            self.run = None

    @property
    def wandb(self):
        if self.run is None:
            return None
        import wandb

        return wandb

    def log(self, values: dict[str, Any], commit: bool = True) -> None:
        if self.run is not None:
            self.run.log(values, commit=commit)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
