"""`paraplan profile -o PROFILE`: measure this machine into a hardware profile."""

from __future__ import annotations

import argparse
from pathlib import Path

from costmodel.errors import ConfigError
from runtime.profiler import profile


def run_profile(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"-o {out}: a profile is a .yaml file")
    data = profile(out, device=args.device, quick=args.quick, base=args.extends)
    dev = data["device"]
    print(f"wrote {out}: peak {max(dev['peak_tflops'].values()):.4g} TFLOP/s, memory {dev['hbm_gb_per_s']} GB/s, "
          f"link {data.get('links', {}).get('intra_node', 'not measured (one GPU)')}")
    return 0
