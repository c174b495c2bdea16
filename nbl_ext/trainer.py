"""The training loop behind :func:`nbl_ext.heal`: deterministic, early-stopped, resumable.

* float32 master copies of the trainable tensors (the parameter itself when it is float32), so AdamW
  steps are not lost to bf16 rounding; gradients accumulate over micro batches;
* the sequences of step ``s`` and its learning rate are functions of ``s`` and the seed (a seeded
  permutation per epoch; linear warm-up, then linear decay or constant), so a resumed run sees
  exactly what an uninterrupted one would;
* the held-out loss is evaluated before the first step and every ``eval_every`` steps; the best
  tensors are kept and restored at the end; ``patience`` evaluations without improvement stop it;
* :meth:`Trainer.save` writes the masters, the best tensors, the AdamW moments, the torch RNG
  state and the counters to ``state_dir/heal_state/`` (safetensors + JSON, the directory replaced
  atomically; no pickle); :meth:`Trainer.load` refuses a state of another run.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nbl_ext._io import atomic_directory, read_json, read_tensors

STATE = "heal_state"  # sub-directory of state_dir: state.safetensors + state.json, replaced atomically
STATE_VERSION = 1


class Trainer:
    """AdamW on float32 masters, a step-indexed data order and schedule, held-out early stopping, atomic state.

    ``objective`` has ``count(ids)`` (the loss's normalizer, known before the forward) and
    ``loss_sum(ids)`` (the summed loss); ``cfg`` is a :class:`nbl_ext.heal.HealConfig`.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Any,
        params: list[tuple[str, nn.Parameter]],
        train: torch.Tensor,
        heldout: torch.Tensor,
        cfg: Any,
        total: int,
        device: torch.device,
        min_steps: int = 0,
        lr_scales: list[float] | None = None,
    ) -> None:
        self.model, self.objective, self.params, self.cfg, self.total = model, objective, params, cfg, total
        self.train_ids, self.heldout = train, heldout
        self.device = device
        # float32 master copies (the parameter itself when it is float32): AdamW steps stay exact in bf16 models
        self.masters = [
            p if p.dtype == torch.float32 else p.detach().float().clone().requires_grad_(True) for _, p in params
        ]
        # one group per tensor (the optimizer state keeps the masters' order), each at lr_scale x the schedule's rate
        scales = lr_scales if lr_scales is not None else [1.0] * len(self.masters)
        if len(scales) != len(self.masters):
            raise ValueError(f"Trainer: {len(scales)} lr_scales for {len(self.masters)} trainable tensors")
        self.opt = torch.optim.AdamW(
            [{"params": [m], "lr_scale": float(s)} for m, s in zip(self.masters, scales)],
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            foreach=False,
        )
        self.micro = cfg.micro_batch_size or cfg.batch_size
        self.warmup = int(round(cfg.warmup_fraction * total))
        self.step, self.best_step, self.best_loss, self.bad_evals = 0, 0, math.inf, 0
        # seconds spent by earlier (interrupted) runs up to their last saved state, and this run's start
        self.seconds_before, self.started = 0.0, time.perf_counter()
        self.best = [m.detach().clone() for m in self.masters]
        self.history: list[dict[str, Any]] = []
        self.stopped = False
        self.min_steps = min_steps  # early stopping never ends the run before this step
        self.running: float | None = None  # exponential moving average of the train loss (the bar's)

    def lr_at(self, step: int) -> float:
        if step <= self.warmup:
            return self.cfg.lr * step / (self.warmup + 1)
        if self.cfg.lr_schedule == "constant":
            return self.cfg.lr
        return self.cfg.lr * max(0.0, (self.total - step + 1) / (self.total - self.warmup))

    def batch(self, step: int) -> torch.Tensor:
        """Sequences of optimizer step ``step`` (1-based): a seeded permutation per epoch, a function of the step."""
        n, b = self.train_ids.shape[0], self.cfg.batch_size
        rows, perms = [], {}
        for pos in range((step - 1) * b, step * b):
            epoch = pos // n
            if epoch not in perms:
                perms[epoch] = torch.randperm(
                    n, generator=torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch + 1)
                )
            rows.append(int(perms[epoch][pos % n]))
        return self.train_ids[rows]

    def train_step(self, step: int) -> float:
        self.model.train()
        ids = self.batch(step)
        norm = self.objective.count(ids)
        total = 0.0
        for s in range(0, ids.shape[0], self.micro):
            loss = self.objective.loss_sum(ids[s : s + self.micro].to(self.device)) / norm
            loss.backward()
            total += float(loss.detach())
        for (_, p), m in zip(self.params, self.masters):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None
        if not math.isfinite(total):
            raise FloatingPointError(f"heal: the training loss is {total} at step {step}; lower lr (now {self.cfg.lr})")
        torch.nn.utils.clip_grad_norm_(self.masters, self.cfg.max_grad_norm)
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(step) * g["lr_scale"]
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sync()
        return total

    def sync(self) -> None:
        with torch.no_grad():
            for (_, p), m in zip(self.params, self.masters):
                if m is not p:
                    p.copy_(m)

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        loss, count = 0.0, 0
        for s in range(0, self.heldout.shape[0], self.micro):
            ids = self.heldout[s : s + self.micro].to(self.device)
            loss += float(self.objective.loss_sum(ids))
            count += self.objective.count(ids)
        return loss / count

    def record_eval(self, step: int, train_loss: float | None) -> None:
        loss = self.evaluate()
        self.history.append({"step": step, "train_loss": train_loss, "heldout_loss": loss})
        if loss < self.best_loss - (self.cfg.min_delta if step else 0.0):
            self.best_loss, self.best_step, self.bad_evals = loss, step, 0
            self.best = [m.detach().clone() for m in self.masters]
        else:
            self.bad_evals += 1
            if self.cfg.patience and self.bad_evals >= self.cfg.patience and step >= self.min_steps:
                self.stopped = True

    def restore_best(self) -> None:
        with torch.no_grad():
            for m, b in zip(self.masters, self.best):
                m.copy_(b)
        self.sync()

    # --- state ------------------------------------------------------------------------------
    def save(self, root: Path, run: dict[str, Any]) -> None:
        tensors = {f"master.{i}": m for i, m in enumerate(self.masters)}
        tensors.update({f"best.{i}": b for i, b in enumerate(self.best)})
        for i, st in self.opt.state_dict()["state"].items():
            for key, v in st.items():
                tensors[f"optim.{i}.{key}"] = v if torch.is_tensor(v) else torch.tensor(float(v))
        tensors["rng.cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        meta = {
            "version": STATE_VERSION,
            "run": run,
            "step": self.step,
            "best_step": self.best_step,
            "best_loss": self.best_loss,
            "bad_evals": self.bad_evals,
            "stopped": self.stopped,
            "history": self.history,
            "running": self.running,
            "seconds": self.seconds(),
            "names": [n for n, _ in self.params],
        }
        root.mkdir(parents=True, exist_ok=True)
        with atomic_directory(root / STATE) as tmp:
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
            (tmp / "state.json").write_text(json.dumps(meta, indent=1) + "\n")

    def load(self, root: Path, run: dict[str, Any]) -> bool:
        d = root / STATE
        if not (d / "state.json").is_file():
            return False
        what = f"heal: resume state {d}"
        meta = read_json(d / "state.json", what)
        if meta.get("version") != STATE_VERSION or meta.get("run") != run:
            old = meta.get("run") or {}
            diff = sorted(k for k in set(old) | set(run) if old.get(k) != run.get(k))
            if "config" in diff and isinstance(old.get("config"), dict):  # name the settings, not just "config"
                was, now = old["config"], run["config"]
                diff += [f"config.{k}" for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
            raise ValueError(
                f"{what} belongs to another run (differs in: {', '.join(diff) or 'version'}); use a "
                "new state_dir, or delete this one to start over"
            )
        t = read_tensors(d / "state.safetensors", what)
        with torch.no_grad():
            for i, m in enumerate(self.masters):
                m.copy_(t[f"master.{i}"])
        self.best = [t[f"best.{i}"].to(m.device) for i, m in enumerate(self.masters)]
        sd = self.opt.state_dict()
        sd["state"] = {}
        for key, v in t.items():
            if key.startswith("optim."):
                _, i, name = key.split(".", 2)
                sd["state"].setdefault(int(i), {})[name] = v
        self.opt.load_state_dict(sd)
        torch.set_rng_state(t["rng.cpu"])
        if "rng.cuda" in t and self.device.type == "cuda":
            torch.cuda.set_rng_state(t["rng.cuda"], self.device)
        self.step, self.best_step, self.best_loss = meta["step"], meta["best_step"], meta["best_loss"]
        self.bad_evals, self.stopped, self.history = meta["bad_evals"], meta["stopped"], meta["history"]
        self.running = meta["running"]
        self.seconds_before, self.started = float(meta.get("seconds", 0.0)), time.perf_counter()
        self.sync()
        return True

    def seconds(self) -> float:
        """Training time so far, over every run of a resumed one (a killed run's time after its last save is
        not counted: that work is done again)."""
        return self.seconds_before + time.perf_counter() - self.started
