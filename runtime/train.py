"""The training loop: a plan, built on this process group, trained for some steps.

AdamW with linear warm-up and cosine decay, gradient clipping by the global norm (over
tensor-, data- and pipeline-parallel ranks alike), synthetic or file data, a JSONL line per
step, DCP checkpoints and exact resume. Returns the losses, the measured step time (median)
and the plan's prediction side by side.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from costmodel.errors import ConfigError
from costmodel.spec import ModelSpec, Position
from planner.plan import Plan
from planner.zoo.model import build_model
from runtime import checkpoint as ckpt
from runtime.activation_checkpoint import apply_recompute
from planner.contract import runnable_problems
from planner.model_source import module_map_of
from runtime.context_parallel import apply_context_parallel, context_shard
from runtime.data import TokenSource, dp_slice, tokenizer_dir
from runtime.data_parallel import apply_data_parallel
from runtime.expert_parallel import apply_expert_parallel, ep_group_of, expert_mesh, is_expert_param, shard_experts
from runtime.lora import apply_lora, freeze_base
from runtime.mesh import build_mesh, data_parallel_mesh
from runtime.module import build_user_parts, logits_of
from runtime.pipeline import build_schedule, my_stages, stage_module
from runtime.tensor_parallel import apply_tensor_parallel


@dataclass(frozen=True, slots=True, kw_only=True)
class RunConfig:
    steps: int = 10
    seed: int = 0
    lr: float = 1e-3
    warmup_steps: int = 2
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    data: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    metrics_path: str | None = None
    stop_after: int | None = None  # leave the loop after this step (tests of resume)
    log: bool = False  # a line per step on rank 0's stdout


def _lr_lambda(cfg: RunConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return f


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy. Vocab-parallel logits (a DTensor sharded over the vocabulary, from a
    head the plan splits over tp) are never gathered: under `loss_parallel` each rank takes
    the max, the sum of exponentials and the target's logit over its vocabulary slice and tp
    reduces those (Megatron's vocab-parallel cross-entropy, as the cost model prices it)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))  # (B*T, V) vs (B*T,)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def runnable_spec(plan: Plan) -> ModelSpec:
    """The plan's model with rotary tables as long as the plan's sequence (a RoPE model may
    train longer than its default `seq_len`; learned positions may not, which check refuses)."""
    spec = plan.spec
    if spec.position is Position.ROPE and plan.seq_len > spec.seq_len:
        return replace(spec, seq_len=plan.seq_len)
    return spec


def tied_pairs(plan: Plan, mesh) -> object | None:
    """The process group joining this rank's first and last pipeline stages when the model ties
    its embedding and head across them (Megatron's embedding group): one group per
    coordinate of the other mesh axes, created on every rank in the same order."""
    if plan.mesh["pp"] == 1 or not plan.spec.tied_embeddings:
        return None
    ranks = mesh.mesh  # (pp, dp_replicate, dp_shard, cp, tp) global ranks
    mine = None
    for pair in zip(ranks[0].flatten().tolist(), ranks[-1].flatten().tolist()):
        group = dist.new_group(list(pair))
        if dist.get_rank() in pair:
            mine = group
    return mine


def tied_ends(m, mmap=None) -> tuple:
    """(token embedding, output head) of a model part, None where the part lacks one."""
    if mmap is None:
        return m.tok_embeddings, m.output
    from runtime.module import part_at

    return part_at(m, mmap.embedding), part_at(m, mmap.head)


def sync_tied_grads(modules, group, mmap=None) -> None:
    """Add the first stage's and the last stage's gradients of the tied weight (each stage saw
    only its own use of it), so both copies take the same update."""
    for m in modules:
        for part in tied_ends(m, mmap):
            if part is None or part.weight.grad is None:
                continue
            grad = part.weight.grad
            if isinstance(grad, DTensor) and grad.placements != part.weight.placements:
                # a vocab-parallel embedding's gradient may come back replicated: lay it out like
                # the weight, as the other stage's is, so the two local tensors add up
                grad = grad.redistribute(part.weight.device_mesh, part.weight.placements)
                part.weight.grad = grad
            dist.all_reduce(grad.to_local() if isinstance(grad, DTensor) else grad, group=group)


def build_parts(plan: Plan, mesh, device: torch.device, seed: int):
    """The model parts this rank runs, parallelized per the plan and initialised."""
    spec = runnable_spec(plan)
    pp, tp = plan.mesh["pp"], plan.mesh["tp"]
    dp_mesh = data_parallel_mesh(mesh, plan.zero)  # (None: dp x cp is one rank, nothing to average over)
    pp_rank = mesh["pp"].get_local_rank()
    stages = my_stages(plan, pp_rank) if pp > 1 else [(0, 0, spec.layers)]
    last = len(plan.stages) - 1 if pp > 1 else 0
    recompute = {s.virtual_stage: s.recompute for s in plan.stages}
    modules, ids = [], []
    ep = int(plan.experts.get("ep", 1))
    emesh = expert_mesh(plan.mesh, plan.zero, ep, device.type) if ep > 1 else None
    for k, first, end in stages:
        m = stage_module(spec, first, end, has_embedding=k == 0, has_head=k == last) if pp > 1 else build_model(spec)
        if emesh is not None:
            apply_expert_parallel(m, emesh, tp)
        if plan.mode == "lora":  # after expert parallelism, whose experts are new parameters: frozen too
            apply_lora(m, plan.lora["targets"], int(plan.lora["rank"]))
        if tp > 1:
            apply_tensor_parallel(m, mesh["tp"], plan.placements, plan.sequence_parallel)
            m.tie_weights()  # before FSDP, which then manages the one shared parameter
            if plan.mode == "lora":
                freeze_base(m)
        apply_recompute(m, {key: recompute.get(k, "none") for key in m.layers.keys()})
        if plan.runtime == "paraplan-compile":  # each block under torch.compile, after AC and before FSDP (torchtitan's order)
            for block in m.layers.values():
                block.compile()
        if dp_mesh is not None:
            if emesh is not None:
                shard_experts(m, emesh, plan.zero, plan.precision)
            apply_data_parallel(m, dp_mesh, plan.zero, plan.precision)
        m.to_empty(device=device)
        m.tie_weights()  # to_empty gives plain tensors each their own copy (DTensors keep theirs)
        m.init_weights(seed)
        if plan.mesh["cp"] > 1:
            apply_context_parallel(m, context_shard(mesh, plan.seq_len))
        modules.append(m)
        ids.append(k)
    return modules, ids


def build_plan_parts(plan: Plan, mesh, device: torch.device, seed: int):
    """(model parts of this rank, their virtual stages, the user's module map or None): the
    built-in Transformer, or the module the plan's source names (runtime.module)."""
    if not plan.source:
        return (*build_parts(plan, mesh, device, seed), None)
    mmap = module_map_of(plan.source, plan.spec)
    stages = my_stages(plan, mesh["pp"].get_local_rank()) if plan.mesh["pp"] > 1 else [(0, 0, plan.spec.layers)]
    return (*build_user_parts(plan, mesh, device, seed, mmap, stages), mmap)


def _grad_norm_clip(modules, max_norm: float, pp_group, tied_copy: bool = False, mmap=None,
                    expert_group=None) -> float:
    """Clip by the global L2 norm. Gradients are grouped by (mesh, placements), one norm and
    one reduction per group (clip_grad_norm_ cannot stack norms of DTensors on different
    meshes); pipeline ranks then add their squares. `tied_copy`: the last stage's head is a
    copy of the first stage's embedding, counted there only."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    copies: list[torch.Tensor] = []
    ep_group = expert_group
    for m in modules:
        embedding, head = tied_ends(m, mmap)
        skip = head.weight if tied_copy and head is not None and embedding is None else None
        for name, p in m.named_parameters():
            if p is skip:
                if p.grad is not None:
                    copies.append(p.grad)
                continue
            if p.grad is not None:
                g = p.grad
                key = (id(g.device_mesh), tuple(g.placements)) if isinstance(g, DTensor) else ("local",)
                expert = ep_group is not None and is_expert_param(name)  # each ep rank holds other experts
                groups.setdefault((expert, *key), []).append(g)
    total = torch.zeros((), dtype=torch.float64)
    experts = torch.zeros((), dtype=torch.float64)
    for key, grads in groups.items():
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=False)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        if key[0]:
            experts += norm.double().cpu() ** 2
        else:
            total += norm.double().cpu() ** 2
    if ep_group is not None:
        experts = experts.to(_device_of(modules))
        dist.all_reduce(experts, group=ep_group)
        total += experts.cpu()
    if pp_group is not None:
        total = total.to(_device_of(modules))
        dist.all_reduce(total, group=pp_group)
        total = total.cpu()
    norm = float(total.sqrt())
    coef = min(1.0, max_norm / (norm + 1e-6))
    if coef < 1.0:
        for grads in [*groups.values(), copies]:
            for g in grads:
                g.mul_(coef)
    return norm


def _device_of(modules) -> torch.device:
    p = next(modules[0].parameters())
    return (p.to_local() if isinstance(p, DTensor) else p).device


def _forward_backward(modules, schedule, x, y, m_micro: int, autocast, device, has_first: bool, has_last: bool,
                      pp_group) -> torch.Tensor:
    """One step's forward and backward over its microbatches (the pipeline schedule's, or
    accumulated on one stage); the mean loss (on every pipeline rank)."""
    if schedule is None:
        loss = torch.zeros((), device=device)
        for xm, ym in zip(x.chunk(m_micro), y.chunk(m_micro)):
            with autocast:
                part = loss_fn(logits_of(modules[0](xm)), ym) / m_micro
            part.backward()
            loss += _local(part.detach())
        return loss
    mb_losses: list[torch.Tensor] = []
    kwargs = {"target": y, "losses": mb_losses} if has_last else {}
    if has_first:
        schedule.step(x, **kwargs)
    else:
        schedule.step(**kwargs)
    loss = torch.stack([_local(v.detach()) for v in mb_losses]).mean() if has_last else torch.zeros((), device=device)
    dist.all_reduce(loss, group=pp_group)  # only the last stage holds it
    return loss


def train(plan: Plan, cfg: RunConfig) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    problems = runnable_problems(plan, world)
    if problems:
        raise ConfigError(problems[0])
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    mesh = build_mesh(plan.mesh, device.type)
    spec = plan.spec
    pp = plan.mesh["pp"]
    dp = plan.mesh["dp_replicate"] * plan.mesh["dp_shard"]
    dp_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp")
    dp_rank = dp_mesh.get_local_rank()
    cp = plan.mesh["cp"]
    shard = context_shard(mesh, plan.seq_len) if cp > 1 else None
    modules, stage_ids, mmap = build_plan_parts(plan, mesh, device, cfg.seed)
    expert_group = ep_group_of(modules)
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)
                  for m in modules]
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, _lr_lambda(cfg)) for o in optimizers]
    pp_group = mesh["pp"].get_group() if pp > 1 else None
    tied_group = tied_pairs(plan, mesh)
    schedule = build_schedule(plan, modules, stage_ids, device, pp_group, loss_fn) if pp > 1 else None
    tokenizer = tokenizer_dir(plan.source["path"]) if plan.source.get("kind") == "hf" else None
    source = TokenSource(spec.vocab, plan.seq_len, cfg.data, cfg.seed, tokenizer=tokenizer)
    extra = {"step": 0}
    state = ckpt.TrainState(modules, optimizers, extra, ep=int(plan.experts.get("ep", 1)))
    if cfg.checkpoint_dir and rank == 0:  # the plan beside its checkpoints (export-weights reads it)
        from planner.files import atomic_write_text

        Path(cfg.checkpoint_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(str(Path(cfg.checkpoint_dir) / "plan.yaml"), plan.to_yaml())
    if cfg.resume and cfg.checkpoint_dir:
        found = ckpt.load_latest(cfg.checkpoint_dir, state)
        if found is not None:
            for s in schedulers:
                s.last_epoch = extra["step"] - 1
                s.step()
    has_first = 0 in stage_ids or pp == 1
    has_last = (len(plan.stages) - 1) in stage_ids or pp == 1
    m_micro = plan.schedule["num_microbatches"]
    losses, times, grad_norms = [], [], []
    # 16-bit compute: FSDP's mixed-precision policy where data parallel, autocast otherwise
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plan.precision)
    autocast = (torch.autocast(device.type, dtype=low) if low is not None and dp * cp == 1
                else contextlib.nullcontext())
    if cfg.metrics_path and rank == 0:  # (its folder made on the way, as the checkpoints' is)
        Path(cfg.metrics_path).parent.mkdir(parents=True, exist_ok=True)
    metrics = open(cfg.metrics_path, "a") if cfg.metrics_path and rank == 0 else None
    start_step = extra["step"]
    for step in range(start_step, cfg.steps):
        t0 = time.perf_counter()
        x, y = source.batch(step, plan.global_batch)
        x, y = dp_slice(x, dp_rank, dp).to(device), dp_slice(y, dp_rank, dp).to(device)
        if shard is not None:  # this rank's two chunks of every sequence, its targets with them
            x, y = shard.shard(x), shard.shard(y)
        try:
            with loss_parallel():  # acts on vocab-parallel (DTensor) logits only
                loss = _forward_backward(modules, schedule, x, y, m_micro, autocast, device, has_first, has_last,
                                         pp_group)
        except RuntimeError as exc:
            if not plan.source or step != start_step:
                raise
            # the user's module under the plan's split (a reshape to the whole hidden size, say)
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"the module {plan.source.get('target') or plan.source.get('path')} failed in its first "
                              f"step under this plan ({type(exc).__name__}: {first}); a module split over tp must "
                              "size its reshapes from its tensors (view(b, t, -1, head_dim)) or from head-count "
                              "attributes (n_heads, num_key_value_heads); or re-plan with --tp 1") from None
        if dp > 1:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG, group=dp_mesh.get_group())
        if shard is not None:  # each cp rank's mean over as many tokens: their mean is the sequence's
            dist.all_reduce(loss, op=dist.ReduceOp.AVG, group=shard.group)
        if tied_group is not None:
            sync_tied_grads(modules, tied_group, mmap)
        grad_norm = _grad_norm_clip(modules, cfg.grad_clip, pp_group, tied_copy=pp > 1 and spec.tied_embeddings,
                                    mmap=mmap, expert_group=expert_group)
        for o, s in zip(optimizers, schedulers):
            o.step()
            o.zero_grad(set_to_none=True)
            s.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        value = float(loss)
        losses.append(value)
        grad_norms.append(grad_norm)
        times.append(dt)
        extra["step"] = step + 1
        if cfg.log and rank == 0:
            print(f"step {step + 1:>5}  loss {value:.4f}  {dt * 1e3:8.1f} ms  "
                  f"{plan.global_batch * plan.seq_len / dt:10.0f} tokens/s", flush=True)
        if metrics is not None:
            record = {"step": step + 1, "loss": value, "grad_norm": grad_norm, "step_time_s": dt,
                      "tokens_per_s": plan.global_batch * plan.seq_len / dt}
            if device.type == "cuda":
                record["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        if cfg.checkpoint_dir and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            ckpt.save(cfg.checkpoint_dir, step + 1, state)
        if cfg.stop_after is not None and step + 1 >= cfg.stop_after:
            break
    if metrics is not None:
        metrics.close()
    measured = statistics.median(times[1:] if len(times) > 1 else times) if times else 0.0
    return {
        "losses": losses,
        "grad_norms": grad_norms,  # the global L2 norm of the gradients before clipping, each step
        "step_time_s": measured,
        "predicted_step_time_s": plan.predicted.get("step_time_s"),
        "tokens_per_s": plan.global_batch * plan.seq_len / measured if measured else 0.0,
        "world_size": world,
        "first_step": start_step + 1,
    }
