"""The paired training loop: one data stream drives every arm through the same batches.

Each arm (a model with its optimizer, scheduler and Recorder) takes one step per batch.
Online probes (gradient ICS, loss smoothness, BN train/eval gap) run at their own schedules
at w_t, before the arm's step, with the Recorder paused. An arm whose training loss turns
non-finite is marked ``diverged`` at that step and stops (on a GPU at the next loss transfer, every
``log_every`` steps or at an evaluation, which avoids a host sync per step); the others go on. Checkpoints hold
everything needed to continue bit-exactly on the CPU (models, optimizers, schedulers, data
position, RNG states, and how many chunks each table had), so a resumed run has no duplicate
and no gap in its recorded steps.
"""

from __future__ import annotations

import math
import os
import random
import signal
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .hooks import Recorder
from .metrics.ics import RngSnapshot, forward_leaving_state
from .schedule import Schedule
from .store import MetricsWriter, chunk_files, fsync_files

LossFn = Callable[[nn.Module, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]


@dataclass
class Arm:
    """One network of a paired run and everything that trains it."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    recorder: Recorder | None = None
    status: str = "running"  # running | finished | diverged
    diverged_step: int | None = None
    reason: str = ""
    last_step: int = -1
    _losses: list[torch.Tensor] = field(default_factory=list)
    _accs: list[torch.Tensor] = field(default_factory=list)
    _lrs: list[float] = field(default_factory=list)  # the learning rate each buffered step used

    @property
    def active(self) -> bool:
        return self.status == "running"

    def paused(self):
        """Context in which this arm's forwards are not recorded (probes, evaluation)."""
        return self.recorder.paused() if self.recorder is not None else nullcontext()

    def summary(self) -> dict[str, Any]:
        """JSON-ready status of this arm for run.json."""
        return {"status": self.status, "diverged_step": self.diverged_step, "reason": self.reason,
                "last_step": self.last_step}


@dataclass
class Probe:
    """An online metric: ``fn(arm, batch, step, **kw) -> list[(metrics dict, layer)]`` at a schedule.

    Probes run at w_t on the step's batch. With ``uses_step_grad`` the probe runs after the
    training step's backward (before the optimizer step, from the RNG state the forward saw) and
    gets ``grads`` (name -> ∇L(w_t)) and ``loss``, saving it a forward/backward."""

    name: str
    schedule: Schedule
    fn: Callable[..., list[tuple[dict[str, float], str]]]
    uses_step_grad: bool = False


class Checkpointer:
    """Saves and restores the full training state in ``<run>/checkpoint.pt`` (atomic)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "checkpoint.pt"

    def exists(self) -> bool:
        return self.path.exists()

    def save(self, state: dict[str, Any]) -> None:
        """Write the checkpoint whole and on the disk itself before it replaces the last one."""
        tmp = self.path.with_name(".checkpoint.pt.tmp")
        torch.save(state, tmp)
        fsync_files([tmp])
        os.replace(tmp, self.path)
        fsync_files([], [self.path.parent])

    def load(self) -> dict[str, Any]:
        return torch.load(self.path, map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from (torch CPU/CUDA, numpy, random)."""
    st = {"torch": torch.get_rng_state(), "numpy": _np_state_to_tensors(), "python": _py_state_to_tensors()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    kind, keys, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state((str(kind), keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    version, internal, gauss_next = st["python"]
    random.setstate((int(version), tuple(int(v) for v in internal.tolist()),
                     None if math.isnan(float(gauss_next)) else float(gauss_next)))


def _np_state_to_tensors():
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return ["MT19937" if kind == "MT19937" else kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
            int(has_gauss), float(gauss)]


def _py_state_to_tensors():
    version, internal, gauss_next = random.getstate()
    return [int(version), torch.tensor(internal, dtype=torch.int64),
            float("nan") if gauss_next is None else float(gauss_next)]


class Trainer:
    """Drives all arms over one batch stream; writes metrics; checkpoints; handles divergence."""

    def __init__(
        self,
        arms: list[Arm],
        stream: Iterator,
        loss_fn: LossFn,
        *,
        run_dir: str | os.PathLike,
        steps: int,
        device: torch.device,
        evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
        eval_every: int = 0,
        log_every: int = 50,
        checkpoint_every: int = 0,
        probes: list[Probe] | None = None,
        accuracy: bool = True,
        on_log: Callable[[int, str, dict[str, float]], None] | None = None,
        progress: Any = None,
        probe_batch: tuple[torch.Tensor, torch.Tensor] | None = None,
        probe_schedule: Schedule | None = None,
    ):
        self.arms = arms
        self.stream = stream
        self.loss_fn = loss_fn
        self.run_dir = Path(run_dir)
        self.steps = int(steps)
        self.device = device
        self.evaluate = evaluate
        self.eval_every = int(eval_every)
        self.log_every = max(1, int(log_every))
        self.checkpoint_every = int(checkpoint_every)
        self.probes = probes or []
        self.accuracy = accuracy
        self.on_log = on_log
        self.progress = progress
        if (probe_batch is None) != (probe_schedule is None):
            raise ValueError("probe_batch and probe_schedule go together")
        self.probe_batch = None if probe_batch is None else tuple(t.to(device) for t in probe_batch)
        self.probe_schedule = probe_schedule
        self.metrics = MetricsWriter(self.run_dir)
        self.checkpointer = Checkpointer(self.run_dir)
        self.step = 0
        # checking each loss costs a device sync on accelerators: there, check at log steps
        self._eager_checks = device.type == "cpu"
        kill = os.environ.get("ICSK_FAULT_KILL_AT_STEP")  # fault injection for crash tests
        self._kill_at = int(kill) if kill else None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly here (chunk counts let resume drop later rows)."""
        return {
            "step": self.step,
            "rng": rng_state(),
            "stream": self.stream.state_dict() if hasattr(self.stream, "state_dict") else None,
            "arms": {
                a.name: {
                    "model": a.model.state_dict(),
                    "optimizer": a.optimizer.state_dict(),
                    "scheduler": a.scheduler.state_dict() if a.scheduler is not None else None,
                    "status": a.status,
                    "diverged_step": -1 if a.diverged_step is None else a.diverged_step,
                    "reason": a.reason,
                    "last_step": a.last_step,
                    # the loss window still filling: logged at its own step after a resume too
                    "window": {"losses": [t.cpu() for t in a._losses], "accs": [t.cpu() for t in a._accs],
                               "lrs": list(a._lrs)},
                    "recorder_edges": _edges_of(a.recorder),
                }
                for a in self.arms
            },
            "chunks": self._chunk_counts(),
        }

    def _chunk_dirs(self) -> list[Path]:
        dirs = [self.run_dir / "metrics"]
        dirs += [a.recorder.stats_dir for a in self.arms if a.recorder is not None]
        return dirs

    def _chunk_counts(self) -> dict[str, int]:
        return {str(d.relative_to(self.run_dir)): len(chunk_files(d)) for d in self._chunk_dirs()}

    def save_checkpoint(self) -> None:
        """Write every table (so a chunk boundary sits at this step) and save the state. The loss
        window still filling goes into the checkpoint, not into the metrics: checkpoints do not
        change which steps the training loss is logged at. The chunks it counts are put on the
        disk itself first, so that a power cut cannot leave a checkpoint counting lost chunks."""
        self._flush_tables(sync=True)
        self.checkpointer.save(self.state_dict())

    def load_checkpoint(self) -> int:
        """Restore the last checkpoint; delete rows written after it. Returns the step to go on from."""
        st = self.checkpointer.load()
        for rel, count in st["chunks"].items():
            for extra in chunk_files(self.run_dir / rel)[count:]:
                extra.unlink()
        for a in self.arms:
            s = st["arms"][a.name]
            a.model.load_state_dict(s["model"])
            a.optimizer.load_state_dict(s["optimizer"])
            if a.scheduler is not None and s["scheduler"] is not None:
                a.scheduler.load_state_dict(s["scheduler"])
            a.status = s["status"]
            a.diverged_step = None if s["diverged_step"] < 0 else int(s["diverged_step"])
            a.reason = s.get("reason", "")
            a.last_step = int(s["last_step"])
            window = s.get("window") or {}  # (absent in checkpoints of older versions, which flushed it)
            a._losses = [t.to(self.device) for t in window.get("losses", [])]
            a._accs = [t.to(self.device) for t in window.get("accs", [])]
            a._lrs = list(window.get("lrs", []))
            if a.recorder is not None:
                a.recorder.current_step = int(st["step"])
                a.recorder.restore_edges(_parse_edges(s["recorder_edges"]))
        if st["stream"] is not None:
            self.stream.load_state_dict(st["stream"])
        set_rng_state(st["rng"])
        self.step = int(st["step"])
        return self.step

    def flush(self) -> None:
        """Write everything buffered (recorders, losses and metrics) to the run folder and wait for it."""
        self._log_losses()
        self._flush_tables()

    def _flush_tables(self, sync: bool = False) -> None:
        for a in self.arms:
            if a.recorder is not None:
                a.recorder.flush(wait=True, sync=sync)
        self.metrics.flush(sync=sync)

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        """Train from ``self.step`` to ``self.steps``."""
        try:
            for a in self.arms:
                if a.recorder is not None:
                    a.recorder.attach()
            while self.step < self.steps and any(a.active for a in self.arms):
                if self._kill_at is not None and self.step == self._kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                self.train_step(next(self.stream))
                self.step += 1
                if self.progress is not None:
                    self.progress.update(1)
                if self.eval_every and (self.step % self.eval_every == 0 or self.step == self.steps):
                    self.run_eval()
                if self.checkpoint_every and self.step % self.checkpoint_every == 0 and self.step < self.steps:
                    self.save_checkpoint()
            for a in self.arms:
                if a.active:
                    a.status = "finished"
        finally:
            self._close_tables()

    def _close_tables(self) -> None:
        """Close every recorder, then write the buffered losses and metrics, each even if a step
        before it failed (a full disk for one arm's statistics must not lose the others' or the
        losses); the first failure is raised afterwards."""
        errors: list[Exception] = []
        for close in [a.recorder.close for a in self.arms if a.recorder is not None] + [
                self._log_losses, lambda: self.metrics.flush(sync=True)]:
            try:
                close()
            except Exception as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def train_step(self, batch) -> None:
        """One step of every active arm on the same batch."""
        x, y = (t.to(self.device, non_blocking=True) for t in batch)
        for a in self.arms:
            if not a.active:
                continue
            if self.probe_schedule is not None and a.recorder is not None and self.probe_schedule(self.step):
                self._record_probe_batch(a)
            due = [p for p in self.probes if p.schedule(self.step)]
            for probe in due:
                if not probe.uses_step_grad:
                    self._run_probe(probe, a, (x, y))
            late = [p for p in due if p.uses_step_grad]
            rng_before = RngSnapshot() if late else None
            a.model.train()
            a.optimizer.zero_grad(set_to_none=True)
            out = a.model(x)
            loss = self.loss_fn(out, y)
            if self._eager_checks and not math.isfinite(loss.item()):  # no device sync on the CPU
                if a.recorder is not None:
                    a.recorder.step()  # keep the statistics of the forward that went non-finite
                self._flush_losses(a)
                self._diverge(a, self.step, f"non-finite training loss {loss.item()}")
                continue
            loss.backward()
            if late:
                rng_after = RngSnapshot()
                rng_before.restore()  # the probes see the RNG state the forward saw
                grads = {n: p.grad for n, p in a.model.named_parameters() if p.requires_grad}
                for probe in late:
                    self._run_probe(probe, a, (x, y), grads=grads, loss=float(loss.detach()))
                rng_after.restore()
            a._lrs.append(float(a.optimizer.param_groups[0]["lr"]))
            a.optimizer.step()
            if a.scheduler is not None:
                a.scheduler.step()
            if a.recorder is not None:
                a.recorder.step()
            a._losses.append(loss.detach())
            if self.accuracy and out.dim() == 2 and y.dtype == torch.long:
                a._accs.append((out.detach().argmax(1) == y).float().mean())
            a.last_step = self.step
        if (self.step + 1) % self.log_every == 0:
            self._log_losses()

    def _record_probe_batch(self, arm: Arm) -> None:
        """The fixed probe batch through the arm at w_t in training mode, recorded as
        ``mode="probe"``; normalizer buffers (BN running statistics) and the RNG are left as
        found, so training goes on exactly as without it."""
        with arm.recorder.probe():
            forward_leaving_state(arm.model, self.probe_batch[0])

    def _run_probe(self, probe: Probe, arm: Arm, batch, **kw) -> None:
        with arm.paused():
            rows = probe.fn(arm, batch, self.step, **kw)
        for values, layer in rows:
            self._emit(self.step, arm, values, layer)

    def _emit(self, step: int, arm: Arm, values: dict[str, float], layer: str = "") -> None:
        """Write metrics to the run folder and mirror them to the logger (``metric/layer``)."""
        self.metrics.log(step, arm.name, values, layer=layer)
        if self.on_log is not None:
            self.on_log(step, arm.name, {f"{k}/{layer}" if layer else k: v for k, v in values.items()})

    def _log_losses(self) -> None:
        """Move the buffered losses to the host in one transfer; detect divergence."""
        for a in self.arms:
            self._flush_losses(a)
        if self.progress is not None and hasattr(self.progress, "set_postfix"):
            self.progress.set_postfix({a.name: a.status if not a.active else "ok" for a in self.arms}, refresh=False)

    def _flush_losses(self, a: Arm) -> None:
        """Log one arm's buffered losses (mean since the last log); a non-finite one diverges it."""
        if not a._losses:
            a._lrs = []
            return
        losses = torch.stack(a._losses).cpu().numpy()
        accs = torch.stack(a._accs).cpu().numpy() if a._accs else None
        first = a.last_step - len(losses) + 1
        lrs = a._lrs
        a._losses, a._accs, a._lrs = [], [], []
        bad = np.flatnonzero(~np.isfinite(losses))
        if bad.size:
            self._diverge(a, first + int(bad[0]), f"non-finite training loss {losses[bad[0]]}")
            losses = losses[: bad[0]]
            accs = accs[: bad[0]] if accs is not None else None
        if losses.size == 0:
            return
        vals = {"loss": float(losses.mean())}
        if accs is not None and accs.size:
            vals["acc"] = float(accs.mean())
        vals["lr"] = lrs[losses.size - 1]  # of the logged step, before the scheduler moved on
        self._emit(first + losses.size - 1, a, vals)

    def _diverge(self, arm: Arm, step: int, reason: str) -> None:
        if arm.status == "diverged":
            return
        arm.status = "diverged"
        arm.diverged_step = step
        arm.last_step = min(arm.last_step, step - 1)  # the last step with a finite loss (a GPU learns of it late)
        arm.reason = reason
        self._emit(step, arm, {"diverged": 1.0})
        if self.progress is not None:
            self.progress.write(f"arm {arm.name!r} diverged at step {step}: {reason}; the other arms go on")
        if arm.recorder is not None:
            arm.recorder.remove()

    def run_eval(self) -> None:
        """Test loss/accuracy of every arm that still trains (eval mode; nothing recorded)."""
        if self.evaluate is None:
            return
        for a in self.arms:  # on accelerators a loss not yet checked may be NaN: no test of a diverged model
            if a.active and a._losses and not bool(torch.isfinite(torch.stack(a._losses)).all()):
                self._flush_losses(a)
        for a in self.arms:
            if a.status == "diverged":
                continue
            with a.paused():
                vals = self.evaluate(a.model)
            self._emit(self.step, a, vals)


def _edges_of(rec: Recorder | None) -> dict[str, list[float]]:
    """Histogram ranges of a recorder as checkpoint-friendly ``{"layer|mode": [lo, hi]}``."""
    if rec is None:
        return {}
    return {f"{layer}|{mode}": list(edges) for (layer, mode), edges in rec.hist_edges().items()}


def _parse_edges(edges: dict[str, list[float]]) -> dict[tuple[str, str], tuple[float, float]]:
    return {tuple(k.split("|", 1)): (float(v[0]), float(v[1])) for k, v in edges.items()}
