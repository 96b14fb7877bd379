"""Context parallelism runs (runtime/context_parallel.py): each sequence cut into 2 * cp chunks,
cp rank r holding chunks r and 2cp - 1 - r, K and V gathered for attention, the attention
recomputed in the backward. Shown against one process on real gloo groups:

- the attention of a rank's chunks (MHA and GQA, fp64) equals SDPA's over the whole sequence,
  output and the gradients of q, k and v, on 4 processes; a Hugging Face Llama's logits for a
  rank's tokens equal the whole model's (its positions set by the hook; without the runtime's
  attention they are 0.1-0.3 off);
- the same under a sliding window that crosses the chunks, and with Gemma-2's soft-capped scores;
- paraplan's Llama, GPT (learned positions) and mixture of experts and Hugging Face Llama,
  Qwen3, Gemma-2 (soft-capped scores), Gemma 3 (sliding windows) and DeepSeek-V3 (latent attention, experts) train under cp alone, with ZeRO 0
  and FSDP data parallelism, tensor + sequence parallelism, pipelining, expert parallelism
  folded over dp x cp and full or selective recomputation with the one-process losses and gradient
  norms (1e-5, as tests/test_runtime_parity.py argues; measured within 2e-7). Every type of
  planner.contract.CONTEXT_HF_TYPES was run the same way under cp2, cp2 x FSDP, cp2 x tp2 and
  cp2 x pp2 when it was listed (within 2e-7 loss, 7e-7 gradient norm).

A run that did not shard its sequence fails in its first step (the attention checks the
sequence it was set up for), so parity here is parity of a context-parallel run.
"""

import importlib.util
import json
import subprocess
import sys

import pytest

from costmodel import Strategy
from runtime_helpers import ROOT, assert_same_gradients, launch_by_world, worker_env, write_plan, write_source_plan

TOLERANCE = 1e-5
STEPS = 3
ZOO_CASES = {  # name -> (model, strategy flags)
    "cp4": ("tiny-llama", dict(cp=4, microbatch_size=4)),
    "cp2_dp2_zero0": ("tiny-llama", dict(cp=2, dp=2, microbatch_size=2)),
    "cp2_tp2_sp_selective": ("tiny-llama", dict(cp=2, tp=2, sequence_parallel=True, microbatch_size=4,
                                                recompute="selective")),
    "cp2_pp2_full_recompute": ("tiny-gpt", dict(cp=2, pp=2, microbatch_size=2, schedule="1f1b", recompute="full")),
    # a mixture of experts: expert parallelism folded over dp x cp (costmodel.moe's folding)
    "cp2_dp2_ep4_fsdp": ("tiny-moe", dict(cp=2, dp=2, ep=4, zero=3, microbatch_size=2)),
}
HF_CASES = {  # name -> (model, strategy flags)
    "cp2_fsdp": ("llama", dict(cp=2, dp=2, zero=3, microbatch_size=2)),
    "cp2_tp2": ("qwen3", dict(cp=2, tp=2, microbatch_size=4)),
    # Gemma 3: a sliding window of 8 of the 32 tokens on every other layer, a rotation per layer kind
    "cp2_pp2": ("gemma3", dict(cp=2, pp=2, microbatch_size=2, schedule="1f1b")),
    # latent attention (a value head narrower than the query's) and experts over ep folded into dp x cp
    "cp2_dp2_ep2": ("deepseek_v3", dict(cp=2, dp=2, ep=2, microbatch_size=2)),
    # soft-capped scores (eager, as Gemma-2's own attention), a window of 8 on every other layer
    "cp4": ("gemma2", dict(cp=4, microbatch_size=4)),
}
HF_CONFIGS = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", dict(head_dim=16, tie_word_embeddings=False)),
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=8, pad_token_id=0, eos_token_id=1, bos_token_id=1)),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=8, sliding_window_pattern=2, pad_token_id=0,
                                        eos_token_id=1, bos_token_id=1)),
}
SIZES = dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=256, max_position_embeddings=64)


def test_context_attention_and_a_hf_forward_equal_one_process():
    transformers_here = importlib.util.find_spec("transformers") is not None
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
           str(ROOT / "tests" / "context_worker.py"), *(["--hf"] if transformers_here else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=worker_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(ranks) == 4
    # rank r holds chunks r and 7 - r of the 8 (4 tokens each): every rank as many causal pairs
    assert ranks[1]["positions"] == [4, 5, 6, 7, 24, 25, 26, 27]
    for rank in ranks:
        for kind in ("mha", "gqa", "window", "softcap"):
            assert max(rank[kind].values()) < 1e-12, rank[kind]
        if transformers_here:
            assert rank["hf_logits"] < 1e-12


def _hf_dir(root, name):
    import transformers

    folder = root / name
    if name not in HF_CONFIGS:  # transformers' own mixture-of-experts classes, as tests/test_moe.py writes them
        from test_moe import TINY_HF_MOE

        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(TINY_HF_MOE[name]))
        return folder
    cls, extra = HF_CONFIGS[name]
    getattr(transformers, cls)(**SIZES, **extra).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("context")
    s = lambda **f: Strategy(precision="fp32", global_batch=8, **f)  # noqa: E731
    by_world: dict[int, list] = {1: [write_plan(d, m, s(microbatch_size=8), "reference")
                                     for m in ("tiny-llama", "tiny-gpt", "tiny-moe")]}
    for name, (model, flags) in ZOO_CASES.items():
        by_world.setdefault(s(**flags).world_size, []).append(write_plan(d, model, s(**flags), name))
    if importlib.util.find_spec("transformers") is not None:
        for name, (model, flags) in HF_CASES.items():
            folder = _hf_dir(d, model)
            by_world[1].append(write_source_plan(d, f"hf:{folder}", s(microbatch_size=8, seq_len=32),
                                                 f"{model}__reference"))
            strategy = s(seq_len=32, **flags)
            by_world.setdefault(strategy.world_size, []).append(
                write_source_plan(d, f"hf:{folder}", strategy, f"{model}__{name}"))
    return launch_by_world(by_world, d, "--steps", str(STEPS))


def _same(ours: dict, ref: dict) -> None:
    assert len(ours["losses"]) == len(ref["losses"]) == STEPS
    for step, (a, b) in enumerate(zip(ours["losses"], ref["losses"]), 1):
        assert abs(a - b) <= TOLERANCE * abs(b), f"step {step}: {a} vs {b}"
    assert_same_gradients(ours, ref)


@pytest.mark.parametrize("name", ZOO_CASES)
def test_builtin_models_under_context_parallelism_match_one_process(runs, name):
    model = ZOO_CASES[name][0]
    _same(runs[f"{model}__{name}"], runs[f"{model}__reference"])


@pytest.mark.parametrize("name", HF_CASES)
def test_hf_models_under_context_parallelism_match_one_process(runs, name):
    pytest.importorskip("transformers")
    model = HF_CASES[name][0]
    _same(runs[f"{model}__{name}"], runs[f"{model}__reference"])


def test_a_long_sequence_is_planned_with_context_parallelism_and_check_accepts_it(tmp_path):
    """Before, the search never picked cp for paraplan's runtime (run refused it): Llama 3 8B at 128K
    tokens on 64 H100s was planned pp 8 x tp 8. Now cp is a choice it prices (K and V gathered,
    not overlapped, the attention recomputed in the backward) and the plan it writes, check accepts."""
    from tests_helpers import paraplan

    target = tmp_path / "long.yaml"
    out = paraplan("plan", "--model", "llama3-8b", "--cluster", "h100-sxm:64", "--seq-len", "131072",
                   "--global-batch", "64", "--no-timing", "-o", str(target), "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)["plan"]
    assert plan["mesh"]["cp"] > 1
    check = paraplan("check", str(target), "--cluster", "h100-sxm:64")
    assert check.returncode == 0 and "OK" in check.stdout, check.stdout + check.stderr


def test_all_gather_context_parallelism_is_priced_exposed_and_a_ring_hidden():
    """paraplan's runtime gathers K and V whole (not overlapped) and again in the backward, which
    recomputes the attention; Megatron-Core's ring overlaps the exchange with the attention blocks.
    At 32K tokens over cp 4 the ring's exchange is hidden, the gathers are not, and they grow with
    the K/V width (multi-head against grouped-query attention)."""
    from costmodel import load_cluster
    from costmodel.layer import layer_cost
    from costmodel.runtime import load_runtime
    from dataclasses import replace
    from planner.zoo import ZOO

    spec = ZOO["llama3-8b"]
    s = Strategy(tp=1, cp=4, dp=2, global_batch=8, seq_len=32768)
    spec = spec.with_seq_len(32768)
    costs = {}
    for runtime in ("paraplan", "megatron-core"):
        cluster = load_cluster("h100-sxm:8", runtime=load_runtime(runtime))
        one = layer_cost(spec, s, cluster, cluster.group(1, 1), cluster.group(4, 1))
        costs[runtime] = one
        plain = layer_cost(spec, s.replace(cp=1, dp=8), cluster, cluster.group(1, 1), cluster.group(1, 1))
        assert plain.forward.cp_comm == plain.backward.cp_comm == 0
    ring, gathered = costs["megatron-core"], costs["paraplan"]
    assert ring.forward.cp_comm == 0 and ring.backward.cp_comm == 0  # hidden behind the attention
    assert gathered.forward.cp_comm > 0 and gathered.backward.cp_comm > gathered.forward.cp_comm
    cluster = load_cluster("h100-sxm:8", runtime=load_runtime("paraplan"))
    mha = layer_cost(replace(spec, kv_heads=spec.heads), s, cluster, cluster.group(1, 1), cluster.group(4, 1))
    ratio = mha.forward.cp_comm / gathered.forward.cp_comm
    assert 3 < ratio < 4.5  # four times the K/V bytes (32 heads against 8), less the calls' fixed latency


@pytest.mark.parametrize("model, needle", [
    ("py:user_model:user_lm", "context parallelism on a py: module is not run"),
])
def test_context_parallelism_the_runtime_does_not_run_is_refused_in_one_line(model, needle):
    from tests_helpers import paraplan

    out = paraplan("plan", "--model", model, "--cluster", "cpu:4", "--global-batch", "8", "--cp", "2")
    assert out.returncode == 2 and needle in out.stderr and "re-plan with --cp 1" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_a_hugging_face_type_outside_the_list_under_cp_is_refused_and_a_window_is_not(tmp_path):
    """StarCoder (GPT-BigCode: its attention its own, not transformers' interface's): not run under
    cp, said in one line. A Mistral whose window is shorter than the sequence was refused too; its
    window is now masked per chunk."""
    transformers = pytest.importorskip("transformers")
    from tests_helpers import paraplan

    starcoder = tmp_path / "starcoder"
    transformers.GPTBigCodeConfig(n_layer=4, n_embd=64, n_head=4, n_positions=64, multi_query=True,
                                  vocab_size=256).save_pretrained(starcoder)
    mistral = tmp_path / "mistral"
    transformers.MistralConfig(**SIZES, sliding_window=16).save_pretrained(mistral)
    flags = ("--cluster", "cpu:4", "--global-batch", "8", "--seq-len", "32", "--cp", "2")
    out = paraplan("plan", "--model", f"hf:{starcoder}", *flags)
    needle = "context parallelism on a Hugging Face gpt_bigcode is not run yet"
    assert out.returncode == 2 and needle in out.stderr and "--cp 1" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    out = paraplan("plan", "--model", f"hf:{mistral}", *flags, "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["plan"]["mesh"]["cp"] == 2, out.stderr
