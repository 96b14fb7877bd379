"""Report build time: gpt3-175b on 1024 A100-80G, global batch 1536 (target under 60 s).
Run:  python bench/report_speed.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from costmodel import load_cluster
from planner.zoo import ZOO
from reports.build import build_report


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = build_report(ZOO["gpt3-175b"], load_cluster("a100-80g:1024"), 1536, Path(tmp), ("md", "html"))
        dt = time.perf_counter() - t0
    print(f"gpt3-175b on a100-80g:1024, batch 1536: report of {summary['strategies']} strategies "
          f"({summary['fitting']} fit, best: {summary['best']}) built in {dt:.1f} s")


if __name__ == "__main__":
    main()
