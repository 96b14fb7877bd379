"""Under torchrun: count the collectives one tensor-parallel layer issues (CommDebugMode)
and print them as JSON (rank 0), with what the cost model predicts for the same layer."""

import faulthandler
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor.debug import CommDebugMode

from costmodel.layer import tp_collectives_per_layer
from planner.plan import Plan
from runtime.mesh import build_mesh
from torch.distributed.tensor.parallel import loss_parallel

from runtime.module import blocks_of, logits_of
from runtime.train import build_plan_parts, loss_fn


def main() -> None:
    faulthandler.enable()  # a native abort prints where it happened (a CI run once died with SIGABRT here)
    dist.init_process_group("gloo")
    plan = Plan.from_yaml(Path(sys.argv[1]).read_text())
    mesh = build_mesh(plan.mesh, "cpu")
    (model,), _, mmap = build_plan_parts(plan, mesh, torch.device("cpu"), seed=0)
    spec = plan.spec
    tp = plan.mesh["tp"]
    seq = plan.seq_len // tp if plan.sequence_parallel else plan.seq_len  # the block's local input
    x = torch.randn(plan.schedule["microbatch_size"], seq, spec.hidden, requires_grad=True)
    if mmap is None:  # paraplan's own Transformer
        block = model.layers["1"]
        call = lambda: block(x, model.rope_cos, model.rope_sin)  # noqa: E731
    else:  # a Hugging Face decoder layer, called as its model calls it
        block = blocks_of(model, mmap)[1]
        positions = torch.arange(plan.seq_len).unsqueeze(0)  # (1, T)
        cos_sin = model.model.rotary_emb(x, positions)
        call = lambda: block(x, attention_mask=None, position_ids=positions, position_embeddings=cos_sin)  # noqa: E731
    with CommDebugMode() as fwd:
        out = call()
        out = out[0] if isinstance(out, tuple) else out
    with CommDebugMode() as bwd:
        out.sum().backward()
    counts = {phase: {str(op).split(".")[-1]: n for op, n in mode.get_comm_counts().items()}
              for phase, mode in (("forward", fwd), ("backward", bwd))}
    # parameters on each rank's local heads (Qwen3's q_norm, k_norm): their gradients must be the
    # same on every tp rank (reduced over tp), or the replicas drift apart
    others = list(mmap.others) if mmap is not None else []
    agree = []
    for path in others:
        g = block.get_submodule(path).weight.grad
        g = (g.full_tensor() if hasattr(g, "full_tensor") else g).contiguous()
        gathered = [torch.zeros_like(g) for _ in range(tp)]
        dist.all_gather(gathered, g, group=mesh["tp"].get_group())
        agree.append(all(torch.equal(gathered[0], x) for x in gathered))
    # the head's logits stay split over the vocabulary and the loss reduces statistics, not logits
    tokens = torch.randint(0, spec.vocab, (plan.schedule["microbatch_size"], plan.seq_len))  # (B, T)
    with torch.no_grad():
        logits = logits_of(model(tokens))
    with CommDebugMode() as loss_mode, loss_parallel():
        loss_fn(logits, tokens)
    loss_counts = {str(op).split(".")[-1]: n for op, n in loss_mode.get_comm_counts().items()}
    if dist.get_rank() == 0:
        print(json.dumps({"measured": counts, "predicted": tp_collectives_per_layer(plan.strategy()),
                          "logits": [str(p) for p in getattr(logits, "placements", ())], "loss": loss_counts,
                          "others": others, "others_agree": agree}))
    dist.barrier()
    # leave without tearing gloo down: its destructor raced with the peer's once in CI (SIGABRT
    # after the counts were printed); the runtime's own teardown is tested by every run test
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
