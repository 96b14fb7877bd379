"""`paraplan generate`: sample from a built-in model with a KV cache and report what it cost."""

from __future__ import annotations

import argparse
import json
import sys

from costmodel import ConfigError, load_cluster
from costmodel.serving import ServingRequest, decode_step_s, kv_bytes_per_token
from planner.model_source import load_model_spec, source_of
from planner.zoo import ZOO


def run_continuous(args: argparse.Namespace) -> int:
    """`generate --workload`: serve a workload's requests on this machine with continuous
    batching (runtime.serve), and the traffic simulator's prediction of the same on --cluster."""
    import torch

    from costmodel.traffic import SchedulerConfig, ServingLayout, latency_percentiles, simulate_traffic
    from costmodel.workload import context_note, workload
    from runtime.generate import load_model
    from runtime.serve import serve

    if args.model not in ZOO:
        raise ConfigError(f"generate --workload runs the built-in models ({', '.join(ZOO)}); got '{args.model}'")
    spec = load_model_spec(args.model)
    if args.requests < 1 or args.kv_blocks < 1:
        raise ConfigError("--requests and --kv-blocks must be positive integers")
    reqs = workload(args.workload, rate=args.rate, requests=args.requests, context=spec.context_len, seed=args.seed)
    note = context_note(args.workload, reqs, spec.context_len)
    if note:
        print(f"paraplan: note: {note}", file=sys.stderr)
    cfg = SchedulerConfig(**{k: getattr(args, k) for k in ("max_num_seqs", "max_num_batched_tokens")
                             if getattr(args, k) is not None})
    torch.set_num_threads(args.threads)
    out = serve(load_model(spec, checkpoint=args.checkpoint, seed=args.seed), reqs, cfg, blocks=args.kv_blocks,
                seed=args.seed)
    cluster = load_cluster(args.cluster)
    predicted = simulate_traffic(spec, cluster, reqs, ServingLayout(precision="fp32"),
                                 SchedulerConfig(max_num_seqs=cfg.max_num_seqs,
                                                 max_num_batched_tokens=cfg.max_num_batched_tokens,
                                                 num_gpu_blocks_override=args.kv_blocks))
    result = {"requests": len(reqs), "iterations": out.iterations, "prefix_hit_tokens": out.prefix_hit_tokens,
              "measured": latency_percentiles(out.ttft_s, out.tpot_s, out.e2e_s, [len(t) for t in out.texts]),
              "predicted": latency_percentiles(predicted.ttft_s, predicted.tpot_s, predicted.e2e_s, predicted.outputs)}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{len(reqs)} requests of {args.workload} on {spec.name}, continuous batching: {out.iterations} "
              f"iterations, {out.prefix_hit_tokens} prompt tokens from the prefix cache")
        print("              measured p50/p90 ms      predicted p50/p90 ms   (" + args.cluster + ")")
        for key in ("ttft", "tpot", "e2e"):
            m, p = result["measured"], result["predicted"]
            print(f"  {key.upper():5s} {m[f'{key}_p50_s'] * 1e3:10.1f} {m[f'{key}_p90_s'] * 1e3:10.1f}   "
                  f"{p[f'{key}_p50_s'] * 1e3:12.1f} {p[f'{key}_p90_s'] * 1e3:10.1f}")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    if getattr(args, "workload", None):
        return run_continuous(args)
    import torch

    from runtime.generate import Sampling, decode, encode, generate, generate_hf, load_model

    source = source_of(args.model)
    if args.model not in ZOO and source.get("kind") != "hf":
        raise ConfigError(f"generate runs the built-in models ({', '.join(ZOO)}) and Hugging Face models "
                          f"(hf:DIR); got '{args.model}'")
    spec = load_model_spec(args.model)
    tokenizer = None
    if source.get("kind") == "hf":
        from runtime.data import tokenizer_dir

        folder = tokenizer_dir(source["path"])
        if folder is not None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder)
    if args.max_new_tokens < 1 or args.batch < 1:
        raise ConfigError("--max-new-tokens and --batch must be positive integers")
    sampling = Sampling(greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        seed=args.seed)
    if args.prompt_tokens:
        try:
            ids = [int(t) for t in args.prompt_tokens.split(",")]
        except ValueError:
            raise ConfigError("--prompt-tokens takes comma-separated integers, e.g. 72,101,108") from None
        if not ids or any(not 0 <= t < spec.vocab for t in ids):
            raise ConfigError(f"--prompt-tokens must be ids in [0, {spec.vocab})")
    else:
        ids = tokenizer(args.prompt)["input_ids"] if tokenizer is not None else encode(args.prompt, spec.vocab)
        if not ids:
            raise ConfigError("--prompt is empty; give some text or --prompt-tokens")
    torch.set_num_threads(args.threads)
    prompt = torch.tensor([ids] * args.batch)  # (B, P)
    if source.get("kind") == "hf":
        from runtime.hf_weights import load_hf_model, resolve_checkpoint

        checkpoint = resolve_checkpoint(args.checkpoint) if args.checkpoint else None
        out = generate_hf(load_hf_model(source["path"], checkpoint=checkpoint, seed=args.seed), prompt,
                          args.max_new_tokens, sampling)
    else:
        model = load_model(spec, checkpoint=args.checkpoint, seed=args.seed)
        out = generate(model, prompt, args.max_new_tokens, sampling)
    # the built-in model's cache is allocated for every token; transformers' grows with what it has
    # computed, which is not the last token sampled
    held = len(ids) + args.max_new_tokens - (1 if source.get("kind") == "hf" else 0)
    predicted_bytes = kv_bytes_per_token(spec, 4) * args.batch * held
    cluster = load_cluster(args.cluster)
    req = ServingRequest(prompt_len=len(ids), output_len=args.max_new_tokens, precision="fp32")
    predicted_step = decode_step_s(spec, cluster, req, 1, 1, args.batch, len(ids) + args.max_new_tokens / 2)
    result = {
        "texts": [tokenizer.decode(row.tolist()) if tokenizer is not None else decode(row.tolist())
                  for row in out.tokens],
        "tokens": out.tokens.tolist(),
        "prefill_s": out.prefill_s,
        "decode_step_s": out.decode_step_s,
        "predicted_decode_step_s": predicted_step,
        "kv_cache_bytes": out.cache_bytes,
        "predicted_kv_cache_bytes": predicted_bytes,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for text in result["texts"]:
            print(text)
        print(f"\n{args.batch} x ({len(ids)} + {args.max_new_tokens}) tokens; prefill {out.prefill_s * 1e3:.1f} ms, "
              f"decode {out.decode_step_s * 1e3:.2f} ms/step (predicted {predicted_step * 1e3:.2f} on {args.cluster}); "
              f"KV cache {out.cache_bytes} bytes (predicted {predicted_bytes})")
    return 0
