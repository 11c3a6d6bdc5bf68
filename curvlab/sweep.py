"""Width (and depth, LR) sweeps: train one run per configuration and log it with a Monitor.

Models: ``mlp``, ``resnet``, ``convnet`` (inputs viewed as square one-channel images, e.g. the
8x8 digits or the 4x4 teacher inputs) and ``transformer`` (inputs split into 4 tokens).

The default job (``curvlab sweep`` with no flags) trains a 3-layer ReLU MLP at widths 64-512
under muP and NTP with full-batch GD on a 512-point teacher-student task (MSE), logging the loss
every step and, every 10 steps, the LR-preconditioned sharpness (with its EoS line ``2 / eta``), the
top eigenvalues of the empirical NTK on 64 probe examples and the feature speed per layer.

``lr="auto"`` (the default): for each parametrization, ``eta = lr_fraction * 2 / lambda_0``, with
``lambda_0`` the LR-preconditioned sharpness at initialization at the base width (the smallest
width) and ``lr_fraction = 0.5``, used unchanged at every width. Starting at half the stability
threshold leaves room for progressive sharpening, so the runs show it rise toward ``2 / eta``
(Cohen et al. 2021, arXiv:2103.00065) instead of sitting at the edge from step one, where every
width looks alike for the wrong reason. With ``optimizer="adam"``, ``lambda_0`` is the
Adam-preconditioned sharpness at initialization (the preconditioner of the first gradient, read
after a step at LR 0) and ``eta = lr_fraction * 38 / lambda_0`` at beta1 = 0.9, the Adam
threshold solved for ``eta`` (Cohen et al. 2022, arXiv:2207.14484; :func:`auto_lr`).

Datasets (all generated or shipped, nothing downloaded): ``"teacher"`` (Gaussian inputs, a random
tanh teacher network's outputs), ``"mixture"`` (a Gaussian mixture, one-hot targets), ``"digits"``
(scikit-learn's bundled 8x8 digits, if scikit-learn is installed) or a path to an ``.npz`` file
with arrays ``x (n, d)`` and ``y (n, k)`` (or integer labels ``(n,)``). The loss is MSE
(``0.5 ||f - y||^2`` averaged over examples; labels are one-hot encoded), or with
``loss="xent"`` the mean cross-entropy of the outputs as logits against the targets' classes
(their argmax, for the classification data sets). ``dtype`` (``"float32"``,
the default, or ``"float64"``) is used for the model and the data.

Running a sweep: ``run_sweep(cfg, out)`` trains the runs one after another; ``jobs=N`` trains N at
once in separate processes, and ``curvlab.fanout.plan_sweep`` writes one JSON config per run for a
cluster instead (``curvlab run CONFIG`` trains one). Every path gives the same run files: the auto
LRs are computed once, before any training, and each run is seeded by its own seed alone.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from curvlab.callbacks import FeatureSpeed, Loss, Monitor, NTKSpectrum, Sharpness
from curvlab.hdf5 import RunLogger
from curvlab.models import (
    MLP,
    NTP,
    SP,
    ConvNet,
    DepthMuP,
    MuP,
    Parametrization,
    ResNet,
    Transformer,
    interpolated,
)
from curvlab.preconditioning import adam_scales, lr_scales
from curvlab.runs import load_run
from curvlab.sharpness import sharpness
from curvlab.testing import mse

MODELS = ("mlp", "resnet", "convnet", "transformer")
DATASETS = ("teacher", "mixture", "digits")
PARAMETRIZATIONS = ("mup", "ntp", "sp", "depth-mup", "interp:S")  # S in [0, 1]
DTYPES = ("float32", "float64")


def cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy of logits ``out (n, k)`` against one-hot targets ``y (n, k)``."""
    return torch.nn.functional.cross_entropy(out, y.argmax(dim=1))


LOSSES = {"mse": mse, "xent": cross_entropy}
LR_FRACTION = 0.5


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """Everything a sweep needs; every run file stores its own slice of it as its config."""

    model: str = "mlp"
    widths: tuple[int, ...] = (64, 128, 256, 512)
    depths: tuple[int, ...] = (3,)
    parametrizations: tuple[str, ...] = ("mup", "ntp")
    optimizer: str = "sgd"
    lrs: tuple[float, ...] | str = "auto"
    steps: int = 200
    batch_size: int | None = None  # None: full batch
    dataset: str = "teacher"
    n: int = 512
    probe_size: int = 256
    every: int = 10
    seeds: tuple[int, ...] = (0, 1, 2)  # averaged per width in the report
    device: str = "cpu"
    base_width: int | None = None  # None: the smallest width
    sigma: float = 1.0  # base init scale of every parametrization
    lr_fraction: float = LR_FRACTION  # lr="auto": eta = lr_fraction * 2 / lambda_0
    dtype: str = "float32"  # of the model and the data: "float32" or "float64"
    loss: str = "mse"  # "mse" or "xent" (cross-entropy on the one-hot targets' classes)

    def validate(self) -> None:
        call = "sweep"
        if self.model not in MODELS:
            raise ValueError(f"{call}: unknown model {self.model!r}; choose from {MODELS}")
        unknown = [p for p in self.parametrizations if not _known_parametrization(p)]
        if unknown or not self.parametrizations:
            raise ValueError(f"{call}: unknown parametrizations {unknown}; choose from "
                             f"{PARAMETRIZATIONS}, e.g. 'interp:0.5' for cl.interpolated(0.5)")
        bad = [w for w in self.widths if isinstance(w, bool) or not isinstance(w, int) or w < 1]
        if bad or not self.widths:
            raise ValueError(f"{call}: widths must be positive integers, got {list(self.widths)}")
        if self.base_width is not None and self.base_width > min(self.widths):
            raise ValueError(f"{call}: base width {self.base_width} is larger than the smallest "
                             f"width {min(self.widths)}")
        if self.dataset not in DATASETS and not str(self.dataset).endswith(".npz"):
            raise ValueError(f"{call}: unknown dataset {self.dataset!r}; choose from {DATASETS} "
                             "or give a path to an .npz file")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"{call}: optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.lrs != "auto" and (isinstance(self.lrs, str) or
                                   not all(lr > 0 for lr in self.lrs)):
            raise ValueError(f"{call}: lrs must be 'auto' or positive numbers, got {self.lrs!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"{call}: dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"{call}: loss must be one of {tuple(LOSSES)}, got {self.loss!r}")

    @property
    def base(self) -> int:
        return self.base_width or min(self.widths)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == "float64" else torch.float32


def config_from_dict(values: Mapping[str, Any], call: str = "sweep") -> SweepConfig:
    """A :class:`SweepConfig` from plain values (JSON lists become tuples); unknown keys refused."""
    unknown = set(values) - {f.name for f in dataclasses.fields(SweepConfig)}
    if unknown:
        raise ValueError(f"{call}: unknown config keys {sorted(unknown)}; the keys are the fields "
                         "of curvlab.sweep.SweepConfig")
    plain: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return SweepConfig(**plain)


Job = tuple[str, int, int, float, int]  # (parametrization, width, depth, lr, seed)


def make_dataset(name: str, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(x (n, d), y (n, k))`` float32 (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    if name == "teacher":
        x = torch.randn(n, 16, generator=g)  # (n, 16)
        w1 = torch.randn(16, 32, generator=g) / 4  # (16, 32)
        w2 = torch.randn(32, 4, generator=g) / math.sqrt(32)  # (32, 4)
        return x, torch.tanh(x @ w1) @ w2 * 2  # (n, 4)
    if name == "mixture":
        centers = torch.randn(4, 16, generator=g) * 1.5  # (4 classes, 16)
        labels = torch.randint(0, 4, (n,), generator=g)
        x = centers[labels] + torch.randn(n, 16, generator=g)  # (n, 16)
        return x, torch.nn.functional.one_hot(labels, 4).float()
    if name == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise ValueError("sweep: dataset 'digits' needs scikit-learn (pip install "
                             "scikit-learn); or use 'teacher', 'mixture' or an .npz") from None
        data = load_digits()
        idx = torch.randperm(len(data.target), generator=g)[:n]
        x = torch.tensor(data.data, dtype=torch.float32)[idx] / 16.0  # (n, 64)
        y = torch.nn.functional.one_hot(torch.tensor(data.target)[idx], 10).float()
        return x, y
    path = Path(name)
    if not path.exists():
        raise ValueError(f"sweep: dataset file {path} does not exist")
    with np.load(path, allow_pickle=False) as f:
        if "x" not in f or "y" not in f:
            raise ValueError(f"sweep: {path} must hold arrays 'x' and 'y'")
        x, y = torch.tensor(f["x"], dtype=torch.float32), torch.tensor(f["y"])
    if y.ndim == 1:
        y = torch.nn.functional.one_hot(y.long()).float()
    return x.reshape(len(x), -1)[:n], y.float()[:n]


def _interp_s(name: str) -> float | None:
    """``S`` of ``"interp:S"`` when it is a number in ``[0, 1]``, else ``None``."""
    head, _, tail = name.partition(":")
    if head != "interp":
        return None
    try:
        s = float(tail)
    except ValueError:
        return None
    return s if 0.0 <= s <= 1.0 else None


def _known_parametrization(name: str) -> bool:
    return name in ("mup", "ntp", "sp", "depth-mup") or _interp_s(name) is not None


def parametrization(name: str, base_width: int, sigma: float, base_depth: int = 1
                    ) -> Parametrization:
    """The parametrization a sweep names: ``"mup"``, ``"ntp"``, ``"sp"``, ``"depth-mup"``
    (relative to ``base_depth``, the sweep's smallest depth) or ``"interp:S"``
    (``cl.interpolated(S)``, NTP at 0 and muP at 1)."""
    s = _interp_s(name)
    if s is not None:
        return interpolated(s, base_width, sigma)
    if name == "depth-mup":
        return DepthMuP(base_width, sigma, base_depth=base_depth)
    return {"mup": MuP(base_width, sigma), "ntp": NTP(sigma=sigma), "sp": SP(sigma=sigma)}[name]


def _param(cfg: SweepConfig, par: str) -> Parametrization:
    return parametrization(par, cfg.base, cfg.sigma, min(cfg.depths))


class _Shaped(torch.nn.Module):
    """Feeds flat inputs ``(n, d)`` to a ConvNet as square images ``(n, 1, s, s)`` or to a
    Transformer as ``TOKENS`` tokens ``(n, TOKENS, d / TOKENS)``; keeps the inner model's
    ``width``, ``depth`` and ``parametrization``."""

    def __init__(self, inner: torch.nn.Module, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.inner, self.shape = inner, shape
        self.width, self.depth = inner.width, inner.depth
        self.parametrization = inner.parametrization

    def forward(self, x: Tensor) -> Tensor:  # x (n, d)
        return self.inner(x.reshape(len(x), *self.shape))  # (n, d_out)


TOKENS = 4


def build_model(cfg: SweepConfig, par: str, width: int, depth: int, d_in: int, d_out: int,
                seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    p = _param(cfg, par)
    model: torch.nn.Module
    if cfg.model in ("mlp", "resnet"):
        model = (MLP if cfg.model == "mlp" else ResNet)(width, depth, p, d_in=d_in, d_out=d_out)
    elif cfg.model == "convnet":
        side = math.isqrt(d_in)
        if side * side != d_in:
            raise ValueError(f"sweep: model 'convnet' needs square images; inputs have {d_in} "
                             "features")
        model = _Shaped(ConvNet(width, depth, p, in_channels=1, d_out=d_out), (1, side, side))
    else:
        if d_in % TOKENS:
            raise ValueError(f"sweep: model 'transformer' splits inputs into {TOKENS} tokens; "
                             f"{d_in} features do not divide")
        model = _Shaped(Transformer(width, depth, p, d_in=d_in // TOKENS, d_out=d_out),
                        (TOKENS, d_in // TOKENS))
    return model.to(device=cfg.device, dtype=cfg.torch_dtype)


def load_data(cfg: SweepConfig) -> tuple[Tensor, Tensor]:
    """The sweep's dataset on ``cfg.device`` in ``cfg.dtype``: ``(x (n, d), y (n, k))``."""
    x, y = make_dataset(cfg.dataset, cfg.n)
    return x.to(cfg.device, cfg.torch_dtype), y.to(cfg.device, cfg.torch_dtype)


def auto_lr(cfg: SweepConfig, par: str, depth: int, x: Tensor, y: Tensor) -> float:
    """``lr_fraction * T(lambda_0)`` at the base width (see the module docstring).

    SGD: ``lambda_0`` is the LR-preconditioned sharpness at initialization and ``eta = fraction *
    2 / lambda_0``. Adam: ``lambda_0`` is the Adam-preconditioned sharpness at initialization,
    with the preconditioner of the second step read after a first step at LR 0 (the state holds
    the first gradient's moments, the parameters stay at init), and ``eta = fraction * (2 + 2
    beta1) / ((1 - beta1) lambda_0)``, the Adam threshold ``38 / eta`` solved for ``eta``.
    """
    model = build_model(cfg, par, cfg.base, depth, x.shape[1], y.shape[1], cfg.seeds[0])
    opt = _param(cfg, par).optimizer(model, cfg.optimizer, 1.0)
    params = dict(model.named_parameters())
    if cfg.optimizer == "sgd":
        d, bound = lr_scales(opt, params, base_lr=1.0), 2.0
    else:
        LOSSES[cfg.loss](model(x), y).backward()
        multipliers = [g["lr"] for g in opt.param_groups]
        for g in opt.param_groups:
            g["lr"] = 0.0  # a first step that fills Adam's state and moves nothing
        opt.step()
        for g, lr in zip(opt.param_groups, multipliers, strict=True):
            g["lr"] = lr
        beta1 = float(opt.param_groups[0]["betas"][0])
        d, bound = adam_scales(opt, params, base_lr=1.0), (2 + 2 * beta1) / (1 - beta1)
    lam = sharpness(model, LOSSES[cfg.loss], (x, y), scales=d,
                    generator=torch.Generator().manual_seed(0))
    return cfg.lr_fraction * bound / lam


def run_name(par: str, width: int, depth: int, lr: float, seed: int) -> str:
    return f"{par.replace(':', '-')}_w{width}_d{depth}_lr{lr:.4g}_s{seed}.h5"


def train_one(cfg: SweepConfig, par: str, width: int, depth: int, lr: float, seed: int,
              data: tuple[Tensor, Tensor], path: Path, progress: Any = None) -> None:
    """One run: full-batch (or mini-batch) training with a Monitor, logged to ``path``."""
    x, y = data
    model = build_model(cfg, par, width, depth, x.shape[1], y.shape[1], seed)
    opt = _param(cfg, par).optimizer(model, cfg.optimizer, lr)
    probe = (x[:cfg.probe_size], y[:cfg.probe_size])
    config = {"model": cfg.model, "width": width, "depth": depth, "parametrization": par,
              "optimizer": cfg.optimizer, "lr": lr, "seed": seed, "steps": cfg.steps,
              "dataset": cfg.dataset, "n": len(x), "batch_size": cfg.batch_size,
              "probe_size": cfg.probe_size, "every": cfg.every, "base_width": cfg.base,
              "loss": cfg.loss, "dtype": cfg.dtype}
    g = torch.Generator().manual_seed(seed)
    kind = "lr" if cfg.optimizer == "sgd" else "adam"
    with RunLogger(path, config, mode="w", env={"device": cfg.device}) as log:
        monitor = Monitor(model, LOSSES[cfg.loss], probe, log,
                          [Loss(every=1), Sharpness(every=cfg.every, preconditioned=kind),
                           NTKSpectrum(every=cfg.every, k=4, size=64),
                           FeatureSpeed(every=cfg.every)],
                          optimizer=opt, seed=seed)
        monitor.on_train_start()
        for step in range(1, cfg.steps + 1):
            if cfg.batch_size is None:
                xb, yb = x, y
            else:
                idx = torch.randint(0, len(x), (cfg.batch_size,), generator=g)
                xb, yb = x[idx], y[idx]
            opt.zero_grad(set_to_none=True)
            loss = LOSSES[cfg.loss](model(xb), yb)
            loss.backward()
            opt.step()
            if not torch.isfinite(loss):
                log.log(step, diverged=1.0)
                break
            try:
                monitor.on_train_batch_end(step)
            except ValueError:  # a measurement of a network that has just blown up
                if _finite_loss(model, LOSSES[cfg.loss], probe):
                    raise
                log.log(step, diverged=1.0)
                break
            if progress is not None:
                progress.update(1)
        monitor.on_train_end()


def _finite_loss(model: torch.nn.Module, loss_fn: Any, probe: tuple[Tensor, Tensor]) -> bool:
    with torch.no_grad():
        return bool(torch.isfinite(loss_fn(model(probe[0]), probe[1])))


def finished(path: Path, steps: int) -> bool:
    try:
        run = load_run(path)
    except (OSError, ValueError):
        return False
    loss = run.metrics.get("loss")
    return loss is not None and loss.step.size > 0 and (
        int(loss.step[-1]) == steps or "diverged" in run.metrics)


def _stored_lrs(out: Path, cfg: SweepConfig) -> dict[tuple[str, int], list[float]] | None:
    """The LRs resolved by an earlier call on the same sweep (``out/sweep.json``), if any; the
    device may differ (a plan made on one machine, collected on another)."""
    try:
        stored = json.loads((out / "sweep.json").read_text())
        lrs = stored.pop("resolved_lrs")
        same = config_from_dict({**stored, "device": cfg.device}) == cfg
        resolved = {(key.split("/d")[0], int(key.split("/d")[1])): [float(v) for v in values]
                    for key, values in lrs.items()}
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
    wanted = set(itertools.product(cfg.parametrizations, cfg.depths))
    return resolved if same and set(resolved) == wanted else None


def prepare(cfg: SweepConfig, out: Path, *, resume: bool = False,
            overwrite: bool = False) -> list[Job]:
    """Check ``out``, resolve the LRs (``lrs="auto"``: once per parametrization and depth, or
    those of ``out/sweep.json`` when resuming the same sweep), write ``out/sweep.json`` and return
    every run of the sweep in order."""
    cfg.validate()
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (resume or overwrite):
        raise FileExistsError(f"sweep: output folder {out} exists and is not empty; pass "
                              "--resume to skip finished runs, --overwrite to redo them, or "
                              "choose another --out")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    lrs = _stored_lrs(out, cfg) if resume and not overwrite and cfg.lrs == "auto" else None
    if lrs is None:
        x, y = load_data(cfg)
        lrs = {}
        for par, depth in itertools.product(cfg.parametrizations, cfg.depths):
            lrs[par, depth] = [auto_lr(cfg, par, depth, x, y)] if cfg.lrs == "auto" else \
                list(cfg.lrs)  # type: ignore[arg-type]
    (out / "sweep.json").write_text(json.dumps(
        {**dataclasses.asdict(cfg), "resolved_lrs": {f"{p}/d{d}": v for (p, d), v in lrs.items()}},
        indent=2) + "\n")
    return [(par, w, d, lr, s) for par in cfg.parametrizations for d in cfg.depths
            for lr in lrs[par, d] for w in cfg.widths for s in cfg.seeds]


def run_path(out: Path, job: Job) -> Path:
    return Path(out) / "runs" / run_name(*job)


def run_sweep(cfg: SweepConfig, out: Path, *, resume: bool = False, overwrite: bool = False,
              progress: bool = True, jobs: int = 1) -> list[Path]:
    """Train every configuration; write ``out/runs/*.h5`` and ``out/sweep.json``.

    ``jobs``: how many runs train at once, each in its own process (see ``curvlab.fanout``);
    1 (the default) trains them one after another in this process. Returns every run's path.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"sweep: jobs (how many runs train at once) must be a positive integer, "
                         f"got {jobs!r}; use 1 to train the runs one after another")
    todo = prepare(cfg, out, resume=resume, overwrite=overwrite)
    paths = [run_path(out, job) for job in todo]
    if resume and not overwrite:
        todo = [job for job, path in zip(todo, paths, strict=True)
                if not finished(path, cfg.steps)]
    if jobs > 1:
        from curvlab.fanout import run_parallel

        run_parallel(cfg, todo, Path(out), jobs, progress=progress)
        return paths
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(paths) * cfg.steps, unit="step", desc="sweep")
        bar.update((len(paths) - len(todo)) * cfg.steps)
    x, y = load_data(cfg) if todo else (torch.empty(0), torch.empty(0))
    for par, w, d, lr, s in todo:
        if bar is not None:
            bar.set_postfix_str(f"{par} width {w} lr {lr:.3g}")
        train_one(cfg, par, w, d, lr, s, (x, y), run_path(out, (par, w, d, lr, s)), bar)
    if bar is not None:
        bar.close()
    return paths
