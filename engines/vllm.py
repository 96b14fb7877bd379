"""vLLM: a serving plan as the `vllm serve` command line.

The serving model prices vLLM's paged KV cache with `gpu_memory_utilization` 0.9 of the GPU
(costmodel.serving), so that is what is exported; replicas are separate `vllm serve`
processes (or `--data-parallel-size`), one per replica.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

from costmodel.errors import ConfigError
from planner.plan import Plan
from engines.common import json_object
from planner.model_source import EAGLE_METHODS, MTP, NGRAM, checkpoint_weights
from planner.zoo import HUB_IDS

_VLLM_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16"}  # what the export writes for a 16-bit dtype
NGRAM_LOOKUP = 4  # the longest prompt n-gram vLLM's n-gram proposer matches (its prompt_lookup_max)


def commands(plan: Plan, *, model_path: str | None = None) -> list[list[str]]:
    """The `vllm serve` command of each kind of instance the serving plan runs: one, or a
    prefill and a decode instance for a disaggregated plan (vLLM's disaggregated prefill over a
    KV connector, experimental there; a proxy sends each request to a prefill instance, then to
    a decode one)."""
    if plan.mode != "inference":
        raise ConfigError("vLLM serves; this is a training plan: export it --to torchtitan, megatron or deepspeed "
                          "(or plan with --mode inference)")
    from planner.serving_plan import serving_setup

    setup = serving_setup(plan, "the serving plan")  # refuses a missing or wrong field in one line
    sv = plan.serving
    prompt, output = setup.request.prompt_len, setup.request.output_len
    traffic = setup.traffic  # planned for a workload: requests of any length up to the context
    max_len = plan.spec.context_len if traffic else prompt + output
    name = str(plan.model.get("name", "MODEL"))  # a built-in model by its Hub checkpoint, another by its directory
    model = model_path or sv.get("model_path") or _model_name(name)
    cmd = ["vllm", "serve", model,
           "--tensor-parallel-size", plan.mesh["tp"], "--pipeline-parallel-size", plan.mesh["pp"],
           "--max-num-seqs", sv.get("max_num_seqs", plan.schedule["microbatch_size"]), "--max-model-len", max_len,
           "--block-size", int(sv.get("block_tokens", 16)),
           "--gpu-memory-utilization", setup.request.gpu_memory_utilization,
           "--dtype", _VLLM_DTYPE_NAMES.get(plan.precision, "auto")]
    path = sv.get("model_path")
    if plan.precision == "fp8" and not (path and checkpoint_weights(f"hf:{path}") == "fp8"):
        cmd += ["--quantization", "fp8"]  # vLLM quantizes a 16-bit checkpoint's weights to fp8 as it loads them
        # (an fp8 checkpoint says so in its config, and vLLM refuses a flag that names another method)
    if traffic:
        cmd += ["--max-num-batched-tokens", sv["max_num_batched_tokens"],
                "--enable-chunked-prefill" if sv.get("chunked_prefill", True) else "--no-enable-chunked-prefill",
                "--enable-prefix-caching" if sv.get("prefix_caching", True) else "--no-enable-prefix-caching"]
    if setup.request.kv_cache_dtype != "auto":
        cmd += ["--kv-cache-dtype", {"fp8": "fp8", **_VLLM_DTYPE_NAMES}[setup.request.kv_cache_dtype]]
    if sv.get("expert_parallel"):  # the experts whole over the tp GPUs (costmodel.serving)
        cmd += ["--enable-expert-parallel"]
    if sv.get("draft_model"):  # a draft model by its Hub checkpoint, or n-gram proposals from the prompt
        k = int(sv.get("draft_len", 4))
        method, sep, head = sv["draft_model"].partition(":")
        if sv["draft_model"] == NGRAM:
            proposer = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": NGRAM_LOOKUP}
        elif sv["draft_model"] == MTP:  # the model's own next-token module
            proposer = {"method": "mtp", "num_speculative_tokens": k}
        elif sep and method in EAGLE_METHODS:  # an EAGLE head's checkpoint
            proposer = {"method": method, "model": head, "num_speculative_tokens": k}
        else:
            proposer = {"model": _model_name(sv["draft_model"]), "num_speculative_tokens": k}
        cmd += ["--speculative-config", json.dumps(proposer, separators=(",", ":"))]
    replicas, prefill = int(sv.get("replicas", 1)), int(sv.get("prefill_replicas", 0))

    def data_parallel(count: int) -> list:
        # under expert parallelism vLLM spreads the experts over data-parallel x tp GPUs: the plan's
        # replicas (experts whole within each) are then separate instances, one per replica
        return ["--data-parallel-size", count] if count > 1 and not sv.get("expert_parallel") else []

    if not prefill:
        return [[str(c) for c in cmd + data_parallel(replicas)]]
    kv = ["--kv-transfer-config", json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_both"},
                                             separators=(",", ":"))]
    out = []
    for count in (prefill, replicas - prefill):
        out.append([str(c) for c in cmd + kv + data_parallel(count)])
    return out


def _model_name(name: str) -> str:
    """What `vllm serve` loads for a model paraplan names: a Hugging Face directory (hf:DIR) as
    its path, a built-in model as its Hub checkpoint, another name as it is."""
    return name[3:] if name.startswith("hf:") else HUB_IDS.get(name, name)


def export(plan: Plan, *, model_path: str | None = None) -> list[str]:
    """The `vllm serve` command for a serving plan (a disaggregated plan's prefill instance)."""
    return commands(plan, model_path=model_path)[0]


def export_text(plan: Plan) -> str:
    runs = commands(plan)
    sv = plan.serving
    if len(runs) == 1:
        replicas = int(sv.get("replicas", 1))
        each = (f"# {replicas} instances of this command, one per replica (with --data-parallel-size vLLM would "
                "spread the experts over every replica's GPUs)\n" if sv.get("expert_parallel") and replicas > 1 else "")
        return each + " ".join(shlex.quote(c) for c in runs[0]) + "\n"
    return (f"# prefill instances ({sv['prefill_replicas']} replica(s)); a proxy sends each request here first\n"
            + " ".join(shlex.quote(c) for c in runs[0]) + "\n"
            + f"# decode instances ({int(sv['replicas']) - int(sv['prefill_replicas'])} replica(s))\n"
            + " ".join(shlex.quote(c) for c in runs[1]) + "\n")


# --- a `vllm serve` command read back: the layout and engine arguments it serves with -----------
@dataclass(frozen=True, slots=True, kw_only=True)
class ServeCommand:
    """What one `vllm serve` instance runs, as the traffic simulator prices it; None where the
    command leaves it to vLLM's default. `unknown`: settings read but not priced, listed."""

    model: str
    tp: int = 1
    pp: int = 1
    dp: int = 1  # --data-parallel-size: replicas of the instance
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    block_size: int | None = None
    chunked_prefill: bool | None = None
    prefix_caching: bool | None = None
    expert_parallel: bool = False
    num_scheduler_steps: int | None = None  # vLLM 0.6-0.10's multi-step scheduling
    max_model_len: int | None = None  # the longest sequence it serves
    precision: str | None = None  # from --dtype
    kv_cache_dtype: str | None = None  # from --kv-cache-dtype (its fp8 formats alike: one byte a value)
    gpu_memory_utilization: float | None = None
    draft_model: str | None = None  # --speculative-config's draft model (its Hub id), or "ngram"
    speculative_tokens: int | None = None  # and its num_speculative_tokens
    unknown: tuple[str, ...] = ()


_INT_FLAGS = {"--tensor-parallel-size": "tp", "-tp": "tp", "--pipeline-parallel-size": "pp", "-pp": "pp",
              "--data-parallel-size": "dp", "-dp": "dp", "--max-num-seqs": "max_num_seqs",
              "--max-num-batched-tokens": "max_num_batched_tokens", "--block-size": "block_size",
              "--num-scheduler-steps": "num_scheduler_steps", "--max-model-len": "max_model_len"}
_BOOL_FLAGS = {"--enable-chunked-prefill": ("chunked_prefill", True), "--no-enable-chunked-prefill": ("chunked_prefill", False),
               "--enable-prefix-caching": ("prefix_caching", True), "--no-enable-prefix-caching": ("prefix_caching", False),
               "--enable-expert-parallel": ("expert_parallel", True)}
# settings of the server that do not change what an iteration costs: whether each takes a value
_NO_COST = {"--host": True, "--port": True, "--served-model-name": True, "--api-key": True,
            "--disable-log-requests": False, "--disable-log-stats": False, "--trust-remote-code": False,
            "--uvicorn-log-level": True, "--tokenizer": True, "--download-dir": True, "--seed": True,
            "--revision": True, "--swap-space": True,
            "--chat-template": True}
_DTYPES = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "half": "fp16", "fp16": "fp16", "auto": None}
_KV_DTYPES = {"auto": "auto", "fp8": "fp8", "fp8_e4m3": "fp8", "fp8_e5m2": "fp8", "bfloat16": "bf16", "float16": "fp16"}
_CHOICE_FLAGS = {"--dtype": ("precision", _DTYPES), "--kv-cache-dtype": ("kv_cache_dtype", _KV_DTYPES),
                 "--quantization": ("quantization", {"fp8": "fp8", "mxfp4": "mxfp4"})}  # W8A8 fp8; MXFP4 experts


def _speculative(raw: str) -> tuple[str, int] | None:
    """(draft model, "ngram", "eagle:HEAD" / "eagle3:HEAD" or "mtp", proposed tokens) of a
    --speculative-config JSON; None for a proposer not priced (Medusa)."""
    config = json_object(raw, "the vllm command's --speculative-config")
    k = config.get("num_speculative_tokens")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"the vllm command's --speculative-config needs num_speculative_tokens >= 1, got {k!r}")
    method = config.get("method")
    if method in ("ngram", "[ngram]") or config.get("model") in ("ngram", "[ngram]"):
        return NGRAM, k
    if method in (None, "draft_model") and isinstance(config.get("model"), str):
        return config["model"], k
    if method in EAGLE_METHODS and isinstance(config.get("model"), str):
        return f"{method}:{config['model']}", k
    if isinstance(method, str) and (method == MTP or method.endswith("_mtp")):  # mtp; deepseek_mtp, glm4_moe_mtp, ...
        return MTP, k
    return None


def import_serve(text: str) -> ServeCommand:
    """A `vllm serve MODEL ...` command (or `python -m vllm.entrypoints.openai.api_server --model
    MODEL ...`) read back; flags as `--flag value` or `--flag=value`."""
    try:
        tokens = shlex.split(text.replace("\\\n", " "), comments=True)
    except ValueError as exc:
        raise ConfigError(f"the vllm command does not parse as a shell line ({exc})") from None
    if "serve" in tokens and tokens.index("serve") + 1 < len(tokens) and \
            not tokens[tokens.index("serve") + 1].startswith("-"):
        at = tokens.index("serve")
        model, rest = tokens[at + 1], tokens[at + 2:]
    else:  # `python -m vllm.entrypoints.openai.api_server --model M ...`: from the first --flag
        model = ""
        rest = tokens[next((i for i, t in enumerate(tokens) if t.startswith("--")), len(tokens)):]
    known = (set(_INT_FLAGS) | set(_BOOL_FLAGS) | set(_NO_COST) | set(_CHOICE_FLAGS)
             | {"--model", "--gpu-memory-utilization", "--speculative-config"})
    fields: dict = {}
    unknown: list[str] = []
    i = 0
    while i < len(rest):
        token = rest[i]
        flag, eq, inline = token.partition("=")
        i += 1
        if flag.startswith("--"):  # vLLM's parser takes snake_case names and unique prefixes, as argparse does
            flag = "--" + flag[2:].replace("_", "-")
            if flag not in known:
                matches = [k for k in known if k.startswith(flag)]
                flag = matches[0] if len(matches) == 1 else flag

        def value() -> str:
            nonlocal i
            if eq:
                return inline
            if i >= len(rest):
                raise ConfigError(f"the vllm command's {flag} has no value")
            i += 1
            return rest[i - 1]

        if flag == "--model":
            model = value()
        elif flag in _INT_FLAGS:
            raw = value()
            try:
                fields[_INT_FLAGS[flag]] = int(raw)
            except ValueError:
                raise ConfigError(f"the vllm command's {flag} {raw!r} is not an integer") from None
        elif flag in _BOOL_FLAGS:
            name, on = _BOOL_FLAGS[flag]
            fields[name] = on
        elif flag in _CHOICE_FLAGS:
            name, choices = _CHOICE_FLAGS[flag]
            raw = value()
            if raw not in choices:
                unknown.append(f"{flag} {raw}")
            else:
                fields[name] = choices[raw]
        elif flag == "--gpu-memory-utilization":
            raw = value()
            try:
                fields["gpu_memory_utilization"] = float(raw)
            except ValueError:
                raise ConfigError(f"the vllm command's --gpu-memory-utilization {raw!r} is not a number") from None
            if not 0 < fields["gpu_memory_utilization"] <= 1:
                raise ConfigError(f"the vllm command's --gpu-memory-utilization {raw} is not a share in (0, 1]")
        elif flag == "--speculative-config":
            raw = value()
            got = _speculative(raw)
            if got is None:
                unknown.append(f"{flag} {raw}")
            else:
                fields["draft_model"], fields["speculative_tokens"] = got
        elif flag in _NO_COST:
            if _NO_COST[flag]:
                value()
        elif flag.startswith("-"):
            takes = i < len(rest) and not rest[i].startswith("-") and not eq
            unknown.append(f"{flag} {rest[i]}" if takes else token)
            if takes:
                i += 1
        else:
            unknown.append(token)
    if not model:
        raise ConfigError("the vllm command names no model: write `vllm serve MODEL ...`")
    quantization = fields.pop("quantization", None)
    if quantization in ("fp8", "mxfp4"):  # fp8 weights and GEMMs (the activations and cache 16-bit); MXFP4 experts
        fields["precision"] = quantization

    for name in dict.fromkeys(_INT_FLAGS.values()):
        if name in fields and fields[name] < 1:
            raise ConfigError(f"the vllm command's {name.replace('_', '-')} must be a positive integer, "
                              f"got {fields[name]}")
    return ServeCommand(model=model, unknown=tuple(unknown), **fields)
