"""Decode step time on this CPU: `paraplan generate`'s KV-cache decoding of a small GPT and
Llama (one process, one thread) against the serving cost model's prediction
(costmodel.serving.decode_step_s) on the measured profile. Run:
    python bench/decode_speed.py [--profile cpu-2core]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from costmodel import load_cluster  # noqa: E402
from costmodel.serving import ServingRequest, decode_step_s  # noqa: E402
from costmodel.spec import ModelSpec, llama_spec  # noqa: E402
from runtime.generate import Sampling, generate, load_model  # noqa: E402

MODELS = [
    ModelSpec(name="bench-gpt", layers=4, hidden=256, heads=8, vocab=1024, seq_len=512, tied_embeddings=False,
              dropout=False),
    llama_spec("bench-llama", layers=4, hidden=512, heads=8, kv_heads=2, ffn_hidden=1408, vocab=2048, seq_len=512),
]
PROMPT, NEW = 192, 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="cpu-2core")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cluster = load_cluster(f"{args.profile}:1")
    print(f"prompt {PROMPT}, {NEW} new tokens, fp32, one thread; profile {args.profile}")
    print("| model | batch | predicted ms/token | measured ms/token | error |")
    print("|---|---|---|---|---|")
    errors = []
    for spec in MODELS:
        model = load_model(spec)
        for batch in (1, 4, 16):
            prompt = torch.randint(0, 256, (batch, PROMPT), generator=torch.Generator().manual_seed(0))
            runs = [generate(model, prompt, NEW, Sampling(greedy=True)).decode_step_s for _ in range(3)]
            measured = statistics.median(runs)
            req = ServingRequest(prompt_len=PROMPT, output_len=NEW, precision="fp32")
            predicted = decode_step_s(spec, cluster, req, 1, 1, batch, PROMPT + NEW / 2)
            err = 100 * (predicted / measured - 1)
            errors.append(abs(err))
            print(f"| {spec.name} | {batch} | {predicted * 1e3:.2f} | {measured * 1e3:.2f} | {err:+.1f}% |", flush=True)
    print(f"median |error| {statistics.median(errors):.1f}%, max |error| {max(errors):.1f}%")


if __name__ == "__main__":
    main()
