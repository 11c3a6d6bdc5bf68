"""Width (and depth, LR) sweeps: train one run per configuration and log it with a Monitor.

A sweep is a :class:`SweepConfig` (the command line's flags are its fields, see ``curvlab.cli``);
each of its runs is a :class:`RunSpec` (parametrization, width, depth, LR, seed), trained by
:func:`train_one` into ``out/runs/<spec.name>``. The models, data sets and parametrizations it
names are the registries of :mod:`curvlab.registries` (``MODELS``, ``DATASETS``,
``PARAMETRIZATIONS``: name -> builder; one entry adds one), the losses
:data:`curvlab.losses.LOSSES`.

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
once in separate processes (:func:`curvlab.pool.run_parallel`), and ``curvlab.fanout.plan_sweep``
writes one JSON config per run for a cluster instead (``curvlab run CONFIG`` trains one). Every
path gives the same run files: the auto LRs are computed once, before any training, and each run
is seeded by its own seed alone.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from curvlab import pool
from curvlab.callbacks import FeatureSpeed, Loss, Monitor, NTKSpectrum, Sharpness
from curvlab.hdf5 import RunLogger
from curvlab.losses import LOSSES
from curvlab.models import Parametrization
from curvlab.preconditioning import adam_scales, lr_scales
from curvlab.registries import (
    DATASETS,
    DTYPES,
    MODELS,
    OPTIMIZERS,
    PARAMETRIZATIONS,
    interp_strength,
    lookup,
    make_dataset,
    parametrization,
)
from curvlab.runs import load_run
from curvlab.sharpness import sharpness

LR_FRACTION = 0.5


def _opt(default: Any, help: str, choices: Iterable[str] | None = None, also: str = "",
         flag: str | None = None) -> Any:
    """A :class:`SweepConfig` field with its default and, for ``curvlab.cli``, its help text, the
    names it takes (a registry, read when the help is shown), what else it takes (``also``) and
    its flag where that is not ``--<name>``."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices,
                                                        "also": also, "flag": flag})


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """Everything a sweep needs; every run file stores its own slice of it as its config.

    Tuple fields hold one value per run of the sweep (their product is the set of runs, see
    :func:`prepare`); ``None`` of ``batch_size`` and ``base_width`` is "full batch" and "the
    smallest width". Each field's ``metadata`` holds the help text of its command-line flag.
    """

    model: str = _opt("mlp", "the network", MODELS)
    widths: tuple[int, ...] = _opt((64, 128, 256, 512), "hidden widths, one run each")
    depths: tuple[int, ...] = _opt((3,), "depths (linear layers of an MLP, residual blocks of a "
                                   "ResNet), one run each")
    parametrizations: tuple[str, ...] = _opt(
        ("mup", "ntp"), "how init, multipliers and per-layer LRs scale with width, one run each",
        PARAMETRIZATIONS, "interp:S (cl.interpolated(S), S in [0, 1]: NTP at 0, muP at 1)")
    optimizer: str = _opt("sgd", "the optimizer, with the parametrization's per-layer LRs",
                          OPTIMIZERS)
    lrs: tuple[float, ...] | str = _opt(
        "auto", "base LRs, one run each (an LR sweep), or 'auto': lr_fraction of the stability "
        "threshold at init at the base width, per parametrization and depth", flag="lr")
    steps: int = _opt(200, "training steps")
    batch_size: int | None = _opt(None, "examples per step, drawn with replacement; unset: "
                                  "full batch")
    dataset: str = _opt("teacher", "the training data", DATASETS,
                        "a path to an .npz file with arrays x (n, d) and y (n, k) or labels (n,)")
    n: int = _opt(512, "training examples")
    probe_size: int = _opt(256, "the first examples, which the measurements use")
    every: int = _opt(10, "log the sharpness, NTK spectrum and feature speed every N steps")
    seeds: tuple[int, ...] = _opt((0, 1, 2), "seeds, one run each (averaged per width in the "
                                  "report)")
    device: str = _opt("cpu", "torch device of the model and the data")
    base_width: int | None = _opt(None, "muP base width; unset: the smallest width")
    sigma: float = _opt(1.0, "base init scale of every parametrization")
    lr_fraction: float = _opt(LR_FRACTION, "lr 'auto': eta = lr_fraction * threshold / lambda_0")
    dtype: str = _opt("float32", "dtype of the model and the data", DTYPES)
    loss: str = _opt("mse", "the training loss (mse: mean 0.5 ||f - y||^2; xent: cross-entropy on "
                     "the targets' classes)", LOSSES)

    def validate(self) -> None:
        """Raise a ValueError naming the first field out of its range, and its choices."""
        call = "sweep"
        lookup(MODELS, "model", self.model, call)
        unknown = [p for p in self.parametrizations
                   if p not in PARAMETRIZATIONS and interp_strength(p) is None]
        if unknown or not self.parametrizations:
            raise ValueError(f"{call}: unknown parametrizations {unknown}; choose from "
                             f"{(*PARAMETRIZATIONS, 'interp:S')}, e.g. 'interp:0.5' for "
                             "cl.interpolated(0.5)")
        bad = [w for w in self.widths if isinstance(w, bool) or not isinstance(w, int) or w < 1]
        if bad or not self.widths:
            raise ValueError(f"{call}: widths must be positive integers, got {list(self.widths)}")
        if self.base_width is not None and self.base_width > min(self.widths):
            raise ValueError(f"{call}: base width {self.base_width} is larger than the smallest "
                             f"width {min(self.widths)}")
        if not str(self.dataset).endswith(".npz"):
            lookup(DATASETS, "dataset", self.dataset, call, " or give a path to an .npz file")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"{call}: optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.lrs != "auto" and (isinstance(self.lrs, str) or
                                   not all(lr > 0 for lr in self.lrs)):
            raise ValueError(f"{call}: lrs must be 'auto' or positive numbers, got {self.lrs!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"{call}: dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"{call}: loss must be one of {tuple(LOSSES)}, got {self.loss!r}")

    @property
    def base(self) -> int:
        return self.base_width or min(self.widths)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def config_from_dict(values: Mapping[str, Any], call: str = "sweep") -> SweepConfig:
    """A :class:`SweepConfig` from plain values (JSON lists become tuples); unknown keys refused."""
    unknown = set(values) - {f.name for f in dataclasses.fields(SweepConfig)}
    if unknown:
        raise ValueError(f"{call}: unknown config keys {sorted(unknown)}; the keys are the fields "
                         "of curvlab.sweep.SweepConfig")
    plain: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return SweepConfig(**plain)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of a sweep; with its :class:`SweepConfig`, all that the run's training reads."""

    parametrization: str
    width: int
    depth: int
    lr: float
    seed: int

    @property
    def name(self) -> str:
        """The run file's name, ``<parametrization>_w<width>_d<depth>_lr<lr>_s<seed>.h5`` (the LR
        to 4 significant digits, ``interp:S`` written ``interp-S``); resume finds runs by it."""
        return (f"{self.parametrization.replace(':', '-')}_w{self.width}_d{self.depth}"
                f"_lr{self.lr:.4g}_s{self.seed}.h5")


def _param(cfg: SweepConfig, par: str) -> Parametrization:
    return parametrization(par, cfg.base, cfg.sigma, min(cfg.depths))


def build_model(cfg: SweepConfig, par: str, width: int, depth: int, d_in: int, d_out: int,
                seed: int) -> torch.nn.Module:
    """:data:`MODELS` ``[cfg.model]`` under ``par``, initialized after ``torch.manual_seed(seed)``,
    on ``cfg.device`` in ``cfg.dtype``."""
    builder = lookup(MODELS, "model", cfg.model, "build_model")
    torch.manual_seed(seed)
    model = builder(width, depth, _param(cfg, par), d_in, d_out)
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


def train_one(cfg: SweepConfig, spec: RunSpec, path: Path,
              data: tuple[Tensor, Tensor] | None = None, progress: Any = None) -> None:
    """One run: full-batch (or mini-batch) training with a Monitor, logged to ``path``.

    ``data``: the sweep's ``(x, y)`` from :func:`load_data` (loaded here when ``None``);
    ``progress``: a tqdm bar advanced by one per step. A run whose loss (or a measurement of a
    network that has just blown up) is not finite stops there, logged as ``diverged``.
    """
    x, y = load_data(cfg) if data is None else data
    model = build_model(cfg, spec.parametrization, spec.width, spec.depth, x.shape[1], y.shape[1],
                        spec.seed)
    opt = _param(cfg, spec.parametrization).optimizer(model, cfg.optimizer, spec.lr)
    probe = (x[:cfg.probe_size], y[:cfg.probe_size])
    config = {"model": cfg.model, "width": spec.width, "depth": spec.depth,
              "parametrization": spec.parametrization, "optimizer": cfg.optimizer, "lr": spec.lr,
              "seed": spec.seed, "steps": cfg.steps, "dataset": cfg.dataset, "n": len(x),
              "batch_size": cfg.batch_size, "probe_size": cfg.probe_size, "every": cfg.every,
              "base_width": cfg.base, "loss": cfg.loss, "dtype": cfg.dtype}
    g = torch.Generator().manual_seed(spec.seed)
    kind = "lr" if cfg.optimizer == "sgd" else "adam"
    loss_fn = LOSSES[cfg.loss]
    with RunLogger(path, config, mode="w", env={"device": cfg.device}) as log:
        monitor = Monitor(model, loss_fn, probe, log,
                          [Loss(every=1), Sharpness(every=cfg.every, preconditioned=kind),
                           NTKSpectrum(every=cfg.every, k=4, size=64),
                           FeatureSpeed(every=cfg.every)],
                          optimizer=opt, seed=spec.seed)
        monitor.on_train_start()
        for step in range(1, cfg.steps + 1):
            if cfg.batch_size is None:
                xb, yb = x, y
            else:
                idx = torch.randint(0, len(x), (cfg.batch_size,), generator=g)
                xb, yb = x[idx], y[idx]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            if not torch.isfinite(loss):
                log.log(step, diverged=1.0)
                break
            try:
                monitor.on_train_batch_end(step)
            except ValueError:  # a measurement of a network that has just blown up
                with torch.no_grad():
                    if torch.isfinite(loss_fn(model(probe[0]), probe[1])):
                        raise
                log.log(step, diverged=1.0)
                break
            if progress is not None:
                progress.update(1)
        monitor.on_train_end()


def finished(path: Path, steps: int) -> bool:
    """Whether ``path`` is a readable run whose loss reached ``steps`` (or that diverged)."""
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
            overwrite: bool = False) -> list[RunSpec]:
    """Check ``out``, resolve the LRs (``lrs="auto"``: once per parametrization and depth, or
    those of ``out/sweep.json`` when resuming the same sweep), write ``out/sweep.json`` and return
    every run of the sweep, ordered by parametrization, depth, LR, width and seed."""
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
    return [RunSpec(par, w, d, lr, s) for par in cfg.parametrizations for d in cfg.depths
            for lr in lrs[par, d] for w in cfg.widths for s in cfg.seeds]


def run_path(out: Path, spec: RunSpec) -> Path:
    """``out/runs/<spec.name>``."""
    return Path(out) / "runs" / spec.name


def _train(cfg: SweepConfig, spec: RunSpec, path: str) -> str | None:
    """Train one run in a worker of :func:`curvlab.pool.run_parallel` (worker ``i`` on GPU ``i``
    modulo the GPU count with ``device="cuda"``); return ``None``, or the error as text."""
    try:
        if cfg.device == "cuda" and torch.cuda.is_available():
            gpu = pool.worker_slot() % torch.cuda.device_count()
            cfg = dataclasses.replace(cfg, device=f"cuda:{gpu}")
        key = (cfg.dataset, cfg.n, cfg.device, cfg.dtype)
        if key not in _DATA:
            _DATA.clear()
            _DATA[key] = load_data(cfg)
        train_one(cfg, spec, Path(path), _DATA[key])
    except Exception as err:  # reported by the parent with the run's name
        return f"{type(err).__name__}: {err}"
    return None


_DATA: dict[tuple[Any, ...], tuple[Tensor, Tensor]] = {}  # a worker's data set, loaded once


def run_sweep(cfg: SweepConfig, out: Path, *, resume: bool = False, overwrite: bool = False,
              progress: bool = True, jobs: int = 1) -> list[Path]:
    """Train every configuration; write ``out/runs/*.h5`` and ``out/sweep.json``.

    ``jobs``: how many runs train at once, each in its own process
    (:func:`curvlab.pool.run_parallel`, which raises :class:`curvlab.pool.RunsFailed`); 1
    (the default) trains them one after another in this process. With ``resume``, finished runs
    are skipped. Returns every run's path.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"sweep: jobs (how many runs train at once) must be a positive integer, "
                         f"got {jobs!r}; use 1 to train the runs one after another")
    specs = prepare(cfg, out, resume=resume, overwrite=overwrite)
    paths = [run_path(out, spec) for spec in specs]
    todo = [spec for spec, path in zip(specs, paths, strict=True)
            if not (resume and not overwrite and finished(path, cfg.steps))]
    if jobs > 1:
        pool.run_parallel(_train, {s.name: (cfg, s, str(run_path(out, s))) for s in todo}, jobs,
                          progress=progress, what="sweep")
        return paths
    bar = tqdm(total=len(paths) * cfg.steps, initial=(len(paths) - len(todo)) * cfg.steps,
               unit="step", desc="sweep", disable=not progress)
    data = load_data(cfg) if todo else None
    for spec in todo:
        bar.set_postfix_str(f"{spec.parametrization} width {spec.width} lr {spec.lr:.3g}")
        train_one(cfg, spec, run_path(out, spec), data, bar)
    bar.close()
    return paths
