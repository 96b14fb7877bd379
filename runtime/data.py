"""Training data: synthetic tokens (default), a tokenized .npy/.bin file, or a text file: read
as bytes, or tokenized by the Hugging Face tokenizer of the model's directory when it has one
(`tokenizer`: that directory). Deterministic: the batch of step t depends only on (seed, t), and every data-
parallel rank takes its own contiguous slice of the global batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from costmodel.errors import ConfigError


class TokenSource:
    def __init__(self, vocab: int, seq_len: int, path: str | None = None, seed: int = 0,
                 tokenizer: str | None = None) -> None:
        self.vocab, self.seq_len, self.seed = vocab, seq_len, seed
        self.tokenizer = tokenizer
        self.tokens = None if path is None else self._load(Path(path))

    def _load(self, path: Path) -> np.ndarray:
        if not path.exists():
            raise ConfigError(f"data file {path} does not exist")
        if path.suffix == ".npy":
            tokens = np.load(path, mmap_mode="r")
        elif path.suffix == ".bin":
            tokens = np.memmap(path, dtype=np.uint16, mode="r")
        elif self.tokenizer is not None:  # text, tokenized as the model was
            tokens = tokenize(path, self.tokenizer)
        else:  # plain text: byte-level tokens
            tokens = np.frombuffer(path.read_bytes(), dtype=np.uint8)
        if tokens.ndim != 1 or len(tokens) <= self.seq_len + 1:
            raise ConfigError(f"data file {path} needs a 1-D token array longer than seq_len + 1 = {self.seq_len + 1}")
        if int(tokens.max()) >= self.vocab:
            raise ConfigError(f"data file {path} has token {int(tokens.max())} >= the model's vocab {self.vocab}")
        return tokens

    def batch(self, step: int, global_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (global_batch, seq_len) int64."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        if self.tokens is None:
            seqs = torch.randint(0, self.vocab, (global_batch, self.seq_len + 1), generator=gen)
        else:
            starts = torch.randint(0, len(self.tokens) - self.seq_len - 1, (global_batch,), generator=gen)
            seqs = torch.stack([torch.from_numpy(np.asarray(self.tokens[s:s + self.seq_len + 1], dtype=np.int64))
                                for s in starts.tolist()])
        return seqs[:, :-1].contiguous(), seqs[:, 1:].contiguous()


def check_data(path: str | None, vocab: int, seq_len: int, tokenizer: str | None = None) -> None:
    """One line (ConfigError) where the data file cannot feed the plan, said before any process
    starts: missing, too short, or holding tokens past the vocabulary (a text file the model's
    tokenizer reads is only checked to exist here: tokenizing it is the workers' job)."""
    if path is None:
        return
    if tokenizer is not None and Path(path).suffix not in (".npy", ".bin"):
        if not Path(path).is_file():
            raise ConfigError(f"data file {path} does not exist")
        return
    TokenSource(vocab, seq_len, path)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def tokenizer_dir(folder: str | Path | None) -> str | None:
    """The folder if it holds a Hugging Face tokenizer, else None."""
    if folder is None:
        return None
    path = Path(folder)
    path = path if path.is_dir() else path.parent
    return str(path) if any((path / name).is_file() for name in TOKENIZER_FILES) else None


def tokenize(path: Path, tokenizer: str) -> np.ndarray:
    """A text file's token ids under the tokenizer saved in `tokenizer` (a model directory)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError('tokenizing text needs transformers: pip install "paraplan[hf]"') from None
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"the tokenizer in {tokenizer} cannot be loaded ({exc}); remove its files to read "
                          "the text as bytes") from None
    ids = tok(path.read_text(encoding="utf-8", errors="replace"))["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def dp_slice(x: torch.Tensor, dp_rank: int, dp: int) -> torch.Tensor:
    per = x.shape[0] // dp
    return x[dp_rank * per:(dp_rank + 1) * per]
