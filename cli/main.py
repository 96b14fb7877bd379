"""`paraplan`: the command line. Each subcommand parses its flags, calls the library, and
prints a table (or JSON with --json). Bad input of any kind ends in one line on stderr and
exit status 2."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from costmodel.errors import ConfigError

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line."""

    def error(self, message: str):  # noqa: D401 - argparse's signature
        raise ConfigError(f"{message}; see `{self.prog} --help`")


def add_strategy_flags(p: argparse.ArgumentParser) -> None:
    """The strategy flags shared by `plan` and `simulate` (docs/ARCHITECTURE.md)."""
    g = p.add_argument_group("strategy (given flags are fixed)")
    g.add_argument("--tp", type=int, help="tensor-parallel degree")
    g.add_argument("--pp", type=int, help="pipeline-parallel degree")
    g.add_argument("--dp", type=int, help="data-parallel degree (default: what the cluster leaves)")
    g.add_argument("--cp", type=int, help="context-parallel degree")
    g.add_argument("--ep", type=int, help="expert-parallel degree (mixtures of experts; folded into data parallelism)")
    g.add_argument("--expert-tp", type=int, help="experts' tensor-parallel degree: tp (default) or 1 (whole experts)")
    g.add_argument("--expert-load-cv", type=float,
                   help="spread of tokens per expert (coefficient of variation, default 0.25; 0: balanced routing)")
    g.add_argument("--ep-overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="all-to-alls overlapped with another microbatch's compute (Megatron-Core's 1F1B A2A "
                        "overlap, DualPipe; not run by paraplan's runtime)")
    g.add_argument("--zero", type=int, choices=(0, 1, 2, 3), help="ZeRO stage; 3 = FSDP full sharding")
    g.add_argument("--shard-group", type=int, help="HSDP: shard within groups of N data-parallel ranks")
    g.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=None,
                   help="Megatron sequence parallelism (default: on when tp > 1)")
    g.add_argument("--recompute", choices=("none", "selective", "full"), help="activation recomputation")
    g.add_argument("--microbatch-size", type=int, help="sequences per microbatch")
    g.add_argument("--schedule", choices=("gpipe", "1f1b", "interleaved", "zero-bubble"),
                   help="pipeline schedule (zero-bubble: torch's ScheduleInterleavedZeroBubble, with --virtual-stages V)")
    g.add_argument("--virtual-stages", type=int, help="model chunks per pipeline rank (interleaved, zero-bubble)")
    g.add_argument("--seq-len", type=int, help="sequence length (default: the model's)")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16", "fp8", "mxfp4"),
                   help="training precision; serving: the weights' (mxfp4: a mixture of experts' experts in MXFP4)")
    g.add_argument("--grad-dtype", choices=("fp32", "bf16"),
                   help="gradients and their reduction (default: the training runtime's)")
    g.add_argument("--master-dtype", choices=("fp32", "bf16"),
                   help="the optimizer's copy of the weights (bf16: none beside the 16-bit weights)")
    g.add_argument("--runtime", help="training-runtime profile that prices the plan: paraplan (default), "
                                     "llm-foundry, megatron-core, paraplan-compile, or a runtime YAML")
    g.add_argument("--flash-attention", action=argparse.BooleanOptionalAction, default=None,
                   help="fused attention without s x s tensors (default: on)")


def add_request_flags(g) -> None:
    """The served request's shape and targets (plan, simulate and report --mode inference)."""
    g.add_argument("--prompt-len", type=int, help="prompt tokens per request")
    g.add_argument("--output-len", type=int, help="generated tokens per request")
    g.add_argument("--max-ttft-ms", type=float, help="time-to-first-token target")
    g.add_argument("--max-tpot-ms", type=float, help="time-per-output-token target")
    g.add_argument("--max-model-len", type=int, help="the longest sequence served, prompt and output (vLLM's flag; "
                                                     "default the model's positions, its config's max_position_embeddings)")
    g.add_argument("--kv-cache-dtype", help="the KV cache's values: auto (the weights' precision, default), bf16, fp16 "
                                            "or fp8 (vLLM's flag: half the bytes of a bf16 cache)")
    g.add_argument("--gpu-memory-utilization", type=float,
                   help="the share of each GPU's memory the engine may use for weights, activations and the KV cache "
                        "(vLLM's flag, default 0.9)")


def add_mode_flags(p: argparse.ArgumentParser) -> None:
    """Pre-training (default), LoRA/QLoRA fine-tuning, or serving."""
    p.add_argument("--mode", choices=("train", "lora", "inference"), default="train",
                   help="pre-train (default), fine-tune with LoRA adapters, or serve")
    g = p.add_argument_group("fine-tuning (--mode lora)")
    g.add_argument("--lora-rank", type=int, help="adapter rank r (default 16)")
    g.add_argument("--lora-targets", help="comma list of q,k,v,o,up,gate,down (default q,k,v,o)")
    g.add_argument("--base-precision", choices=("bf16", "nf4"), help="frozen base weights: bf16, or nf4 (QLoRA)")
    g = p.add_argument_group("serving (--mode inference)")
    add_request_flags(g)
    g.add_argument("--batch", type=int, help="sequences per replica (default: the best the KV cache allows)")
    g.add_argument("--beam", type=int, help="beam width (multiplies the KV cache of the output)")
    g.add_argument("--block-size", type=int, help="paged KV block, tokens (default 16)")
    g.add_argument("--draft-model", help="speculative decoding: a draft model, ngram (drafts looked up in the prompt), "
                                         "eagle:HEAD / eagle3:HEAD (an EAGLE head's checkpoint) or mtp (the model's "
                                         "own next-token module: DeepSeek-V3, GLM-4.5)")
    g.add_argument("--draft-len", type=int, help="speculative decoding: tokens drafted per step (gamma, default 4)")
    g.add_argument("--acceptance", type=float, help="speculative decoding: the chance each drafted token is accepted "
                                                    "(default 0.6, published EAGLE heads on chat prompts)")
    g.add_argument("--acceptance-length", type=float,
                   help="speculative decoding: tokens a check emits on average, drafts accepted plus the target's own "
                        "(vLLM's 'Mean acceptance length' at this --draft-len); instead of --acceptance")
    g.add_argument("--expert-parallel", action="store_true", default=None,
                   help="a mixture of experts' experts held whole, experts/tp per GPU (vLLM's "
                        "--enable-expert-parallel); plan searches it")
    g = p.add_argument_group("serving under traffic (--mode inference --workload)")
    g.add_argument("--workload", help="chat, long-context, agent, random:PROMPT/OUTPUT (fixed lengths, vLLM's "
                                      "benchmark random dataset), or a trace FILE (.csv/.jsonl: arrival_s, "
                                      "prompt_tokens, output_tokens[, prefix_id, prefix_tokens])")
    g.add_argument("--rate", type=float, help="requests per second of a scenario (inf: all at once)")
    g.add_argument("--requests", type=int, help="requests simulated (default 2000)")
    g.add_argument("--concurrency", type=int, help="simulate: at most this many requests in flight, the next sent when "
                                                    "one finishes (a benchmark client's --max-concurrency; with "
                                                    "--rate inf a closed loop of that many users)")
    g.add_argument("--burst-cv", type=float, help="arrival gaps' coefficient of variation (default 1: Poisson)")
    g.add_argument("--workload-seed", type=int, help="seed of the generated workload (default 0)")
    g.add_argument("--slo", help="latency objectives, e.g. ttft_p99=0.5,tpot_p99=50ms (seconds or ms)")
    g.add_argument("--replicas", type=int, help="model replicas (default: every GPU used)")
    g.add_argument("--prefill-replicas", type=int, help="of the replicas, how many only prefill (disaggregated)")
    g.add_argument("--max-num-seqs", type=int, help="sequences in an iteration (vLLM's flag; default vLLM's for the "
                                                    "GPU: 1024 on one of >= 70 GiB but an A100, 256 otherwise)")
    g.add_argument("--max-num-batched-tokens", type=int, help="tokens in an iteration (vLLM's flag; default vLLM's for "
                                                              "the GPU: 8192, or 2048 where max-num-seqs is 256)")
    g.add_argument("--chunked-prefill", action=argparse.BooleanOptionalAction, default=None,
                   help="split prompts over iterations beside the decodes (default on, as vLLM V1)")
    g.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="reuse cached prefixes (default on)")
    g.add_argument("--preemption", choices=("recompute", "swap"), help="when KV blocks run out (default recompute)")
    g.add_argument("--num-scheduler-steps", type=int,
                   help="vLLM 0.6-0.10's multi-step scheduling: decode steps run at a time, requests admitted "
                        "between runs (default 1)")
    g.add_argument("--evicted-prefix", choices=("drop", "host"),
                   help="a cached prefix evicted from the GPU: forgotten (default) or kept in host memory")
    g.add_argument("--engine", help="inference: the serving engine whose share of the GPU prices prefill and decode: "
                                    "vllm (default; fitted to published vLLM 0.11 runs) or tensorrt-llm "
                                    "(profiles/serving)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="paraplan", description="Plan, predict and run parallel transformer training.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    plan = sub.add_parser("plan", help="search for the fastest plan that fits")
    plan.add_argument("--model", help="zoo name, spec .yaml/.json, HF config.json, hf:MODEL_DIR or py:MODULE:CALLABLE")
    plan.add_argument("--cluster", help="DEVICE:COUNT (e.g. a100-80g:1024) or a cluster YAML")
    plan.add_argument("--global-batch", type=int, help="sequences per step")
    add_strategy_flags(plan)
    plan.add_argument("--from", dest="from_engine", nargs=2, metavar=("ENGINE", "FILE_OR_ARGS"),
                      help="start from a torchtitan/megatron/deepspeed config: price it, then say what to change")
    plan.add_argument("--time-limit", type=float, metavar="S", help="stop searching after S seconds, keep the best")
    plan.add_argument("-o", "--output", metavar="PLAN", help="write the plan YAML here")
    plan.add_argument("--no-timing", action="store_true", help="leave wall-clock times out of the plan (byte-identical reruns)")
    plan.add_argument("--json", action="store_true", help="print JSON for scripts")
    add_mode_flags(plan)
    prof = sub.add_parser("profile", help="measure this machine into a hardware profile")
    prof.add_argument("-o", "--output", required=True, metavar="PROFILE", help="profiles/NAME.yaml")
    prof.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    prof.add_argument("--quick", action="store_true", help="fewer sizes (under 2 minutes on a CPU)")
    prof.add_argument("--extends", help="the datasheet profile the measurements override (default: cpu / h100-sxm)")
    rep = sub.add_parser("report", help="compare strategies (or serving layouts) in tables and pictures")
    rep.add_argument("plan", nargs="?", metavar="PLAN",
                     help="a plan YAML: its model, cluster and batch (or serving setup), the plan ranked among the rest")
    rep.add_argument("--model")
    rep.add_argument("--cluster")
    rep.add_argument("--global-batch", type=int, help="training: sequences per step")
    rep.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for report.md, CSV and PNGs")
    rep.add_argument("--runtime", help="training-runtime profile (default paraplan)")
    rep.add_argument("--format", default="md", help="md, html or md,html")
    rep.add_argument("--json", action="store_true")
    rep.add_argument("--mode", choices=("train", "inference"), default="train",
                     help="training strategies (default) or serving layouts")
    g = rep.add_argument_group("serving (--mode inference): the steady state at --prompt-len/--output-len, or "
                               "under traffic with --workload")
    add_request_flags(g)
    g.add_argument("--workload", help="chat, long-context, agent, random:PROMPT/OUTPUT, or a trace FILE: the goodput planner's unit "
                                      "against the steady-state planner's, latency against rate, a timeline")
    g.add_argument("--rate", type=float, help="requests per second to deploy for (default: the scenario's)")
    g.add_argument("--slo", help="latency objectives, e.g. ttft_p99=1,tpot_p99=50ms (default: the scenario's)")
    g.add_argument("--engine", help="serving engine profile: vllm (default) or tensorrt-llm")
    g.add_argument("--precision", choices=("bf16", "fp16", "fp8", "mxfp4"),
                   help="the weights' (default bf16, or what a checkpoint's quantization_config says)")
    cmp_ = sub.add_parser("compare", help="plans side by side")
    cmp_.add_argument("plans", nargs="+", metavar="PLAN")
    cmp_.add_argument("--json", action="store_true")
    chk = sub.add_parser("check", help="list every reason a plan cannot run on a cluster")
    chk.add_argument("plan", help="a plan YAML")
    chk.add_argument("--cluster", help="DEVICE:COUNT or a cluster YAML (default: the plan's)")
    chk.add_argument("--json", action="store_true")
    rep_ = sub.add_parser("replan", help="plan the same model and batch for a new GPU count")
    rep_.add_argument("plan", help="the plan YAML in use")
    rep_.add_argument("--gpus", type=int, help="the GPU count now available (default: --cluster's)")
    rep_.add_argument("--cluster", help="the new cluster (default: the plan's device with --gpus of them)")
    rep_.add_argument("--time-limit", type=float, metavar="S", help="stop searching after S seconds, keep the best")
    rep_.add_argument("-o", "--output", metavar="PLAN", help="write the new plan YAML here")
    rep_.add_argument("--json", action="store_true")
    gen = sub.add_parser("generate", help="sample text from a built-in or Hugging Face model with a KV cache")
    gen.add_argument("--model", required=True, help="a built-in model (tiny-gpt, tiny-llama, ...) or hf:MODEL_DIR")
    gen.add_argument("--prompt", default="Hello", help="prompt text (its UTF-8 bytes are the tokens)")
    gen.add_argument("--prompt-tokens", help="comma-separated token ids instead of --prompt")
    gen.add_argument("--max-new-tokens", type=int, default=16)
    gen.add_argument("--batch", type=int, default=1, help="sequences generated together")
    gen.add_argument("--greedy", action="store_true", help="always the most likely token")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (0: all)")
    gen.add_argument("--top-p", type=float, default=1.0, help="sample within this probability mass (nucleus)")
    gen.add_argument("--seed", type=int, default=0, help="weights (without --checkpoint) and sampling")
    gen.add_argument("--checkpoint", help="a `paraplan run --checkpoint-dir` folder (its latest checkpoint)")
    gen.add_argument("--threads", type=int, default=1, help="CPU threads")
    gen.add_argument("--cluster", default="cpu-2core:1", help="the profile the decode step is predicted on")
    gen.add_argument("--json", action="store_true")
    g = gen.add_argument_group("continuous batching (several requests arriving over time)")
    g.add_argument("--workload", help="chat, long-context, agent, random:PROMPT/OUTPUT or a trace file: serve its requests with "
                                      "iteration-level scheduling and a paged KV cache")
    g.add_argument("--rate", type=float, help="requests per second of a scenario")
    g.add_argument("--requests", type=int, default=20, help="requests of a scenario (default 20)")
    g.add_argument("--max-num-seqs", type=int, help="sequences in an iteration (default 256)")
    g.add_argument("--max-num-batched-tokens", type=int, help="tokens in an iteration (default 8192)")
    g.add_argument("--kv-blocks", type=int, default=1024, help="paged KV blocks of 16 tokens (default 1024)")
    run = sub.add_parser("run", help="train a plan on torch.distributed (torchrun)")
    run.add_argument("plan", help="a plan YAML")
    run.add_argument("--steps", type=int, default=10)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--data", help="tokens (.npy/.bin) or a text file (bytes); default synthetic")
    run.add_argument("--checkpoint-dir")
    run.add_argument("--checkpoint-every", type=int, default=0)
    run.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    run.add_argument("--metrics", help="append a JSON line per step here")
    run.add_argument("--nnodes", type=int, help="nodes (multi-node torchrun)")
    run.add_argument("--node-rank", type=int, default=0)
    run.add_argument("--rdzv-endpoint", help="HOST:PORT of the rendezvous (multi-node)")
    run.add_argument("--max-restarts", type=int, default=0)
    run.add_argument("--json", action="store_true", help="print the summary as JSON")
    sim = sub.add_parser("simulate", help="predict one training step of a plan or of a strategy")
    sim.add_argument("--plan", help="a plan YAML (its model, cluster and strategy)")
    sim.add_argument("--model", help="zoo name, spec .yaml/.json, HF config.json, hf:MODEL_DIR or py:MODULE:CALLABLE")
    sim.add_argument("--cluster", help="DEVICE:COUNT (e.g. a100-80g:1024) or a cluster YAML")
    sim.add_argument("--global-batch", type=int, help="sequences per step (default: dp * microbatch size)")
    add_strategy_flags(sim)
    add_mode_flags(sim)
    sim.add_argument("--from", dest="from_engine", nargs=2, metavar=("ENGINE", "FILE_OR_ARGS"),
                     help="price an engine's config: torchtitan TOML, Megatron-LM arguments (a file or the quoted "
                          "line), DeepSpeed JSON")
    sim.add_argument("--trace", metavar="FILE", help="write a Chrome/Perfetto trace of the step")
    sim.add_argument("-o", "--output", metavar="PLAN", help="write the strategy as a plan YAML")
    sim.add_argument("--json", action="store_true", help="print JSON for scripts")
    ew = sub.add_parser("export-weights", help="write a Hugging Face model's checkpoint as a from_pretrained folder")
    ew.add_argument("checkpoint", help="a `paraplan run --checkpoint-dir` folder (its newest checkpoint) or a step_N folder")
    ew.add_argument("-o", "--output", required=True, metavar="DIR", help="a new folder for config.json + model.safetensors")
    ew.add_argument("--plan", help="the plan it was trained under (default: the plan.yaml kept beside the checkpoints)")
    exp = sub.add_parser("export", help="write a plan as an engine's config (torchtitan, megatron, deepspeed, vllm)")
    exp.add_argument("plan", help="a plan YAML")
    exp.add_argument("--to", required=True, choices=("torchtitan", "megatron", "deepspeed", "vllm"))
    exp.add_argument("-o", "--output", metavar="FILE", help="write here (default: standard output)")
    return parser


def main(argv: list[str] | None = None) -> int:
    # transformers' own warnings and progress bars are not paraplan's output (its errors are one
    # line); set before transformers is first imported here or in the workers run starts
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        commands = {"plan": ("plan", "run_plan"), "profile": ("profile", "run_profile"),
                    "report": ("report", "run_report"), "compare": ("report", "run_compare"),
                    "run": ("run", "run_run"), "generate": ("generate", "run_generate"),
                    "check": ("check", "run_check"), "replan": ("replan", "run_replan"),
                    "simulate": ("simulate", "run_simulate"),
                    "export": ("engines", "run_export"), "export-weights": ("weights", "run_export_weights")}
        if args.command in commands:
            module, function = commands[args.command]
            return getattr(importlib.import_module(f"cli.commands.{module}"), function)(args)
        raise ConfigError(f"unknown command {args.command}")
    except ConfigError as exc:
        one_line = " ".join(str(exc).split())  # names from user files may carry newlines
        print(f"paraplan: error: {one_line}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("paraplan: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
