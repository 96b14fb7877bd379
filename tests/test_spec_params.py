"""Golden parameter counts and agreement between the spec and the nn.Module."""

import pytest
import torch

from costmodel.errors import ConfigError
from costmodel.spec import ModelSpec
from golden_data import KV_BYTES_PER_TOKEN_KIB, LLAMA_PUBLISHED_PARAMS
from planner.zoo import ZOO
from planner.zoo.model import build_model

GPT = [n for n in ZOO if n.startswith(("gpt3", "megatron"))]


@pytest.mark.parametrize("name", GPT)
def test_gpt_params_match_narayanan_formula(name):
    # Narayanan et al. (SC 2021), Sec. 5.1: P = 12 l h^2 (1 + 13/(12h) + (V + s)/(12 l h))
    s = ZOO[name]
    l, h, V, seq = s.layers, s.hidden, s.vocab, s.seq_len
    formula = 12 * l * h**2 * (1 + 13 / (12 * h) + (V + seq) / (12 * l * h))
    assert s.num_params == pytest.approx(formula, rel=1e-3)


def test_gpt3_175b_is_175b():
    assert ZOO["gpt3-175b"].num_params == pytest.approx(175e9, rel=0.005)


@pytest.mark.parametrize("name", sorted(LLAMA_PUBLISHED_PARAMS))
def test_llama_params_match_published(name):
    assert ZOO[name].num_params == pytest.approx(LLAMA_PUBLISHED_PARAMS[name], rel=0.005)


# MLA and biased experts (gpt-oss): priced, not built (planner.contract.model_planned_only)
@pytest.mark.parametrize("name", [n for n in ZOO if not ZOO[n].latent_attention and not (ZOO[n].moe and ZOO[n].bias)])
def test_module_parameter_count_equals_spec(name):
    spec = ZOO[name]
    model = build_model(spec, device="meta")
    unique = {id(p): p.numel() for p in model.parameters()}
    assert sum(unique.values()) == spec.num_params


@pytest.mark.parametrize("name", sorted(KV_BYTES_PER_TOKEN_KIB))
def test_kv_bytes_per_token(name):
    s = ZOO[name]
    assert 2 * s.layers * s.kv_heads * s.head_dim * 2 == KV_BYTES_PER_TOKEN_KIB[name] * 1024


def test_tiny_models_run_forward_on_cpu():
    for name in ("tiny-gpt", "tiny-llama"):
        spec = ZOO[name]
        model = build_model(spec, device="cpu")
        model.init_weights(seed=0)
        tokens = torch.randint(0, spec.vocab, (2, spec.seq_len))
        logits = model(tokens)
        assert logits.shape == (2, spec.seq_len, spec.vocab)
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"layers": 2, "hidden": 65, "heads": 4, "vocab": 10, "seq_len": 8}, r"hidden \(65\) is not a multiple of heads"),
        ({"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 3, "vocab": 10, "seq_len": 8}, "kv_heads"),
        ({"layers": 0, "hidden": 64, "heads": 4, "vocab": 10, "seq_len": 8}, "'layers' must be a positive integer"),
        ({"layers": 2, "hidden": 64, "heads": 4, "vocab": 10, "seq_len": 8, "activation": "relu"}, "gelu|swiglu"),
    ],
)
def test_bad_specs_are_refused(fields, needle):
    with pytest.raises(ConfigError, match=needle):
        ModelSpec(**fields)
