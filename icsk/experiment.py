"""One training job from a config: data, paired arms, recorders, probes, logger, run folder.

``run(cfg, run_dir)`` is what ``scripts/train.py`` (Hydra) calls; it can also be called from
Python with an OmegaConf config composed by :func:`icsk.config.compose`.
"""

from __future__ import annotations

import datetime as dt
import difflib
import logging
import math
import os
import random
import re
import shlex
import shutil
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm

from . import metrics as M
from .config import flatten, group_keys, metric_keys, option_keys
from .data import BatchStream, DataBundle, DatasetNotFoundError, dataset_options, get_dataset, probe_batch
from .hooks import Recorder, RecorderError
from .log import hydra_job_info, make_logger, run_identity
from .models import make_pair, model_options, uses_batch_statistics
from .models.norms import NORM_NAMES
from .schedule import Schedule
from .store import FolderBusyError, FolderLease, chunk_files, read_json, write_json_atomic
from .train import Arm, Checkpointer, Probe, Trainer

log = logging.getLogger("icsk")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available (else mps, else cpu); otherwise the named device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"device={name!r} is not a device torch knows; use device=auto (cuda when available, "
                          "else mps, else cpu), cpu, cuda, cuda:N (GPU number N) or mps") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available here; use device=auto or device=cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device={name!r} but this machine has {torch.cuda.device_count()} GPU(s); use "
                          f"device=cuda (the first) or cuda:N with N < {torch.cuda.device_count()}")
    if dev.type == "mps" and not _mps_available():
        raise ConfigError(f"device={name!r} but MPS (Apple's GPU) is not available here; use device=auto or device=cpu")
    return dev


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and random."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def arm_names(model_cfg: DictConfig) -> list[str]:
    """Arms of a run: ``model.norm`` (one arm) when set, else ``model.arms``."""
    norm = model_cfg.get("norm")
    key, arms = ("model.norm", [norm]) if norm else ("model.arms", model_cfg.get("arms"))
    if isinstance(arms, str):
        arms = [a.strip() for a in arms.split(",")]
    if not arms:
        raise ConfigError("model.arms is empty; give e.g. model.arms=[bn,none] or model.norm=bn")
    if bad := [str(a) for a in arms if str(a).lower() not in NORM_NAMES]:
        raise ConfigError(f"{key}: unknown normalizer(s) {bad}; valid: {', '.join(NORM_NAMES)}")
    return [str(a) for a in arms]


def _plain(node: Any) -> dict[str, Any]:
    """A config mapping (or None) as a plain, resolved dict."""
    if node is None:
        return {}
    return dict(OmegaConf.to_container(node, resolve=True)) if OmegaConf.is_config(node) else dict(node)


def _check_options(key: str, given: dict[str, Any], valid: Sequence[str], owner: str) -> None:
    """ConfigError naming each ``<key>.<name>`` of ``given`` that is not in ``valid``, and the valid names."""
    bad = [k for k in given if k not in valid]
    if bad:
        hint = "".join(f" (did you mean {key}.{m[0]}?)" for k in bad if (m := difflib.get_close_matches(k, valid, n=1)))
        raise ConfigError(f"unknown {', '.join(f'{key}.{k}' for k in bad)} for {owner}{hint}: remove it or use a "
                          f"valid {key} name: {', '.join(valid) or '(none)'}")


def check_group_keys(cfg: DictConfig) -> None:
    """Refuse keys of model, data, optim, train and recorder that the chosen config in conf/ does
    not set (Hydra lets ``+optim.momentun=0.9`` add one, and ``+optim.momentum=0.9`` to Adam, which
    nothing would read). The recorder's are the Recorder options the job passes on and the probe
    batch's schedule: no ``modes`` or ``channel_dim`` (the job records training forwards only, and
    its models' units are on dim 1)."""
    owners = {"model": f"model={cfg.model.name}", "data": f"data={cfg.data.name}", "optim": f"optim={cfg.optim.name}",
              "train": "the training loop", "recorder": "the Recorder"}
    for group, owner in owners.items():
        known = option_keys(group, str(cfg[group].name)) if group in ("model", "data", "optim") else group_keys(group)
        if known:
            _check_options(group, {k: None for k in cfg[group]}, known, owner)
    probes = metric_keys()
    if cfg.get("metrics") and probes:  # metrics.<probe>.<key> (+metrics.ics.shedule=5 was ignored)
        _check_options("metrics", {k: None for k in cfg.metrics}, list(probes), "the online metrics")
        for probe, node in cfg.metrics.items():
            if OmegaConf.is_dict(node):
                _check_options(f"metrics.{probe}", {k: None for k in node}, probes[probe], f"the {probe} probe")


def load_data(cfg: DictConfig) -> DataBundle:
    """The dataset of ``cfg.data``, flattened for fully connected models."""
    kw = _plain(cfg.data.get("options"))
    _check_options("data.options", kw, dataset_options(cfg.data.name), f"data={cfg.data.name}")
    if cfg.data.name != "gaussian":
        kw.setdefault("flatten", cfg.model.name in ("mlp", "dln"))
    else:
        kw.setdefault("dim", int(cfg.model.get("dim", 32)))
    root = cfg.data.get("root")
    try:
        return get_dataset(cfg.data.name, root=root if root is not None else "data", download=bool(cfg.data.download),
                           **kw)
    except DatasetNotFoundError as e:  # its message says where the files go and how to get them
        raise ConfigError(str(e)) from None


def build_arms_models(cfg: DictConfig, bundle: DataBundle) -> dict[str, nn.Module]:
    """Paired models (identical shared initial weights), sized for the data."""
    m = cfg.model
    kw: dict[str, Any] = _plain(m.get("options"))
    _check_options("model.options", kw, model_options(m.name), f"model={m.name}")
    if m.name in ("mlp", "vgg", "cnn") and bundle.task == "regression":
        raise ConfigError(f"data={bundle.name} is regression data (y = A x) for the deep linear net: use model=dln "
                          f"with it, or a classification dataset (e.g. data=mnist5k) for model={m.name}")
    kw["init_scale"] = float(m.get("init_scale", 1.0))
    if m.name == "mlp":
        kw.update(in_features=int(np.prod(bundle.input_shape)), num_classes=bundle.num_classes,
                  depth=int(m.depth), width=int(m.width), activation=str(m.activation))
    elif m.name in ("vgg", "cnn"):
        if len(bundle.input_shape) != 3:
            raise ConfigError(f"model={m.name} needs image data (C, H, W); {bundle.name} gives {bundle.input_shape}")
        kw.update(num_classes=bundle.num_classes, in_channels=bundle.input_shape[0], image_size=bundle.input_shape[-1],
                  variant=str(m.variant), activation=str(m.activation))
    elif m.name == "dln":
        if bundle.task != "regression":
            raise ConfigError("model=dln trains on regression data; use data=gaussian")
        kw.update(dim=int(bundle.input_shape[0]), depth=int(m.depth))
    else:
        raise ConfigError(f"unknown model.name {m.name!r}; valid: mlp, vgg (cnn), dln")
    names = arm_names(m)  # (its ConfigError names its own key)
    try:
        return make_pair(str(m.name), names, seed=int(cfg.seed), **kw)
    except ValueError as e:  # a bad value of model.* (activation, variant, ...)
        raise ConfigError(f"model={m.name}: {e}") from None


def build_optimizer(ocfg: DictConfig, params) -> torch.optim.Optimizer:
    """SGD (momentum, nesterov) or Adam from ``cfg.optim``."""
    name = str(ocfg.name).lower()
    lr = float(ocfg.lr)
    if not lr > 0:
        raise ConfigError(f"optim.lr must be > 0, got {lr}")
    wd = float(ocfg.get("weight_decay", 0.0))
    try:  # torch's own checks of the values (nesterov without momentum, betas of the wrong length, ...)
        if name == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=float(ocfg.get("momentum", 0.0)),
                                   nesterov=bool(ocfg.get("nesterov", False)), weight_decay=wd)
        if name == "adam":
            betas = tuple(float(b) for b in ocfg.get("betas", (0.9, 0.999)))
            if len(betas) != 2:
                raise ValueError(f"optim.betas must hold two values, got {list(betas)}")
            return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=wd)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"optim={name}: {e}") from None
    raise ConfigError(f"unknown optim.name {name!r}; valid: sgd, adam")


def build_scheduler(ocfg: DictConfig, opt: torch.optim.Optimizer, steps: int):
    """``constant``, ``cosine`` or ``step`` (x0.1 at 50% and 75%), with optional linear warm-up."""
    kind = str(ocfg.get("schedule", "constant"))
    warm = int(ocfg.get("warmup_steps", 0))

    def factor(step: int) -> float:
        w = min(1.0, (step + 1) / warm) if warm else 1.0
        if kind == "constant":
            return w
        if kind == "cosine":
            # math, not numpy: a numpy scalar lr reached the checkpoint, which torch.load(weights_only) refuses
            return w * 0.5 * (1 + math.cos(math.pi * min(step, steps) / max(1, steps)))
        if kind == "step":  # (at least one step in: a run of one step keeps its lr)
            return w * (0.1 ** ((step >= max(1, steps // 2)) + (step >= max(1, 3 * steps // 4))))
        raise ConfigError(f"unknown optim.schedule {kind!r}; valid: constant, cosine, step")

    factor(0)
    if kind == "constant" and not warm:
        return None
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def make_criterion(task: str):
    """Cross-entropy for classification; squared error ||f(x) - y||^2 (mean over the batch) for regression."""
    if task == "classification":
        return nn.functional.cross_entropy
    return lambda out, y: (out - y).pow(2).sum(1).mean()


def make_evaluator(bundle: DataBundle, criterion, device: torch.device, batch_size: int):
    """Test loss (and accuracy) of a model in eval mode over the whole test split."""
    xs, ys = bundle.test.tensors if hasattr(bundle.test, "tensors") else _stack(bundle.test)
    xs, ys = xs.to(device), ys.to(device)
    if len(xs) == 0:
        return None

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        was = model.training
        model.eval()
        tot_loss, correct = 0.0, 0.0
        for i in range(0, len(xs), batch_size):
            x, y = xs[i:i + batch_size], ys[i:i + batch_size]
            out = model(x)
            tot_loss += float(criterion(out, y)) * len(x)
            if bundle.task == "classification":
                correct += float((out.argmax(1) == y).sum())
        model.train(was)
        res = {"test_loss": tot_loss / len(xs)}
        if bundle.task == "classification":
            res["test_acc"] = correct / len(xs)
        return res

    return evaluate


def _stack(ds) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
    return torch.stack(xs), torch.as_tensor(ys)


def config_schedule(value: Any, key: str) -> Schedule:
    """The schedule of config key ``key`` from its value: N, a list of steps or "log:K"."""
    try:
        return Schedule.parse(list(value) if OmegaConf.is_list(value) else value)
    except ValueError as e:
        raise ConfigError(f"{key}={value}: {e}") from None


def build_recorder(rcfg: DictConfig, model: nn.Module, path: Path) -> Recorder | None:
    """The Recorder of one arm from ``cfg.recorder`` (None when disabled; its keys are checked
    by :func:`check_group_keys`)."""
    if not rcfg.get("enabled", True):
        return None
    layers = list(rcfg.layers) if rcfg.get("layers") is not None else None
    hist_range = rcfg.get("hist_range")  # "auto" or [lo, hi], checked by the Recorder
    sched = config_schedule(rcfg.get("schedule", 1), "recorder.schedule")
    try:
        return Recorder(
            model, layers=layers, capture=str(rcfg.get("capture", "output")), stats=list(rcfg.stats),
            quantiles=[float(q) for q in rcfg.get("quantiles", (0.15, 0.5, 0.85))],
            hist_bins=int(rcfg.get("hist_bins", 32)), hist_range="auto" if hist_range is None else hist_range,
            schedule=sched, path=path,
            flush_every=int(rcfg.get("flush_every", 1024)), flush_mb=float(rcfg.get("flush_mb", 8.0)),
            sat_threshold=float(rcfg.get("sat_threshold", 4.0)), zero_eps=float(rcfg.get("zero_eps", 1e-6)),
            hist_margin=float(rcfg.get("hist_margin", 0.5)),
        )
    except RecorderError as e:  # a bad recorder.* value (stats, layers, capture, ...)
        raise ConfigError(f"recorder: {e}") from None


def build_probes(mcfg: DictConfig | None, model_layers: list[str], probe_loss, lr: float,
                 model_groups: list[str] | None = None) -> list[Probe]:
    """Online metric probes (gradient ICS, loss smoothness, BN gap) from ``cfg.metrics``.

    Gradient ICS probes ``model_layers`` (the weight layers), or those of them ``metrics.ics.layers``
    names; each weight layer moves with its block (``model_groups``, normalizer parameters
    included) in G' of the layers after it, probed or not."""
    probes: list[Probe] = []
    if mcfg is None:
        return probes
    ics = mcfg.get("ics")
    if ics is not None and ics.get("enabled", False):
        only = list(ics.layers) if ics.get("layers") else None
        if only is not None and (unknown := [n for n in only if n not in model_layers]):
            raise ConfigError(f"metrics.ics.layers: {unknown} are not weight layers of the model; choose among "
                              f"{model_layers} (or null for all)")

        def ics_fn(arm: Arm, batch, step: int):
            df = M.gradient_ics(arm.model, probe_loss, batch, arm.optimizer, model_layers, groups=model_groups,
                                only=only)
            return [({"ics_l2": r.l2, "ics_cos": r.cos, "ics_grad_norm": r.grad_norm}, r.layer) for r in df.itertuples()]

        probes.append(Probe("ics", config_schedule(ics.get("schedule", 100), "metrics.ics.schedule"), ics_fn))
    sm = mcfg.get("smoothness")
    if sm is not None and sm.get("enabled", False):
        scales = tuple(float(s) for s in sm.scales) if sm.get("scales") else None

        def smooth_fn(arm: Arm, batch, step: int, grads=None, loss=None):
            cur_lr = float(arm.optimizer.param_groups[0]["lr"])
            kw = {"scales": scales} if scales else {}
            res = M.loss_smoothness(arm.model, probe_loss, batch, cur_lr, grad=grads, loss=loss, **kw)
            return [({f"smooth_{k}": float(v) for k, v in res.items() if np.isscalar(v)}, "")]

        probes.append(Probe("smoothness", config_schedule(sm.get("schedule", 100), "metrics.smoothness.schedule"),
                            smooth_fn, uses_step_grad=True))
    gap = mcfg.get("bn_gap")
    if gap is not None and gap.get("enabled", False):

        def gap_fn(arm: Arm, batch, step: int):
            if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in arm.model.modules()):
                return []  # arms without BN have no running statistics to compare
            df = M.bn_gap(arm.model, batch[0])
            return [({"bngap_mean_shift": r.mean_shift, "bngap_var_ratio": r.var_ratio, "bngap_w2": r.w2}, r.layer)
                    for r in df.itertuples()]

        probes.append(Probe("bn_gap", config_schedule(gap.get("schedule", 100), "metrics.bn_gap.schedule"), gap_fn))
    return probes


@contextmanager
def graceful_signals() -> Iterator[None]:
    """SIGTERM (e.g. a cluster's pre-emption) raises KeyboardInterrupt so the run folder is closed cleanly."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler) if _main_thread() else None
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _drop_rows_without_checkpoint(run_dir: Path) -> None:
    """``resume=true`` without a checkpoint (killed before the first, or ``checkpoint_every=0``)
    trains again from step 0: rows an earlier attempt wrote are removed first, so no step is
    recorded twice."""
    stale = [p for d in [run_dir / "metrics", *(run_dir / "arms").glob("*/stats")] for p in chunk_files(d)]
    if stale:
        log.warning("%s has no checkpoint to resume from; training again from step 0 (removing %d chunks "
                    "an earlier attempt wrote)", run_dir, len(stale))
    for p in stale:
        p.unlink()


def _requeued(status_path: Path) -> bool:
    """Whether this is a submitit job (SLURM or local) started again after an interruption: the
    launcher resubmits it with its first overrides, so without resume=true; its run.json says
    interrupted (running after a hard kill: the folder's lease shows that no job is live; finished
    when the signal came after the last step)."""
    in_submitit = any(k in os.environ for k in ("SUBMITIT_EXECUTOR", "SUBMITIT_LOCAL_JOB_ID"))
    return (in_submitit and status_path.exists()
            and read_json(status_path).get("status") in ("interrupted", "running", "finished"))


def _check_intervals(tcfg: DictConfig) -> None:
    """``train.steps`` >= 0, ``log_every`` and ``eval_batch_size`` >= 1, ``eval_every`` and ``checkpoint_every`` >= 0
    (0 = off)."""
    for key, low in {"steps": 0, "log_every": 1, "eval_every": 0, "checkpoint_every": 0, "eval_batch_size": 1}.items():
        value = tcfg.get(key, low)
        if value is None or int(value) < low:
            off = " (0 turns it off)" if key in ("eval_every", "checkpoint_every") else ""
            raise ConfigError(f"train.{key} must be an integer >= {low}{off}, got {value}")


# exceptions a cluster's launcher raises in the job when it stops it, by class name (the launcher
# may not be importable here): submitit's at a SLURM time-out it does not requeue
CLUSTER_INTERRUPTIONS = ("UncompletedJobError",)

# settings a resumed run may change: where it runs and what it prints or mirrors, not what it computes
RESUME_MAY_CHANGE = ("resume", "device", "train.progress", "logger", "data.root", "data.download")


def resume_command(first: Sequence[str], run_dir: str | Path) -> str:
    """The shell command that continues the run in ``run_dir``, first launched with ``first``."""
    return _continue_command(first, "hydra.run.dir", run_dir)


def sweep_resume_command(argv: Sequence[str], sweep_dir: str | Path) -> str:
    """The shell command that finishes the sweep in ``sweep_dir``, launched with ``argv`` (``-m ...``):
    its finished jobs are left alone, the others continue or start."""
    return _continue_command(argv, "hydra.sweep.dir", sweep_dir)


def _continue_command(words: Sequence[str], dir_key: str, folder: str | Path) -> str:
    kept = [w for w in words if not w.startswith(("resume=", "+resume=", f"{dir_key}="))]
    return " ".join([_program(), *(_shell_word(w) for w in [*kept, "resume=true",
                                                             f"{dir_key}={_hydra_quoted(str(folder))}"])])


def _program() -> str:
    """How this process was started, as a command to type again from the same folder:
    ``icsk-train`` where that is the one on PATH, else the path it ran from
    (``.venv/bin/icsk-train``), or the interpreter and script for ``python scripts/train.py``."""
    argv0 = sys.argv[0] if sys.argv else ""
    name = os.path.basename(argv0)
    if name not in ("icsk-train", "train.py") or not os.path.isfile(argv0):
        return "icsk-train"  # (a launcher's worker, a test)
    if name == "icsk-train":
        on_path = shutil.which("icsk-train")
        return "icsk-train" if on_path and os.path.samefile(on_path, argv0) else _shell_word(argv0)
    python = os.path.relpath(sys.executable)
    return f"{_shell_word(python if not python.startswith('..') else sys.executable)} {_shell_word(argv0)}"


def _hydra_quoted(value: str) -> str:
    """``value`` as a quoted Hydra override value (folder names may hold '=', ',' or '['): quotes
    escaped, backslashes doubled where they precede a quote or the end, ``${`` not interpolated."""
    value = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value)
    return "'" + value.replace("'", "\\'").replace("${", "\\${") + "'"


def _shell_word(word: str) -> str:
    """``word`` quoted for a POSIX shell, readably: bare when safe, in double quotes when that
    needs no escapes (a Hydra value in single quotes stays as it is), else shlex's quoting."""
    if word and all(c.isalnum() or c in "-_./=:+,@%" for c in word):
        return word
    if not any(c in word for c in '"$`\\!'):
        return f'"{word}"'
    return shlex.quote(word)


def _override_values(overrides: list[str] | None) -> dict[str, str]:
    """``{key: value text}`` of command-line overrides (``+key=v`` and ``~key`` included)."""
    return {o.partition("=")[0].lstrip("+~"): o.partition("=")[2] for o in overrides or ()}


def _check_resume_config(cfg: DictConfig, run_dir: Path, first: list[str] | None, now_overrides: list[str] | None,
                         finished: bool = False) -> None:
    """``resume=true`` continues a run with the settings it started with (its config.yaml): any
    other difference would mix two experiments in one folder, so it is refused with the command
    that resumes it as started (``first``: the first launch's overrides, if known).

    A key only one side has is a difference too (``+model.options.momentum=...`` or
    ``~metrics.bn_gap`` in one launch only), unless its value is null: a setting added to icsk
    since the run started, off by default. A key that both launches set with the same
    interpolating override (``name=x_${now:%H%M}``) resolves anew each time and is not compared."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        return
    saved = flatten(OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True))
    now = flatten(OmegaConf.to_container(cfg, resolve=True))
    was, is_ = _override_values(first), _override_values(now_overrides)
    moving = {k for k, v in was.items() if "${" in v and is_.get(k) == v}
    unset = object()

    def differs(k: str) -> bool:
        a, b = saved.get(k, unset), now.get(k, unset)
        if unset in (a, b):
            return (b if a is unset else a) is not None
        return a != b

    differ = sorted(k for k in saved.keys() | now.keys()
                    if k not in moving and not any(k == m or k.startswith(m + ".") for m in RESUME_MAY_CHANGE)
                    and differs(k))
    if not differ:
        return
    shown = "; ".join(f"{k}: {saved.get(k, '(unset)')} in the run, {now.get(k, '(unset)')} now"
                      for k in differ[:8]) + (f"; and {len(differ) - 8} more" if len(differ) > 8 else "")
    if finished:  # nothing left to resume: the command below would only say so
        raise ConfigError(f"{run_dir} finished already, and these settings differ from its own ({shown}); a "
                          "finished run is not extended or changed: start a new run folder (for more steps, "
                          "train.steps=N there)")
    how = resume_command(first, run_dir) if first is not None else "the overrides of its first launch, plus resume=true"
    raise ConfigError(f"resume=true continues {run_dir} with the settings it started with, but {len(differ)} "
                      f"differ: {shown}. Resume it with: {how}. Only {', '.join(RESUME_MAY_CHANGE[1:])} may "
                      "change on resume; for other settings start a new run folder.")


def _probe_plan(cfg: DictConfig, bundle: DataBundle, models: dict[str, nn.Module]):
    """``(schedule, batch)`` of the fixed probe batch (``recorder.probe_schedule``; both None when
    off), after checking that the batch sizes can train every arm: arms that normalize over the
    batch need 2 or more samples, in training batches and in the probe batch (it runs in
    training mode)."""
    batch_norms = sorted(a for a in models if uses_batch_statistics(a))
    n_train = len(bundle.train)  # a batch never holds more (a larger batch_size means the full batch)
    if batch_norms and (n_train < 2 or (cfg.data.batch_size is not None and int(cfg.data.batch_size) < 2)):
        why = f"data.batch_size={cfg.data.batch_size}" if n_train >= 2 else f"{n_train} training example(s)"
        raise ConfigError(f"arms {batch_norms} normalize over the batch and cannot train with {why}; use "
                          "data.batch_size>=2 and 2 or more training examples, or drop those arms (model.arms=[none,ln])")
    at = cfg.recorder.get("probe_schedule") if cfg.recorder.get("enabled", True) else None
    if at is None:
        return None, None
    size = cfg.data.get("probe_size")
    if size is not None and int(size) < 1:
        raise ConfigError(f"data.probe_size must be >= 1 (or null: the whole training split), got {size}")
    if batch_norms and min(len(bundle.train), len(bundle.train) if size is None else int(size)) < 2:
        raise ConfigError(f"arms {batch_norms} normalize over the batch, and the probe batch (recorder.probe_schedule) "
                          f"runs in training mode: it needs data.probe_size>=2, got {size}")
    return config_schedule(at, "recorder.probe_schedule"), probe_batch(bundle.train, size, int(cfg.seed))


def run(cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train every arm of ``cfg`` into ``run_dir``; returns the final run.json content.

    ``overrides``: the command-line overrides that composed ``cfg`` (the Hydra entry point
    passes them); kept in run.json, so a refused resume can print the command that works.
    The job holds ``run_dir`` (a lease) throughout: a second job on a live run is refused
    before it reads or writes anything."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lease = FolderLease(run_dir)
    try:
        lease.acquire()
    except FolderBusyError as e:
        raise ConfigError(f"another job is running in {run_dir}: {e}") from None
    try:
        return _run_held(cfg, run_dir, overrides)
    finally:
        lease.release()


def _run_held(cfg: DictConfig, run_dir: Path, overrides: list[str] | None) -> dict[str, Any]:
    """:func:`run` while it holds the folder."""
    resume = bool(cfg.get("resume", False))
    status_path = run_dir / "run.json"
    if not resume and (run_dir / "arms").exists():
        if not _requeued(status_path):
            raise ConfigError(f"{run_dir} already holds a run; pass resume=true to continue it or choose a new folder")
        log.warning("%s: a cluster job requeued after an interruption; resuming the run", run_dir)
        resume = True
    prior: dict[str, Any] = read_json(status_path) if (resume and status_path.exists()) else {}
    if resume:
        finished = prior.get("status") == "finished"
        _check_resume_config(cfg, run_dir, prior.get("overrides"), overrides, finished=finished)
        if finished:
            log.warning("%s finished already; nothing to resume", run_dir)
            return prior
    # everything that can refuse the config runs before the folder is written to
    check_group_keys(cfg)
    seed_everything(int(cfg.seed))
    device = resolve_device(str(cfg.device))
    _check_intervals(cfg.train)
    bundle = load_data(cfg)
    models = build_arms_models(cfg, bundle)
    probe_at, probe = _probe_plan(cfg, bundle, models)
    steps = int(cfg.train.steps)
    criterion = make_criterion(bundle.task)
    arms: list[Arm] = []
    for name, model in models.items():
        model.to(device)
        opt = build_optimizer(cfg.optim, model.parameters())
        rec = build_recorder(cfg.recorder, model, run_dir / "arms" / name)  # writes nothing yet
        arms.append(Arm(name, model, opt, build_scheduler(cfg.optim, opt, steps), rec))
    first = next(iter(models.values()))
    try:
        stream = BatchStream(bundle.train, cfg.data.batch_size, seed=int(cfg.seed), device=device)
    except ValueError as e:
        raise ConfigError(f"data.{e}") from None

    def probe_loss(model: nn.Module, batch) -> torch.Tensor:
        return criterion(model(batch[0]), batch[1])

    probes = build_probes(cfg.get("metrics"), first.weight_layer_names(), probe_loss, float(cfg.optim.lr),
                          first.weight_group_names())
    container = OmegaConf.to_container(cfg, resolve=True)
    # wandb's group, tags and name come from the first attempt (a resume runs outside the sweep)
    identity = prior.get("wandb_identity") or run_identity(cfg.get("logger"), hydra_job_info())
    logger = make_logger(cfg.get("logger"), run_dir, container, resume_id=prior.get("wandb_run") if resume else None,
                         identity=identity)
    # the config is accepted: from here on the folder is written to
    if resume and not Checkpointer(run_dir).exists():
        _drop_rows_without_checkpoint(run_dir)
    if not (resume and (run_dir / "config.yaml").exists()):  # a resumed run keeps the config it started with
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    for name in models:
        (run_dir / "arms" / name / "stats").mkdir(parents=True, exist_ok=True)
    info = prior
    info.pop("error", None)  # an earlier attempt's failure is not this one's
    info.setdefault("overrides", None if overrides is None else [str(o) for o in overrides])
    threads = torch.get_num_threads()
    if resume and prior.get("torch_threads") not in (None, threads) and device.type == "cpu":
        log.warning("%s started with %s intra-op threads and continues with %d: CPU float sums then round "
                    "differently, so the resumed steps are not bit-identical to an uninterrupted run (set "
                    "OMP_NUM_THREADS=%s to match)", run_dir, prior["torch_threads"], threads, prior["torch_threads"])
        info["torch_threads_on_resume"] = threads  # (torch_threads stays the count the run started with)
    info.update({"name": str(cfg.get("name", "run")), "status": "running", "started": info.get("started", _now()),
                 "device": str(device), "torch_threads": info.get("torch_threads", threads), "steps": steps, "arms": {},
                 # an attempt without wandb (logger=none) keeps the id for the next one that has it
                 "wandb_run": logger.run_id or info.get("wandb_run"),
                 "wandb_identity": identity if logger.run_id else info.get("wandb_identity")})
    write_json_atomic(status_path, info)
    eval_bs = int(cfg.train.get("eval_batch_size", 1000))
    progress = tqdm(total=steps, desc=f"{info['name']} [{','.join(models)}]", unit="step", mininterval=1.0,
                    disable=not bool(cfg.train.get("progress", True)), dynamic_ncols=True)
    exit_code = 0
    try:  # from the first step that can fail, so run.json never stays "running" after a failure
        trainer = Trainer(
            arms, stream, criterion, run_dir=run_dir, steps=steps, device=device,
            probe_batch=probe,
            probe_schedule=probe_at,
            evaluate=make_evaluator(bundle, criterion, device, eval_bs), eval_every=int(cfg.train.eval_every),
            log_every=int(cfg.train.log_every), checkpoint_every=int(cfg.train.get("checkpoint_every", 0)),
            probes=probes, accuracy=bundle.task == "classification", on_log=logger.log, progress=progress,
        )
        with graceful_signals():
            if resume and trainer.checkpointer.exists():
                start = trainer.load_checkpoint()
                progress.update(start)
                log.info("resumed %s at step %d", run_dir, start)
            elif trainer.step == 0 and trainer.evaluate is not None and trainer.eval_every:
                trainer.run_eval()  # accuracy at initialization, so curves start at step 0
            trainer.run()
        info["status"] = "finished"
    except (KeyboardInterrupt, SystemExit):  # SystemExit: e.g. submitit's exit when SLURM pre-empts or requeues
        info["status"] = "interrupted"
        exit_code = 130
        raise
    except Exception as e:
        if type(e).__name__ in CLUSTER_INTERRUPTIONS:
            info["status"] = "interrupted"
            exit_code = 130
        else:
            info["status"] = "failed"
            info["error"] = f"{type(e).__name__}: {e}"
            exit_code = 1
        raise
    finally:
        progress.close()
        info["arms"] = {a.name: a.summary() for a in arms}
        for arm_info in info["arms"].values():  # arms still training share the run's end
            if arm_info["status"] == "running" and info["status"] != "finished":
                arm_info["status"] = info["status"]
        info["finished"] = _now()
        final = _final_metrics(run_dir)
        info["final"] = final
        write_json_atomic(status_path, info)
        logger.summary({f"{arm}/final_{k}": v for arm, d in final.items() for k, v in d.items()})
        logger.summary({f"{name}/status": arm_info["status"] for name, arm_info in info["arms"].items()})
        logger.finish(exit_code)
    return info


def _final_metrics(run_dir: Path) -> dict[str, dict[str, float]]:
    """Last value of each per-arm scalar metric (test accuracy, loss, ...)."""
    from .store import read_metrics

    try:
        df = read_metrics(run_dir)
    except Exception:  # a summary must never hide the real error
        return {}
    df = df[df["layer"] == ""]
    if df.empty:
        return {}
    last = df.sort_values("step").groupby(["arm", "metric"]).tail(1)
    out: dict[str, dict[str, float]] = {}
    for r in last.itertuples():
        out.setdefault(r.arm, {})[r.metric] = float(r.value)
    return out
