"""Healing a linearized model: LoRA (peft) or distillation of the affine maps, one call after compression.

The closed-form map of each replaced block is fitted locally; the error left over compounds
through the model. :func:`heal` trains it away on text, in place::

    result = nbl_ext.heal(model, tokens, HealConfig(method="lora"))            # causal-LM objective
    result = nbl_ext.heal(model, tokens, HealConfig(method="distill"), teacher=original)   # match the original

Methods
-------
* ``"lora"``: LoRA through peft on the replaced blocks' affine maps (:class:`AffineResidual` is an
  ``nn.Linear``, so ``peft.tuners.lora.Linear`` wraps it: ``h + (W + BA) h + b``) and, with
  ``lora_targets="around"``, on ``lora_modules`` of the layers within ``lora_radius`` of every
  replaced block (the default for DROP models, which have no map). Causal-LM loss; the paper's
  hyperparameters (rank 32, alpha 64, dropout 0.1, learning rate 1e-4, effective batch 16,
  3 epochs) are the defaults, the step count follows from the data given. At the end the best
  adapter is merged into W (and the targeted linears): the model keeps its structure.
  ``adapter_dir`` also saves the adapter (peft's own format, safetensors), which
  ``peft.PeftModel.from_pretrained(unhealed_model, adapter_dir)`` loads.
* ``"distill"``: trains only the replaced blocks' W and b to match the original model:
  ``"kl"``, KL(original || linearized) of the next-token distributions, or ``"hidden"``, the
  relative squared error of the hidden state after every replaced block (no LM head, and both
  forwards stop after the last replaced block). The teacher is computed per micro batch and
  released, never stored for the data set.

The teacher is not a second model. It is the student itself with the replaced layers swapped
back to their original attention branches (:class:`OriginalBranches`, taken from the original
model, which the caller can then free): everything else (embeddings, MLPs, untouched layers,
LM head) is shared. The layers before the first replaced block compute the same thing in both,
so the student replays the teacher's hidden state there instead of recomputing it.

``input_scaling="rms"`` (both methods) trains LoRA's A or the maps' W on each map's inputs divided by their
per-channel RMS on the first training batch (a reparametrization ``W = V diag(1/s)`` through
``torch.nn.utils.parametrize``, removed before merging and saving: see :func:`_scale_inputs` for why). Only the
maps, which read the residual stream: the modules around them (``lora_targets="around"``) read attention outputs
and MLP activations, whose heavy tails made a scaled run diverge (Gemma 3); they train on their plain inputs, at
``lora_around_lr`` when given (the rms-scaled maps take rates far above what plain LoRA tolerates).

Both methods hold out tokens (``heldout`` or ``heldout_fraction`` of the sequences) that are
never trained on, evaluate the loss on them every ``eval_every`` steps (and before the first
step), stop after ``patience`` evaluations without improvement (never before ``min_steps``, by default one
epoch: the first AdamW steps are noisy, and stopping inside the first pass is not overfitting control) and keep
the best weights, so
healing never ends with a held-out loss worse than the unhealed model's. Runs are
deterministic for a seed and, with ``state_dir``, resumable: every ``save_every`` steps the
trainable tensors, the AdamW moments, the RNG state and the step are written atomically
(safetensors + JSON, no pickle); a rerun with the same settings continues from there and ends
with the same weights as an uninterrupted run.

Peak memory, Llama-3.1-8B shape in bfloat16, k = 12 replaced blocks, micro batch 1 x 1024
tokens (estimates from the parameter counts: weights 8.03 G parameters, one attention branch
41.9 M, one map 16.8 M, vocabulary 128256):

* student weights 15.5 GB (16.1 GB original - 12 x 84 MB branches + 12 x 34 MB maps);
* distill only: the 12 original branches 1.0 GB (the teacher's only extra weights);
* trainable state: distill 201 M parameters (12 maps) x (float32 master 4 + AdamW 8 + bf16
  gradient 2 + its float32 copy 4 bytes) = 3.6 GB, plus the best-so-far snapshot (float32, 0.8 GB)
  and the maps before training (restored on error, 0.4 GB): 4.8 GB; LoRA rank 32 on the 12 maps:
  3.1 M parameters, under 0.1 GB;
* logits: 1024 x 128256 x 4 bytes = 0.53 GB per copy, about 4 copies for the loss and its
  gradient (plus the teacher's probabilities for "kl"): about 2.5 GB; none for "hidden";
* activations kept for the backward, from the first trainable layer on: about 0.2-0.3 GB per
  layer (1024 tokens x ~84 k saved values x 2 bytes), up to ~10 GB when the first replaced block
  is near the input, less when it is late.

At most about 34 GB in all (distill with "kl"), 28 GB for LoRA: one 40/80 GB GPU.
``micro_batch_size`` scales the last two items linearly. These are estimates from the shapes,
not measurements.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nbl_ext._io import atomic_directory
from nbl_ext.adapters import Adapter, get_adapter
from nbl_ext.calibrate import weights_fingerprint
from nbl_ext.engine import check_token_data, eval_mode
from nbl_ext.linearize import AffineResidual, LinearizedLayerMixin, is_linearized
from nbl_ext.trainer import Trainer
from nbl_ext.validation import check_choice, check_count

__all__ = ["HealConfig", "HealResult", "OriginalBranches", "heal"]

METHODS = ("lora", "distill")
DISTILL_LOSSES = ("kl", "hidden")
LORA_TARGETS = ("auto", "maps", "around")
SCHEDULES = ("linear", "constant")
INPUT_SCALINGS = ("none", "rms")
# HealConfig fields added after resume states were first written, at the value that behaves as before they existed
FINGERPRINT_NEUTRAL = {"input_scaling": "none", "lora_around_lr": None}


@dataclass
class HealConfig:
    """Settings of :func:`heal` (defaults: the paper's LoRA recipe; the step count follows from the data)."""

    method: str = "lora"
    epochs: float = 3.0
    steps: int | None = None  # optimizer steps; overrides epochs
    lr: float = 1e-4
    batch_size: int = 16  # sequences per optimizer step
    micro_batch_size: int | None = None  # sequences per forward (gradient accumulation); default batch_size
    lr_schedule: str = "linear"  # linear warm-up, then linear decay to 0 ("linear") or constant
    warmup_fraction: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_rank: int = 32
    lora_alpha: float = 64.0
    lora_dropout: float = 0.1
    lora_targets: str = "auto"  # "maps", "around" (maps + lora_modules near replaced blocks), "auto"
    lora_radius: int = 1
    lora_modules: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    # peak learning rate of the LoRA on the lora_modules around the blocks (not the maps); default lr
    lora_around_lr: float | None = None
    distill_loss: str = "kl"
    # "rms": LoRA's A (LoRA) or W (distill) of each map is trained on the map's inputs divided by their per-channel
    # RMS on the training data (a reparametrization: the same function and the same merged W, b; see _scale_inputs)
    input_scaling: str = "none"
    heldout_fraction: float = 0.1  # of the sequences, when heal() gets no heldout tensor
    patience: int = 3  # evaluations without improvement before stopping; 0: never stop early
    # early stopping never ends a run before this step; default: one epoch (one pass over the training sequences,
    # at most the run). Before that the held-out loss mostly shows the noise of the first AdamW steps, not overfitting
    min_steps: int | None = None
    min_delta: float = 0.0
    eval_every: int | None = None  # steps; default: about 10 evaluations per run
    save_every: int | None = None  # steps; default eval_every (with state_dir)
    seed: int = 0
    state_dir: str | None = None

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"HealConfig: {name} {why}, got {getattr(self, name)!r}")

        for name, choices in (
            ("method", METHODS),
            ("distill_loss", DISTILL_LOSSES),
            ("lora_targets", LORA_TARGETS),
            ("lr_schedule", SCHEDULES),
            ("input_scaling", INPUT_SCALINGS),
        ):
            check_choice(getattr(self, name), choices, name, what="HealConfig")
        for name, lo, optional in (
            ("steps", 1, True),
            ("batch_size", 1, False),
            ("micro_batch_size", 1, True),
            ("lora_rank", 1, False),
            ("lora_radius", 0, False),
            ("patience", 0, False),
            ("min_steps", 0, True),
            ("eval_every", 1, True),
            ("save_every", 1, True),
            ("seed", 0, False),
        ):
            if not (optional and getattr(self, name) is None):
                check_count(getattr(self, name), name, lo, what="HealConfig")
        for name, lo, hi in (
            ("epochs", 0.0, math.inf),
            ("lr", 0.0, math.inf),
            ("lora_alpha", 0.0, math.inf),
            ("max_grad_norm", 0.0, math.inf),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo < v < hi:
                raise bad(name, "must be a positive number")
        for name, hi in (("lora_dropout", 1.0), ("heldout_fraction", 1.0), ("warmup_fraction", 1.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < hi:
                raise bad(name, f"must be a number in [0, {hi})")
        v = self.lora_around_lr
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v < math.inf):
            raise bad("lora_around_lr", "must be a positive number or None (the lr)")
        if v is not None and self.method != "lora":
            raise bad("lora_around_lr", "is LoRA's rate on the modules around the blocks; method='distill' trains W, b")
        for name in ("weight_decay", "min_delta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < math.inf:
                raise bad(name, "must be a number >= 0")
        if isinstance(self.lora_modules, str) or not all(isinstance(m, str) and m for m in self.lora_modules):
            raise bad("lora_modules", "must be a sequence of module paths inside a decoder layer")
        self.lora_modules = tuple(self.lora_modules)

    def training_fields(self) -> dict[str, Any]:
        """The settings a resumed run must share with the interrupted one.

        A field added after resume states were first written is left out at the value that behaves
        as before it existed (:data:`FINGERPRINT_NEUTRAL`), so those states still resume; at any
        other value it is part of the fingerprint.
        """
        out = {k: v for k, v in asdict(self).items() if k not in ("state_dir", "save_every")}
        for k, v in FINGERPRINT_NEUTRAL.items():
            if out.get(k) == v:
                del out[k]
        if self.method == "lora" and self.input_scaling == "rms" and self.lora_targets != "maps":
            # Until lora_around_lr came (commit 74c795c) rms scaled every LoRA target, the modules around the blocks
            # too; now only the maps. A state written then has the same fields, other semantics: it must not resume.
            out["rms_scope"] = "maps"
        return out


@dataclass
class HealResult:
    """What :func:`heal` did: the held-out loss before and after, the steps, tokens and time."""

    method: str
    objective: str
    targets: list[str]
    trainable_parameters: int
    steps: int  # optimizer steps taken (including those of an interrupted run that was resumed)
    planned_steps: int
    best_step: int  # 0: healing never beat the unhealed model on held-out tokens; nothing changed
    stopped_early: bool
    heldout_loss_before: float
    heldout_loss_after: float
    train_tokens: int  # tokens trained on (steps x batch_size x seq_len)
    heldout_tokens: int
    seconds: float  # wall time, including the interrupted runs it resumed (up to their last saved state)
    resumed_from: int
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return asdict(self)


class OriginalBranches:
    """The original attention branches of a linearized model's replaced layers: the distillation teacher.

    Takes from ``original`` (the model before linearization) only the modules each replaced layer
    lost (the adapter's ``branch_modules``), plus the first row of every other weight so that
    :func:`heal` can check the student really came from it. ``original`` may be freed afterwards.
    """

    def __init__(self, original: nn.Module, layers: list[int]) -> None:
        adapter = get_adapter(original)
        if getattr(adapter.config, "nbl", None) or any(is_linearized(layer) for layer in adapter.layers()):
            raise ValueError("OriginalBranches: the teacher must be the original model, not a linearized one")
        self.model_type, self.num_layers, self.hidden_size = adapter.model_type, adapter.num_layers, adapter.hidden_size
        bad = [i for i in layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"OriginalBranches: layers {bad} out of range for {self.num_layers} layers")
        self.branches = {
            i: {name: getattr(adapter.layers()[i], name) for name in adapter.branch_modules} for i in layers
        }
        branch_ids = {id(p) for mods in self.branches.values() for m in mods.values() for p in m.parameters()}
        self.probe = {
            n: p.detach().reshape(-1)[: p.shape[-1]].to("cpu", torch.float32, copy=True)
            for n, p in original.named_parameters()
            if id(p) not in branch_ids
        }

    def check(self, model: nn.Module, adapter: Adapter, replaced: list[int]) -> None:
        shape = (adapter.model_type, adapter.num_layers, adapter.hidden_size)
        if shape != (self.model_type, self.num_layers, self.hidden_size):
            raise ValueError(
                f"heal: the teacher is a {self.model_type} with {self.num_layers} layers of width "
                f"{self.hidden_size}; the model is a {shape[0]} with {shape[1]} x {shape[2]}"
            )
        missing = [i for i in replaced if i not in self.branches]
        if missing:
            raise ValueError(f"heal: the teacher's branches lack replaced layers {missing}")
        own = dict(model.named_parameters())
        differ = [
            n
            for n, v in self.probe.items()
            if n in own and not torch.equal(own[n].detach().reshape(-1)[: v.numel()].to("cpu", torch.float32), v)
        ]
        if differ:
            raise ValueError(
                f"heal: the teacher differs from the linearized model outside the replaced blocks "
                f"({differ[0]}{' ...' if len(differ) > 1 else ''}); pass the original model this one "
                "was compressed from"
            )


# --- the teacher and the shared prefix ---------------------------------------------------------


def _original_layer(student: nn.Module, branches: dict[str, nn.Module]) -> nn.Module:
    """The original decoder layer: the student layer's own modules plus its original branch (shallow, shared)."""
    base = next(c for c in type(student).__bases__ if c is not LinearizedLayerMixin)
    layer = copy.copy(student)
    for key, value in list(vars(layer).items()):  # own module/parameter/hook dicts: never alias the student's
        if isinstance(value, dict):
            vars(layer)[key] = type(value)(value)
    layer.__class__ = base
    layer._modules.pop("nbl_affine", None)
    layer._modules.update(branches)
    for key in ("nbl_method", "nbl_layer_idx", "nbl_release_kv"):
        vars(layer).pop(key, None)
    return layer


@contextlib.contextmanager
def _swapped(layers: nn.ModuleList, replacement: dict[int, nn.Module]) -> Iterator[None]:
    saved = {i: layers[i] for i in replacement}
    try:
        for i, m in replacement.items():
            layers[i] = m
        yield
    finally:
        for i, m in saved.items():
            layers[i] = m


class _Replay(nn.Module):
    """Stands in for a leading decoder layer: returns the (teacher's) hidden state after it, or passes through."""

    def __init__(self, layer: nn.Module, value: torch.Tensor | None) -> None:
        super().__init__()
        self.value = value
        self.attention_type = getattr(layer, "attention_type", None)  # the decoder reads it in some families

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states if self.value is None else self.value


class _Stop(Exception):
    """Raised after the last replaced block when the rest of the forward is not needed."""


# --- objectives ------------------------------------------------------------------------------


class _Objective:
    """loss_sum(ids) -> (summed loss, count); count(ids) is known before the forward."""

    def __init__(self, model: nn.Module, adapter: Adapter, replaced: list[int]) -> None:
        self.model, self.adapter, self.replaced = model, adapter, replaced

    def count(self, ids: torch.Tensor) -> int:
        return ids.shape[0] * (ids.shape[1] - 1)

    def loss_sum(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")


class _Distill(_Objective):
    def __init__(
        self, model: nn.Module, adapter: Adapter, replaced: list[int], teacher: OriginalBranches, loss: str
    ) -> None:
        super().__init__(model, adapter, replaced)
        layers = adapter.layers()
        dtype, device = layers[replaced[0]].nbl_affine.weight.dtype, layers[replaced[0]].nbl_affine.weight.device
        self.teacher_layers = {}

        def placed(m: nn.Module) -> nn.Module:  # a copy only where the device or dtype differs
            if all(p.device == device and p.dtype == dtype for p in m.parameters()):
                return m
            return copy.deepcopy(m).to(device=device, dtype=dtype)

        for i in replaced:
            mods = {n: placed(m) for n, m in teacher.branches[i].items()}  # run under no_grad only
            self.teacher_layers[i] = _original_layer(layers[i], mods)
        self.loss = loss
        self.first, self.last = replaced[0], replaced[-1]

    def count(self, ids: torch.Tensor) -> int:
        return ids.numel() * (len(self.replaced) if self.loss == "hidden" else 1)

    def _run(self, ids: torch.Tensor, swap: dict[int, nn.Module], capture: dict[int, nn.Module]) -> tuple:
        """Forward with ``swap``'d layers; the outputs of ``capture``'d layers, the input of the first replaced one."""
        seen: dict[int, torch.Tensor] = {}
        hooks = []

        def grab(i: int):
            def hook(module, args, output):
                seen[i] = output[0] if isinstance(output, tuple) else output
                if self.loss == "hidden" and i == self.last:
                    raise _Stop

            return hook

        def grab_input(module, args, kwargs):
            seen[-1] = kwargs.get("hidden_states", args[0] if args else None)

        for i, m in capture.items():
            hooks.append(m.register_forward_hook(grab(i)))
        if self.first > 0 and self.first in swap:  # only the teacher's pass records the shared prefix
            hooks.append(swap[self.first].register_forward_pre_hook(grab_input, with_kwargs=True))
        logits = None
        try:
            with _swapped(self.adapter.layers(), swap):
                logits = self.model(input_ids=ids, use_cache=False).logits
        except _Stop:
            pass
        finally:
            for h in hooks:
                h.remove()
        return logits, seen

    def loss_sum(self, ids: torch.Tensor) -> torch.Tensor:
        layers = self.adapter.layers()
        with torch.no_grad():
            t_logits, t_seen = self._run(ids, self.teacher_layers, self.teacher_layers)
        replay = {j: _Replay(layers[j], t_seen[-1] if j == self.first - 1 else None) for j in range(self.first)}
        s_logits, s_seen = self._run(ids, replay, {i: layers[i] for i in self.replaced})
        if self.loss == "hidden":
            total = 0
            for i in self.replaced:
                t, s = t_seen[i].float(), s_seen[i].float()
                total = total + (((s - t) ** 2).sum(-1) / (t * t).sum(-1).clamp_min(1e-12)).sum()
            return total
        log_p = F.log_softmax(t_logits.float(), -1)
        del t_logits
        log_q = F.log_softmax(s_logits.float(), -1)
        return (log_p.exp() * (log_p - log_q)).sum()


# --- input scaling -----------------------------------------------------------------------------


class _ColumnScale(nn.Module):
    """Parametrization ``W = V diag(1 / s)``: the trained tensor ``V`` acts on inputs divided by ``s`` per channel."""

    def __init__(self, s: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("s", s)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return v / self.s.to(v.dtype)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.s.to(w.dtype)


def _input_rms(model: nn.Module, modules: list[nn.Module], ids: torch.Tensor, micro: int) -> list[torch.Tensor]:
    """Per-input-channel RMS of each module's input over ``ids`` (float32; a floor keeps dead channels finite)."""
    sums = [None] * len(modules)
    count = [0]

    def hook(i: int):
        def pre(module, args, kwargs):
            x = (args[0] if args else next(iter(kwargs.values()))).detach()
            sq = x.double().pow(2).reshape(-1, x.shape[-1]).sum(0)
            sums[i] = sq if sums[i] is None else sums[i] + sq
            if i == 0:
                count[0] += x.numel() // x.shape[-1]

        return pre

    hooks = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, m in enumerate(modules)]
    device = next(model.parameters()).device
    try:
        with eval_mode(model):
            for s in range(0, ids.shape[0], micro):
                model(input_ids=ids[s : s + micro].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for sq in sums:
        rms = (sq / count[0]).sqrt()
        out.append(rms.clamp_min(max(float(rms.max()) * 1e-6, 1e-12)).float())
    return out


def _scale_inputs(module: nn.Module, s: torch.Tensor, keep_function: bool) -> None:
    """Train ``module.weight`` (out x in) on inputs divided by ``s`` per channel: ``weight = V diag(1/s)``, V trained.

    Why: the replaced blocks read the residual stream, whose channels differ in scale by orders of magnitude
    (Gemma 3: per-channel RMS from 3 to 4,700 at one layer, massive activations). An AdamW step moves every
    entry of A (LoRA) or W (distill) by about the learning rate, so the change of the output is proportional to
    each input channel's scale: a rate small enough for the massive channels barely moves the others. On inputs
    divided by their RMS every channel counts alike. ``keep_function``: V starts at ``W diag(s)`` (distill: the
    same map); otherwise V keeps the tensor's current value (LoRA's A: its random start, on unit-scale inputs;
    B = 0 leaves the function unchanged). Removed by :func:`_unscale_inputs`, which leaves the plain weight.
    """
    from torch.nn.utils import parametrize

    value = module.weight.detach().clone()
    module._nbl_parameter_order = list(module._parameters)  # put back by _unscale_inputs
    parametrize.register_parametrization(module, "weight", _ColumnScale(s.to(value.device)))
    if not keep_function:
        with torch.no_grad():
            module.parametrizations.weight.original.copy_(value)


def _unscale_inputs(modules: list[nn.Module]) -> None:
    from torch.nn.utils import parametrize

    for m in modules:
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
            # the weight comes back as a new parameter at the end: restore the order (state dicts, fingerprints)
            order = vars(m).pop("_nbl_parameter_order")
            m._parameters = {k: m._parameters[k] for k in order}


@torch.no_grad()
def _put_back(layers: nn.ModuleList, replaced: list[int], initial: list[torch.Tensor]) -> None:
    """The maps' W and b (in ``replaced`` order, weight then bias) set back to ``initial``."""
    plain = [getattr(layers[i].nbl_affine, n) for i in replaced for n in ("weight", "bias")]
    for p, v in zip(plain, initial):
        p.copy_(v)


# --- targets and data ------------------------------------------------------------------------


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()


def _lora_targets(model: nn.Module, adapter: Adapter, replaced: list[int], method: str, cfg: HealConfig) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    layers = adapter.layers()
    maps = [names[id(layers[i].nbl_affine)] for i in replaced if method == "nbl"]
    mode = cfg.lora_targets if cfg.lora_targets != "auto" else ("maps" if method == "nbl" else "around")
    if mode == "maps":
        if not maps:
            raise ValueError(
                "heal: lora_targets='maps' but the model's blocks were dropped (no maps); use "
                "lora_targets='around' (LoRA on the layers around the dropped blocks)"
            )
        return maps
    near = sorted(
        {
            j
            for i in replaced
            for j in range(i - cfg.lora_radius, i + cfg.lora_radius + 1)
            if 0 <= j < adapter.num_layers
        }
    )
    extra = []
    for j in near:
        for path in cfg.lora_modules:
            try:
                mod = layers[j].get_submodule(path)
            except AttributeError:
                continue  # e.g. self_attn.o_proj of a linearized layer
            if isinstance(mod, nn.Linear) and not isinstance(mod, AffineResidual):
                extra.append(f"{names[id(layers[j])]}.{path}")
    if not maps and not extra:
        raise ValueError(
            f"heal: no module matches lora_modules {list(cfg.lora_modules)} within {cfg.lora_radius} "
            f"layers of the replaced blocks {replaced}"
        )
    return maps + extra


def _split(
    data: torch.Tensor, heldout: torch.Tensor | None, cfg: HealConfig, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    data = check_token_data(data, vocab, "heal")
    if data.shape[1] < 2:
        raise ValueError(f"heal: sequences need at least 2 tokens (next-token targets), got seq_len {data.shape[1]}")
    if heldout is not None:
        heldout = check_token_data(heldout, vocab, "heal(heldout)")
        if heldout.shape[1] < 2:
            raise ValueError("heal: held-out sequences need at least 2 tokens")
        return data, heldout
    n_hold = int(round(cfg.heldout_fraction * data.shape[0]))
    if n_hold == 0 or n_hold == data.shape[0]:
        raise ValueError(
            f"heal: no held-out tokens: heldout_fraction={cfg.heldout_fraction} of {data.shape[0]} sequences holds "
            f"out {n_hold}; early stopping needs held-out sequences and training needs the rest. Pass heldout= "
            "(token ids never trained on), more sequences, or another heldout_fraction"
        )
    order = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
    return data[order[n_hold:].sort().values], data[order[:n_hold].sort().values]


# --- the entry point --------------------------------------------------------------------------


def heal(
    model: nn.Module,
    data: torch.Tensor,
    config: HealConfig | None = None,
    *,
    heldout: torch.Tensor | None = None,
    teacher: nn.Module | OriginalBranches | None = None,
    adapter_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> HealResult:
    """Heal a linearized model in place (see the module docstring); returns a :class:`HealResult`.

    Args:
        model: a model linearized by :func:`nbl_ext.linearize` or loaded by :func:`nbl_ext.load_pretrained`.
        data: training token ids (num_samples, seq_len).
        config: :class:`HealConfig` (default: LoRA with the paper's settings).
        heldout: held-out token ids for early stopping (default: ``config.heldout_fraction`` of ``data``'s
            sequences, never trained on).
        teacher: for ``method="distill"``: the original model, or its :class:`OriginalBranches`.
        adapter_dir: for ``method="lora"``: also write the best adapter there (peft format).
        progress: a tqdm bar with the running train loss and the last held-out loss.

    The model's structure, config and dtype are unchanged; only W, b (and, for LoRA "around", the
    targeted linears) change, and only to weights that lowered the held-out loss. An error leaves
    the model as it was (the saved state keeps the progress).
    """
    cfg = config or HealConfig()
    if not isinstance(cfg, HealConfig):
        raise TypeError(f"heal: config must be a HealConfig, got {type(cfg).__name__}")
    adapter = get_adapter(model)
    layers = adapter.layers()
    replaced = [i for i, layer in enumerate(layers) if is_linearized(layer)]
    if not replaced:
        raise ValueError(
            "heal: the model has no replaced blocks (nothing was linearized or dropped); heal a model "
            "from nbl_ext.linearize / `nbl compress`"
        )
    method = layers[replaced[0]].nbl_method
    if cfg.method == "distill" and method != "nbl":
        raise ValueError(
            "heal: method='distill' trains the replaced blocks' W and b, but this model's blocks were "
            "dropped (no maps); use method='lora' (LoRA on the layers around them)"
        )
    if cfg.method == "distill" and teacher is None:
        raise ValueError("heal: method='distill' needs the original model: heal(..., teacher=original_model)")
    if cfg.method == "lora" and teacher is not None:
        raise ValueError("heal: teacher= is for method='distill'; LoRA trains on the causal-LM objective")
    if adapter_dir is not None and cfg.method != "lora":
        raise ValueError("heal: adapter_dir is for method='lora' (distillation trains W and b directly)")
    train, held = _split(data, heldout, cfg, adapter.vocab_size)
    steps_per_epoch = math.ceil(train.shape[0] / cfg.batch_size)
    total = cfg.steps if cfg.steps is not None else int(round(cfg.epochs * steps_per_epoch))
    if total < 1:
        raise ValueError(
            f"heal: zero training steps ({cfg.epochs} epochs of {train.shape[0]} sequences in batches "
            f"of {cfg.batch_size}); give steps >= 1, more epochs or more data"
        )
    eval_every = cfg.eval_every or max(1, total // 10)
    save_every = cfg.save_every or eval_every
    device = next(model.parameters()).device
    run = json.loads(
        json.dumps(
            {
                "config": cfg.training_fields(),
                "data": _sha(train),
                "heldout": _sha(held),
                "model": weights_fingerprint(model),
                "replaced": replaced,
            }
        )
    )  # as stored

    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    was_training = model.training
    peft_model = None
    initial = None  # distill: the maps before training, put back if healing fails
    scaled: list[nn.Module] = []  # modules trained through _scale_inputs (input_scaling="rms")
    lr_scales = None  # per trainable tensor, of the schedule's rate (lora_around_lr)
    micro = cfg.micro_batch_size or cfg.batch_size
    t0 = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            torch.manual_seed(cfg.seed)
            if cfg.method == "lora":
                try:
                    from peft import LoraConfig, get_peft_model
                except ImportError:
                    raise ImportError("heal(method='lora') needs peft: pip install 'peft>=0.17,<0.22'") from None

                targets = _lora_targets(model, adapter, replaced, method, cfg)
                on_maps = [t for t in targets if isinstance(model.get_submodule(t), AffineResidual)]
                around = [t for t in targets if t not in on_maps]
                if cfg.lora_around_lr is not None and not around:
                    raise ValueError(
                        "heal: lora_around_lr is set but LoRA has no targets around the blocks (only the maps); "
                        "pass lora_targets='around' or leave lora_around_lr unset"
                    )
                if cfg.input_scaling == "rms":
                    rms = _input_rms(model, [model.get_submodule(t) for t in on_maps], train[: cfg.batch_size], micro)
                peft_model = get_peft_model(
                    model,
                    LoraConfig(
                        r=cfg.lora_rank,
                        lora_alpha=cfg.lora_alpha,
                        lora_dropout=cfg.lora_dropout,
                        target_modules=targets,
                        bias="none",
                    ),
                )
                if cfg.input_scaling == "rms":
                    scaled = [model.get_submodule(t).lora_A["default"] for t in on_maps]
                    for m, s in zip(scaled, rms):
                        _scale_inputs(m, s, keep_function=False)
                params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
                if cfg.lora_around_lr is not None:
                    lr_scales = [
                        cfg.lora_around_lr / cfg.lr if any(n.startswith(f"{t}.") for t in around) else 1.0
                        for n, _ in params
                    ]
                objective = _Objective(model, adapter, replaced)
            else:
                branches = teacher if isinstance(teacher, OriginalBranches) else OriginalBranches(teacher, replaced)
                branches.check(model, adapter, replaced)
                targets = [f"layer {i} nbl_affine" for i in replaced]
                maps = [layers[i].nbl_affine for i in replaced]
                initial = [t.detach().clone() for m in maps for t in (m.weight, m.bias)]  # _put_back's order
                if cfg.input_scaling == "rms":
                    scaled = maps
                    for m, s in zip(scaled, _input_rms(model, scaled, train[: cfg.batch_size], micro)):
                        _scale_inputs(m, s, keep_function=True)
                params = []
                for i in replaced:
                    for name in ("weight", "bias"):
                        p = getattr(layers[i].nbl_affine, name)
                        if name == "weight" and cfg.input_scaling == "rms":
                            p = layers[i].nbl_affine.parametrizations.weight.original
                        p.requires_grad_(True)
                        params.append((f"{i}.{name}", p))
                objective = _Distill(model, adapter, replaced, branches, cfg.distill_loss)
            min_steps = cfg.min_steps if cfg.min_steps is not None else min(total, steps_per_epoch)
            tr = Trainer(model, objective, params, train, held, cfg, total, device, min_steps, lr_scales)
            state_root = Path(cfg.state_dir) if cfg.state_dir else None
            resumed = tr.load(state_root, run) if state_root else False
            start = tr.step
            if not resumed:
                tr.record_eval(0, None)
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=total, initial=start, desc=f"nbl heal ({cfg.method})", unit="step", dynamic_ncols=True)
            try:
                while tr.step < total and not tr.stopped:
                    step = tr.step + 1
                    loss = tr.train_step(step)
                    tr.step = step
                    tr.running = loss if tr.running is None else 0.9 * tr.running + 0.1 * loss
                    if step % eval_every == 0 or step == total:
                        tr.record_eval(step, tr.running)
                    if state_root and (step % save_every == 0 or step == total or tr.stopped):
                        tr.save(state_root, run)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(train=f"{tr.running:.4f}", heldout=f"{tr.history[-1]['heldout_loss']:.4f}")
            finally:
                if bar is not None:
                    bar.close()
            tr.restore_best()
            _unscale_inputs(scaled)  # the plain tensors again: W (distill) or A (LoRA, before saving and merging)
            if tr.best_step == 0 and initial is not None:
                _put_back(layers, replaced, initial)  # exactly the unhealed maps (V / s can differ from W by an ulp)
        if peft_model is not None:
            if adapter_dir is not None:
                with atomic_directory(adapter_dir) as tmp:
                    peft_model.save_pretrained(str(tmp))
            peft_model.merge_and_unload()
            peft_model = None
    except BaseException:
        _unscale_inputs(scaled)
        if peft_model is not None:
            peft_model.unload()  # the LoRA layers out again, unmerged: the model is as it was
        if initial is not None:
            _put_back(layers, replaced, initial)
        raise
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(trainable.get(n, False))
        model.train(was_training)
    return HealResult(
        method=cfg.method,
        objective="causal_lm" if cfg.method == "lora" else f"distill_{cfg.distill_loss}",
        targets=targets,
        trainable_parameters=sum(p.numel() for _, p in params),
        steps=tr.step,
        planned_steps=total,
        best_step=tr.best_step,
        stopped_early=tr.stopped,
        heldout_loss_before=tr.history[0]["heldout_loss"],
        heldout_loss_after=tr.best_loss,
        train_tokens=tr.step * cfg.batch_size * train.shape[1],
        heldout_tokens=int(held.numel()),
        seconds=round(time.perf_counter() - t0 + tr.seconds_before, 3),  # with the runs it resumed
        resumed_from=start,
        history=tr.history,
        config=asdict(cfg),
    )
