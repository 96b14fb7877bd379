"""Planner speed and quality. Prints, for each request, the wall time of `run_search`, the
candidates evaluated, the ILP solves and their time, and the plan found; then the
Korthikanti Table 3 comparison (planned against the published configuration, same simulator).
Run:  python bench/planner_speed.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from costmodel import load_cluster, predict  # noqa: E402
from golden_data import KORTHIKANTI_TABLE3, published_strategy  # noqa: E402
from planner.search import SearchRequest, run_search  # noqa: E402
from planner.zoo import ZOO  # noqa: E402


def describe(s) -> str:
    mesh = " x ".join(f"{k}{v}" for k, v in s.mesh.items() if v > 1) + (f" (ep{s.ep})" if s.ep > 1 else "")
    sched = s.schedule.value + (f"(v={s.virtual_stages})" if s.virtual_stages > 1 else "")
    return f"{mesh}, zero {s.zero}, {s.recompute.value} recompute, {sched}, microbatch {s.microbatch_size}"


def main() -> None:
    print("| request | wall s | candidates | ILP solves (s) | plan | step s | MFU |")
    print("|---|---|---|---|---|---|---|")
    # mixtures of experts: Mixtral-8x7B on 64 H100; DeepSeek-V3 on 2048 H100 at its report's final batch
    # (15360 sequences of 4096 tokens; DeepSeek-AI, arXiv:2412.19437, Sec. 4.2)
    for name, cluster, batch in (("gpt3-175b", "a100-80g:1024", 1536), ("megatron-1t", "a100-80g:3072", 3072),
                                 ("llama3-70b", "h100-sxm:64", 256), ("mixtral-8x7b", "h100-sxm:64", 1024),
                                 ("deepseek-v3", "h100-sxm:2048", 15360)):
        t0 = time.perf_counter()
        found = run_search(SearchRequest(spec=ZOO[name], cluster=load_cluster(cluster), global_batch=batch))
        dt = time.perf_counter() - t0
        st = found.stats
        print(f"| {name} on {cluster}, batch {batch} | {dt:.1f} | {st['candidates']} | {st['ilp_solves']} "
              f"({st['ilp_time_s']:.2f}) | {describe(found.strategy)} | {found.result.step_time_s:.2f} | "
              f"{100 * found.result.mfu:.1f}% |" + (
                  f" ep {found.strategy.ep}, expert states {found.result.memory_gib['experts']:.1f} GiB/GPU, "
                  f"fits {found.result.fits}" if ZOO[name].moe else ""))

    # a Hugging Face model as the user gives it (meta-llama/Llama-2-70b-hf's config.json sizes):
    # read, mapped, searched, priced on its own graph and checked, as `paraplan plan` does
    from cli.commands.plan import plan_of_search
    from planner.model_source import load_model, source_and_map

    where = "hf:" + str(Path(__file__).resolve().parent / "data" / "llama2_70b_config.json")
    t0 = time.perf_counter()
    spec, _ = load_model(where)
    source, module_map, _ = source_and_map(where, spec)
    cluster = load_cluster("a100-80g:64")
    found = run_search(SearchRequest(spec=spec, cluster=cluster, global_batch=256, source=source),
                       module_map=module_map)
    plan_of_search(spec, found, "a100-80g:64", dict(found.stats), cluster, source)  # checked as `plan` writes it
    dt = time.perf_counter() - t0
    st = found.stats
    print(f"| hf: Llama-2-70B on a100-80g:64, batch 256 (read, map, search, graph price, check) | {dt:.1f} | "
          f"{st['candidates']} | {st['ilp_solves']} ({st['ilp_time_s']:.2f}) | {describe(found.strategy)} | "
          f"{found.result.step_time_s:.2f} | {100 * found.result.mfu:.1f}% |")

    print("\nKorthikanti et al. 2022 Table 3 runs: planned vs published configuration (no FlashAttention), "
          "both priced as Megatron-LM (--runtime megatron-core)")
    print("| model | GPUs | batch | published config s | planned s | plan | memory GiB |")
    print("|---|---|---|---|---|---|---|")
    for row in KORTHIKANTI_TABLE3:
        name, gpus, batch = row[0], row[6], row[7]
        cluster = load_cluster(f"a100-80g:{gpus}", runtime="megatron-core")
        published = predict(ZOO[name], published_strategy(row, "selective"), cluster)
        found = run_search(SearchRequest(spec=ZOO[name], cluster=cluster, global_batch=batch,
                                         fixed={"flash_attention": False}))
        print(f"| {name} | {gpus} | {batch} | {published.step_time_s:.2f} | {found.result.step_time_s:.2f} | "
              f"{describe(found.strategy)} | {found.result.memory_gib['total']:.1f} |")


if __name__ == "__main__":
    main()
