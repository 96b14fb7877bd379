"""Regenerate the gallery under reports/gallery/ (one command):

    python -m reports.gallery
"""

from __future__ import annotations

import sys
from pathlib import Path

from costmodel import load_cluster
from planner.zoo import ZOO
from reports.build import build_report

GALLERY = [
    ("gpt3-175b", "a100-80g:1024", 1536),
    ("llama3-70b", "h100-sxm:64", 256),
    ("llama3-8b", "a100-40g:8", 64),
    ("llama3-405b", "h100-sxm:2048", 2048),
]


def main() -> int:
    root = Path(__file__).resolve().parent / "gallery"
    serving_only = "--serving" in sys.argv  # regenerate only the serving report
    index = ["# Gallery", "", "Regenerate with `python -m reports.gallery` (`--serving`: only the serving report).", ""]
    if serving_only and (root / "README.md").exists():
        index = [line for line in (root / "README.md").read_text().splitlines()
                 if line and "serving" not in line and not line.startswith(("# ", "Regenerate"))]
        index = ["# Gallery", "", "Regenerate with `python -m reports.gallery` (`--serving`: only the serving report).", "",
                 *index]
    for model, cluster, batch in ([] if serving_only else GALLERY):
        name = f"{model}_{cluster.replace(':', '-')}"
        summary = build_report(ZOO[model], load_cluster(cluster), batch, root / name, ("md", "html"))
        print(f"{name}: {summary['strategies']} strategies, {summary['fitting']} fit, best {summary['best']}, "
              f"{summary['seconds']:.1f} s", flush=True)
        index.append(f"- [{model} on {cluster}, global batch {batch}]({name}/report.md): best {summary['best']}")
    from costmodel.serving import ServingRequest
    from reports.serving import build_serving_report

    req = ServingRequest(prompt_len=1024, output_len=256, max_tpot_ms=50)
    best = build_serving_report(ZOO["llama2-70b"], ["h100-sxm:4", "h100-sxm:8"], req, root / "serving_llama2-70b_h100")
    for cluster, d in best.items():
        print(f"serving llama2-70b on {cluster}: tp{d['tp']} x pp{d['pp']}, batch {d['batch']}, "
              f"{d['throughput_tokens_per_s']:.0f} tokens/s", flush=True)
    index.append("- [serving llama2-70b on 4 and 8 H100 (throughput against latency, KV capacity, batch limits)]"
                 "(serving_llama2-70b_h100/report.md)")
    from reports.traffic import build_traffic_report

    for model in ("llama3-8b", "llama2-70b"):  # serving under traffic: the goodput planner against the static layout
        name = f"traffic_{model}_h100-sxm-8"
        table = build_traffic_report(model, "h100-sxm:8", root / name)
        print(f"serving {model} under traffic: {len(table)} rows", flush=True)
        index.append(f"- [serving {model} on 8 H100 under chat, long-context and agent traffic (goodput planner "
                     f"against the static layout, latency against rate, timelines)]({name}/README.md)")
    (root / "README.md").write_text("\n".join(index) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
