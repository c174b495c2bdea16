"""nbl_ext.benchmark and `nbl bench`: timing protocol, exact tokens, KV accounting, floors, synthetic maps, CLI.

Everything runs on the 2-layer tiny Llama of _tiny.py (a few ms per step), so
the numbers are meaningless; the tests check that they are well formed, and
the parts that must be exact (tokens, KV bytes, byte counts) exactly.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from _tiny import tiny_llama
from nbl_ext import benchmark, cli
from nbl_ext.benchmark import (
    Shape,
    decode_cost,
    floors,
    synthetic_linearize,
    synthetic_maps,
    time_generation,
)

VOCAB = 20
BATCH, PROMPT, NEW = 2, 8, 6
# tiny_llama: hidden 32, 2 layers, 4 heads, 2 KV heads -> head_dim 8, float32
KV_BYTES_PER_POSITION = 2 * BATCH * 2 * 8 * 4  # keys + values, per layer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices gain nothing from threads, and on a busy machine OpenMP's spinning
    threads made each tiny step ~100x slower (16 ms per linear instead of 0.1 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(seed: int = 3):
    return tiny_llama(VOCAB, seed=seed)


def _prompt():
    return torch.randint(4, VOCAB, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))


def _plain_generate(model, prompt):
    return model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=NEW,
        min_new_tokens=NEW,
        do_sample=False,
        pad_token_id=3,
    )


def _time(model, mode, **kw):
    kw = {"batch": BATCH, "prompt_len": PROMPT, "new_tokens": NEW, "warmup": 1, "repeats": 2, "compile": False, **kw}
    return time_generation(model, mode=mode, **kw)


# --- time_generation ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_time_generation_numbers_are_sane(mode):
    r = _time(_model(), mode)
    for key in (
        "prefill_s",
        "ttft_s",
        "decode_step_s",
        "decode_step_min_s",
        "decode_step_max_s",
        "e2e_s",
        "decode_tokens_per_s",
        "e2e_tokens_per_s",
    ):
        assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (key, r[key])
    assert r["decode_steps"] == 2 * (NEW - 1)  # repeats x steps after the first token
    assert r["decode_step_min_s"] <= r["decode_step_s"] <= r["decode_step_max_s"]
    assert r["decode_tokens_per_s"] == pytest.approx(BATCH / r["decode_step_s"])
    assert r["e2e_tokens_per_s"] == pytest.approx(BATCH * NEW / r["e2e_s"])
    assert r["e2e_s"] > r["decode_step_min_s"] * (NEW - 1)
    assert r["timer"] == "perf_counter" and r["mode"] == mode
    assert r["weights_bytes"] == sum(t.numel() * 4 for t in (*_model().parameters(), *_model().buffers()))
    # CPU peak memory: the RSS growth where Linux lets us reset the high-water mark, else None with the reason
    assert (isinstance(r["peak_memory_bytes"], int) and r["peak_memory_bytes"] >= 0) or (
        r["peak_memory_bytes"] is None and "unavailable" in r["peak_memory_method"]
    )
    assert r["peak_memory_method"]
    json.dumps(r)  # JSON-able as returned


@pytest.mark.parametrize("layers", [[], [0], [1]], ids=["original", "nbl-first", "nbl-last"])
def test_tokens_equal_plain_greedy_generate(layers):
    """Both modes (static also compiled: dynamo capture, fullgraph) give generate's greedy tokens."""
    model = _model()
    if layers:
        synthetic_linearize(model, layers, "nbl")
    prompt = _prompt()
    expected = _plain_generate(model, prompt)
    assert expected.shape == (BATCH, PROMPT + NEW)
    for mode, compile in (("eager", False), ("static", False), ("static", "eager")):
        r = _time(model, mode, compile=compile, prompt=prompt, return_tokens=True, warmup=1, repeats=1)
        assert torch.equal(r["tokens"], expected), (mode, compile)


def test_prefill_in_chunks_gives_the_same_tokens():
    model = _model()
    prompt = _prompt()
    expected = _plain_generate(model, prompt)
    for mode in ("eager", "static"):
        r = _time(model, mode, prompt=prompt, prefill_chunk=3, return_tokens=True, warmup=0, repeats=1)
        assert torch.equal(r["tokens"], expected), mode


@pytest.mark.parametrize("method", ["nbl", "drop"])
@pytest.mark.parametrize("mode", ["eager", "static"])
def test_kv_cache_bytes_drop_by_the_linearized_share(mode, method):
    # eager (dynamic cache) holds prompt + new - 1 positions at the end; static allocates prompt + new
    positions = PROMPT + NEW - (1 if mode == "eager" else 0)
    original = _time(_model(), mode, warmup=0, repeats=1)["kv_cache_bytes"]
    assert original == 2 * KV_BYTES_PER_POSITION * positions
    model = synthetic_linearize(_model(), [1], method)
    assert _time(model, mode, warmup=0, repeats=1)["kv_cache_bytes"] == original // 2
    model = synthetic_linearize(_model(), [0, 1], method)  # no attention left: nothing cached
    assert _time(model, mode, warmup=0, repeats=1)["kv_cache_bytes"] == 0


def test_time_generation_rejects_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match="mode must be one of"):
        time_generation(model, mode="fast")
    with pytest.raises(ValueError, match="new_tokens must be an int >= 2"):
        time_generation(model, new_tokens=1)
    with pytest.raises(ValueError, match="prompt has shape"):
        time_generation(model, batch=1, prompt_len=4, prompt=torch.zeros(2, 4, dtype=torch.long))


# --- synthetic_linearize ---------------------------------------------------------------------------


def test_synthetic_linearize_layer_is_the_affine_map():
    model = _model()
    synthetic_linearize(model, [1], "nbl", seed=7)
    w, b = synthetic_maps(32, [1], seed=7)[1]
    layer = model.model.layers[1]
    assert not hasattr(layer, "self_attn") and not hasattr(layer, "input_layernorm")
    assert model.config.nbl["layers"] == [1] and model.config.nbl["method"] == "nbl"
    h = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = layer(h)
        mid = h + h @ w.T + b
        expected = mid + layer.mlp(layer.post_attention_layernorm(mid))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert float(w.norm()) > 0 and torch.linalg.matrix_norm(w, 2) < 0.05  # small: spectral norm ~ 2 x 0.01


def test_synthetic_drop_and_errors():
    model = synthetic_linearize(_model(), [0], "drop")
    layer = model.model.layers[0]
    h = torch.randn(1, 3, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(h), h + layer.mlp(layer.post_attention_layernorm(h)))
    with pytest.raises(ValueError, match="already linearized"):
        synthetic_linearize(model, [1], "nbl")
    with pytest.raises(ValueError, match="out of range"):
        synthetic_linearize(_model(), [2], "nbl")
    with pytest.raises(ValueError, match="method must be one of"):
        synthetic_linearize(_model(), [0], "prune")


# --- random_model ----------------------------------------------------------------------------------


def test_random_model_shapes_on_meta_match_decode_cost():
    """Full-size shapes built on the meta device (no memory): the parameter counts of the real models,
    and decode_cost reads every parameter once (the embedding only for the new tokens' rows)."""
    expected_params = {"llama-3.1-8b": 8_030_261_248, "mistral-7b": 7_248_023_552, "smollm2-135m": 134_515_008}
    for name, count in expected_params.items():
        model = benchmark.random_model(name, device="meta", dtype="bfloat16")
        params = sum(p.numel() for p in model.parameters())
        assert params == count, name
        sh = Shape.of(model)
        assert sh == Shape.of(name)
        embed = 0 if model.config.tie_word_embeddings else sh.vocab * sh.hidden  # tied: lm_head is the embedding
        assert decode_cost(sh, batch=3, context=0)["weight_bytes"] == 2 * (params - embed + 3 * sh.hidden), name
        del model
    llama = Shape.of("llama-3.1-8b")
    assert (llama.hidden, llama.layers, llama.heads, llama.kv_heads, llama.intermediate, llama.vocab) == (
        4096,
        32,
        32,
        8,
        14336,
        128256,
    )


def test_random_model_small_on_cpu():
    model = benchmark.random_model("smollm2-135m", num_layers=1, dtype="bfloat16", device="cpu", seed=1)
    assert model.config.num_hidden_layers == 1 and len(model.model.layers) == 1
    q = model.model.layers[0].self_attn.q_proj.weight
    assert q.dtype == torch.bfloat16 and q.device.type == "cpu"
    assert 0.015 < float(q.detach().float().std()) < 0.025  # transformers' N(0, 0.02^2) init
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert model.config.nbl_source["shape"] == "smollm2-135m"
    with pytest.raises(ValueError, match="unknown shape"):
        benchmark.random_model("gpt-5")


# --- floors -------------------------------------------------------------------------------------------

TOY = Shape(hidden=8, layers=2, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=10)


def test_decode_cost_and_floors_by_hand():
    # d = 8, q = 8, kv = 4: attention matmuls A = 8*8 + 2*8*4 + 8*8 = 192 (+ 8 norm), MLP 3*8*16 = 384 (+ 8),
    # head 10*8 + 8, embedding rows 2*8; float32 (4 bytes); batch 2, context 5.
    c0 = decode_cost(TOY, batch=2, context=5, dtype=torch.float32)
    # weights 2*392 + 2*200 + 88 + 16 = 1288 values; KV 2 layers * 2 (k, v) * 2 batch * 4 * 5 = 160 values
    assert c0 == {
        "weight_bytes": 5152,
        "kv_bytes": 640,
        "bytes": 5792,
        # 2*2*(2*384 + 2*192 + 80) matmuls + 2 layers * 4*2*8*5 attention
        "flops": 4928 + 640,
    }
    # NBL-1: one attention branch (200 values) -> W, b (64 + 8); half the KV
    c1 = decode_cost(TOY, k=1, method="nbl", batch=2, context=5, dtype=torch.float32)
    assert c1 == {"weight_bytes": 4640, "kv_bytes": 320, "bytes": 4960, "flops": 4160 + 256 + 320}
    # DROP-1: the branch is gone
    d1 = decode_cost(TOY, k=1, method="drop", batch=2, context=5, dtype=torch.float32)
    assert d1 == {"weight_bytes": 4352, "kv_bytes": 320, "bytes": 4672, "flops": 4160 + 320}

    f = floors(TOY, k=1, method="nbl", batch=2, context=5, dtype="float32", bandwidth=100.0, peak_flops=1000.0)
    assert f["original"]["memory_s"] == pytest.approx(57.92)
    assert f["original"]["compute_s"] == pytest.approx(5.568)
    assert f["original"]["floor_s"] == pytest.approx(57.92) and f["original"]["bound"] == "memory"
    assert f["linearized"]["floor_s"] == pytest.approx(49.60)
    assert f["ideal_speedup"] == pytest.approx(5792 / 4960)
    assert f["floor_speedup"] == pytest.approx(5792 / 4960)
    # the docstring's closed form: (W + K) / (W - k s (A - R) + K (n - k) / n)
    assert f["ideal_speedup"] == pytest.approx((5152 + 640) / (5152 - 4 * (200 - 72) + 640 / 2))
    # compute-bound when the peak rate is low; no ceilings -> no seconds
    slow = floors(TOY, batch=2, context=5, dtype="float32", bandwidth=1e6, peak_flops=1.0)
    assert slow["original"]["bound"] == "compute" and slow["ideal_speedup"] == 1.0
    bare = floors(TOY, k=2, method="drop", context=5, dtype="float32")
    assert bare["linearized"]["floor_s"] is None and bare["floor_speedup"] is None
    assert bare["linearized"]["kv_bytes"] == 0
    with pytest.raises(ValueError, match="k must be an int in"):
        decode_cost(TOY, k=3)


# --- compare ---------------------------------------------------------------------------------------


def test_compare_runs_every_variant_with_ratios():
    result = benchmark.compare(
        _model,
        [("nbl", 1), ("drop", 1)],
        modes=("eager", "static"),
        batch=BATCH,
        prompt_len=PROMPT,
        new_tokens=NEW,
        warmup=0,
        repeats=1,
        compile=False,
        ceilings={"bandwidth_bytes_per_s": 1e10, "matmul_flops_per_s": 1e11},
    )
    runs = result["runs"]
    assert [(r["variant"], r["mode"]) for r in runs] == [
        (v, m) for v in ("original", "nbl-k1", "drop-k1") for m in ("eager", "static")
    ]
    assert result["num_layers"] == 2 and result["shape"]["hidden"] == 32
    for r in runs:
        v = r["vs_original"]
        if r["variant"] == "original":
            assert v["decode_speedup"] == 1.0 and v["kv_cache_ratio"] == 1.0 and r["ideal_decode_speedup"] == 1.0
            assert r["layers"] == []
        else:
            assert r["layers"] == [1]  # the last k layers
            assert v["kv_cache_ratio"] == 0.5 and r["ideal_decode_speedup"] > 1.0 and v["weights_ratio"] < 1.0
        assert r["floor"]["floor_s"] > 0 and r["achieved_bandwidth_bytes_per_s"] > 0
    json.dumps(result)
    with pytest.raises(ValueError, match="k=3 is larger than the model's 2 decoder layers"):
        benchmark.compare(_model, [("nbl", 3)], warmup=0, repeats=1)


def test_compare_interleaved_rounds():
    """interleave=True: every variant built first, timed round by round; same report shape, medians of rounds."""
    calls = []
    real = benchmark.time_generation

    def spy(model, **kw):
        calls.append((id(model), kw["repeats"], kw["warmup"]))
        return real(model, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(benchmark.comparison, "time_generation", spy)
        result = benchmark.compare(
            _model,
            [("nbl", 1), ("drop", 1)],
            batch=BATCH,
            prompt_len=PROMPT,
            new_tokens=NEW,
            warmup=1,
            repeats=3,
            interleave=True,
        )
    models = [c[0] for c in calls]
    assert len(calls) == 9 and len(set(models)) == 3
    assert models[:3] == models[3:6] == models[6:]  # round-robin: o, nbl, drop, o, nbl, drop, ...
    assert [c[2] for c in calls] == [1, 1, 1, 0, 0, 0, 0, 0, 0] and all(c[1] == 1 for c in calls)
    runs = result["runs"]
    assert [r["variant"] for r in runs] == ["original", "nbl-k1", "drop-k1"] and result["settings"]["interleave"]
    for r in runs:
        assert r["interleaved_rounds"] == 3 and r["decode_steps"] == 3 * (NEW - 1)
        assert r["decode_step_min_s"] <= r["decode_step_s"] <= r["decode_step_max_s"]
        assert r["e2e_tokens_per_s"] == pytest.approx(BATCH * NEW / r["e2e_s"])
        assert r["vs_original"]["decode_speedup"] > 0
    with pytest.raises(ValueError, match="interleave=True times eager mode only"):
        benchmark.compare(_model, [("nbl", 1)], modes=("eager", "static"), interleave=True)


# --- nbl bench ---------------------------------------------------------------------------------------

QUICK = ["--prompt-len", "8", "--new-tokens", "4", "--warmup", "0", "--repeats", "1", "--no-ceilings"]


def test_bench_cli_writes_json(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "sub" / "bench.json"
    rc = cli.main(
        [
            "bench",
            str(tiny_model_dir),
            "--k",
            "1",
            "--mode",
            "eager,static",
            "--no-compile",
            "--device",
            "cpu",
            *QUICK,
            "--output",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "x decode" in printed and "nbl-k1" in printed and "drop-k1" in printed
    report = json.loads(out.read_text())
    assert report["nbl_bench"] == 1 and report["model"]["weights"] == "real"
    assert report["device"]["type"] == "cpu" and report["versions"]["torch"] == torch.__version__
    assert "commit" in report["git"] and report["versions"]["transformers"]
    assert report["args"]["k"] == [1] and report["settings"]["new_tokens"] == 4
    assert {(r["variant"], r["mode"]) for r in report["runs"]} == {
        (v, m) for v in ("original", "nbl-k1", "drop-k1") for m in ("eager", "static")
    }
    assert all(r["decode_step_s"] > 0 and "vs_original" in r for r in report["runs"])


def test_bench_cli_interleave(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "bench.json"
    quick = [a if a != "1" else "2" for a in QUICK]  # two rounds
    rc = cli.main(
        [
            "bench",
            str(tiny_model_dir),
            "--k",
            "1",
            "--mode",
            "eager",
            "--device",
            "cpu",
            *quick,
            "--interleave",
            "--output",
            str(out),
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["settings"]["interleave"] is True
    assert all(r["interleaved_rounds"] == 2 for r in report["runs"])
    rc = cli.main(
        ["bench", str(tiny_model_dir), "--k", "1", "--mode", "static", "--device", "cpu", *QUICK, "--interleave"]
    )
    assert rc != 0 and "eager mode only" in capsys.readouterr().err


def test_bench_help_teaches(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for needle in ("--shape", "llama-3.1-8b", "--k", "--mode", "examples:", "eager", "static"):
        assert needle in text


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--k", "0"], "values must be > 0"),
        (["--k", "4,x"], "comma-separated positive integers"),
        (["--shape", "gpt-5"], "invalid choice: 'gpt-5'"),
        (["--mode", "fast"], "choose from eager,static"),
    ],
)
def test_bench_argument_errors_exit_2(capsys, argv, needle):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", *argv])
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["{dir}", "--k", "3"], "k=3 is larger than the model's 2 decoder layers"),
        (["--shape", "llama-3.1-8b", "--k", "8,40"], "--k 40: larger than the 32 layers of llama-3.1-8b"),
        (["--shape", "smollm2-135m", "--num-layers", "2", "--k", "3"], "larger than the 2 layers"),
        (["{dir}", "--shape", "mistral-7b"], "not both"),
        (["{dir}", "--num-layers", "2"], "--num-layers applies to --shape"),
        (["{dir}", "--new-tokens", "1"], "--new-tokens must be at least 2"),
    ],
)
def test_bench_user_errors_exit_2(capsys, tiny_model_dir, argv, needle):
    argv = [a.replace("{dir}", str(tiny_model_dir)) for a in argv]
    assert cli.main(["bench", "--device", "cpu", *QUICK, *argv]) == 2  # argv last: it wins
    err = capsys.readouterr().err
    assert "nbl bench: error:" in err and needle in err.split("nbl bench: error:", 1)[1], err


# --- calibration cost ----------------------------------------------------------------------------------

CAL_VOCAB = 64  # > hidden 32: layer 0's inputs (embeddings) span all directions, C_xx is well conditioned


def _cal_model():
    return tiny_llama(CAL_VOCAB, seed=3)


def test_store_all_gives_the_same_calibration_as_streaming():
    """The benchmark's baseline computes the same statistics the other way: same W, b and scores."""
    model = _cal_model()
    data = benchmark.calibration_tokens(CAL_VOCAB, 8, 32, seed=1)
    s = benchmark.time_calibration(model, data, method="streaming", batch_size=3, return_result=True)
    a = benchmark.time_calibration(model, data, method="store_all", batch_size=3, return_result=True)
    rs, ra = s.pop("result"), a.pop("result")
    assert rs.num_layers == ra.num_layers == 2
    for ls, la in zip(rs.layers, ra.layers):
        assert ls.tokens == la.tokens == 8 * 32
        # float32 Gram blocks of centered chunks (streaming) vs float64 torch.cov (store_all)
        assert torch.allclose(la.weight, ls.weight, rtol=0, atol=1e-5 * float(ls.weight.abs().max()))
        assert torch.allclose(la.bias, ls.bias, rtol=0, atol=1e-5 * max(1.0, float(ls.bias.abs().max())))
        assert la.bound == pytest.approx(ls.bound, rel=1e-5)
        assert la.nmse == pytest.approx(ls.nmse, rel=1e-4)
        assert la.cosine == pytest.approx(ls.cosine, abs=1e-12)  # the same streaming cosine code in both
    for r, method in ((s, "streaming"), (a, "store_all")):
        assert r["method"] == method and r["tokens"] == 256 and r["num_layers"] == 2 and r["batch_size"] == 3
        assert r["tokens_per_s"] == pytest.approx(256 / r["total_s"])
        for key in ("forward_s", "statistics_s", "fit_s"):
            assert 0 <= r[key] <= r["total_s"], (key, r[key], r["total_s"])
        assert r["forward_s"] + r["statistics_s"] + r["fit_s"] == pytest.approx(r["total_s"])
        assert r["statistics_s"] > 0 and r["fit_s"] > 0
        assert r["bounds"] == pytest.approx(rs.bounds if method == "streaming" else ra.bounds)
        assert (isinstance(r["peak_host_bytes"], int) and r["peak_host_bytes"] >= 0) or (
            r["peak_host_bytes"] is None and "unavailable" in r["peak_memory_method"]
        )
        assert r["peak_cuda_bytes"] is None and r["floor"]["floor_s"] is None and r["pct_of_floor"] is None
        json.dumps(r)
    # store_all held every layer's X and A for every token: 2 layers x 2 x 256 tokens x 32 x 4 bytes
    assert a["stored_activation_bytes"] == 2 * 2 * 256 * 32 * 4 == benchmark.store_all_bytes(model, 8, 32)
    assert s["stored_activation_bytes"] == 0
    assert (
        s["cost"]
        == a["cost"]
        == benchmark.calibration_cost(model, num_samples=8, seq_len=32, batch_size=3, dtype=torch.float32)
    )


def test_calibration_cost_and_floor_by_hand():
    # tiny_llama: d 32, 2 layers, 4 heads x 8, 2 KV heads, intermediate 64; 2 samples x 8 tokens, float32
    c = benchmark.calibration_cost(Shape.of(_cal_model()), num_samples=2, seq_len=8, batch_size=1, dtype=torch.float32)
    layer_mat = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64  # q, k, v, o, gate/up/down = 9216
    assert c["tokens"] == 16
    assert c["linear_flops"] == 2 * 16 * 2 * layer_mat
    assert c["attention_flops"] == 4 * 32 * 2 * 2 * (8 * 9 // 2)  # position t attends t + 1 keys
    assert c["forward_flops"] == c["linear_flops"] + c["attention_flops"]
    assert c["gram_flops"] == 2 * 2 * 16 * 3 * 32 * 32
    assert c["weight_bytes"] == 2 * 2 * 4 * (layer_mat + 64)  # 2 layers x 2 batches
    assert c["stored_activation_bytes"] == c["activation_bytes"] == 2 * 2 * 16 * 32 * 4
    assert c["bytes"] == c["weight_bytes"] + c["activation_bytes"]
    assert c["state_bytes"] == 8 * (3 * 32 * 32 + 64)
    assert (
        benchmark.calibration_cost(Shape.of(_cal_model()), num_samples=2, seq_len=8, batch_size=2, dtype=torch.float32)[
            "weight_bytes"
        ]
        == c["weight_bytes"] // 2
    )
    f = benchmark.calibration_floor(c, matmul_flops_per_s=1e6, gram_flops_per_s=2e6, bandwidth_bytes_per_s=1e3)
    assert f["forward_s"] == pytest.approx(c["forward_flops"] / 1e6)
    assert f["gram_s"] == pytest.approx(c["gram_flops"] / 2e6)
    assert f["compute_s"] == pytest.approx(f["forward_s"] + f["gram_s"])
    assert f["memory_s"] == pytest.approx(c["bytes"] / 1e3)
    assert f["floor_s"] == max(f["compute_s"], f["memory_s"]) and f["bound"] == "memory"
    assert benchmark.calibration_floor(c)["floor_s"] is None
    # the 8B shape at the paper's 256 x 2048 tokens: 2 x 6.98e9 FLOPs per token in the layers' matmuls
    big = benchmark.calibration_cost("llama-3.1-8b", num_samples=256, seq_len=2048)
    assert big["linear_flops"] == 2 * 256 * 2048 * 32 * 218_103_808
    assert big["stored_activation_bytes"] == 32 * 2 * 256 * 2048 * 4096 * 2  # 256 GiB on the host


def test_time_calibration_with_ceilings_reports_floor():
    model = _cal_model()
    data = benchmark.calibration_tokens(CAL_VOCAB, 4, 32)
    ceil = {"matmul_flops_per_s": 1e9, "gram_flops_per_s": 5e8, "bandwidth_bytes_per_s": 1e9}
    r = benchmark.time_calibration(model, data, ceilings=ceil)
    expect = benchmark.calibration_floor(
        r["cost"], matmul_flops_per_s=1e9, gram_flops_per_s=5e8, bandwidth_bytes_per_s=1e9
    )
    assert r["floor"] == expect and r["floor"]["floor_s"] > 0
    assert r["pct_of_floor"] == pytest.approx(100 * expect["floor_s"] / r["total_s"])


def test_time_calibration_rejects_bad_input(monkeypatch):
    model = _cal_model()
    data = benchmark.calibration_tokens(CAL_VOCAB, 4, 32)
    with pytest.raises(ValueError, match="method must be one of"):
        benchmark.time_calibration(model, data, method="all")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        benchmark.time_calibration(model, data, batch_size=0)
    with pytest.raises(TypeError, match="integer token ids"):
        benchmark.time_calibration(model, data.float())
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 64\)"):
        benchmark.time_calibration(model, data + CAL_VOCAB)
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        benchmark.calibration_tokens(CAL_VOCAB, 0, 8)
    monkeypatch.setattr(benchmark.calibration, "available_host_bytes", lambda: 1000)
    with pytest.raises(ValueError, match=r"store_all would keep .* GiB of activations on the host"):
        benchmark.time_calibration(model, data, method="store_all")
    benchmark.time_calibration(model, data, method="store_all", check_memory=False)  # the check can be waived


def test_compare_calibration_ratios_and_skips(monkeypatch):
    model = _cal_model()
    r = benchmark.compare_calibration(model, [4, 6], seq_len=32)
    assert [(x["method"], x["num_samples"]) for x in r["runs"]] == [
        ("streaming", 4),
        ("store_all", 4),
        ("streaming", 6),
        ("store_all", 6),
    ]
    for x in r["runs"]:
        assert x["vs_streaming"]["time_ratio"] > 0
    assert r["runs"][0]["vs_streaming"]["time_ratio"] == 1.0
    monkeypatch.setattr(benchmark.calibration, "available_host_bytes", lambda: 1000)
    r = benchmark.compare_calibration(model, [4], seq_len=32)
    assert "skipped" in r["runs"][1] and "would keep" in r["runs"][1]["skipped"]
    with pytest.raises(ValueError, match="method must be one of"):
        benchmark.compare_calibration(model, [2], methods=["streaming", "pickle"])
    with pytest.raises(ValueError, match="sample_counts must be positive ints"):
        benchmark.compare_calibration(model, [])


@pytest.mark.filterwarnings("ignore::nbl_ext.numerics.SingularWarning")  # 20-token vocabulary: layer 0 is rank 20 < 32
def test_bench_calibration_cli_writes_json(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "calib.json"
    rc = cli.main(
        [
            "bench",
            str(tiny_model_dir),
            "--calibration",
            "--samples",
            "2,3",
            "--seq-len",
            "8",
            "--device",
            "cpu",
            "--no-ceilings",
            "--no-progress",
            "--output",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "streaming" in printed and "store_all" in printed and "tokens/s" in printed
    report = json.loads(out.read_text())
    assert report["nbl_bench_calibration"] == 1 and report["model"]["weights"] == "real"
    assert [(r["method"], r["tokens"]) for r in report["runs"]] == [
        ("streaming", 16),
        ("store_all", 16),
        ("streaming", 24),
        ("store_all", 24),
    ]
    assert all(r["total_s"] > 0 and r["num_layers"] == 2 for r in report["runs"])
    assert report["settings"]["seq_len"] == 8 and report["device"]["type"] == "cpu"


def test_bench_calibration_help_and_errors(capsys, tiny_model_dir):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = capsys.readouterr().out
    for needle in ("--calibration", "--samples", "--seq-len", "--calib-methods", "store_all", "streaming"):
        assert needle in text
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--calibration", "--calib-methods", "pickle"])
    assert exc.value.code == 2 and "choose from streaming,store_all" in capsys.readouterr().err
    assert cli.main(["bench", str(tiny_model_dir), "--calibration", "--shape", "mistral-7b"]) == 2
    assert "not both" in capsys.readouterr().err
