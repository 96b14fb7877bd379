"""`paraplan generate`: the KV cache gives the tokens of recomputing the whole sequence, holds
exactly the predicted bytes, samples as asked, and loads `paraplan run` checkpoints."""

import json

import pytest
import torch

from costmodel import Strategy
from costmodel.serving import kv_bytes_per_token
from planner.zoo import ZOO
from runtime.generate import Sampling, generate, load_model, next_tokens
from runtime_helpers import torchrun, write_plan
from tests_helpers import paraplan


@pytest.mark.parametrize("name", ["tiny-gpt", "tiny-llama"])
def test_cached_decoding_equals_recomputing_the_sequence(name):
    model = load_model(ZOO[name], seed=3)
    prompt = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    out = generate(model, prompt, 12, Sampling(greedy=True))
    seq = prompt
    with torch.no_grad():
        for _ in range(12):  # no cache: the whole sequence each step
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.tokens, seq)


@pytest.mark.parametrize("name", ["tiny-gpt", "tiny-llama"])
def test_cache_bytes_equal_the_prediction(name):
    spec = ZOO[name]
    out = generate(load_model(spec), torch.zeros(3, 5, dtype=torch.long), 9, Sampling(greedy=True))
    # 2 * layers * kv_heads * head_dim * 4 bytes (fp32) per token, for 3 sequences of 5 + 9 tokens
    assert out.cache_bytes == kv_bytes_per_token(spec, 4) * 3 * (5 + 9)
    if name == "tiny-llama":  # GQA: 2 KV heads for 4 query heads halve the cache
        assert kv_bytes_per_token(spec, 4) == 2 * spec.layers * 2 * spec.head_dim * 4


def test_sampling_options():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 4.9]])
    gen = torch.Generator().manual_seed(0)
    greedy = next_tokens(logits, Sampling(greedy=True), gen)
    assert greedy.tolist() == [1, 0]
    assert next_tokens(logits, Sampling(top_k=1), gen).tolist() == [1, 0]
    assert next_tokens(logits, Sampling(top_p=1e-6), gen).tolist() == [1, 0]
    # top-k 2 never picks outside the two best
    picks = {tuple(next_tokens(logits, Sampling(top_k=2), gen).tolist()) for _ in range(200)}
    assert all(a in (1, 3) and b in (0, 3) for a, b in picks) and len(picks) > 1
    # top-p 0.5 on row 1 (softmax ~ .64, .24, .09, .03): only the best token holds half the mass
    assert {next_tokens(logits[:1], Sampling(top_p=0.5), gen).item() for _ in range(50)} == {1}
    # a low temperature sharpens towards the greedy choice
    cold = [next_tokens(logits[1:], Sampling(temperature=0.01), gen).item() for _ in range(50)]
    assert cold.count(0) >= 45
    model = load_model(ZOO["tiny-gpt"])
    prompt = torch.zeros(1, 4, dtype=torch.long)
    a = generate(model, prompt, 10, Sampling(seed=5)).tokens
    assert torch.equal(a, generate(model, prompt, 10, Sampling(seed=5)).tokens)  # seeded: reproducible
    assert not torch.equal(a, generate(model, prompt, 10, Sampling(seed=6)).tokens)


def test_command_line_and_checkpoints(tmp_path):
    run = paraplan("generate", "--model", "tiny-llama", "--prompt", "Hi there", "--max-new-tokens", "6", "--greedy",
                   "--json")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["kv_cache_bytes"] == out["predicted_kv_cache_bytes"] and out["texts"][0].startswith("Hi there")
    assert out["predicted_decode_step_s"] > 0
    for bad, needle in (([ "--model", "llama3-8b.yaml"], "built-in"), (["--model", "tiny-gpt", "--max-new-tokens", "40"],
                        "context"), (["--model", "tiny-gpt", "--top-p", "0"], "--top-p"),
                        (["--model", "tiny-gpt", "--prompt-tokens", "1,x"], "--prompt-tokens")):
        r = paraplan("generate", *bad)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (bad, r.stderr)
    # weights trained by `paraplan run`
    plan = write_plan(tmp_path, "tiny-gpt", Strategy(precision="fp32", global_batch=8, microbatch_size=8), "one")
    ckpt = tmp_path / "ckpt"
    assert torchrun(1, [plan], tmp_path / "o.jsonl", "--steps", "3", "--checkpoint-dir", str(ckpt),
                    "--checkpoint-every", "3").returncode == 0
    trained = load_model(ZOO["tiny-gpt"], checkpoint=str(ckpt))
    fresh = load_model(ZOO["tiny-gpt"])
    assert not torch.equal(trained.output.weight, fresh.output.weight)
    r = paraplan("generate", "--model", "tiny-gpt", "--checkpoint", str(ckpt), "--greedy", "--json")
    assert r.returncode == 0, r.stderr
    missing = paraplan("generate", "--model", "tiny-gpt", "--checkpoint", str(tmp_path / "none"))
    assert missing.returncode == 2 and "no complete checkpoint" in missing.stderr


def test_a_model_too_large_for_this_machine_is_refused_before_it_is_built(monkeypatch):
    """generate builds the model in fp32 on this CPU: one that would not fit the memory left is
    refused in one line (llama3-8b's 30 GiB was killed by the kernel, without a word)."""
    from costmodel import ConfigError
    from planner.zoo import ZOO
    from runtime import generate as gen

    monkeypatch.setattr(gen, "available_memory_bytes", lambda: 16 * 2**30)
    with pytest.raises(ConfigError, match=r"llama3-8b needs 29\.9 GiB of fp32 weights .* 16\.0 GiB free"):
        gen.load_model(ZOO["llama3-8b"])
    assert gen.load_model(ZOO["tiny-llama"]).spec.name == "tiny-llama"
