"""A compact Llama-style decoder whose attention is NSA or full attention, chosen by config.

Pre-norm blocks: x + Attn(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)); RoPE inside attention; the output head is tied
to the token embedding. Packed batches use `cu_seqlens` ([N+1] offsets, B = 1), as everywhere in `nsa`.
Generation keeps a cache: `nsa.NSACache` for NSA, the small `KVCache` below for full attention.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import cache as nsa_cache
from ..compression import COMPRESSORS
from ..config import NSAConfig, check_bool, check_lengths, check_number
from ..layer import NativeSparseAttention
from ..ops.dispatch import check_backend_name, check_cu_seqlens
from ..ops.varlen import check_position_ids, sequence_spans, token_positions
from ..rope import apply_rope, rope_dtype, rope_tables

ATTENTIONS = ("nsa", "full")


@dataclass
class ModelConfig:
    """Everything that defines the decoder. `nsa` holds NSAConfig fields (used when attention == "nsa")."""

    vocab_size: int = 256
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 384
    attention: str = "nsa"
    nsa: dict = field(default_factory=dict)
    compression: str = "mlp"
    shared_kv: bool | str = True  # see NativeSparseAttention: True, False (paper §3.3.3) or "slc_win"
    gate_bias: tuple = (0.0, 0.0, 0.0)  # initial gate logits (cmp, slc, win), see NativeSparseAttention
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    backend: str = "auto"
    token_shift: bool = False  # attention input += mix * previous token's (a "smeared" input, see Block)

    def __post_init__(self) -> None:
        if not isinstance(self.attention, str) or self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        self.rope_theta = check_number("rope_theta", self.rope_theta, 0.0, lo_open=True, hi_open=True)
        self.norm_eps = check_number("norm_eps", self.norm_eps, 0.0, lo_open=True, hi_open=True)
        self.init_std = check_number("init_std", self.init_std, 0.0, lo_open=True, hi_open=True)
        check_bool("token_shift", self.token_shift)
        if not isinstance(self.backend, str):  # `x in dict` raises TypeError for unhashable values
            raise ValueError(f"backend must be a backend name (a string), got {self.backend!r}")
        check_backend_name(self.backend)
        if not isinstance(self.compression, str) or self.compression not in COMPRESSORS:
            raise ValueError(f"compression must be one of {sorted(COMPRESSORS)}, got {self.compression!r}")
        if not (isinstance(self.shared_kv, bool) or (isinstance(self.shared_kv, str) and self.shared_kv == "slc_win")):
            raise ValueError(f"shared_kv must be true, false or 'slc_win', got {self.shared_kv!r}")
        if not isinstance(self.gate_bias, (list, tuple)) or len(self.gate_bias) != 3:
            raise ValueError(f"gate_bias must be 3 numbers (cmp, slc, win), got {self.gate_bias!r}")
        self.gate_bias = tuple(check_number("gate_bias", b, hi_open=True, lo_open=True) for b in self.gate_bias)
        if not isinstance(self.nsa, (dict, NSAConfig)):
            raise ValueError(f"nsa must be a mapping of NSAConfig fields, got {self.nsa!r}")
        if isinstance(self.nsa, NSAConfig):
            self.nsa = dataclasses.asdict(self.nsa)
        known = {f.name for f in dataclasses.fields(NSAConfig)}
        unknown = [k for k in self.nsa if not (isinstance(k, str) and k in known)]
        if unknown:
            raise ValueError(f"nsa has unknown keys {unknown!r} (NSAConfig fields: {sorted(known)})")
        self.nsa_config()  # validates the geometry (ValueError naming the field)

    def nsa_config(self) -> NSAConfig:
        return NSAConfig(**self.nsa)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, Mapping):
            raise ValueError(f"model config must be a mapping of ModelConfig fields, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"model config has unknown keys {sorted(unknown, key=repr)}")
        return cls(**d)


class KVCache:
    """Preallocated keys/values of every layer for full-attention decoding.

    k[i], v[i]: [B, max_length, HKV, D]. Row b of layer i holds its first `host_lengths[i][b]` positions (host
    int64 [B]; rows may differ after a ragged prefill). Same calling convention as nsa.NSACache: each attention
    layer reads and extends its own slot, and `lengths` reports layer 0's ([B] int64).

    `static=True` (as HF's StaticCache): the lengths live on the device only, and a one-token step (`step`) stores
    at each row's length and advances it there, attending over all `max_length` slots under a mask. Nothing is read
    back, so one CUDA graph captured once replays every later step (`LlamaLM.generate(cuda_graph=True)`). Other calls
    (prefill, chunks) read the lengths back once. Eagerly a step into a full row raises ValueError; under capture
    that row stores nothing and its output is NaN (as for NSACache).
    """

    def __init__(self, num_layers: int, batch_size: int, max_length: int, num_kv_heads: int, head_dim: int,
                 device=None, dtype=None, static: bool = False):
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size), ("max_length", max_length),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_bool("static", static)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        shape = (batch_size, max_length, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.static = static
        where = self.k[0].device if static else "cpu"
        self._lengths = [torch.zeros(batch_size, dtype=torch.long, device=where) for _ in range(num_layers)]
        self.batch_size, self.max_length = batch_size, max_length

    @property
    def host_lengths(self) -> list[torch.Tensor]:
        """Per layer [B] int64 on the CPU (a static cache reads them from the device: a synchronisation)."""
        return [n.to("cpu", copy=True) for n in self._lengths] if self.static else self._lengths

    @property
    def lengths(self) -> torch.Tensor:
        return self._lengths[0].clone()

    def append(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, new_lengths: torch.Tensor | None = None):
        """Store k/v [B, T, HKV, D] after each row's cached ones (only the first new_lengths[b] of row b, default
        all T). Returns all keys/values [B, S, HKV, D] with S = max_b(old_b) + T: row b's query i (position
        old_b + i) may read slots 0 .. old_b + i."""
        old = self.host_lengths[layer_idx]
        T = k.shape[1]
        if old.numel() == 0:  # an empty batch
            return self.k[layer_idx][:, :T], self.v[layer_idx][:, :T]
        n = torch.full_like(old, T) if new_lengths is None else new_lengths
        if int((old + n).max()) > self.max_length:
            raise ValueError(f"cache holds at most {self.max_length} tokens, got {int((old + n).max())}")
        if bool((old == old[0]).all()) and bool((n == T).all()):
            self.k[layer_idx][:, int(old[0]):int(old[0]) + T] = k
            self.v[layer_idx][:, int(old[0]):int(old[0]) + T] = v
        else:  # rows at different lengths (after a ragged prefill): one scattered write of the valid tokens
            rows, t = (torch.arange(T)[None, :] < n[:, None]).nonzero(as_tuple=True)
            dest = (rows.to(k.device), (old[rows] + t).to(k.device))
            self.k[layer_idx][dest] = k[rows.to(k.device), t.to(k.device)].to(self.k[layer_idx].dtype)
            self.v[layer_idx][dest] = v[rows.to(k.device), t.to(k.device)].to(self.v[layer_idx].dtype)
        if self.static:  # in place: a captured graph keeps reading this buffer
            self._lengths[layer_idx].copy_(old + n)
        else:  # a new tensor: callers may still hold the old lengths
            self._lengths[layer_idx] = old + n
        S = min(int(old.max()) + T, self.max_length)
        return self.k[layer_idx][:, :S], self.v[layer_idx][:, :S]

    def step(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """A static cache's one-token step, with no host read: k/v [B, 1, HKV, D] go to slot lengths[b] of each row
        that has room, whose length then advances on the device. Returns every slot's keys/values
        [B, max_length, HKV, D], the positions of the new tokens [B] (the old lengths, on the device) and `room`
        [B] bool (False: the row was full and stored nothing). Eagerly, a full row raises ValueError instead."""
        lengths = self._lengths[layer_idx]
        pos = lengths.clone()
        room = pos < self.max_length
        if not nsa_cache.capturing() and not bool(room.all()):
            raise ValueError(f"cache holds at most {self.max_length} tokens, got {int(pos.max()) + 1}")
        slot = pos.clamp(max=self.max_length - 1)
        rows = torch.arange(pos.shape[0], device=pos.device)
        for store, new in ((self.k[layer_idx], k), (self.v[layer_idx], v)):
            store[rows, slot] = torch.where(room[:, None, None], new[:, 0].to(store.dtype), store[rows, slot])
        lengths.add_(room.long())
        return self.k[layer_idx], self.v[layer_idx], pos, room

    def check_room(self, new_tokens) -> None:
        """ValueError unless every layer can take `new_tokens` more tokens per row (an int, or host [B]). Not
        checked for a static cache's one-token step under CUDA-graph capture (that would read the lengths back)."""
        if self.static and isinstance(new_tokens, int) and new_tokens == 1 and nsa_cache.capturing():
            return
        n = torch.as_tensor(new_tokens, dtype=torch.long)
        for lengths in self.host_lengths:
            need = int((lengths + n).max()) if lengths.numel() else 0
            if need > self.max_length:
                raise ValueError(f"cache holds at most {self.max_length} tokens, got {need}")

    def reset(self) -> None:
        for lengths in self._lengths:
            lengths.zero_()

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Row b becomes old row beam_idx[b] in every layer (beam search), in place (captured graphs keep their
        buffers)."""
        if not isinstance(beam_idx, torch.Tensor) or beam_idx.shape != (self.batch_size,) or \
                beam_idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"beam_idx must be an integer tensor of shape [{self.batch_size}]")
        if beam_idx.numel() and (int(beam_idx.min()) < 0 or int(beam_idx.max()) >= self.batch_size):
            raise ValueError(f"beam_idx must lie in [0, {self.batch_size}), got {beam_idx.tolist()}")
        for t in self.k + self.v + self._lengths:
            t.copy_(t.index_select(0, beam_idx.to(t.device).long()))

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


_GENERATING = threading.local()  # .models: ids of the models whose generate runs in this thread


def _reads_values() -> bool:
    """Whether a check may read tensor values on the host: not while compiling or exporting (data-dependent) nor
    while a CUDA graph is being captured (a synchronisation)."""
    return not (torch.compiler.is_compiling() or nsa_cache.capturing())


def _check_token_ids(name: str, ids, vocab_size: int, valid: torch.Tensor | None = None,
                     check_range: bool = True) -> torch.Tensor:
    """ids as a [B, T] integer tensor of token ids in [0, vocab_size) (int32 kept, other integer types as int64),
    else ValueError naming it. `valid` [B, T] bool: only those positions are range-checked (skipped, as a host
    read, while compiling or capturing, and with check_range=False)."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{name} must be [B, T], got shape {shape}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    if ids.dtype not in (torch.int32, torch.int64):
        ids = ids.long()  # nn.Embedding takes int32/int64 only
    if check_range and ids.numel() and _reads_values():
        bad = (ids < 0) | (ids >= vocab_size)
        if valid is not None:
            bad &= valid
        if bool(bad.any()):
            raise ValueError(f"{name} must be token ids in [0, {vocab_size}), got {int(bad.sum())} outside "
                             f"(e.g. {int(ids[bad][0])})")
    return ids


def _check_real(name: str, value, lo: float, hi: float = math.inf, lo_open: bool = False) -> float:
    """A real number (NumPy scalars too; strings and bools refused) in the interval, as a float, else ValueError
    naming it."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return check_number(name, float(value), lo, hi, lo_open=lo_open)


def _attend(q, k, v, mask=None, is_causal=False):
    """SDPA on [B, T, H, D] tensors with GQA (k/v heads repeated to q's)."""
    G = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       is_causal=is_causal)
    return o.transpose(1, 2)


def _attend_step(q, k, v, visible):
    """One new query per row, q [B, 1, HQ, D], over a cache's k/v [B, S, HKV, D] with `visible` [B, S] bool ->
    [B, 1, HQ, D]. The G query heads of a KV group become G query rows of that KV head, so the cache is read in
    place, once per KV head (no copy per query head)."""
    B, _, HQ, D = q.shape
    HKV = k.shape[2]
    qg = q.reshape(B, HKV, HQ // HKV, D)
    o = F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=visible[:, None, None])
    return o.reshape(B, 1, HQ, -1)


class FullAttention(nn.Module):
    """Causal softmax attention with GQA and RoPE (the dense baseline). Same call signature as the NSA layer."""

    def __init__(self, hidden_size, num_heads, num_kv_heads, head_dim, rope_theta=10000.0):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.rope_theta = num_heads, num_kv_heads, head_dim, rope_theta
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.kv_proj = nn.Linear(hidden_size, 2 * num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def forward(self, x, cu_seqlens=None, position_ids=None, cache: KVCache | None = None, layer_idx: int = 0,
                new_lengths: torch.Tensor | None = None):
        """With `cache`: x continues each cached row; `new_lengths` [B] (host) gives each row's valid tokens of x
        (right padding; outputs there are 0), as in NativeSparseAttention."""
        B, T, _ = x.shape
        if cache is not None and position_ids is not None:
            raise ValueError("position_ids cannot be combined with cache: positions come from the cache")
        check_position_ids(position_ids, B, T)
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k, v = self.kv_proj(x).view(B, T, 2, self.num_kv_heads, self.head_dim).unbind(2)
        if cache is not None and cache.static and T == 1 and new_lengths is None:  # no host read: graph-capturable
            pos = cache._lengths[layer_idx][:, None]  # [B, 1] on the device
            tables = rope_tables(pos, self.head_dim, self.rope_theta, x.device, rope_dtype(q.dtype))
            q, k = apply_rope(q, None, tables=tables), apply_rope(k, None, tables=tables)
            k, v, pos, room = cache.step(layer_idx, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)  # a cache of another dtype (no-op when equal)
            o = _attend_step(q, k, v, torch.arange(k.shape[1], device=x.device)[None, :] <= pos[:, None])
            o = torch.where(room[:, None, None, None], o, torch.full_like(o, float("nan")))
        elif cache is not None:
            old = cache.host_lengths[layer_idx].clone()  # append advances the cache's own
            pos = (old[:, None] + torch.arange(T)).to(x.device)  # [B, T]
            tables = rope_tables(pos, self.head_dim, self.rope_theta, x.device, rope_dtype(q.dtype))
            q, k = apply_rope(q, None, tables=tables), apply_rope(k, None, tables=tables)
            k, v = cache.append(layer_idx, k, v, new_lengths)
            k, v = k.to(q.dtype), v.to(q.dtype)
            if T == 1:
                o = _attend_step(q, k, v, torch.arange(k.shape[1], device=x.device)[None, :] <= pos)
            elif old.numel() and int(old.max()) == 0:  # a prefill: plain causal attention over the T new tokens
                o = _attend(q, k, v, is_causal=True)
            else:  # row b's query i (position old_b + i) sees keys 0 .. old_b + i
                o = _attend(q, k, v, mask=(torch.arange(k.shape[1], device=x.device) <= pos[..., None])[:, None])
            if new_lengths is not None:
                o = o * (torch.arange(T, device=x.device)[None, :] < new_lengths.to(x.device)[:, None])[..., None, None]
        else:
            if position_ids is None:
                position_ids = token_positions(T, cu_seqlens, x.device)
            tables = rope_tables(position_ids, self.head_dim, self.rope_theta, x.device, rope_dtype(q.dtype))
            q, k = apply_rope(q, None, tables=tables), apply_rope(k, None, tables=tables)
            if cu_seqlens is None:
                o = _attend(q, k, v, is_causal=True)
            else:  # one causal attention per packed sequence: nothing crosses a boundary
                o = torch.zeros_like(q)
                for _, s, e in sequence_spans(B, T, cu_seqlens):
                    if e > s:
                        o[:, s:e] = _attend(q[:, s:e], k[:, s:e], v[:, s:e], is_causal=True)
        return self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.gate_up = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        if cfg.attention == "nsa":
            self.attn = NativeSparseAttention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                              config=cfg.nsa_config(), compression=cfg.compression,
                                              shared_kv=cfg.shared_kv, rope_theta=cfg.rope_theta, backend=cfg.backend,
                                              gate_bias=tuple(cfg.gate_bias))
        else:
            self.attn = FullAttention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta)
        self.mlp_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        # token shift: the attention input also carries the previous token's normalised state (per-channel mix),
        # so a key can say "I follow token X" without a previous-token head; speeds up learning recall (induction)
        self.shift_mix = nn.Parameter(torch.full((cfg.hidden_size,), 0.5)) if cfg.token_shift else None

    def _shift(self, h, cu_seqlens, shift_state, layer_idx, new_lengths=None, in_place=False):
        """h [B, T, C] -> h + mix * h[t-1] (zero at every sequence start, or the cached last state). `in_place`
        (a static cache): the state tensor is overwritten instead of replaced, so a captured CUDA graph keeps
        reading and writing the same buffer."""
        if shift_state is not None:  # decoding: continue from the state of the last cached token
            state = shift_state.get(layer_idx)
            prev = torch.cat([torch.zeros_like(h[:, :1]) if state is None else state, h[:, :-1]], dim=1)
            if new_lengths is None:
                last = h[:, -1:]
            else:  # row b's last valid token; a row without new tokens keeps its state
                last = h.gather(1, (new_lengths.to(h.device) - 1).clamp(min=0)[:, None, None].expand(-1, 1, h.shape[2]))
                last = torch.where(new_lengths.to(h.device)[:, None, None] > 0, last, prev[:, :1])
            if in_place and state is not None and state.shape == last.shape and state.dtype == last.dtype:
                state.copy_(last.detach())
            else:
                shift_state[layer_idx] = last.detach().clone() if in_place else last
        else:
            prev = F.pad(h[:, :-1], (0, 0, 1, 0))
            if cu_seqlens is not None:
                starts = token_positions(h.shape[1], cu_seqlens, h.device) == 0
                prev = prev.masked_fill(starts[None, :, None], 0.0)
        return h + self.shift_mix * prev

    def forward(self, x, cu_seqlens=None, position_ids=None, cache=None, layer_idx=0, shift_state=None,
                new_lengths=None):
        h = self.attn_norm(x)
        if self.shift_mix is not None:
            h = self._shift(h, cu_seqlens, shift_state if cache is not None else None, layer_idx, new_lengths,
                            in_place=getattr(cache, "static", False))
        if cache is None:
            h = self.attn(h, cu_seqlens=cu_seqlens, position_ids=position_ids)
        else:
            h = self.attn(h, cache=cache, layer_idx=layer_idx, new_lengths=new_lengths)
        x = x + h
        return x + self.mlp(self.mlp_norm(x))


class LlamaLM(nn.Module):
    """Decoder-only LM: input_ids [B, T] (or packed [1, T] with cu_seqlens) -> logits [B, T, vocab]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self._init_weights()

    def reset_parameters(self) -> None:
        """Initialise every parameter again as a new model's, e.g. after meta-device construction and
        `to_empty()`: norms, token-shift mixes, each NSA layer's own init (gate bias, φ), then `_init_weights`."""
        for m in self.modules():
            if m is not self and isinstance(m, (nn.RMSNorm, NativeSparseAttention)):
                m.reset_parameters()
        with torch.no_grad():
            for block in self.blocks:
                if block.shift_mix is not None:
                    block.shift_mix.fill_(0.5)
        self._init_weights()

    def _init_weights(self) -> None:
        """Normal(0, init_std) for embeddings and projections, residual outputs scaled by 1/sqrt(2·layers);
        the NSA layer's own zero/mean-pool initialisations (gate bias, φ) are kept."""
        std = self.cfg.init_std
        nn.init.normal_(self.embed.weight, std=std)
        for block in self.blocks:
            for name, mod in block.named_modules():
                if isinstance(mod, nn.Linear) and not name.startswith(("attn.compress", "attn.g_proj")):
                    out_proj = name.endswith(("o_proj", "down"))
                    nn.init.normal_(mod.weight, std=std / (2 * self.cfg.num_layers) ** 0.5 if out_proj else std)

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None, shift_state: dict | None = None,
                new_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: integer token ids in [0, vocab_size) (ValueError otherwise; the range is not read while
        compiling or capturing a CUDA graph). `shift_state` (a dict, with `cache` and cfg.token_shift): each layer's
        last input state, kept by `generate` between calls. `new_lengths` [B] (with `cache`): row b's first
        new_lengths[b] tokens are valid (right padding, ragged prefill); logits at padded positions are meaningless.
        `position_ids` cannot be combined with `cache` (positions come from the cache)."""
        # generate's own steps feed ids it checked or sampled: no range check (a GPU synchronisation) per token
        input_ids = _check_token_ids("input_ids", input_ids, self.cfg.vocab_size,
                                     check_range=id(self) not in getattr(_GENERATING, "models", ()))
        B, T = input_ids.shape
        if cache is not None:
            self._check_cache(cache, B)
            if cu_seqlens is not None:
                raise ValueError("cu_seqlens cannot be combined with a cache")
            if position_ids is not None:
                raise ValueError("position_ids cannot be combined with cache: positions come from the cache")
        cu_seqlens = check_cu_seqlens(cu_seqlens, input_ids)
        check_position_ids(position_ids, B, T)
        if cache is not None and self.cfg.token_shift and shift_state is None:
            raise ValueError("shift_state (a dict) is required with a cache when token_shift is on")
        if shift_state is not None:
            if not isinstance(shift_state, dict):
                raise ValueError(f"shift_state must be a dict (layer index -> state), got {type(shift_state).__name__}")
            if cache is not None and self.cfg.token_shift:
                for i, state in shift_state.items():
                    if not isinstance(state, torch.Tensor) or tuple(state.shape) != (B, 1, self.cfg.hidden_size):
                        got = tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
                        raise ValueError(f"shift_state[{i!r}] must be a [B, 1, hidden] = [{B}, 1, "
                                         f"{self.cfg.hidden_size}] tensor, got {got}")
        if new_lengths is not None:
            if cache is None:
                raise ValueError("new_lengths is only used with cache")
            new_lengths = check_lengths("new_lengths", new_lengths, *input_ids.shape[:1], 0, input_ids.shape[1])
        if cache is not None:  # before any layer (or token-shift state) changes
            cache.check_room(new_lengths if new_lengths is not None else input_ids.shape[1])
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            x = block(x, cu_seqlens=cu_seqlens, position_ids=position_ids, cache=cache, layer_idx=i,
                      shift_state=shift_state, new_lengths=new_lengths)
        return F.linear(self.norm(x), self.embed.weight)  # tied output head

    def _check_cache(self, cache, batch: int) -> None:
        """ValueError (naming cache) unless `cache` is this attention type's cache with the input's batch size and
        at least the model's layers."""
        full = self.cfg.attention == "full"
        if not isinstance(cache, KVCache if full else nsa_cache.NSACache):
            kind = "a KVCache" if full else "an nsa.NSACache"
            raise ValueError(f"cache must be {kind} for attention={self.cfg.attention!r} (see make_cache), got "
                             f"{type(cache).__name__}")
        layers = len(cache.k) if full else cache.num_layers
        if layers < self.cfg.num_layers:
            raise ValueError(f"cache has {layers} layers, fewer than the model's {self.cfg.num_layers}")
        if cache.batch_size != batch:
            raise ValueError(f"input_ids batch size {batch} does not match the cache's batch_size {cache.batch_size}")
        if full and tuple(cache.k[0].shape[2:]) != (self.cfg.num_kv_heads, self.cfg.head_dim):
            raise ValueError(f"cache holds [HKV, D] = {list(cache.k[0].shape[2:])}, the model "
                             f"[{self.cfg.num_kv_heads}, {self.cfg.head_dim}]")

    def loss(self, input_ids, labels, cu_seqlens=None, reduction="mean"):
        """Cross-entropy of logits vs labels [B, T] (input_ids' shape; integer ids in [0, vocab), -100 = ignored).
        As in torch and HF, the mean over no counted label (all -100) is NaN."""
        if (not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex()
                or labels.dtype == torch.bool):
            got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"labels must be an integer tensor [B, T], got {got}")
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and labels.shape != input_ids.shape:
            raise ValueError(f"labels must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
        labels = labels.long()
        if labels.numel() and _reads_values():
            bad = ((labels < 0) | (labels >= self.cfg.vocab_size)) & (labels != -100)
            if bool(bad.any()):
                raise ValueError(f"labels must be token ids in [0, {self.cfg.vocab_size}) or -100 (ignored), got "
                                 f"{int(bad.sum())} outside (e.g. {int(labels[bad][0])})")
        logits = self(input_ids, cu_seqlens=cu_seqlens)
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction=reduction)

    def make_cache(self, batch_size: int, max_length: int, device=None, dtype=None, static: bool = False):
        """nsa.NSACache for NSA models, KVCache for full attention (`static`: graph-capturable decode steps)."""
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        if self.cfg.attention == "full":
            return KVCache(self.cfg.num_layers, batch_size, max_length, self.cfg.num_kv_heads, self.cfg.head_dim,
                           device=device, dtype=dtype, static=static)
        import nsa

        if not hasattr(nsa, "NSACache"):
            return None
        return nsa.NSACache(self.cfg.num_layers, batch_size, max_length, device=device, dtype=dtype, static=static)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 use_cache: bool = True, generator: torch.Generator | None = None,
                 prompt_lengths: torch.Tensor | None = None, eos_token_id: int | None = None,
                 pad_token_id: int = 0, cuda_graph: bool = False) -> torch.Tensor:
        """Extend each prompt by up to max_new_tokens tokens -> [B, T_out].

        prompt [B, T0]; `prompt_lengths` [B] (optional, each in [1, T0]): row b's prompt is its first
        prompt_lengths[b] tokens (right padding), and its new tokens follow right after them. A row stops after
        emitting `eos_token_id` (kept); generation ends when every row has stopped or after max_new_tokens steps.
        Row b of the result is its prompt, its new tokens (eos included), then `pad_token_id` up to T_out, the
        longest row's length (T0 + max_new_tokens for equal prompts without eos).
        temperature 0 is greedy; otherwise nucleus sampling keeps the smallest set of tokens with mass >= top_p.
        With `use_cache` (and a cache available for this attention type) each step feeds one token; without, the
        whole prefix is recomputed every step. `cuda_graph` (on a CUDA device): the one-token step is captured once
        in a CUDA graph over a static cache and replayed (no Python or launch gaps between kernels); for full
        attention each step then attends over every slot of the cache, masked, as HF's StaticCache does.
        """
        if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.shape[1] == 0:
            shape = tuple(prompt.shape) if isinstance(prompt, torch.Tensor) else type(prompt).__name__
            raise ValueError(f"prompt must be [B, T0] with T0 >= 1, got shape {shape}")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if prompt.is_floating_point() or prompt.is_complex() or prompt.dtype == torch.bool:
            raise ValueError(f"prompt must hold integer token ids, got dtype {prompt.dtype}")
        if torch.iinfo(prompt.dtype).max < self.cfg.vocab_size - 1:
            raise ValueError(f"prompt's dtype {prompt.dtype} cannot hold token ids up to vocab_size - 1 = "
                             f"{self.cfg.vocab_size - 1}")
        temperature = _check_real("temperature", temperature, 0.0)
        top_p = _check_real("top_p", top_p, 0.0, 1.0, lo_open=True)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        check_bool("use_cache", use_cache)
        for name, tok, optional in (("eos_token_id", eos_token_id, True), ("pad_token_id", pad_token_id, False)):
            if tok is None and optional:
                continue
            if not (isinstance(tok, numbers.Integral) and not isinstance(tok, bool) and 0 <= tok < self.cfg.vocab_size):
                raise ValueError(f"{name} must be a token id in [0, {self.cfg.vocab_size}), got {tok!r}")
        if not isinstance(cuda_graph, bool):
            raise ValueError(f"cuda_graph must be a bool, got {cuda_graph!r}")
        if cuda_graph and not (use_cache and (self.cfg.attention == "full" or self.cfg.backend != "reference")
                               and prompt.device.type == "cuda" and self.embed.weight.device.type == "cuda"):
            raise ValueError("cuda_graph needs use_cache=True, an NSA backend other than 'reference' (whose decode "
                             "reads the lengths back) and the model and prompt on a CUDA device")
        eos_token_id = None if eos_token_id is None else int(eos_token_id)
        pad_token_id = int(pad_token_id)
        B, T0 = prompt.shape
        dev = prompt.device
        if prompt_lengths is None:
            lengths = torch.full((B,), T0, dtype=torch.long)
        else:
            lengths = check_lengths("prompt_lengths", prompt_lengths, B, 1, T0)
        valid = None if prompt_lengths is None else torch.arange(T0, device=dev)[None, :] < lengths.to(dev)[:, None]
        _check_token_ids("prompt", prompt, self.cfg.vocab_size, valid)  # the padding may hold any ids
        if B == 0:
            return prompt.new_zeros(0, T0 + max_new_tokens)
        ragged = bool((lengths != T0).any())
        rows = torch.arange(B, device=dev)
        out = torch.full((B, T0 + max_new_tokens), pad_token_id, dtype=prompt.dtype, device=dev)
        out[:, :T0] = prompt.masked_fill(torch.arange(T0, device=dev)[None, :] >= lengths.to(dev)[:, None],
                                         pad_token_id)
        cache = self.make_cache(B, T0 + max_new_tokens, static=cuda_graph) if use_cache else None
        shift_state = {} if cache is not None else None
        step_fn = _GraphStep(self, cache, shift_state) if cuda_graph else None
        models = _GENERATING.__dict__.setdefault("models", set())
        outer = id(self) in models  # a generate inside a generate leaves the outer one's mark
        models.add(id(self))
        try:
            return self._generate_loop(out, lengths, max_new_tokens, cache, shift_state, step_fn, ragged, rows,
                                       temperature, top_p, generator, eos_token_id, pad_token_id)
        finally:
            if not outer:
                models.discard(id(self))

    def _generate_loop(self, out, lengths, max_new_tokens, cache, shift_state, step_fn, ragged, rows, temperature,
                       top_p, generator, eos_token_id, pad_token_id):
        B, dev = out.shape[0], out.device
        T0 = out.shape[1] - max_new_tokens
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        nxt, produced = None, torch.zeros(B, dtype=torch.long, device=dev)
        for step in range(max_new_tokens):
            cur = lengths + step  # host: tokens of each row so far
            if cache is not None and step == 0:
                # the prompt with its padding replaced by pad_token_id (any ids may sit there)
                logits = self(out[:, :T0], cache=cache, shift_state=shift_state,
                              new_lengths=lengths if ragged else None)
                logits = logits[rows, (lengths - 1).to(dev)]
            elif step_fn is not None:
                logits = step_fn(nxt[:, None])
            elif cache is not None:
                logits = self(nxt[:, None], cache=cache, shift_state=shift_state)[:, -1]
            elif ragged:  # recompute: the rows' prefixes packed back to back
                keep = torch.arange(out.shape[1], device=dev)[None, :] < cur.to(dev)[:, None]
                cu = F.pad(cur.cumsum(0), (1, 0)).to(dev)
                logits = self(out[keep][None], cu_seqlens=cu)[0, cu[1:] - 1]
            else:
                logits = self(out[:, :T0 + step])[:, -1]
            nxt = sample(logits.float(), temperature, top_p, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt).to(out.dtype)  # the prompt's dtype
            out[rows, cur.to(dev)] = nxt
            produced += ~done
            if eos_token_id is not None:
                done |= nxt == eos_token_id
                if bool(done.all()):
                    break
        return out[:, :int((lengths.to(dev) + produced).max())]

    @staticmethod
    def reorder_cache(cache, beam_idx: torch.Tensor, shift_state: dict | None = None) -> None:
        """Beam search: row b of the cache (and of the token-shift states that `forward` keeps in `shift_state`)
        becomes old row beam_idx[b]. Reordering the cache alone leaves token shift reading the old rows. Both are
        reordered in place (a captured CUDA graph keeps its buffers)."""
        if not isinstance(cache, (KVCache, nsa_cache.NSACache)):
            raise ValueError(f"cache must be a KVCache or an nsa.NSACache, got {type(cache).__name__}")
        if shift_state is not None:  # checked before anything is reordered
            if not isinstance(shift_state, dict):
                raise ValueError(f"shift_state must be a dict (layer index -> state), got {type(shift_state).__name__}")
            for i, state in shift_state.items():
                if not isinstance(state, torch.Tensor) or state.dim() == 0 or state.shape[0] != cache.batch_size:
                    raise ValueError(f"shift_state[{i!r}] must be a tensor of {cache.batch_size} rows (the cache's "
                                     f"batch_size)")
        cache.reorder(beam_idx)
        for state in (shift_state or {}).values():  # in place, as the cache: captured graphs keep their buffers
            state.copy_(state.index_select(0, beam_idx.to(state.device)))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class _GraphStep:
    """A one-token decode step of `model` over a static cache as a CUDA graph: the first call runs the step on a
    side stream (compilation, cuBLAS set-up) and captures it; later calls copy the tokens into the captured input
    buffer and replay. Returns the step's last logits [B, V] (a fresh tensor)."""

    def __init__(self, model, cache, shift_state):
        self.model, self.cache, self.shift_state = model, cache, shift_state
        self.graph = self.tokens = self.logits = None

    def _step(self):
        return self.model(self.tokens, cache=self.cache, shift_state=self.shift_state)[:, -1]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.graph is not None:
            self.tokens.copy_(tokens)
            self.graph.replay()
            return self.logits.clone()
        self.tokens = tokens.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = self._step()  # this call's step, for real
        torch.cuda.current_stream().wait_stream(side)
        logits.record_stream(torch.cuda.current_stream())  # allocated on the side stream, read on this one
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # recorded, not run
            self.logits = self._step()
        return logits


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """Next token [B] from logits [B, V]: argmax at temperature 0, else nucleus (top-p) sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    # the top logit at 0 (a tiny temperature must not overflow it), temperature at least the dtype's smallest normal
    # (else it rounds to 0): tiny temperatures act as greedy
    logits = logits - logits.amax(-1, keepdim=True)
    tiny = torch.finfo(logits.dtype if logits.is_floating_point() else torch.float32).tiny
    probs = torch.softmax(logits / max(temperature, tiny), dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # tokens before which the mass is still < top_p
        keep[..., 0] = True  # the most likely token always (a tiny top_p rounds to 0 in float32)
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
