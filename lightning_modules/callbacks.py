"""Callbacks shared by every model family."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L

from core import storage

log = logging.getLogger("mirflow")


class ThroughputLog(L.Callback):
    """Logs crops/s of each training epoch, to the logger and as one log line per epoch.

    The line is what shows progress where there is no terminal for a progress bar.
    """

    def __init__(self, name: str, *, quiet: bool = False) -> None:
        self.name = name
        self.quiet = quiet  # many short fits (a study's MLPs): their callers report each fit instead
        self._start = 0.0
        self._crops = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._crops = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._crops += len(batch[0])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rate = self._crops / max(time.perf_counter() - self._start, 1e-9)
        # Under DDP each rank feeds its own share: the crops/s of the whole job is their sum.
        pl_module.log("train/crops_per_s", rate, reduce_fx="sum", sync_dist=True)
        shown = {k: f"{float(v):.4f}" for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}
        # On a terminal the progress bar already shows this; elsewhere the line is the progress.
        level = logging.DEBUG if trainer.progress_bar_callback is not None or self.quiet else logging.INFO
        log.log(
            level,
            "%s epoch %d/%d: %s, %.0f crops/s",
            self.name,
            trainer.current_epoch + 1,
            trainer.max_epochs,
            " ".join(f"{k} {v}" for k, v in sorted(shown.items())),
            rate,
        )


FINISHED = "mirflow_finished"  # in a snapshot: training had ended (max epochs or early stopping)


class Snapshot(L.Callback):
    """Writes ``path`` (``last.ckpt``) every ``every_n_steps`` optimizer steps and when training ends.

    A killed run restarts from it: Lightning restores the weights, the optimizer and the
    loops' progress, mid-epoch included (the rest of that epoch draws fresh crops: the
    loaders do not resume mid-epoch). The snapshot written when training ends carries
    :data:`FINISHED`, so a re-run tests the best checkpoint instead of training on.
    Each write goes to a temporary file renamed over the last one (:func:`core.storage.atomic_path`). Every rank calls
    :meth:`~lightning.Trainer.save_checkpoint` (it is collective); rank 0 writes.
    """

    def __init__(self, path: Path, *, every_n_steps: int) -> None:
        self.path, self.every_n_steps = Path(path), every_n_steps
        self._finished = False

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero:
            with storage.atomic_path(self.path) as tmp:
                trainer.save_checkpoint(tmp)
        else:  # the other ranks take part in the collective call; only rank 0 writes a file
            trainer.save_checkpoint(self.path)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[FINISHED] = self._finished

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finished = True
        self._save(trainer)


class CompileNetwork(L.Callback):
    """``torch.compile`` of ``pl_module.net`` in place, in every process that trains it.

    Under ``ddp_spawn`` each rank gets a pickled copy of the module, and pickling drops a
    compiled module's compiled call: compiling at ``setup`` happens in the rank itself.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            pl_module.net.compile()
