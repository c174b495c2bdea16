"""heal(): LoRA (peft) and distillation of the affine maps on tiny random models; merge, reload, resume, errors."""

from __future__ import annotations

import copy
import importlib
import json
import time

import pytest
import safetensors.torch
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import nbl_ext  # noqa: E402
from hf_tiny import greedy_generate, greedy_recompute, tiny_model, token_data  # noqa: E402
from nbl_ext.heal import HealConfig, OriginalBranches, heal  # noqa: E402
from nbl_ext.linearize import AffineResidual  # noqa: E402

heal_mod = importlib.import_module("nbl_ext.heal")  # the module (nbl_ext.heal is the function)
trainer_mod = importlib.import_module("nbl_ext.trainer")
LAYERS = [1, 2]


def _fast(**kw) -> HealConfig:
    base = dict(steps=12, batch_size=4, lr=3e-2, eval_every=3, patience=0, lora_rank=4, lora_alpha=8.0)
    base.update(kw)
    return HealConfig(**base)


@pytest.fixture(scope="module")
def models():
    """(original, linearized with deliberately poor maps, train ids, held-out ids): plenty left to heal."""
    original = tiny_model("llama", 4, seed=0)
    gen = torch.Generator().manual_seed(5)
    d = original.config.hidden_size
    lin = copy.deepcopy(original)
    maps = {i: (0.3 * torch.randn(d, d, generator=gen), 0.3 * torch.randn(d, generator=gen)) for i in LAYERS}
    from nbl_ext.adapters import get_adapter
    from nbl_ext.linearize import apply_structure

    apply_structure(lin, get_adapter(lin), "affine", LAYERS, maps, None)
    # text the original writes (sampled): what it predicts is learnable, unlike uniform random ids
    start = token_data(40, 1, seed=1)
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(3)
        seqs = original.generate(
            start,
            attention_mask=torch.ones_like(start),
            do_sample=True,
            top_k=0,
            max_new_tokens=15,
            min_new_tokens=15,
            pad_token_id=0,
        )
    return original, lin, seqs[:32], seqs[32:]


def _maps(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "nbl_affine" in k}


def test_affine_residual_is_an_nn_linear_with_the_residual(gen):
    w, b = torch.randn(8, 8, generator=gen), torch.randn(8, generator=gen)
    m = AffineResidual(w, b)
    assert isinstance(m, torch.nn.Linear) and (m.in_features, m.out_features) == (8, 8)
    assert set(m.state_dict()) == {"weight", "bias"}  # checkpoints keep nbl_affine.weight / .bias
    h = torch.randn(3, 8, generator=gen)
    torch.testing.assert_close(m(h), h + h @ w.T + b)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # transformers, inside peft
def test_lora_lowers_heldout_loss_and_merged_equals_adapter_model(models, tmp_path):
    _, lin, train, held = models
    model = copy.deepcopy(lin)
    before = _maps(model)
    res = heal(model, train, _fast(), heldout=held, adapter_dir=tmp_path / "adapter")
    assert res.heldout_loss_after < res.heldout_loss_before - 0.03 and res.best_step > 0
    assert res.targets == ["model.layers.1.nbl_affine", "model.layers.2.nbl_affine"]
    assert [h["step"] for h in res.history] == [0, 3, 6, 9, 12]
    # merged into W: same structure and keys, W changed, b untouched (bias="none"), nothing of peft left behind
    assert type(model.model.layers[1].nbl_affine) is AffineResidual and not hasattr(model, "peft_config")
    assert set(model.state_dict()) == set(lin.state_dict())
    after = _maps(model)
    assert not torch.equal(after["model.layers.1.nbl_affine.weight"], before["model.layers.1.nbl_affine.weight"])
    assert torch.equal(after["model.layers.1.nbl_affine.bias"], before["model.layers.1.nbl_affine.bias"])
    assert not any(p.requires_grad for p in model.model.layers[1].nbl_affine.parameters())
    # the saved adapter, loaded by peft on the unmerged model, gives the merged model's logits
    unmerged = peft.PeftModel.from_pretrained(copy.deepcopy(lin), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(unmerged(held).logits, model(held).logits, rtol=1e-5, atol=1e-5)
    # the held-out loss it reports is the merged model's
    with torch.no_grad():
        logits = model(held).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), held[:, 1:].flatten())
    assert nll.item() == pytest.approx(res.heldout_loss_after, rel=1e-5)


@pytest.mark.parametrize("loss", ["kl", "hidden"])
def test_distill_trains_only_the_maps_and_lowers_heldout_loss(models, loss):
    original, lin, train, held = models
    model = copy.deepcopy(lin)
    others = {k: v.clone() for k, v in model.state_dict().items() if "nbl_affine" not in k}
    res = heal(model, train, _fast(method="distill", distill_loss=loss), heldout=held, teacher=original)
    assert res.heldout_loss_after < 0.75 * res.heldout_loss_before
    assert res.trainable_parameters == len(LAYERS) * (32 * 32 + 32)
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in others.items())  # only W, b moved
    key = "model.layers.2.nbl_affine.weight"
    assert not torch.equal(now[key], lin.state_dict()[key])
    # distillation brings the outputs nearer to the original's
    with torch.no_grad():
        ref = original(held).logits
        assert (model(held).logits - ref).norm() < (lin(held).logits - ref).norm()


def test_the_teacher_is_the_original_model_and_the_replayed_prefix_changes_nothing(models):
    original, lin, _, held = models
    model = copy.deepcopy(lin)
    adapter = nbl_ext.get_adapter(model)
    obj = heal_mod._Distill(model, adapter, LAYERS, OriginalBranches(original, LAYERS), "kl")
    with torch.no_grad():
        t_logits, seen = obj._run(held, obj.teacher_layers, obj.teacher_layers)
        torch.testing.assert_close(t_logits, original(held).logits, rtol=0, atol=0)
        layers = adapter.layers()
        replay = {0: heal_mod._Replay(layers[0], seen[-1])}
        s_logits, _ = obj._run(held, replay, {})
        torch.testing.assert_close(s_logits, model(held).logits, rtol=1e-6, atol=1e-6)
    assert all(type(layer).__name__.startswith("NBL") for i, layer in enumerate(layers) if i in LAYERS)  # swapped back


@pytest.mark.parametrize("family", ["gemma3_text", "qwen2"])
def test_teacher_and_replay_are_exact_in_other_families(family):
    """Gemma 3 (sandwich norms, sliding + full layers, tied embeddings) and Qwen2 (mixed sliding layers)."""
    from nbl_ext.adapters import get_adapter
    from nbl_ext.linearize import apply_structure

    original = tiny_model(family, 4, seed=0)
    model = copy.deepcopy(original)
    adapter = get_adapter(model)
    d, gen = adapter.hidden_size, torch.Generator().manual_seed(0)
    apply_structure(
        model,
        adapter,
        "affine",
        [2, 3],
        {i: (0.1 * torch.randn(d, d, generator=gen), torch.zeros(d)) for i in (2, 3)},
        None,
    )
    ids = token_data(2, 12, seed=4)
    obj = heal_mod._Distill(model, adapter, [2, 3], OriginalBranches(original, [2, 3]), "kl")
    with torch.no_grad():
        t_logits, seen = obj._run(ids, obj.teacher_layers, obj.teacher_layers)
        torch.testing.assert_close(t_logits, original(ids).logits, rtol=0, atol=0)
        replay = {j: heal_mod._Replay(adapter.layers()[j], seen[-1] if j == 1 else None) for j in range(2)}
        s_logits, _ = obj._run(ids, replay, {})
        torch.testing.assert_close(s_logits, model(ids).logits, rtol=1e-6, atol=1e-6)


def test_bfloat16_model_trains_through_float32_masters(models):
    original, lin, train, held = models
    model, teacher = copy.deepcopy(lin).to(torch.bfloat16), copy.deepcopy(original).to(torch.bfloat16)
    res = heal(model, train, _fast(method="distill", steps=6), heldout=held, teacher=teacher)
    assert res.heldout_loss_after < res.heldout_loss_before
    w = model.model.layers[1].nbl_affine.weight
    assert w.dtype == torch.bfloat16 and not w.requires_grad


def test_healed_checkpoint_reloads_generates_and_compiles_exactly(models, tmp_path):
    _, lin, train, held = models
    model = copy.deepcopy(lin)
    heal(model, train, _fast(steps=6), heldout=held)
    nbl_ext.save_pretrained(model, tmp_path / "healed")
    loaded = nbl_ext.load_pretrained(tmp_path / "healed")
    with torch.no_grad():
        assert torch.equal(loaded(held).logits, model(held).logits)
    prompt = held[:1, :6]
    seq, _ = greedy_recompute(loaded, prompt, 5)
    gen_seq, _, _ = greedy_generate(loaded, prompt, 5)
    assert torch.equal(seq, gen_seq)
    compiled = torch.compile(loaded, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(held, use_cache=False).logits, loaded(held).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "method,scaling,lr", [("lora", "none", 3e-3), ("distill", "none", 3e-3), ("distill", "rms", 3e-2)]
)
def test_resume_after_interruption_gives_the_uninterrupted_weights(models, tmp_path, monkeypatch, method, scaling, lr):
    original, lin, train, held = models
    kw = {"teacher": original} if method == "distill" else {}
    cfg = dict(method=method, input_scaling=scaling, steps=6, eval_every=2, save_every=2, lr=lr)
    ref = copy.deepcopy(lin)
    ref_res = heal(ref, train, _fast(**cfg), heldout=held, **kw)

    model = copy.deepcopy(lin)
    real = trainer_mod.Trainer.train_step

    def dies_at_step_5(self, step):
        if step == 5:
            raise KeyboardInterrupt
        return real(self, step)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        heal(model, train, _fast(state_dir=str(tmp_path / "state"), **cfg), heldout=held, **kw)
    assert all(torch.equal(v, lin.state_dict()[k]) for k, v in model.state_dict().items())  # left as it was
    assert (tmp_path / "state" / "heal_state" / "state.safetensors").is_file()
    monkeypatch.setattr(trainer_mod.Trainer, "train_step", real)
    saved = json.loads((tmp_path / "state" / "heal_state" / "state.json").read_text())["seconds"]
    assert saved > 0
    t = time.perf_counter()
    res = heal(model, train, _fast(state_dir=str(tmp_path / "state"), **cfg), heldout=held, **kw)
    elapsed = time.perf_counter() - t
    assert res.resumed_from == 4 and res.steps == 6
    assert elapsed < res.seconds <= saved + elapsed  # the interrupted run's time up to its last save counts
    assert res.history == ref_res.history
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_resume_refuses_a_state_of_another_run(models, tmp_path):
    _, lin, train, held = models
    heal(copy.deepcopy(lin), train, _fast(steps=2, state_dir=str(tmp_path)), heldout=held)
    with pytest.raises(ValueError, match="belongs to another run .*config"):
        heal(copy.deepcopy(lin), train, _fast(steps=2, lr=5e-3, state_dir=str(tmp_path)), heldout=held)
    with pytest.raises(ValueError, match="belongs to another run .*config"):  # rms is not the plain run
        heal(copy.deepcopy(lin), train, _fast(steps=2, input_scaling="rms", state_dir=str(tmp_path)), heldout=held)


def test_a_state_written_before_a_config_field_existed_resumes_at_that_fields_neutral_value(models, tmp_path):
    """States written before input_scaling existed lack it in their fingerprint; they behaved as 'none'."""
    _, lin, train, held = models
    assert "input_scaling" not in _fast().training_fields()
    assert _fast(input_scaling="rms").training_fields()["input_scaling"] == "rms"
    ref = copy.deepcopy(lin)
    heal(ref, train, _fast(steps=2, state_dir=str(tmp_path)), heldout=held)
    model = copy.deepcopy(lin)
    res = heal(model, train, _fast(steps=2, state_dir=str(tmp_path)), heldout=held)
    assert res.resumed_from == 2  # finished state: nothing trained again, the best weights restored
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_an_rms_around_state_written_before_rms_meant_maps_only_is_refused(models, tmp_path):
    """Until 74c795c input_scaling='rms' scaled every LoRA target; such a state has the same fields, other meaning."""
    _, lin, train, held = models
    assert "rms_scope" not in _fast(input_scaling="rms", lora_targets="maps").training_fields()  # meaning unchanged
    assert "rms_scope" not in _fast(lora_targets="around").training_fields()
    cfg = dict(steps=2, lora_targets="around", input_scaling="rms", state_dir=str(tmp_path))
    heal(copy.deepcopy(lin), train, _fast(**cfg), heldout=held)
    path = tmp_path / "heal_state" / "state.json"
    meta = json.loads(path.read_text())
    assert meta["run"]["config"].pop("rms_scope") == "maps"
    path.write_text(json.dumps(meta))  # what the older code wrote
    with pytest.raises(ValueError, match=r"belongs to another run .*config\.rms_scope"):
        heal(copy.deepcopy(lin), train, _fast(**cfg), heldout=held)


def test_drop_model_gets_lora_around_the_dropped_blocks_and_is_never_made_worse(models):
    original, _, train, held = models
    model = copy.deepcopy(original)
    res0 = nbl_ext.calibrate(model, train[:4], progress=False)
    nbl_ext.linearize(model, res0, [2], method="drop")
    unhealed = copy.deepcopy(model)
    # dropping layer 2 of this random model costs nothing on held-out text, so LoRA can only overfit:
    # early stopping (patience 2) ends the run and the unhealed weights are kept; min_steps=0: as soon as the
    # patience runs out (step 6 of evaluations every 3)
    res = heal(model, train, _fast(steps=12, patience=2, min_steps=0), heldout=held, progress=True)
    assert res.targets == [
        "model.layers.1.self_attn.o_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.2.mlp.down_proj",
        "model.layers.3.self_attn.o_proj",
        "model.layers.3.mlp.down_proj",
    ]
    assert res.stopped_early and res.steps == 6 and res.best_step == 0
    assert res.heldout_loss_after == res.heldout_loss_before
    assert all(torch.equal(v, unhealed.state_dict()[k]) for k, v in model.state_dict().items())
    # the default min_steps is one epoch (32 sequences in batches of 4: 8 steps): not stopped at 6, at 9
    again = copy.deepcopy(unhealed)
    res = heal(again, train, _fast(steps=12, patience=2), heldout=held)
    assert res.stopped_early and res.steps == 9 and res.best_step == 0
    assert all(torch.equal(v, unhealed.state_dict()[k]) for k, v in again.state_dict().items())
    with pytest.raises(ValueError, match="dropped .*use method='lora'"):
        heal(model, train, _fast(method="distill"), heldout=held, teacher=original)
    with pytest.raises(ValueError, match="no maps"):
        heal(model, train, _fast(lora_targets="maps"), heldout=held)


def test_errors_are_clear(models):
    original, lin, train, held = models
    with pytest.raises(ValueError, match="no replaced blocks"):
        heal(copy.deepcopy(original), train, _fast(), heldout=held)
    with pytest.raises(ValueError, match="no held-out tokens"):
        heal(copy.deepcopy(lin), train[:3], _fast())  # 10% of 3 sequences is none
    with pytest.raises(ValueError, match="no held-out tokens"):
        heal(copy.deepcopy(lin), train, _fast(heldout_fraction=0.0))
    with pytest.raises(ValueError, match="zero training steps"):
        heal(copy.deepcopy(lin), train, HealConfig(epochs=0.01, batch_size=64), heldout=held)
    with pytest.raises(ValueError, match="HealConfig: steps must be a positive int, got 0"):
        HealConfig(steps=0)
    with pytest.raises(ValueError, match="HealConfig: min_steps must be"):
        HealConfig(min_steps=-1)
    with pytest.raises(ValueError, match="HealConfig: method must be one of 'lora', 'distill'"):
        HealConfig(method="qlora")
    with pytest.raises(ValueError, match="needs the original model"):
        heal(copy.deepcopy(lin), train, _fast(method="distill"), heldout=held)
    other = tiny_model("llama", 4, seed=9)
    with pytest.raises(ValueError, match="teacher differs from the linearized model"):
        heal(copy.deepcopy(lin), train, _fast(method="distill"), heldout=held, teacher=other)
    with pytest.raises(ValueError, match="token ids must lie in"):
        heal(copy.deepcopy(lin), train + 10_000, _fast(), heldout=held)
    model = copy.deepcopy(lin)
    with pytest.raises(ValueError, match="teacher= is for method='distill'"):
        heal(model, train, _fast(), heldout=held, teacher=original)
    assert json.dumps(_fast().training_fields())  # JSON-able (stored with the resume state)


# --- input_scaling="rms" ---------------------------------------------------------------------


def test_rms_input_scaling_makes_adamw_blind_to_the_scale_of_each_input_channel(gen):
    """The mechanism: W = V diag(1/s) with s the inputs' per-channel RMS. Two problems that differ only by a
    per-channel rescaling of the inputs (c, up to 1000x: massive activations) and the matching W' = W diag(1/c)
    follow the same function at every AdamW step; without the scaling they do not."""
    x = torch.randn(64, 6, generator=gen)
    c = torch.tensor([1000.0, 1.0, 0.01, 3.0, 1.0, 50.0])
    w0, b0 = torch.randn(4, 6, generator=gen), torch.randn(4, generator=gen)
    target = x @ torch.randn(6, 4, generator=gen)

    def run(scale_inputs: bool, channel_scale: torch.Tensor) -> list[torch.Tensor]:
        xs = x * channel_scale
        lin = torch.nn.Linear(6, 4)
        with torch.no_grad():
            lin.weight.copy_(w0 / channel_scale)
            lin.bias.copy_(b0)
        if scale_inputs:
            heal_mod._scale_inputs(lin, xs.pow(2).mean(0).sqrt(), keep_function=True)
        opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
        outs = []
        for _ in range(5):
            loss = (lin(xs) - target).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            outs.append(lin(xs).detach())
        heal_mod._unscale_inputs([lin])
        assert type(lin) is torch.nn.Linear and set(lin.state_dict()) == {"weight", "bias"}
        return outs

    plain, scaled = run(True, torch.ones(6)), run(True, c)
    for a, b in zip(plain, scaled):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    unscaled = run(False, c)
    assert (unscaled[-1] - plain[-1]).abs().max() > 1e-2


def test_input_rms_is_the_rms_of_each_module_input(models):
    _, lin, train, _ = models
    model = copy.deepcopy(lin)
    maps = [model.model.layers[i].nbl_affine for i in LAYERS]
    seen = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, a, i=i: seen.setdefault(i, []).append(a[0])) for i, m in enumerate(maps)
    ]
    with torch.no_grad():
        model(input_ids=train[:6])
    for h in hooks:
        h.remove()
    rms = heal_mod._input_rms(model, maps, train[:6], micro=4)  # two forwards, 4 + 2 sequences
    for i in range(len(maps)):
        x = seen[i][0].double().reshape(-1, 32)
        torch.testing.assert_close(rms[i].double(), x.pow(2).mean(0).sqrt(), rtol=1e-6, atol=0)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_rms_scaled_lora_still_merges_into_w_and_saves_a_plain_peft_adapter(models, tmp_path):
    _, lin, train, held = models
    model = copy.deepcopy(lin)
    res = heal(model, train, _fast(input_scaling="rms", lr=0.1), heldout=held, adapter_dir=tmp_path / "a")
    assert res.heldout_loss_after < res.heldout_loss_before - 0.02 and res.best_step > 0
    assert set(model.state_dict()) == set(lin.state_dict())  # no parametrization left behind
    assert type(model.model.layers[1].nbl_affine) is AffineResidual
    saved = safetensors.torch.load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert saved and not any("parametrizations" in k for k in saved)
    unmerged = peft.PeftModel.from_pretrained(copy.deepcopy(lin), str(tmp_path / "a")).eval()
    with torch.no_grad():
        torch.testing.assert_close(unmerged(held).logits, model(held).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # transformers, inside peft
def test_nbl_lora_around_trains_the_maps_and_the_modules_near_them_and_merges_all(models, tmp_path):
    _, lin, train, held = models
    model = copy.deepcopy(lin)
    cfg = _fast(lora_targets="around", input_scaling="rms")
    res = heal(model, train, cfg, heldout=held, adapter_dir=tmp_path / "a")
    assert res.heldout_loss_after < res.heldout_loss_before - 0.02 and res.best_step > 0
    # the maps, then o_proj / down_proj of the layers within 1 of a replaced block (a replaced layer has no o_proj)
    assert res.targets == [
        "model.layers.1.nbl_affine",
        "model.layers.2.nbl_affine",
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.2.mlp.down_proj",
        "model.layers.3.self_attn.o_proj",
        "model.layers.3.mlp.down_proj",
    ]
    now, before = model.state_dict(), lin.state_dict()
    assert set(now) == set(before)  # merged: the plain structure, nothing of peft or the parametrization left
    moved = {k for k in now if not torch.equal(now[k], before[k])}
    assert moved == {f"{t}.weight" for t in res.targets}  # every target merged into its weight, nothing else
    unmerged = peft.PeftModel.from_pretrained(copy.deepcopy(lin), str(tmp_path / "a")).eval()
    with torch.no_grad():
        torch.testing.assert_close(unmerged(held).logits, model(held).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # transformers, inside peft
def test_around_scales_only_the_maps_inputs_and_trains_the_modules_around_at_their_own_rate(models, monkeypatch):
    """input_scaling='rms' reparametrizes the maps' LoRA A only (the modules around read heavy-tailed inputs);
    lora_around_lr sets the rate of the LoRA on the modules around: at ~0 they stay put while the maps move."""
    _, lin, train, held = models
    scaled = []
    real = heal_mod._scale_inputs
    monkeypatch.setattr(
        heal_mod, "_scale_inputs", lambda m, s, keep_function: scaled.append(m) or real(m, s, keep_function)
    )
    model = copy.deepcopy(lin)
    res = heal(model, train, _fast(lora_targets="around", input_scaling="rms", lora_around_lr=1e-12), heldout=held)
    assert len(scaled) == 2 and all(m.in_features == lin.config.hidden_size for m in scaled)  # the two maps' A
    assert res.heldout_loss_after < res.heldout_loss_before - 0.02
    now, before = model.state_dict(), lin.state_dict()
    for t in res.targets:
        delta = (now[f"{t}.weight"] - before[f"{t}.weight"]).abs().max().item()
        if t.endswith("nbl_affine"):
            assert delta > 1e-3, t
        else:
            assert delta < 1e-8, (t, delta)  # B moved by ~1e-12 per step from 0
    # at the maps' rate (the default) the modules around do move
    model = copy.deepcopy(lin)
    res = heal(model, train, _fast(lora_targets="around", input_scaling="rms", steps=3), heldout=held)
    assert (
        model.state_dict()["model.layers.0.self_attn.o_proj.weight"] - before["model.layers.0.self_attn.o_proj.weight"]
    ).abs().max() > 1e-4
    with pytest.raises(ValueError, match="lora_around_lr is set but LoRA has no targets around the blocks"):
        heal(copy.deepcopy(lin), train, _fast(lora_targets="maps", lora_around_lr=1e-4), heldout=held)
    with pytest.raises(ValueError, match="lora_around_lr must be a positive number or None"):
        HealConfig(lora_around_lr=0.0)
    with pytest.raises(ValueError, match="lora_around_lr is LoRA's rate on the modules around"):
        HealConfig(method="distill", lora_around_lr=1e-4)


def test_rms_scaled_distill_lowers_the_loss_and_keeps_w_when_it_cannot_help(models):
    """(Resuming an rms-scaled run exactly: test_resume_after_interruption_gives_the_uninterrupted_weights.)"""
    original, lin, train, held = models
    cfg = dict(method="distill", input_scaling="rms", steps=6, eval_every=2, save_every=2, lr=3e-2)
    ref = copy.deepcopy(lin)
    ref_res = heal(ref, train, _fast(**cfg), heldout=held, teacher=original)
    assert ref_res.heldout_loss_after < 0.9 * ref_res.heldout_loss_before
    assert list(ref.state_dict()) == list(lin.state_dict())  # same keys, same order: nothing of the scaling left
    # a learning rate that only makes it worse: best step 0, and W is bit for bit the unhealed one (not V / s)
    worse = copy.deepcopy(lin)
    res = heal(worse, train, _fast(**{**cfg, "lr": 50.0}), heldout=held, teacher=original)
    assert res.best_step == 0
    assert all(torch.equal(v, lin.state_dict()[k]) for k, v in worse.state_dict().items())
    with pytest.raises(ValueError, match="input_scaling must be one of 'none', 'rms'"):
        HealConfig(input_scaling="std")
