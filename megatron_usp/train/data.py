"""The trainer's data: one flat token stream cut into ``seq_length + 1`` windows.

Two sources: a Megatron indexed dataset (``PREFIX.bin`` / ``PREFIX.idx``, read with ``megatron.core.datasets``)
or, with no ``--data-path``, the bytes of the Python standard library's source files (vocab 256; present on
every machine, nothing to download). Sample ``i`` of the run depends only on the seed and ``i``, never on the
parallel grid, so runs on different grids (and resumed runs) see the same tokens.
"""
from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..megatron.batch import get_batch_on_this_usp_rank

BYTE_VOCAB_SIZE = 256


class ByteCorpus:
    """The standard library's ``*.py`` files (sorted by path, up to ``max_bytes``) as one byte stream."""

    vocab_size = BYTE_VOCAB_SIZE

    def __init__(self, max_bytes: int = 8 << 20, root: Optional[str] = None):
        root_path = Path(root or sysconfig.get_paths()["stdlib"])
        chunks, total = [], 0
        for path in sorted(root_path.rglob("*.py")):
            if "site-packages" in path.parts:
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue
            chunks.append(data + b"\n")
            total += len(data) + 1
            if total >= max_bytes:
                break
        if total == 0:
            raise ValueError(f"no Python source files under {root_path}: pass --data-path PREFIX instead")
        self.tokens = np.frombuffer(b"".join(chunks)[:max_bytes], dtype=np.uint8)
        self.description = f"byte-level corpus: {len(self.tokens):,} bytes of {root_path}/**/*.py"

    def __len__(self) -> int:
        return len(self.tokens)

    def window(self, start: int, length: int) -> np.ndarray:
        return self.tokens[start:start + length]


class IndexedTokens:
    """A Megatron indexed dataset (``PREFIX.bin`` / ``PREFIX.idx``): its documents concatenated in order."""

    def __init__(self, path_prefix: str):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        for suffix in (".bin", ".idx"):
            if not Path(path_prefix + suffix).is_file():
                raise ValueError(f"--data-path {path_prefix}: {path_prefix}{suffix} not found (give the prefix "
                                 "without .bin/.idx, as Megatron's preprocess_data.py writes it)")
        self.dataset = IndexedDataset(path_prefix)
        self.path_prefix, self._vocab_size = path_prefix, None
        lengths = np.asarray(self.dataset.index.sequence_lengths, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lengths)])
        self.description = f"indexed dataset {path_prefix}: {len(lengths):,} sequences, {self.starts[-1]:,} tokens"

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def vocab_size(self) -> int:
        """Largest token id + 1: one vectorised scan of the ``.bin`` file (its tokens, back to back)."""
        if self._vocab_size is None:
            tokens = np.memmap(self.path_prefix + ".bin", dtype=self.dataset.index.dtype, mode="r")
            self._vocab_size = int(tokens.max(initial=0)) + 1
        return self._vocab_size

    def window(self, start: int, length: int) -> np.ndarray:
        pieces, end = [], start + length
        sequence = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < end:
            offset = start - int(self.starts[sequence])
            take = min(end, int(self.starts[sequence + 1])) - start
            pieces.append(self.dataset.get(sequence, offset=offset, length=take))
            start += take
            sequence += 1
        return np.concatenate(pieces)


class GPTSamples:
    """Sample ``i``: tokens ``[seq_length]`` and labels (the next tokens). Windows do not overlap; each epoch
    visits them in a fresh seeded order."""

    def __init__(self, stream, seq_length: int, seed: int):
        self.stream, self.seq_length, self.seed = stream, seq_length, seed
        self.num_windows = (len(stream) - 1) // seq_length
        if self.num_windows < 1:
            raise ValueError(f"the data has {len(stream)} tokens, fewer than --seq-length {seq_length} + 1")
        self._epoch, self._order = -1, None

    def _window_index(self, sample: int) -> int:
        epoch, index = divmod(sample, self.num_windows)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
        return int(self._order[index])

    def batch(self, first_sample: int, count: int) -> dict:
        """Samples ``first_sample .. first_sample+count-1`` as a Megatron batch (``[count, seq_length]``)."""
        rows = [self.stream.window(self._window_index(s) * self.seq_length, self.seq_length + 1)
                for s in range(first_sample, first_sample + count)]
        tokens = torch.from_numpy(np.stack(rows).astype(np.int64))
        return {
            "tokens": tokens[:, :-1].contiguous(),
            "labels": tokens[:, 1:].contiguous(),
            "loss_mask": torch.ones(count, self.seq_length),
            "position_ids": torch.arange(self.seq_length).expand(count, -1).contiguous(),
        }


def open_data(args: argparse.Namespace):
    """The token stream of ``--data-path`` (or the byte corpus) and its samples, checked against the model before
    any process group: every token id must be below ``--vocab-size`` (default: the data's own vocabulary)."""
    stream = IndexedTokens(args.data_path) if args.data_path else ByteCorpus(args.corpus_bytes)
    data_vocab = stream.vocab_size
    if args.vocab_size is None:
        args.vocab_size = data_vocab + (-data_vocab) % args.tensor_model_parallel_size
    elif args.vocab_size < data_vocab:
        raise ValueError(f"--vocab-size {args.vocab_size} is below the data's vocabulary ({stream.description}: token "
                         f"ids up to {data_vocab - 1}); tokens >= {args.vocab_size} would have no embedding: raise "
                         f"--vocab-size to at least {data_vocab} or drop it")
    try:
        samples = GPTSamples(stream, args.seq_length, args.seed)
    except ValueError as error:
        raise ValueError(f"{error} (--corpus-bytes / --data-path)") from None
    return stream, samples


class MicroBatches:
    """The data iterator Megatron's schedules pull micro-batches from: this DP rank's share of each global batch,
    every tensor sharded along the sequence for this USP rank (every pipeline stage reads the same ones)."""

    def __init__(self, args, samples, device):
        from megatron.core import parallel_state

        self.args, self.samples, self.device = args, samples, device
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.iteration, self.micro = 0, 0

    def start(self, iteration: int) -> "MicroBatches":
        self.iteration, self.micro = iteration, 0
        return self

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        args = self.args
        first = (self.iteration * args.global_batch_size
                 + (self.micro * args.data_parallel_size + self.dp_rank) * args.micro_batch_size)
        self.micro += 1
        batch = get_batch_on_this_usp_rank(self.samples.batch(first, args.micro_batch_size))
        return {key: value.to(self.device) for key, value in batch.items()}
