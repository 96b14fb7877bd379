"""Training data sources: deterministic synthetic batches, .npy tokens, text as bytes."""

import numpy as np
import pytest
import torch

from costmodel import ConfigError
from runtime.data import TokenSource, dp_slice


def test_synthetic_batches_depend_only_on_seed_and_step():
    a, b = TokenSource(256, 16, seed=3), TokenSource(256, 16, seed=3)
    x1, y1 = a.batch(5, 4)
    x2, y2 = b.batch(5, 4)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the inputs shifted by one
    assert not torch.equal(a.batch(6, 4)[0], x1)


def test_npy_and_text_files(tmp_path):
    np.save(tmp_path / "t.npy", np.arange(1000, dtype=np.int64) % 200)
    x, y = TokenSource(256, 16, str(tmp_path / "t.npy")).batch(0, 2)
    assert x.shape == (2, 16) and int(x.max()) < 200
    assert torch.equal((x[:, 1:] - x[:, :-1]) % 200, torch.ones(2, 15, dtype=torch.int64))  # consecutive tokens
    (tmp_path / "t.txt").write_text("hello world " * 20)
    x, _ = TokenSource(256, 8, str(tmp_path / "t.txt")).batch(1, 3)
    assert bytes(x[0].tolist()).decode() in ("hello world " * 20)


def test_bad_data_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        TokenSource(256, 8, str(tmp_path / "none.npy"))
    np.save(tmp_path / "big.npy", np.full(100, 999))
    with pytest.raises(ConfigError, match="vocab"):
        TokenSource(256, 8, str(tmp_path / "big.npy"))


def test_data_parallel_slices_cover_the_batch():
    x = torch.arange(8).view(8, 1)
    assert torch.equal(torch.cat([dp_slice(x, r, 4) for r in range(4)]), x)


def test_a_bad_data_file_is_one_line_before_any_process_starts(tmp_path):
    """`paraplan run --data` with a missing, short or out-of-vocabulary file: each rank raised the
    error and torchrun printed its ChildFailedError traceback; the launcher says it first, in one line."""
    from tests_helpers import paraplan

    plan = tmp_path / "p.yaml"
    assert paraplan("plan", "--model", "tiny-llama", "--cluster", "cpu:2", "--global-batch", "4",
                    "-o", str(plan)).returncode == 0
    (tmp_path / "short.txt").write_text("too short")
    np.save(tmp_path / "big.npy", np.full(100, 999))
    for data, why in (("none.bin", "does not exist"), ("short.txt", "longer than seq_len"), ("big.npy", "vocab")):
        out = paraplan("run", str(plan), "--steps", "1", "--data", str(tmp_path / data))
        assert out.returncode == 2 and why in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1


def test_run_output_paths_are_checked_before_any_process_starts(tmp_path):
    """--checkpoint-dir or --metrics under a file raised an OSError in the ranks (a torchrun traceback);
    --resume or --checkpoint-every without --checkpoint-dir were ignored without a word; --metrics in a
    folder that did not exist yet failed in rank 0."""
    from tests_helpers import paraplan

    plan = tmp_path / "p.yaml"
    assert paraplan("plan", "--model", "tiny-llama", "--cluster", "cpu:2", "--global-batch", "4",
                    "-o", str(plan)).returncode == 0
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for args, why in ((["--checkpoint-dir", str(blocker / "ck"), "--checkpoint-every", "1"], "not a folder"),
                      (["--metrics", str(blocker / "m.jsonl")], "not a folder"),
                      (["--checkpoint-dir", str(blocker)], "is a file"),
                      (["--resume"], "--resume needs --checkpoint-dir"),
                      (["--checkpoint-every", "1"], "--checkpoint-every needs --checkpoint-dir")):
        out = paraplan("run", str(plan), "--steps", "1", *args)
        assert out.returncode == 2 and why in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    metrics = tmp_path / "new" / "m.jsonl"
    out = paraplan("run", str(plan), "--steps", "2", "--metrics", str(metrics))
    assert out.returncode == 0, out.stderr[-500:]
    assert len(metrics.read_text().splitlines()) == 2
