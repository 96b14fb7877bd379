"""Under torchrun, 2 ranks: rank 1 meets a ConfigError of its own part (as a pipeline stage's modules
can raise) while rank 0 waits for it in a collective; `runtime.worker.refuse` must say the error and
leave instead of waiting at a barrier for the group's timeout."""

import datetime
import sys

import torch
import torch.distributed as dist

from costmodel.errors import ConfigError
from runtime.worker import refuse


def main() -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
    if dist.get_rank() == 1:
        sys.exit(refuse(ConfigError("rank 1's own part cannot be built"), arrival=datetime.timedelta(seconds=5)))
    dist.all_reduce(torch.zeros(1))  # rank 0 waits for rank 1, which never comes


if __name__ == "__main__":
    main()
