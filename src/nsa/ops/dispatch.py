"""The public NSA ops: input checks and the one place that picks a backend.

Every backend module exposes the same functions with the same signatures as `nsa.ops.reference`; this file checks
the inputs once (raising ValueError that names the offending argument) and forwards to the chosen backend.
"""
from __future__ import annotations

import importlib
import math
import numbers
from types import ModuleType

import torch

from ..config import NSAConfig, bounded_window
from . import library
from .varlen import host_offsets, num_compressed_total, remember_offsets

# name -> module path; a backend whose import fails (e.g. Triton missing) is reported as unavailable.
_BACKENDS = {
    "reference": "nsa.ops.reference",
    "torch": "nsa.ops.torch_backend",
    "triton": "nsa.ops.triton",
}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def register_backend(name: str, module_path: str) -> None:
    """Make `backend=name` resolve to the module at `module_path` (same functions as `nsa.ops.reference`)."""
    _BACKENDS[name] = module_path


def available_backends() -> list[str]:
    out = []
    for name in _BACKENDS:
        try:
            _load(name)
        except ImportError:  # not installed here (Triton missing) or not built yet
            continue
        out.append(name)
    return out


def _load(name: str) -> ModuleType:
    return importlib.import_module(_BACKENDS[name])


def check_backend_name(backend) -> str:
    """backend as given when it names one ('auto' or a registered backend), else ValueError naming it."""
    if not isinstance(backend, str) or (backend != "auto" and backend not in _BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {sorted(_BACKENDS)}, got {backend!r}")
    return backend


def resolve_backend(backend: str, device: torch.device) -> ModuleType:
    """'auto' picks triton on CUDA (when importable), else the fast torch backend, else the reference."""
    if backend == "auto":
        order = ["triton", "torch", "reference"] if device.type == "cuda" else ["torch", "reference"]
        for name in order:
            if name in _BACKENDS:
                try:
                    return _load(name)
                except ImportError:
                    continue
        return _load("reference")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(_BACKENDS)}, got {backend!r}")
    try:
        return _load(backend)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ValueError(f"backend {backend!r} is not available here: {exc}") from exc


def _eager_under_compile(fn):
    """torch.compile runs the op eagerly (one graph break around it) instead of tracing into the backends' host
    logic and C++/Triton calls, which Dynamo cannot trace (it warned about every compiled-kernel call)."""
    return torch.compiler.disable(fn, recursive=True)


# ----------------------------------------------------------------------------------------------- input checks
def _check_tensor(name, x, ndim=4):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")


def _check_qkv(q, k, v, kname="k", vname="v", same_time=True):
    _check_tensor("q", q)
    _check_tensor(kname, k)
    _check_tensor(vname, v)
    if q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    for name, x in ((kname, k), (vname, v)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")
        if x.shape[0] != q.shape[0]:
            raise ValueError(f"{name} batch size {x.shape[0]} does not match q's {q.shape[0]}")
        if same_time and x.shape[1] != q.shape[1]:
            raise ValueError(f"{name} length {x.shape[1]} does not match q's {q.shape[1]}")
    if k.shape[2] == 0 or q.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(f"{kname} heads ({k.shape[2]}) must divide q heads ({q.shape[2]}), both positive")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"{vname} heads ({v.shape[2]}) must equal {kname} heads ({k.shape[2]})")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"{kname} head dim ({k.shape[3]}) must equal q's ({q.shape[3]})")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"{vname} length {v.shape[1]} does not match {kname}'s {k.shape[1]}")
    if q.shape[3] == 0 or v.shape[3] == 0:
        raise ValueError("q and v head dims must be positive")


def _check_cu_seqlens(cu_seqlens, q, values=True):
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D tensor [N+1] of sequence offsets")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if q.shape[0] != 1:
        raise ValueError(f"cu_seqlens requires a packed batch of size 1, got q batch size {q.shape[0]}")
    if not values:
        return cu_seqlens
    values = check_offset_values(cu_seqlens, q.shape[1])
    on_device = cu_seqlens.to(q.device)
    if on_device is cu_seqlens and cu_seqlens.is_inference():
        on_device = cu_seqlens.clone()  # ours: its values can be remembered (a caller's inference tensor's cannot)
    return remember_offsets(on_device, values, owned=on_device is not cu_seqlens)


def check_offset_values(cu_seqlens: torch.Tensor, seqlen: int) -> list[int]:
    """The offsets' host values (read once, or remembered: the backends' host-side planning reuses them), after
    checking that they run from 0 to seqlen without decreasing."""
    values = host_offsets(cu_seqlens)
    if values[0] != 0 or values[-1] != seqlen:
        raise ValueError(f"cu_seqlens must start at 0 and end at T={seqlen}, got {values}")
    if any(b < a for a, b in zip(values[:-1], values[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {values}")
    return values


def check_cu_seqlens(cu_seqlens, x: torch.Tensor):
    """Validated offsets for a packed x [1, T, ...] (ValueError naming cu_seqlens), on x's device, their host
    values remembered; None stays None. For layers and models, before they slice by the offsets. Under
    torch.compile the shape and dtype are checked while tracing and the values at run time, by an op whose output
    every later use of the offsets depends on (so no op can read bad offsets first)."""
    if not torch.compiler.is_compiling():
        return _check_cu_seqlens(cu_seqlens, x)
    cu_seqlens = _check_cu_seqlens(cu_seqlens, x, values=False)
    return None if cu_seqlens is None else library.checked_offsets(cu_seqlens, x.shape[1]).to(x.device)


def _check_scale(scale):
    """scale as a Python float (NumPy scalars accepted) or None, else ValueError."""
    if scale is None:
        return None
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
    return float(scale)


def _check_positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_config(config):
    if not isinstance(config, NSAConfig):
        raise ValueError(f"config must be an nsa.NSAConfig, got {type(config).__name__}")


def _check_cmp(q, k_cmp, v_cmp, block_size, stride, cu_seqlens, kname="k_cmp", vname="v_cmp", values=True):
    _check_qkv(q, k_cmp, v_cmp, kname, vname, same_time=False)
    if not values and cu_seqlens is not None:
        return  # a packed batch's compressed-token count depends on the offsets' values: the op checks it
    expected = num_compressed_total(q.shape[1], cu_seqlens, block_size, stride)
    if k_cmp.shape[1] != expected:
        raise ValueError(
            f"{kname} must hold {expected} compressed tokens for this q (block {block_size}, stride {stride}), "
            f"got {k_cmp.shape[1]}"
        )


def _check_indices(indices, q, k, block_size, values=True, name="indices"):
    _check_tensor(name, indices)
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {indices.dtype}")
    if indices.device != q.device:
        raise ValueError(f"{name} must be on q's device {q.device}, got {indices.device}")
    B, T, HKV = q.shape[0], q.shape[1], k.shape[2]
    if tuple(indices.shape[:3]) != (B, T, HKV):
        raise ValueError(f"{name} must be [B, T, HKV, n] = [{B}, {T}, {HKV}, n], got {tuple(indices.shape)}")
    if values and indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        nb = math.ceil(T / block_size)
        if lo < -1 or hi >= nb:
            raise ValueError(f"{name} must lie in [-1, {nb - 1}] (block size {block_size}), got [{lo}, {hi}]")


def _check_backend_name(backend):
    if not isinstance(backend, str):
        raise ValueError(f"backend must be a string, got {backend!r}")


# ----------------------------------------------------------------------------------------------- public ops
def check_branch(branch, q, k, v, indices, geometry, *, scale=None, cu_seqlens=None, backend="auto", values=True):
    """Input checks of one branch op ("cmp": geometry (l, d); "slc": (l',) with indices; "win": (w,)); returns
    cu_seqlens on q's device. values=False: as in `check_native_sparse_attention`."""
    names = {"cmp": ("block_size", "stride"), "slc": ("block_size",), "win": ("window",)}[branch]
    for name, value in zip(names, geometry):
        _check_positive_int(name, value)
    _check_scale(scale)
    _check_backend_name(backend)
    if branch == "cmp":
        _check_tensor("q", q)
        cu_seqlens = _check_cu_seqlens(cu_seqlens, q, values)
        _check_cmp(q, k, v, *geometry, cu_seqlens, values=values)
        return cu_seqlens
    _check_qkv(q, k, v)
    cu_seqlens = _check_cu_seqlens(cu_seqlens, q, values)
    if branch == "slc":
        _check_indices(indices, q, k, geometry[0], values)
    return cu_seqlens


def bounded_geometry(branch, geometry, seqlen):
    """A window branch's (w,) as (min(w, max(seqlen, 1)),): see `bounded_window`."""
    return (min(geometry[0], max(int(seqlen), 1)),) if branch == "win" else tuple(geometry)


def _compiling_with(backend, q, split_pair):
    """Whether this call is being traced by torch.compile and `backend` has the split pair the custom ops run."""
    return torch.compiler.is_compiling() and isinstance(q, torch.Tensor) and _compiles_as_custom_op(
        backend, q.device.type, split_pair)


def compressed_attention(q, k_cmp, v_cmp, *, block_size, stride, scale=None, cu_seqlens=None, backend="auto"):
    """Attention of q [B,T,HQ,Dk] over compressed tokens k_cmp/v_cmp [B,Tc,HKV,Dk|Dv] (Eq. 7).

    Query t sees compressed token i iff i*d + l - 1 <= t. Returns (o [B,T,HQ,Dv], lse [B,T,HQ] in fp32/fp64);
    a query that sees none gets o = 0 and lse = -inf.
    """
    return _branch_op("cmp", q, k_cmp, v_cmp, None, (block_size, stride), scale, cu_seqlens, backend)


def selected_attention(q, k, v, indices, *, block_size, scale=None, cu_seqlens=None, backend="auto",
                       return_lse=False):
    """Attention over the raw tokens of the blocks in `indices` [B,T,HKV,n] (Eq. 12), causal inside a block.
    Returns o [B,T,HQ,Dv], or (o, lse [B,T,HQ] fp32/fp64, natural log, -inf where a query sees no key) with
    `return_lse` (differentiable: e.g. to merge with attention computed elsewhere)."""
    o, lse = _branch_op("slc", q, k, v, indices, (block_size,), scale, cu_seqlens, backend)
    return (o, lse) if return_lse else o


def sliding_window_attention(q, k, v, *, window, scale=None, cu_seqlens=None, backend="auto", return_lse=False):
    """Attention over keys in [t - window + 1, t] of the query's own sequence. Returns o [B,T,HQ,Dv], or (o, lse)
    with `return_lse`, as `selected_attention`."""
    o, lse = _branch_op("win", q, k, v, None, (window,), scale, cu_seqlens, backend)
    return (o, lse) if return_lse else o


def _branch_op(branch, q, k, v, indices, geometry, scale, cu_seqlens, backend):
    scale = _check_scale(scale)
    if _compiling_with(backend, q, "branch_fwd"):
        check_branch(branch, q, k, v, indices, geometry, scale=scale, cu_seqlens=cu_seqlens, backend=backend,
                     values=False)
        return library.branch(branch, q, k, v, indices, geometry=geometry, scale=scale, cu_seqlens=cu_seqlens,
                              backend=backend)
    return _branch_op_eager(branch, q, k, v, indices, geometry, scale, cu_seqlens, backend)


@_eager_under_compile
def _branch_op_eager(branch, q, k, v, indices, geometry, scale, cu_seqlens, backend):
    cu_seqlens = check_branch(branch, q, k, v, indices, geometry, scale=scale, cu_seqlens=cu_seqlens,
                              backend=backend)
    geometry = bounded_geometry(branch, geometry, q.shape[1])
    impl = resolve_backend(backend, q.device)
    if branch == "cmp":
        return impl.compressed_attention(q, k, v, block_size=geometry[0], stride=geometry[1], scale=scale,
                                         cu_seqlens=cu_seqlens)
    if branch == "slc":
        return impl.selected_attention(q, k, v, indices, block_size=geometry[0], scale=scale,
                                       cu_seqlens=cu_seqlens, return_lse=True)
    return impl.sliding_window_attention(q, k, v, window=geometry[0], scale=scale, cu_seqlens=cu_seqlens,
                                         return_lse=True)


def _check_select_blocks(q, k_cmp, config, scale, cu_seqlens, backend, values=True):
    _check_config(config)
    _check_scale(scale)
    _check_backend_name(backend)
    _check_tensor("q", q)
    cu_seqlens = _check_cu_seqlens(cu_seqlens, q, values)
    _check_cmp(q, k_cmp, k_cmp, config.cmp_block_size, config.cmp_stride, cu_seqlens, "k_cmp", "k_cmp", values)
    return cu_seqlens


def select_blocks(q, k_cmp, *, config, scale=None, cu_seqlens=None, backend="auto"):
    """Selected block indices [B,T,HKV,n] (Eq. 8-11): ascending, -1 padded, forced init/local blocks included."""
    scale = _check_scale(scale)
    if torch.compiler.is_compiling():
        _check_select_blocks(q, k_cmp, config, scale, cu_seqlens, backend, values=False)
        return library.select_blocks(q, k_cmp, config=config, scale=scale, cu_seqlens=cu_seqlens, backend=backend)
    return _select_blocks_eager(q, k_cmp, config, scale, cu_seqlens, backend)


@_eager_under_compile
def _select_blocks_eager(q, k_cmp, config, scale, cu_seqlens, backend):
    cu_seqlens = _check_select_blocks(q, k_cmp, config, scale, cu_seqlens, backend)
    return resolve_backend(backend, q.device).select_blocks(q, k_cmp, config=config, scale=scale,
                                                            cu_seqlens=cu_seqlens)


def check_native_sparse_attention(
    q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, config, scale=None, cu_seqlens=None, block_indices=None,
    backend="auto", values=True,
):
    """The composed op's input checks; returns cu_seqlens on q's device (its host values remembered).
    values=False skips the checks that read tensor contents (cu_seqlens' offsets, the range of block_indices, and
    the compressed-token count of a packed batch), which torch.compile cannot trace: the op runs them later."""
    _check_config(config)
    _check_scale(scale)
    _check_backend_name(backend)
    _check_qkv(q, k_slc, v_slc, "k_slc", "v_slc")
    _check_qkv(q, k_win, v_win, "k_win", "v_win")
    if k_win.shape[2] != k_slc.shape[2]:
        raise ValueError(f"k_win heads ({k_win.shape[2]}) must equal k_slc heads ({k_slc.shape[2]})")
    if v_win.shape[3] != v_slc.shape[3]:
        raise ValueError(f"v_win head dim ({v_win.shape[3]}) must equal v_slc's ({v_slc.shape[3]})")
    cu_seqlens = _check_cu_seqlens(cu_seqlens, q, values)
    _check_cmp(q, k_cmp, v_cmp, config.cmp_block_size, config.cmp_stride, cu_seqlens, values=values)
    if k_cmp.shape[2] != k_slc.shape[2]:
        raise ValueError(f"k_cmp heads ({k_cmp.shape[2]}) must equal k_slc heads ({k_slc.shape[2]})")
    if v_cmp.shape[3] != v_slc.shape[3]:
        raise ValueError(f"v_cmp head dim ({v_cmp.shape[3]}) must equal v_slc's ({v_slc.shape[3]})")
    _check_tensor("gates", gates)
    if tuple(gates.shape) != (q.shape[0], q.shape[1], q.shape[2], 3):
        raise ValueError(f"gates must be [B, T, HQ, 3] = {(*q.shape[:3], 3)}, got {tuple(gates.shape)}")
    if not gates.is_floating_point():
        raise ValueError(f"gates must be a floating tensor, got {gates.dtype}")
    if gates.device != q.device:
        raise ValueError(f"gates must be on q's device {q.device}, got {gates.device}")
    if block_indices is not None:
        _check_indices(block_indices, q, k_slc, config.slc_block_size, values, "block_indices")
        if block_indices.shape[3] != config.num_selected:
            raise ValueError(
                f"block_indices must list config.num_selected={config.num_selected} blocks, got {block_indices.shape[3]}"
            )
    return cu_seqlens


@_eager_under_compile
def decode_attention(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, lengths, config, scale=None,
                     win_start=None, backend="auto", host_lengths=None, max_length=None):
    """NSA output o [B,Tq,HQ,Dv] for the LAST Tq positions of each cached sequence: a decode step (Tq = 1) or a
    chunked prefill (Tq > 1), over caches the caller keeps (what `NSACache` and the layer do for you).

    Sequence b holds lengths[b] tokens *including* its Tq new ones. q [B,Tq,HQ,Dk] (rotated); k_cmp/v_cmp
    [B,Sc,HKV,Dk|Dv] compressed tokens (the first Tc(lengths[b]) are read); k_slc/v_slc [B,S,HKV,Dk|Dv] with slot p =
    position p; k_win/v_win [B,W,HKV,Dk|Dv] with slot s = position win_start[b] + s (win_start None: indexed by
    position, e.g. the selection tensors themselves); gates [B,Tq,HQ,3]. The checks read lengths (unless
    `host_lengths`, a CPU copy, is given) and win_start on the host. backend: "auto" (triton decode kernels on CUDA,
    else torch), "triton", "torch", "reference". Semantics: docs/spec.md §12.

    `max_length` (host int, e.g. the cache capacity) sizes the work instead, and nothing is read from the device
    (with the torch and triton backends; "reference" loops over rows on the host): one CUDA graph captured with it
    replays every later step as the lengths grow in place. k_slc (and k_win when win_start is None) must hold
    max_length slots; host_lengths is not taken then. Rows whose lengths (or window slots) are out of range cannot
    raise then: they come out NaN, and nothing is read out of bounds.
    """
    from .decode import decode_attention as _decode_attention

    scale = _check_scale(scale)
    _check_backend_name(backend)
    impls = {"reference": "reference", "torch": "torch", "triton": "triton"}
    if backend == "auto":
        impl = "triton" if isinstance(q, torch.Tensor) and q.device.type == "cuda" else "torch"
    elif backend in impls:
        impl = impls[backend]
    else:
        raise ValueError(f"backend must be 'auto' or one of {sorted(impls)}, got {backend!r}")
    return _decode_attention(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, lengths=lengths, config=config,
                             scale=scale, win_start=win_start, impl=impl, host_lengths=host_lengths,
                             check_window=True, max_length=max_length)


@torch.compiler.assume_constant_result
def _compiles_as_custom_op(backend: str, device_type: str, split_pair: str) -> bool:
    """Whether the backend has the split forward/backward pair (`split_pair`: the forward's name) that
    `nsa.ops.library` runs as custom ops."""
    try:
        return hasattr(resolve_backend(backend, torch.device(device_type)), split_pair)
    except ValueError:
        return False


def native_sparse_attention(
    q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, config, scale=None, cu_seqlens=None,
    block_indices=None, backend="auto",
):
    """Native Sparse Attention (Eq. 5): o = g_cmp*o_cmp + g_slc*o_slc + g_win*o_win.

    q [B,T,HQ,Dk]; k_cmp/v_cmp [B,Tc,HKV,Dk|Dv] compressed tokens (output of φ); k_slc/v_slc and k_win/v_win
    [B,T,HKV,Dk|Dv]; gates [B,T,HQ,3] in (cmp, slc, win) order; config an NSAConfig. `block_indices`
    [B,T,HKV,n] replaces the selection computed from the compressed scores. Returns o [B,T,HQ,Dv].

    Under torch.compile the torch and triton backends run as custom ops (`nsa.ops.library`): no graph break.
    """
    args = (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates)
    scale = _check_scale(scale)
    if _compiling_with(backend, q, "native_sparse_attention_fwd"):
        check_native_sparse_attention(*args, config=config, scale=scale, cu_seqlens=cu_seqlens,
                                      block_indices=block_indices, backend=backend, values=False)
        return library.native_sparse_attention(*args, config=config, scale=scale, cu_seqlens=cu_seqlens,
                                               block_indices=block_indices, backend=backend)
    return _native_sparse_attention_eager(*args, config=config, scale=scale, cu_seqlens=cu_seqlens,
                                          block_indices=block_indices, backend=backend)


@_eager_under_compile
def _native_sparse_attention_eager(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, config, scale,
                                   cu_seqlens, block_indices, backend):
    args = (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates)
    cu_seqlens = check_native_sparse_attention(*args, config=config, scale=scale, cu_seqlens=cu_seqlens,
                                               block_indices=block_indices, backend=backend)
    return resolve_backend(backend, q.device).native_sparse_attention(
        *args, config=bounded_window(config, q.shape[1]), scale=scale, cu_seqlens=cu_seqlens,
        block_indices=block_indices)
