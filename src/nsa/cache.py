"""NSACache: the decoding state of every NSA layer (a data structure; the layer computes, the cache stores).

Per layer and sequence b with L = lengths[b] cached tokens (positions 0..L-1):
  k_slc, v_slc   [B, max_length, HKV, D]   selection-branch K/V (rotated keys), the full history: slot p = position p
  k_win, v_win   [B, min(w, max_length), HKV, D]  window-branch K/V, a ring buffer holding the last w positions at
                                           slot p % capacity (absent with shared_kv: the window reads k_slc/v_slc)
  k_cmp, v_cmp   [B, Tc(max_length), HKV, D]  compressed tokens 0..Tc(L)-1 (keys rotated at i*d + l - 1)
  k_tail, v_tail [B, l - 1, HKV, D]        raw (un-rotated) cmp-branch K/V of positions Tc(L)*d .. L-1, the only
                                           tokens a future compressed block still needs (at most l - 1 of them),
                                           ring buffer at slot p % (l - 1)
where Tc(L) = max(0, (L - l)//d + 1) (Eq. 7). A new compressed token is emitted whenever a block end i*d + l - 1 is
reached, i.e. every d tokens once l tokens exist. Storage is allocated once per layer (on first use, when the
layer's head counts are known) for `max_length` tokens: appending never reallocates.
"""
from __future__ import annotations

import torch

from .config import NSAConfig, num_compressed_tokens


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (then nothing may be read back from the device)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class LayerCache:
    """One layer's storage; see the module docstring. `lengths` [B] int64 lives on the cache device, with a CPU
    mirror `host_lengths` so that the layer never has to synchronise with the device to slice or index. A static
    cache keeps no mirror (its decode steps advance the lengths on the device only, also as CUDA-graph replays):
    `host_lengths` then reads them from the device."""

    def __init__(self, batch_size, max_length, num_kv_heads, head_dim, v_head_dim, config: NSAConfig, shared_kv,
                 device, dtype, static: bool = False):
        B, S, H = batch_size, max_length, num_kv_heads
        l, w = config.cmp_block_size, config.window_size

        def buf(n, dim):
            return torch.zeros(B, n, H, dim, device=device, dtype=dtype)

        self.config, self.shared_kv, self.max_length = config, shared_kv, max_length
        self.num_kv_heads, self.head_dim, self.v_head_dim = num_kv_heads, head_dim, v_head_dim
        self.k_slc, self.v_slc = buf(S, head_dim), buf(S, v_head_dim)
        self.window_capacity = min(w, S)
        self.k_win = self.v_win = None
        if not shared_kv:
            self.k_win, self.v_win = buf(self.window_capacity, head_dim), buf(self.window_capacity, v_head_dim)
        tc = num_compressed_tokens(S, l, config.cmp_stride)
        self.k_cmp, self.v_cmp = buf(tc, head_dim), buf(tc, v_head_dim)
        self.tail_capacity = l - 1
        self.k_tail, self.v_tail = buf(l - 1, head_dim), buf(l - 1, v_head_dim)
        self.lengths = torch.zeros(B, dtype=torch.long, device=device)
        self.static = static
        self._host_lengths = torch.zeros(B, dtype=torch.long)

    @property
    def host_lengths(self) -> torch.Tensor:
        """[B] int64 on the CPU: the mirror, or for a static cache a copy read from the device (a synchronisation)."""
        return self.lengths.to("cpu", copy=True) if self.static else self._host_lengths

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("k_slc", "v_slc", "k_win", "v_win", "k_cmp", "v_cmp", "k_tail", "v_tail")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def live(self, b: int) -> dict[str, torch.Tensor]:
        """Row b's meaningful contents in position order (ring buffers unrolled): k/v_slc [L], k/v_win (the last
        min(L, capacity) positions), k/v_cmp [Tc(L)], k/v_tail (positions Tc(L)*d .. L-1)."""
        L = int(self.host_lengths[b])
        l, d = self.config.cmp_block_size, self.config.cmp_stride
        tc = num_compressed_tokens(L, l, d)
        out = {"k_slc": self.k_slc[b, :L], "v_slc": self.v_slc[b, :L], "k_cmp": self.k_cmp[b, :tc],
               "v_cmp": self.v_cmp[b, :tc]}
        dev = self.k_slc.device
        tail = torch.arange(tc * d, L, device=dev)
        out["k_tail"] = self.k_tail[b, tail % max(1, self.tail_capacity)] if self.tail_capacity else self.k_tail[b]
        out["v_tail"] = self.v_tail[b, tail % max(1, self.tail_capacity)] if self.tail_capacity else self.v_tail[b]
        if self.k_win is not None:
            win = torch.arange(max(0, L - self.window_capacity), L, device=dev) % self.window_capacity
            out["k_win"], out["v_win"] = self.k_win[b, win], self.v_win[b, win]
        return out

    def num_compressed(self) -> torch.Tensor:
        """[B] compressed tokens per sequence (host)."""
        l, d = self.config.cmp_block_size, self.config.cmp_stride
        return torch.tensor([num_compressed_tokens(int(L), l, d) for L in self.host_lengths], dtype=torch.long)

    def set_lengths(self, rows, new_lengths_host: torch.Tensor, new_lengths_device: torch.Tensor | None = None) -> None:
        """Rows' new lengths: the host mirror from `new_lengths_host`, the device copy from `new_lengths_device`
        (the same values computed on the device: no host-to-device copy, which would wait for the device) or else
        a copy of the host values."""
        if not self.static:
            self._host_lengths[rows] = new_lengths_host
        if new_lengths_device is None:
            new_lengths_device = new_lengths_host.to(self.lengths.device)
        self.lengths[rows.to(self.lengths.device) if isinstance(rows, torch.Tensor) else rows] = new_lengths_device


class NSACache:
    """KV cache for `NativeSparseAttention` decoding, one `LayerCache` per layer, allocated lazily.

    cache = NSACache(num_layers, batch_size, max_length, device=None, dtype=None)
    y = layer(x, cache=cache, layer_idx=i)   # continues each cached sequence; updates layer i only

    Each layer tracks its own fill; `lengths` reports the first used layer's ([B] int64). `device`/`dtype`
    default to those of the first input a layer sees. Storage for a layer is `memory_bytes()`-accounted from its
    allocation on.

    `static=True`: one-token decode steps (`layer(x [B, 1, hidden], cache=cache)`) take no host decision on the
    lengths, so a CUDA graph captured once replays every later step (see `NativeSparseAttention`). Run eagerly, a
    step reads the lengths back once to check the room (ValueError when a row is full); while a graph is captured it
    reads nothing, and a full row comes out NaN. Prefill and chunks run eagerly, reading the lengths from the device.
    """

    def __init__(self, num_layers: int, batch_size: int, max_length: int, device=None, dtype=None,
                 static: bool = False):
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size), ("max_length", max_length)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(static, bool):
            raise ValueError(f"static must be a bool, got {static!r}")
        self.static = static
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        self.num_layers, self.batch_size, self.max_length = num_layers, batch_size, max_length
        try:
            self.device = None if device is None else torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must be a torch.device, a device string or None, got {device!r}") from exc
        self.dtype = dtype
        self.layers: list[LayerCache | None] = [None] * num_layers

    def layer(self, layer_idx: int, *, num_kv_heads, head_dim, v_head_dim, config, shared_kv, device, dtype):
        """The storage of layer `layer_idx`, allocated on first use; later calls check the geometry matches."""
        if not isinstance(layer_idx, int) or isinstance(layer_idx, bool) or not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"layer_idx must be an int in [0, {self.num_layers}), got {layer_idx!r}")
        lc = self.layers[layer_idx]
        if lc is None:
            lc = LayerCache(self.batch_size, self.max_length, num_kv_heads, head_dim, v_head_dim, config, shared_kv,
                            self.device or device, self.dtype or dtype, static=self.static)
            self.layers[layer_idx] = lc
        elif (lc.num_kv_heads, lc.head_dim, lc.v_head_dim, lc.config, lc.shared_kv) != (
                num_kv_heads, head_dim, v_head_dim, config, shared_kv):
            raise ValueError(f"layer_idx {layer_idx} is cached for a layer of another geometry")
        return lc

    @property
    def lengths(self) -> torch.Tensor:
        """[B] int64 tokens cached per sequence in the first layer slot in use (a hybrid model may cache NSA in
        some layers only; zeros before any is used). `layers[i].lengths` gives layer i's."""
        lc = next((lc for lc in self.layers if lc is not None), None)
        if lc is None:
            return torch.zeros(self.batch_size, dtype=torch.long, device=self.device)
        return lc.lengths.clone()

    def check_room(self, new_tokens) -> None:
        """ValueError unless every layer can take `new_tokens` more tokens per row (an int, or host [B]): a model
        checks this before its first layer runs, so that a call that fails changes no layer. While a CUDA graph is
        being captured, a static cache's one-token step is not checked (that would read the lengths back): a full
        row comes out NaN on each replay."""
        if self.static and isinstance(new_tokens, int) and new_tokens == 1 and capturing():
            return
        n = torch.as_tensor(new_tokens, dtype=torch.long)
        for lc in self.layers:
            need = int((n + (lc.host_lengths if lc is not None else 0)).max()) if n.numel() else 0
            if need > self.max_length:
                raise ValueError(f"cache max_length {self.max_length} exceeded: {need} tokens")

    def reset(self) -> None:
        """Forget every sequence (storage is kept for reuse)."""
        for lc in self.layers:
            if lc is not None:
                lc.lengths.zero_()
                lc._host_lengths.zero_()

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Row b becomes old row beam_idx[b] in every layer (beam search); beam_idx [B] int64."""
        if not isinstance(beam_idx, torch.Tensor) or beam_idx.shape != (self.batch_size,) or \
                beam_idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"beam_idx must be an integer tensor of shape [{self.batch_size}]")
        if beam_idx.numel() and (int(beam_idx.min()) < 0 or int(beam_idx.max()) >= self.batch_size):
            raise ValueError(f"beam_idx must lie in [0, {self.batch_size}), got {beam_idx.tolist()}")
        host = beam_idx.detach().cpu().long()
        for lc in self.layers:
            if lc is None:
                continue
            idx = beam_idx.to(lc.lengths.device).long()
            for name, t in lc.tensors().items():
                t.copy_(t.index_select(0, idx))
            lc.lengths.copy_(lc.lengths.index_select(0, idx))
            lc._host_lengths.copy_(lc._host_lengths.index_select(0, host))

    def memory_bytes(self) -> int:
        """Bytes of allocated storage over all layers (K/V buffers and lengths)."""
        total = 0
        for lc in self.layers:
            if lc is not None:
                total += sum(t.numel() * t.element_size() for t in lc.tensors().values())
                total += lc.lengths.numel() * lc.lengths.element_size()
        return total
