"""Lightning with strategy="ddp" on two CPU processes and a curvlab Monitor (run by
tests/test_lightning.py as ``python tests/lightning_ddp.py OUT``; Lightning relaunches this script
for rank 1). Every rank builds the same RunLogger; only rank 0 writes OUT/run.h5."""

from __future__ import annotations

import gc
import sys
import warnings
from pathlib import Path

import torch
import torchvision_compat  # noqa: F401  (before Lightning imports torchvision)
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

import curvlab as cl
from curvlab.callbacks.lightning import CurvlabCallback
from curvlab.testing import MLP, mse


class Module(LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        x, y = batch
        return mse(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.05)


def problem() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = MLP(4, 8, 2).double()
    return (model, torch.randn(32, 4, generator=g, dtype=torch.float64),
            torch.randn(32, 2, generator=g, dtype=torch.float64))


def main(out: Path) -> None:
    torch.set_num_threads(1)
    model, x, y = problem()
    logger = cl.RunLogger(out / "run.h5", {"lr": 0.05}, mode="w")  # a no-op on rank 1
    monitor = cl.Monitor(model, mse, (x, y), logger,
                         [cl.Loss(every=2), cl.Sharpness(every=2, tol=1e-10)])
    trainer = Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=4, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[CurvlabCallback(monitor)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Module(model), DataLoader(TensorDataset(x, y), batch_size=8))
    logger.close()
    del trainer  # Lightning leaves the group up and DDP in reference cycles: an orderly teardown
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
