"""`paraplan export-weights CKPT -o DIR`: a trained Hugging Face model back as a folder that
`AutoModelForCausalLM.from_pretrained` loads."""

from __future__ import annotations

import argparse

from planner.plan import Plan


def run_export_weights(args: argparse.Namespace) -> int:
    from runtime.hf_weights import export_weights

    plan = Plan.load(args.plan) if args.plan else None
    out = export_weights(args.checkpoint, args.output, plan)
    print(f"wrote {out} (config.json, model.safetensors); load it with AutoModelForCausalLM.from_pretrained")
    return 0
