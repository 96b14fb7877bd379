"""The tensor-parallel collectives counted at run time (CommDebugMode) equal the ones the
cost model prices for the plan, per layer, forward and backward."""

import json
import subprocess
import sys

import pytest

from costmodel import Strategy
from runtime_helpers import ROOT, worker_env, write_plan, write_source_plan


def _hf_model(tmp_path, name: str) -> str:
    transformers = pytest.importorskip("transformers")
    cls = transformers.Qwen3Config if name == "hf-qwen3" else transformers.LlamaConfig
    config = cls(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=256, max_position_embeddings=64, head_dim=16)
    config.save_pretrained(tmp_path / name)
    return f"hf:{tmp_path / name}"


@pytest.mark.parametrize("model", ["tiny-gpt", "tiny-llama", "hf-llama", "hf-qwen3"])
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_collectives_per_layer_match_the_plan(tmp_path, model, sp):
    s = Strategy(precision="fp32", tp=2, global_batch=2, microbatch_size=2, sequence_parallel=sp,
                 seq_len=32 if model.startswith("hf-") else 0)
    if model.startswith("hf-"):  # the user's module (a transformers decoder layer), parallelized from the plan
        plan = write_source_plan(tmp_path, _hf_model(tmp_path, model), s, "comm")
    else:
        plan = write_plan(tmp_path, model, s, "comm")
    env = worker_env()
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(ROOT / "tests" / "comm_count_worker.py"), str(plan)],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    clues = [l for l in out.stderr.splitlines() if any(w in l for w in ("terminate", "Fatal", "Error", "File \""))]
    assert out.returncode == 0, "\n".join(clues[:40]) + out.stderr[-1500:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("{"))
    counts = json.loads(line)
    if counts["others"]:
        # Qwen3's q_norm, k_norm see each rank's heads: their gradients come out as partial sums that
        # DTensor reduces over tp where they are read (clip, optimizer), the same on every rank; as plain
        # tensors (before runtime.tensor_parallel.LocalShard) each rank kept its own and the replicas drifted
        assert counts["others"] == ["self_attn.q_norm", "self_attn.k_norm"] and counts["others_agree"] == [True, True]
    assert counts["measured"] == counts["predicted"]
    # the vocab-parallel head's logits are never gathered (Shard over the vocabulary), and the loss
    # reduces its statistics over tp, as the cost model's head prices it (no all_gather)
    assert counts["logits"] == ["S(2)"]  # DTensor writes Shard(dim=2) so
    assert counts["loss"] == {"all_reduce": 3}  # max, sum of exponentials, target logit (costmodel.layer)
    assert sum(counts["measured"]["forward"].values()) in (2, 4)
