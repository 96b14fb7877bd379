"""Predicted against published: Korthikanti et al. 2022 Tables 4 and 5 on the a100-80g profile.

Prints one row per run with the published time, ours and the error. Run:
    python bench/korthikanti_fidelity.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from costmodel import Strategy, load_cluster, predict  # noqa: E402
from costmodel.layer import layer_cost  # noqa: E402
from golden_data import KORTHIKANTI_TABLE3, KORTHIKANTI_TABLE4_22B_MS, KORTHIKANTI_TABLE5_S, published_strategy  # noqa: E402
from planner.zoo import ZOO  # noqa: E402


def main() -> None:
    print("Korthikanti et al. 2022, Table 5 (iteration time, s), A100-80G, seq 2048, no FlashAttention")
    print("| model | GPUs | tp x pp (v) | recompute | published s | predicted s | error | predicted MFU |")
    print("|---|---|---|---|---|---|---|---|")
    errors = []
    for row in KORTHIKANTI_TABLE3:
        name, _a, _h, _l, tp, pp, gpus, batch, mb, v = row
        cluster = load_cluster(f"a100-80g:{gpus}", runtime="megatron-core")
        for i, recompute in enumerate(("full", "selective")):
            s = published_strategy(row, recompute)
            r = predict(ZOO[name], s, cluster)
            pub = KORTHIKANTI_TABLE5_S[name][i]
            err = r.step_time_s / pub - 1
            errors.append(abs(err))
            label = "full" if recompute == "full" else "SP + selective"
            print(f"| {name} | {gpus} | {tp} x {pp} ({v}) | {label} | {pub:.2f} | {r.step_time_s:.2f} | "
                  f"{100 * err:+.1f}% | {100 * r.mfu:.1f}% |")
    print(f"\nmax |error| {100 * max(errors):.1f}%, mean |error| {100 * sum(errors) / len(errors):.1f}%\n")

    print("Korthikanti et al. 2022, Table 4 (one 22B layer, tp 8, microbatch 4; ms)")
    print("| variant | published fwd | predicted fwd | published bwd | predicted bwd |")
    print("|---|---|---|---|---|")
    cluster = load_cluster("a100-80g:8", runtime="megatron-core")
    for key, (fwd, bwd) in KORTHIKANTI_TABLE4_22B_MS.items():
        sp = "sequence_parallel" in key
        recompute = {"full_recompute": "full"}.get(key, "selective" if "selective" in key else "none")
        s = Strategy(tp=8, global_batch=4, microbatch_size=4, sequence_parallel=sp, recompute=recompute,
                     flash_attention=False)
        layer = layer_cost(ZOO["megatron-22b"], s, cluster, cluster.group(8, 1), cluster.group(1, 8))
        print(f"| {key} | {fwd} | {1e3 * layer.forward.total:.2f} | {bwd} | {1e3 * layer.backward.total:.2f} |")


if __name__ == "__main__":
    main()
