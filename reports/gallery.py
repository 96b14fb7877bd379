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
    index = ["# Gallery", "", "Regenerate with `python -m reports.gallery`.", ""]
    for model, cluster, batch in GALLERY:
        name = f"{model}_{cluster.replace(':', '-')}"
        summary = build_report(ZOO[model], load_cluster(cluster), batch, root / name, ("md", "html"))
        print(f"{name}: {summary['strategies']} strategies, {summary['fitting']} fit, best {summary['best']}, "
              f"{summary['seconds']:.1f} s", flush=True)
        index.append(f"- [{model} on {cluster}, global batch {batch}]({name}/report.md): best {summary['best']}")
    (root / "README.md").write_text("\n".join(index) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
