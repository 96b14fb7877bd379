"""Run `runtime.worker` on N processes forked from one that has already imported torch (and
transformers): what torchrun does for the tests, without paying torch's imports once per rank.

    python tests/fork_launch.py N [--preload MODULE ...] PLAN.yaml ... [worker flags]

On this 2-core machine a torchrun launch of 8 ranks spends ~30 s importing (4 s for torchrun
itself, ~7 s for each rank); forked ranks share the parent's imports, so a launch costs one
import. The ranks are real processes joined by a real gloo process group (env:// rendezvous
on a free local port, as `torchrun --standalone` sets up); as torchrun does, the first rank to
fail takes the others down so that a failing test does not wait for gloo's timeout. The
commands users run (`paraplan run`, restarts after a fault, resumption) are still tested
under torchrun itself (tests/test_runtime_faults.py, tests/test_runtime_resume.py).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import traceback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_rank(rank: int, world: int, port: int, argv: list[str]) -> int:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from runtime.worker import main

    try:
        return int(main(argv) or 0)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - a rank's traceback goes to stderr, as under torchrun
        traceback.print_exc()
        return 1


def launch(world: int, argv: list[str]) -> int:
    """Fork `world` ranks running the worker on `argv`; the first non-zero exit status, else 0."""
    port = _free_port()
    sys.stdout.flush()
    sys.stderr.flush()
    children: dict[int, int] = {}
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            code = _run_rank(rank, world, port, argv)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        children[pid] = rank
    status = 0
    while children:
        pid, wait_status = os.wait()
        children.pop(pid, None)
        code = os.waitstatus_to_exitcode(wait_status)
        if code != 0 and status == 0:
            status = code if code > 0 else 1
            for other in children:  # the others would wait for the dead rank until gloo's timeout
                os.kill(other, signal.SIGKILL)
    return status


def main(argv: list[str]) -> int:
    world = int(argv[0])
    rest = argv[1:]
    while rest[:1] == ["--preload"]:  # e.g. transformers' modeling module, imported lazily by the worker
        __import__(rest[1])
        rest = rest[2:]
    import runtime.worker  # noqa: F401 - torch, DTensor, FSDP, pipelining: imported once, before the fork

    return launch(world, rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
