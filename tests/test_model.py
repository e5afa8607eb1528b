"""Model: Hugging Face naming, config import, rotary embeddings, attention, padding."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import small_shapes

from rftjax import models
from rftjax.models import transformer as tf

SMALL = small_shapes.MODEL


def test_param_names_are_hugging_face_names():
    _, params = models.create(SMALL, 0)
    names = models.param_names(params)
    d, h, k, e, f = 8, 4, 2, 32, 64
    expected = {
        "model.embed_tokens.weight": (32, e),
        "model.norm.weight": (e,),
        "lm_head.weight": (32, e),
    }
    for i in range(2):
        p = f"model.layers.{i}."
        expected.update(
            {
                p + "input_layernorm.weight": (e,),
                p + "post_attention_layernorm.weight": (e,),
                p + "self_attn.q_proj.weight": (h * d, e),
                p + "self_attn.q_proj.bias": (h * d,),
                p + "self_attn.k_proj.weight": (k * d, e),
                p + "self_attn.k_proj.bias": (k * d,),
                p + "self_attn.v_proj.weight": (k * d, e),
                p + "self_attn.v_proj.bias": (k * d,),
                p + "self_attn.o_proj.weight": (e, h * d),
                p + "mlp.gate_proj.weight": (f, e),
                p + "mlp.up_proj.weight": (f, e),
                p + "mlp.down_proj.weight": (e, f),
            }
        )
    assert names == expected


def test_tied_embeddings_have_no_lm_head():
    _, params = models.create(SMALL.replace(tie_word_embeddings=True, qkv_bias=False), 0)
    names = models.param_names(params)
    assert "lm_head.weight" not in names
    assert not any(n.endswith(".bias") for n in names)


def _hf_config(model_type, **extra):
    base = {
        "model_type": model_type,
        "vocab_size": 100,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
    }
    return {**base, **extra}


def test_from_hf_config_llama_and_qwen2(tmp_path):
    llama = _hf_config(
        "llama",
        rope_theta=500000.0,
        attention_bias=False,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    (tmp_path / "config.json").write_text(json.dumps(llama))
    cfg = models.from_hf_config(tmp_path)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim) == (3, 8, 2, 8)
    assert cfg.rope_theta == 500000.0 and not cfg.qkv_bias and cfg.tie_word_embeddings
    assert dict(cfg.rope_scaling)["factor"] == 32.0
    # transformers>=5 writes rope settings under rope_parameters.
    qwen = _hf_config("qwen2", rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
    cfg = models.from_hf_config(qwen)
    assert cfg.qkv_bias and cfg.rope_theta == 1e6 and cfg.rope_scaling is None


def test_from_hf_config_rejects_unknown_architecture():
    with pytest.raises(ValueError, match="gpt2"):
        models.from_hf_config(_hf_config("gpt2"))
    with pytest.raises(ValueError, match="yarn"):
        models.from_hf_config(_hf_config("llama", rope_scaling={"rope_type": "yarn"}))


def test_config_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="num_kv_heads"):
        SMALL.replace(num_kv_heads=3)
    with pytest.raises(ValueError, match="unknown model override 'depth'"):
        models.parse_overrides("depth=3")
    assert models.parse_overrides("num_layers=3, qkv_bias=true") == {
        "num_layers": 3,
        "qkv_bias": True,
    }


def test_rope_matches_reference_rotation():
    # Rotate-half convention: pairs (x_i, x_{i+D/2}) rotate by angle pos * inv_freq_i.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 3, 2, 8)).astype(np.float32)
    pos = np.array([[0, 1, 5]])
    inv = 1.0 / (10000.0 ** (np.arange(0, 8, 2) / 8))
    want = np.empty_like(x)
    for s in range(3):
        ang = pos[0, s] * inv
        a, b = x[0, s, :, :4], x[0, s, :, 4:]
        want[0, s, :, :4] = a * np.cos(ang) - b * np.sin(ang)
        want[0, s, :, 4:] = b * np.cos(ang) + a * np.sin(ang)
    got = tf.apply_rope(jnp.asarray(x), jnp.asarray(pos), jnp.asarray(inv, jnp.float32))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_llama3_rope_scaling_keeps_high_and_scales_low_frequencies():
    cfg = SMALL.replace(
        hidden_size=512,
        num_heads=4,
        num_kv_heads=2,
        rope_theta=500000.0,
        rope_scaling=(
            ("factor", 8.0),
            ("low_freq_factor", 1.0),
            ("high_freq_factor", 4.0),
            ("original_max_position_embeddings", 8192.0),
        ),
    )
    scaled = np.asarray(tf.rope_frequencies(cfg))
    plain = np.asarray(tf.rope_frequencies(cfg.replace(rope_scaling=None)))
    wavelen = 2 * np.pi / plain
    np.testing.assert_allclose(scaled[wavelen < 8192 / 4], plain[wavelen < 8192 / 4])
    np.testing.assert_allclose(scaled[wavelen > 8192], plain[wavelen > 8192] / 8.0, rtol=1e-6)


def test_grouped_query_attention_equals_repeated_heads():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(2, 5, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 5, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 5, 2, 8)), jnp.float32)
    mask = models.causal_mask(jnp.ones((2, 5), bool))
    got = tf.attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)  # [B,K,L,D]
    # Reference: plain multi-head attention with each kv head repeated for its 2 query heads.
    kr, vr = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)
    scores = np.einsum("bshd,blhd->bhsl", q, kr) / np.sqrt(8)
    scores = np.where(np.tril(np.ones((5, 5), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(got, np.einsum("bhsl,blhd->bshd", probs, vr), atol=1e-5)


def test_left_padding_does_not_change_logits():
    graphdef, params = models.create(SMALL, 0)
    tokens = jnp.array([[5, 9, 3, 7]])
    padded = jnp.array([[0, 0, 5, 9, 3, 7]])
    valid = jnp.array([[False, False, True, True, True, True]])
    plain, _, _ = models.full_forward(graphdef, params, tokens, jnp.ones((1, 4), bool))
    pad, _, _ = models.full_forward(graphdef, params, padded, valid)
    np.testing.assert_allclose(pad[:, 2:], plain, atol=1e-5)


def test_forward_compiles_once():
    graphdef, params = models.create(SMALL, 0)
    fwd = jax.jit(lambda p, t, v: models.full_forward(graphdef, p, t, v)[0])
    rng = np.random.default_rng(0)
    for _ in range(2):
        t = jnp.asarray(rng.integers(0, 32, (2, 6)), jnp.int32)
        fwd(params, t, jnp.ones((2, 6), bool))
    assert fwd._cache_size() == 1
