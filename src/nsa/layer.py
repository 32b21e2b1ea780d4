"""NativeSparseAttention: projections, RoPE, φ, gates, and the NSA op (paper §3)."""
from __future__ import annotations

import itertools
import numbers

import torch
from torch import nn

from .compression import block_starts, make_compressor
from .config import NSAConfig, check_bool, check_int, check_lengths, check_number, num_compressed_tokens
from .ops import dispatch
from .ops.varlen import check_position_ids, token_positions
from .rope import apply_rope, rope_dtype, rope_tables

_LAYER_IDS = itertools.count()


class NativeSparseAttention(nn.Module):
    """NSA attention layer: [B, T, hidden] -> [B, T, hidden] (or packed [1, T, hidden] with `cu_seqlens`).

    - q from one projection; K/V projections per `shared_kv`: False -> independent K/V for cmp, slc and win
      (§3.3.3); True -> one K/V set for all three branches; "slc_win" -> an independent cmp set and one set shared
      by slc and win. Whenever slc and win share, decoding reads the window from the selection cache.
    - cmp keys/values are compressed by φ (`compression`: "mlp" | "linear" | "mean") from *un-rotated* keys; each
      compressed key is then rotated at the position of its block's last token (i*d + l - 1), the first query
      position allowed to see it. q and the slc/win keys are rotated at their own positions.
    - gates g = sigmoid(Linear(x)) per query head and branch (Eq. 5); the Linear's bias starts at `gate_bias`
      (cmp, slc, win), so at initialisation g ≈ sigmoid(gate_bias) (0.5 each by default).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        v_head_dim: int | None = None,
        config: NSAConfig = NSAConfig(),
        compression: str = "mlp",
        shared_kv: bool | str = False,
        rope_theta: float = 10000.0,
        backend: str = "auto",
        gate_bias: tuple[float, float, float] = (0.0, 0.0, 0.0),
    ):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim), ("v_head_dim", head_dim if v_head_dim is None else v_head_dim)):
            check_int(name, value, 1)
        rope_theta = check_number("rope_theta", rope_theta, 0.0, lo_open=True, hi_open=True)
        dispatch.check_backend_name(backend)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
        if not (isinstance(shared_kv, bool) or (isinstance(shared_kv, str) and shared_kv == "slc_win")):
            raise ValueError(f"shared_kv must be True, False or 'slc_win', got {shared_kv!r}")
        if not (isinstance(gate_bias, (tuple, list)) and len(gate_bias) == 3
                and all(isinstance(b, numbers.Real) and not isinstance(b, bool) and abs(b) < float("inf")
                        for b in gate_bias)):
            raise ValueError(f"gate_bias must be 3 finite numbers (cmp, slc, win), got {gate_bias!r}")
        if not isinstance(config, NSAConfig):
            raise ValueError(f"config must be an nsa.NSAConfig, got {type(config).__name__}")
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim, self.v_head_dim, self.config = head_dim, v_head_dim, config
        self.shared_kv, self.rope_theta, self.backend = shared_kv, rope_theta, backend
        self.num_kv_sets = 3 if shared_kv is False else 1 if shared_kv is True else 2
        self.window_reads_slc = self.num_kv_sets < 3  # win uses the slc K/V (and the selection cache)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.kv_proj = nn.Linear(hidden_size, self.num_kv_sets * num_kv_heads * (head_dim + v_head_dim), bias=False)
        self.g_proj = nn.Linear(hidden_size, 3 * num_heads)
        self.gate_bias = tuple(float(b) for b in gate_bias)
        self._set_gate_bias()
        self.o_proj = nn.Linear(num_heads * v_head_dim, hidden_size, bias=False)
        l, d = config.cmp_block_size, config.cmp_stride
        self.compress_k = make_compressor(compression, head_dim, l, d, position_embedding=True)
        self.compress_v = make_compressor(compression, v_head_dim, l, d, position_embedding=False)
        self._call_id = next(_LAYER_IDS)  # tells this layer's compiled block-start op from other layers'

    def __setstate__(self, state) -> None:  # copy.deepcopy and unpickling: a copy is another layer
        super().__setstate__(state)
        self._call_id = next(_LAYER_IDS)

    def _set_gate_bias(self) -> None:
        with torch.no_grad():  # output j = head * 3 + branch
            self.g_proj.bias.copy_(torch.tensor(self.gate_bias).repeat(self.num_heads))

    def reset_parameters(self) -> None:
        """Initialise every parameter again as a new layer's: PyTorch's default for the projections, the gate bias
        at `gate_bias`, φ as mean pooling. For meta-device initialisation (`to_empty()`, then this, or a post-order
        `module.apply`, which resets the children first)."""
        for m in (self.q_proj, self.kv_proj, self.g_proj, self.o_proj, self.compress_k, self.compress_v):
            m.reset_parameters()
        self._set_gate_bias()

    @torch.no_grad()
    def load_dense_attention(self, q_weight, k_weight, v_weight, o_weight) -> None:
        """Start from a dense attention layer (uptraining dense -> NSA): copy its projection weights (nn.Linear
        layouts, no biases: q [HQ·Dk, hidden], k [HKV·Dk, hidden], v [HKV·Dv, hidden], o [hidden, HQ·Dv]) into
        q_proj, every K/V set of kv_proj, and o_proj. The gates and φ keep their initialisation; RoPE must use the
        dense model's base (`rope_theta`)."""
        HQ, HKV, Dk, Dv, H = self.num_heads, self.num_kv_heads, self.head_dim, self.v_head_dim, self.hidden_size
        for name, w, shape in (("q_weight", q_weight, (HQ * Dk, H)), ("k_weight", k_weight, (HKV * Dk, H)),
                               ("v_weight", v_weight, (HKV * Dv, H)), ("o_weight", o_weight, (H, HQ * Dv))):
            if not isinstance(w, torch.Tensor) or tuple(w.shape) != shape:
                got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
                raise ValueError(f"{name} must be {shape}, got {got}")
        kv = torch.cat([k_weight.reshape(HKV, Dk, H), v_weight.reshape(HKV, Dv, H)], 1)  # per KV head: k rows, v rows
        self.q_proj.weight.copy_(q_weight)
        self.kv_proj.weight.copy_(kv.repeat(self.num_kv_sets, 1, 1).reshape(-1, H))
        self.o_proj.weight.copy_(o_weight)

    def extra_repr(self) -> str:
        c = self.config
        return (f"hidden_size={self.hidden_size}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, v_head_dim={self.v_head_dim}, l={c.cmp_block_size}, d={c.cmp_stride}, "
                f"l'={c.slc_block_size}, n={c.num_selected}, w={c.window_size}, shared_kv={self.shared_kv}, "
                f"backend={self.backend!r}")

    def project_tokens(self, x: torch.Tensor, position_ids: torch.Tensor):
        """Per-token projections of x [B, T, hidden] at positions [T] or [B, T], for callers that keep their own
        caches (a serving engine; see `nsa.decode_attention`): (q [B,T,HQ,Dk] rotated, k_cmp_raw / v_cmp_raw
        [B,T,HKV,Dk|Dv] un-rotated (φ's input: pass l of them to `compress` when a block completes), k_slc, v_slc,
        k_win, v_win [B,T,HKV,Dk|Dv] (keys rotated), gates [B,T,HQ,3])."""
        B, T, _ = x.shape
        HQ, HKV, Dk, Dv = self.num_heads, self.num_kv_heads, self.head_dim, self.v_head_dim
        q = self.q_proj(x).view(B, T, HQ, Dk)
        # one table for q, k_slc and k_win (same positions)
        tables = rope_tables(position_ids, Dk, self.rope_theta, x.device, rope_dtype(q.dtype))
        q = apply_rope(q, None, tables=tables)
        kv = self.kv_proj(x).view(B, T, self.num_kv_sets, HKV, Dk + Dv)
        ks, vs = kv[..., :Dk].unbind(2), kv[..., Dk:].unbind(2)
        if self.num_kv_sets == 1:
            ks, vs = ks * 3, vs * 3
        elif self.num_kv_sets == 2:
            ks, vs = (ks[0], ks[1], ks[1]), (vs[0], vs[1], vs[1])
        (k_cmp_raw, k_slc, k_win), (v_cmp_raw, v_slc, v_win) = ks, vs
        k_slc = apply_rope(k_slc, None, tables=tables)
        k_win = k_slc if self.window_reads_slc else apply_rope(k_win, None, tables=tables)
        gates = torch.sigmoid(self.g_proj(x)).view(B, T, HQ, 3)
        return q, k_cmp_raw, v_cmp_raw, k_slc, v_slc, k_win, v_win, gates

    def compress(self, k_raw, v_raw, last_positions, cu_seqlens=None, starts=None):
        """Compressed tokens (k_cmp rotated, v_cmp) of the blocks of raw cmp K/V [B, L, HKV, D] (every l-token
        block at stride d; exactly one block when L = l): φ, then each compressed key rotated at its block's last
        position, `last_positions` [Tc] or [B, Tc] (spec §8)."""
        k_cmp = apply_rope(self.compress_k(k_raw, cu_seqlens, starts), last_positions, self.rope_theta)
        return k_cmp, self.compress_v(v_raw, cu_seqlens, starts)

    def project(self, x: torch.Tensor, cu_seqlens=None, position_ids=None):
        """All inputs of the NSA op for x [B, T, hidden]: (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates).
        position_ids: integer [T] or [B, T] (default: 0.. within each sequence)."""
        B, T = x.shape[:2]
        cu_seqlens = dispatch.check_cu_seqlens(cu_seqlens, x)
        check_position_ids(position_ids, B, T)
        if position_ids is None:
            position_ids = token_positions(T, cu_seqlens, x.device)
        q, k_cmp_raw, v_cmp_raw, k_slc, v_slc, k_win, v_win, gates = self.project_tokens(x, position_ids)
        l, d = self.config.cmp_block_size, self.config.cmp_stride
        # once per call: under compile a packed batch's Tc is one size symbol for K and V
        starts = block_starts(T, l, d, cu_seqlens, x.device, call_id=self._call_id, anchor=x)
        k_cmp, v_cmp = self.compress(k_cmp_raw, v_cmp_raw, position_ids[..., starts + l - 1], cu_seqlens, starts)
        return q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, *, cache=None, layer_idx: int = 0,
                new_lengths: torch.Tensor | None = None, return_aux: bool = False):
        """x [B, T, hidden] -> [B, T, hidden].

        `return_aux` (no cache): also return a dict for analysis, {"block_indices": [B, T, HKV, n] int64, the
        selected blocks (Eq. 11, sequence-local, ascending, -1 padded), "gates": [B, T, HQ, 3], the (cmp, slc,
        win) gates}; the output is the same (the selection then runs as its own op before the attention).

        With `cache` (an `nsa.NSACache`), x continues each cached sequence of layer `layer_idx`: prefill when the
        cache is empty, chunked prefill, or T = 1 decode; RoPE positions come from the cache. Rows may hold
        different numbers of cached tokens. `new_lengths` [B] (optional, each in [0, T]) gives the number of
        valid tokens of each row of x (right padding) for ragged prefill; outputs at padded positions are 0.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.hidden_size:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be [B, T, {self.hidden_size}], got {shape}")
        w = getattr(self.q_proj, "weight", None)  # a method, not a tensor, in a dynamically quantized Linear
        if isinstance(w, torch.Tensor) and x.device != w.device:
            raise ValueError(f"x must be on the layer's device {w.device}, got {x.device}")
        if isinstance(w, torch.Tensor) and x.dtype != w.dtype and not (
                x.is_floating_point() and torch.is_autocast_enabled(x.device.type)):
            raise ValueError(f"x must have the layer's dtype {w.dtype} (or run under autocast), got {x.dtype}")
        check_bool("return_aux", return_aux)
        if cache is not None:
            if cu_seqlens is not None:
                raise ValueError("cu_seqlens cannot be combined with cache (use new_lengths for ragged rows)")
            if position_ids is not None:
                raise ValueError("position_ids cannot be combined with cache: positions come from the cache")
            if return_aux:
                raise ValueError("return_aux is not supported with cache")
            return self._forward_cached(x, cache, layer_idx, new_lengths)
        if new_lengths is not None:
            raise ValueError("new_lengths is only used with cache")
        B, T, _ = x.shape
        cu_seqlens = dispatch.check_cu_seqlens(cu_seqlens, x)
        inputs = self.project(x, cu_seqlens, position_ids)
        idx = None
        if return_aux:
            idx = dispatch.select_blocks(inputs[0].detach(), inputs[1].detach(), config=self.config,
                                         cu_seqlens=cu_seqlens, backend=self.backend)
        o = dispatch.native_sparse_attention(*inputs, config=self.config, cu_seqlens=cu_seqlens, block_indices=idx,
                                             backend=self.backend)
        y = self.o_proj(o.reshape(B, T, self.num_heads * self.v_head_dim))
        return (y, {"block_indices": idx, "gates": inputs[7].detach()}) if return_aux else y

    # ------------------------------------------------------------------------------------------------ decoding
    def _decode_impl(self, device: torch.device) -> str:
        """reference -> readable decode reference; torch -> the torch decode (on the CPU one compiled call for float32,
        bfloat16 or float16 caches, else vectorised); triton (or auto on CUDA) ->
        the Triton decode kernels (decode steps and chunked prefill) where they apply, else the torch decode."""
        if self.backend == "reference":
            return "reference"
        if self.backend == "triton" or (self.backend == "auto" and device.type == "cuda"):
            return "triton"
        return "torch"

    @torch.compiler.disable  # host-side cache bookkeeping: under torch.compile, run eagerly (no per-step recompiles)
    def _forward_cached(self, x, cache, layer_idx, new_lengths):
        from .cache import NSACache

        if not isinstance(cache, NSACache):
            raise ValueError(f"cache must be an nsa.NSACache, got {type(cache).__name__}")
        B, T, _ = x.shape
        if B != cache.batch_size:
            raise ValueError(f"x batch size {B} does not match the cache's batch_size {cache.batch_size}")
        if cache.static and layer_idx in range(cache.num_layers) and cache.layers[layer_idx] is None:
            from .cache import capturing

            if capturing():  # allocated inside the graph, the storage would be zeroed again by every replay
                raise ValueError("a static cache's storage is allocated on a layer's first call: run one call "
                                 "(prefill or step) before capturing a CUDA graph")
        lc = cache.layer(layer_idx, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                         v_head_dim=self.v_head_dim, config=self.config, shared_kv=self.window_reads_slc,
                         device=x.device, dtype=x.dtype)
        if lc.k_slc.device != x.device:
            raise ValueError(f"the cache's device {lc.k_slc.device} must match x's device {x.device}")
        if new_lengths is None and T == 1 and cache.static:
            return self._static_step(x, lc)
        if new_lengths is None:
            return self._cached_step(x, lc, slice(None)) if T else self.o_proj(x.new_zeros(B, 0, self.num_heads *
                                                                                            self.v_head_dim))
        n_host = check_lengths("new_lengths", new_lengths, B, 0, T)
        if B and int((lc.host_lengths + n_host).max()) > lc.max_length:  # before any row group is written
            raise ValueError(f"cache max_length {lc.max_length} exceeded: {int((lc.host_lengths + n_host).max())} "
                             f"tokens")
        out = x.new_zeros(B, T, self.hidden_size)
        for n in sorted(set(n_host.tolist())):  # rows with the same number of new tokens run together
            if n == 0:
                continue
            rows = (n_host == n).nonzero().flatten()
            rows_d = rows.to(x.device)
            out[rows_d, :n] = self._cached_step(x[rows_d, :n], lc, rows)
        return out

    def _cached_step(self, x, lc, rows):
        """Append x [R, T, hidden] to the cached rows `rows` (slice(None) or a CPU LongTensor) and attend."""
        from .ops.decode import decode_attention

        R, T, _ = x.shape
        dev, cdt = x.device, lc.k_slc.dtype
        L_old = lc.host_lengths[rows]  # host: sizes and branch decisions
        L_new = L_old + T
        if int(L_new.max()) > lc.max_length:
            raise ValueError(f"cache max_length {lc.max_length} exceeded: {int(L_new.max())} tokens")
        ridx = (torch.arange(R, device=dev) if isinstance(rows, slice) else rows.to(dev))[:, None]
        L_old_d = lc.lengths[ridx[:, 0]]  # the same lengths on the device, for position arithmetic there
        pos = L_old_d[:, None] + torch.arange(T, device=dev)  # [R, T]
        q, kc_raw, vc_raw, k_slc, v_slc, k_win, v_win, gates = self.project_tokens(x, pos)
        lc.k_slc[ridx, pos] = k_slc.detach().to(cdt)
        lc.v_slc[ridx, pos] = v_slc.detach().to(cdt)
        win_start = None
        if not self.window_reads_slc:  # the ring holds positions L_old - cap .. L_old - 1; the window needs them + new
            cap = lc.window_capacity
            ring = (L_old_d[:, None] - cap + torch.arange(cap, device=dev)) % cap
            k_win_all = torch.cat([lc.k_win[ridx, ring], k_win.to(cdt)], 1)
            v_win_all = torch.cat([lc.v_win[ridx, ring], v_win.to(cdt)], 1)
            win_start = L_old_d - cap
            keep = min(T, cap)
            lc.k_win[ridx, pos[:, T - keep:] % cap] = k_win[:, T - keep:].detach().to(cdt)
            lc.v_win[ridx, pos[:, T - keep:] % cap] = v_win[:, T - keep:].detach().to(cdt)
        fresh = self._append_compressed(lc, ridx, L_old, L_old_d, kc_raw, vc_raw)
        L_new_d = L_old_d + T
        lc.set_lengths(rows, L_new, L_new_d)
        if fresh is not None and self._full_backend_available(dev):
            # empty cache: this is an ordinary prefill, run the layer's backend on the chunk itself
            o = dispatch.native_sparse_attention(q, *fresh, k_slc, v_slc, k_win, v_win, gates, config=self.config,
                                                 backend=self.backend)
            return self.o_proj(o.reshape(R, T, -1))
        Lmax = int(L_new.max())
        Tc = num_compressed_tokens(Lmax, self.config.cmp_block_size, self.config.cmp_stride)
        if isinstance(rows, slice):
            k_cmp, v_cmp, k_s, v_s = lc.k_cmp[:, :Tc], lc.v_cmp[:, :Tc], lc.k_slc[:, :Lmax], lc.v_slc[:, :Lmax]
        else:
            r = ridx[:, 0]
            k_cmp, v_cmp, k_s, v_s = lc.k_cmp[r, :Tc], lc.v_cmp[r, :Tc], lc.k_slc[r, :Lmax], lc.v_slc[r, :Lmax]
        if self.window_reads_slc:
            k_win_all, v_win_all = k_s, v_s
        o = decode_attention(q, k_cmp, v_cmp, k_s, v_s, k_win_all, v_win_all, gates, lengths=L_new_d,
                             config=self.config, win_start=win_start, impl=self._decode_impl(dev), host_lengths=L_new)
        return self.o_proj(o.reshape(R, T, -1))

    def _static_step(self, x, lc):
        """One-token decode step of every row of a static cache, x [B, 1, hidden]: no decision depends on the
        lengths, so a CUDA graph captured once replays every later step. The same output and cache contents as
        `_cached_step`: every row's candidate compressed block goes through φ, and is kept where the new token
        completes it (Eq. 7); the attention is sized by the capacity (`decode_attention(max_length=)`). Eagerly, a
        full row raises (one read of the lengths); while a graph is captured nothing is read back (the reference
        decode excepted: it reads the lengths, so it cannot be captured), and a row already at capacity stores
        nothing and comes out NaN."""
        from .cache import capturing
        from .ops.decode import decode_attention

        B = x.shape[0]
        dev, cdt, S = x.device, lc.k_slc.dtype, lc.max_length
        if not capturing():
            need = int(lc.lengths.max()) + 1 if B else 0
            if need > S:
                raise ValueError(f"cache max_length {S} exceeded: {need} tokens")
        l, d = self.config.cmp_block_size, self.config.cmp_stride
        p = lc.lengths.clone()  # [B] the new token's position (lengths advance in place below)
        room = p < S
        p_w = p.clamp(max=S - 1)  # a full row's writes put back what the slot holds
        rows = torch.arange(B, device=dev)

        def put(buf, slot, new, write=room):  # buf[b, slot[b]] = new[b] where write[b] (default: the row has room)
            old = buf[rows, slot]
            buf[rows, slot] = torch.where(write.view(-1, *(1,) * (old.dim() - 1)), new.to(cdt), old)

        q, kc_raw, vc_raw, k_slc, v_slc, k_win, v_win, gates = self.project_tokens(x, p_w[:, None])
        put(lc.k_slc, p_w, k_slc[:, 0].detach())
        put(lc.v_slc, p_w, v_slc[:, 0].detach())
        win_start = None
        if not self.window_reads_slc:  # the ring, then unrolled: slot s holds position L + 1 - cap + s
            cap = lc.window_capacity
            put(lc.k_win, p_w % cap, k_win[:, 0].detach())
            put(lc.v_win, p_w % cap, v_win[:, 0].detach())
            win_start = p_w + 1 - cap
            ring = (win_start[:, None] + torch.arange(cap, device=dev)) % cap
            k_win_all, v_win_all = lc.k_win[rows[:, None], ring], lc.v_win[rows[:, None], ring]
        cap_t = lc.tail_capacity
        if lc.k_cmp.shape[1]:  # φ over the block ending at p (positions p - l + 1 .. p)
            tail = (p_w[:, None] - cap_t + torch.arange(cap_t, device=dev)) % max(cap_t, 1)
            blk_k = torch.cat([lc.k_tail[rows[:, None], tail].to(kc_raw.dtype), kc_raw], 1)  # [B, l, HKV, D]
            blk_v = torch.cat([lc.v_tail[rows[:, None], tail].to(vc_raw.dtype), vc_raw], 1)
            k_new, v_new = self.compress(blk_k, blk_v, p_w[:, None])
            i_new = (p_w + 1 - l).clamp(min=0) // d
            completes = room & (p_w + 1 >= l) & ((p_w + 1 - l) % d == 0)
            put(lc.k_cmp, i_new, k_new[:, 0].detach(), completes)
            put(lc.v_cmp, i_new, v_new[:, 0].detach(), completes)
        if cap_t:
            put(lc.k_tail, p_w % cap_t, kc_raw[:, 0].detach())
            put(lc.v_tail, p_w % cap_t, vc_raw[:, 0].detach())
        lc.lengths += room.long()
        lengths = torch.where(room, p + 1, S + 1)  # a full row lies past max_length: NaN
        k_s, v_s = lc.k_slc, lc.v_slc
        if self.window_reads_slc:
            k_win_all, v_win_all = k_s, v_s
        o = decode_attention(q, lc.k_cmp, lc.v_cmp, k_s, v_s, k_win_all, v_win_all, gates, lengths=lengths,
                             config=self.config, win_start=win_start, impl=self._decode_impl(dev), max_length=S)
        return self.o_proj(o.reshape(B, 1, -1))

    def _full_backend_available(self, device) -> bool:
        try:
            module = dispatch.resolve_backend(self.backend, device)
        except ValueError:
            return False
        return hasattr(module, "native_sparse_attention")

    def _append_compressed(self, lc, ridx, L_old, L_old_d, kc_raw, vc_raw):
        """Emit the compressed tokens completed by the new raw cmp K/V [R, T, HKV, D] and keep the pending tail.

        Block i (tokens i*d .. i*d + l - 1, Eq. 7) is emitted once its last token arrives. The cache stores
        detached tensors: it never holds autograd history. Returns the chunk's
        compressed (k, v) when every row started empty (one batched φ, exactly as the full forward), else None.
        """
        l, d = self.config.cmp_block_size, self.config.cmp_stride
        cap, cdt = lc.tail_capacity, lc.k_tail.dtype
        R, T = kc_raw.shape[:2]
        dev = kc_raw.device
        if int(L_old.max()) == 0:
            n = num_compressed_tokens(T, l, d)
            k_cmp, v_cmp = self.compress(kc_raw, vc_raw, torch.arange(n, device=dev) * d + l - 1)
            lc.k_cmp[ridx, torch.arange(n, device=dev)] = k_cmp.detach().to(cdt)
            lc.v_cmp[ridx, torch.arange(n, device=dev)] = v_cmp.detach().to(cdt)
            if cap:
                keep = torch.arange(n * d, T, device=dev)
                lc.k_tail[ridx, keep % cap] = kc_raw[:, n * d:].detach().to(cdt)
                lc.v_tail[ridx, keep % cap] = vc_raw[:, n * d:].detach().to(cdt)
            return k_cmp, v_cmp
        if T == 1 and cap:  # decode: one candidate block per row (positions p - l + 1 .. p), emitted where complete
            p, p_d = L_old, L_old_d  # host (decisions), device (indices): no host-to-device copy

            def completes(pos):  # position pos ends compressed block (pos + 1 - l) / d
                return ((pos + 1 - l) >= 0) & ((pos + 1 - l) % d == 0)

            emit = completes(p)
            if bool(emit.any()):  # φ over every row's candidate block; rows that complete none keep their entry
                slots = (p_d[:, None] - cap + torch.arange(cap, device=dev)) % cap
                blk_k = torch.cat([lc.k_tail[ridx, slots].to(kc_raw.dtype), kc_raw], 1)  # [R, l, HKV, D]
                blk_v = torch.cat([lc.v_tail[ridx, slots].to(vc_raw.dtype), vc_raw], 1)
                k_new, v_new = self.compress(blk_k, blk_v, p_d[:, None])
                i_new = ((p_d + 1 - l).clamp(min=0) // d)[:, None]
                if not bool(emit.all()):
                    keep = ~completes(p_d)[:, None, None, None]
                    k_new = torch.where(keep, lc.k_cmp[ridx, i_new].to(k_new.dtype), k_new)
                    v_new = torch.where(keep, lc.v_cmp[ridx, i_new].to(v_new.dtype), v_new)
                lc.k_cmp[ridx, i_new] = k_new.detach().to(cdt)
                lc.v_cmp[ridx, i_new] = v_new.detach().to(cdt)
            lc.k_tail[ridx, (p_d % cap)[:, None]] = kc_raw.detach().to(cdt)
            lc.v_tail[ridx, (p_d % cap)[:, None]] = vc_raw.detach().to(cdt)
            return None
        for r in range(R):  # chunked prefill: per row, tail + chunk, then φ over the completed blocks
            Lo = int(L_old[r])
            Ln = Lo + T
            c_old, c_new = num_compressed_tokens(Lo, l, d), num_compressed_tokens(Ln, l, d)
            start = c_old * d
            held = torch.arange(start, Lo, device=dev)
            row = ridx[r]
            seq_k = torch.cat([lc.k_tail[row, held % cap].to(kc_raw.dtype) if cap else kc_raw[r, :0], kc_raw[r]])
            seq_v = torch.cat([lc.v_tail[row, held % cap].to(vc_raw.dtype) if cap else vc_raw[r, :0], vc_raw[r]])
            if c_new > c_old:
                idx = torch.arange(c_old, c_new, device=dev)
                k_new, v_new = self.compress(seq_k[None], seq_v[None], idx * d + l - 1)
                lc.k_cmp[row, idx] = k_new[0].detach().to(cdt)
                lc.v_cmp[row, idx] = v_new[0].detach().to(cdt)
            if cap:
                keep = torch.arange(c_new * d, Ln, device=dev)
                lc.k_tail[row, keep % cap] = seq_k[c_new * d - start:].detach().to(cdt)
                lc.v_tail[row, keep % cap] = seq_v[c_new * d - start:].detach().to(cdt)
        return None
