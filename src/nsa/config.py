"""NSAConfig: the geometry of Native Sparse Attention and its validation."""
from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass


@dataclass(frozen=True)
class NSAConfig:
    """Geometry of the three NSA branches (paper defaults, §4.1).

    cmp_block_size  l   tokens per compressed block (Eq. 7)
    cmp_stride      d   stride between compressed blocks (Eq. 7)
    slc_block_size  l'  tokens per selection block (Eq. 9, 12)
    num_selected    n   selected blocks per query, forced ones included (Eq. 11)
    num_init_blocks     blocks 0..init-1 always selected
    num_local_blocks    the query's own block and the ones before it, always selected
    window_size     w   sliding-window length (§3.3.3)
    """

    cmp_block_size: int = 32
    cmp_stride: int = 16
    slc_block_size: int = 64
    num_selected: int = 16
    num_init_blocks: int = 1
    num_local_blocks: int = 2
    window_size: int = 512

    def __post_init__(self) -> None:
        for name in ("cmp_block_size", "cmp_stride", "slc_block_size", "num_selected", "window_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("num_init_blocks", "num_local_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        l, d, lp = self.cmp_block_size, self.cmp_stride, self.slc_block_size
        if l % d:
            raise ValueError(f"cmp_stride ({d}) must divide cmp_block_size ({l})")
        if lp % d:
            raise ValueError(f"cmp_stride ({d}) must divide slc_block_size ({lp})")
        if l > lp:
            raise ValueError(f"cmp_block_size ({l}) must be <= slc_block_size ({lp})")
        if self.num_selected < self.num_init_blocks + self.num_local_blocks:
            raise ValueError(
                f"num_selected ({self.num_selected}) must be >= num_init_blocks + num_local_blocks "
                f"({self.num_init_blocks} + {self.num_local_blocks})"
            )

    def num_compressed(self, seqlen: int) -> int:
        """Compressed tokens of a length-`seqlen` sequence: max(0, floor((T - l) / d) + 1) (Eq. 7)."""
        return num_compressed_tokens(seqlen, self.cmp_block_size, self.cmp_stride)

    def num_slc_blocks(self, seqlen: int) -> int:
        """Selection blocks covering a length-`seqlen` sequence: ceil(T / l')."""
        return math.ceil(seqlen / self.slc_block_size)


def num_compressed_tokens(seqlen: int, block_size: int, stride: int) -> int:
    """max(0, floor((T - l) / d) + 1): compressed block i covers tokens [i*d, i*d + l - 1] (Eq. 7)."""
    if seqlen < block_size:
        return 0
    return (seqlen - block_size) // stride + 1


def bounded_window(config: NSAConfig, seqlen: int) -> NSAConfig:
    """`config` with w = min(w, max(seqlen, 1)). A window longer than the sequence reads the same keys (every
    earlier position), and the backends size buffers and gathers by w: w = 2^31 must not allocate for 2^31 keys."""
    w = min(config.window_size, max(int(seqlen), 1))
    return config if w == config.window_size else dataclasses.replace(config, window_size=w)


# ---------------------------------------------------------------------------------- field checks for configs
def check_int(name: str, value, minimum: int, numpy: bool = False) -> int:
    """value as an int >= minimum (bools refused), else ValueError naming the field. `numpy`: NumPy integers are
    accepted too and returned as Python ints (for sizes passed to functions; config fields stay Python ints, which
    every serialiser takes)."""
    if numpy and not isinstance(value, bool) and not hasattr(value, "dim"):  # not a bool, not a tensor
        try:
            value = operator.index(value)
        except TypeError:
            pass
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return value


def check_number(name: str, value, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False,
                 hi_open: bool = False) -> float:
    """value as a float in the interval, else ValueError naming the field. A numeric string is read as a number:
    YAML 1.1 (PyYAML) loads `3e-3` (no dot) as a string."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return float(value)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def check_lengths(name: str, value, batch: int, lo: int, hi: int):
    """value as a host int64 [batch] tensor of per-row counts in [lo, hi] (an integer tensor, not bool), else
    ValueError naming it. Reads the values on the host."""
    import torch

    if (not isinstance(value, torch.Tensor) or tuple(value.shape) != (batch,) or value.is_floating_point()
            or value.is_complex() or value.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer tensor of shape [{batch}]")
    host = value.detach().cpu().long()
    if batch and (int(host.min()) < lo or int(host.max()) > hi):
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got {host.tolist()}")
    return host
