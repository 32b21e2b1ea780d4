"""selected_attention / sliding_window_attention with return_lse: the lse equals the reference's, and gradients
through it (delta = rowsum(dO * O) - dlse) match autograd of the reference, for every backend, padded and packed,
GQA; float64 gradcheck of the reference."""
import pytest
import torch

import nsa
from nsa.ops import torch_backend as tb
from nsa.ops import torch_dense
from tests.kit import CPU_BACKENDS, assert_close, make_inputs, small_config

CFG = small_config()  # l=8, d=4, l'=16, n=4, w=16
BACKENDS = CPU_BACKENDS + (["triton"] if "triton" in nsa.available_backends() else [])


def _branch(name, x, idx, cu, backend):
    q, k, v = x[0], x[3], x[4]
    if name == "slc":
        return nsa.selected_attention(q, k, v, idx, block_size=CFG.slc_block_size, cu_seqlens=cu, backend=backend,
                                      return_lse=True)
    return nsa.sliding_window_attention(q, x[5], x[6], window=CFG.window_size, cu_seqlens=cu, backend=backend,
                                        return_lse=True)


def _grads(out, x, seed=4):
    g = torch.Generator().manual_seed(seed)
    o, lse = out
    do = torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)
    dl = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(lse.dtype)
    loss = (o * do).sum() + torch.where(torch.isfinite(lse), lse * dl, 0).sum()
    return torch.autograd.grad(loss, [t for t in x if t.requires_grad], allow_unused=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["slc", "win"])
@pytest.mark.parametrize("varlen", [False, True])
def test_lse_and_its_gradient_match_the_reference(backend, name, varlen, monkeypatch):
    monkeypatch.setattr(torch_dense, "DENSE_MAX_LEN", 0)
    dtype = torch.float32 if backend == "triton" else torch.float64
    cu = torch.tensor([0, 9, 40, 71]) if varlen else None
    B, T = (1, 71) if varlen else (2, 53)
    x = make_inputs(B, T, 6, 2, 16, 8, CFG, dtype=dtype, cu_seqlens=cu, seed=5, requires_grad=True)
    idx = nsa.select_blocks(x[0].detach(), x[1].detach(), config=CFG, cu_seqlens=cu, backend="reference")
    got, exp = _branch(name, x, idx, cu, backend), _branch(name, x, idx, cu, "reference")
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=5e-5, rtol=5e-5)
    assert got[1].dtype == exp[1].dtype
    for a, b, what in ((got[0], exp[0], "o"), (got[1], exp[1], "lse")):
        assert_close(a, b, name=what, **tol)
    for a, b in zip(_grads(got, x), _grads(exp, x)):
        if a is not None or b is not None:
            assert_close(a, b, name=f"{name} grad", **tol)
    with torch.no_grad():  # the no-grad path returns the same lse
        assert_close(_branch(name, x, idx, cu, backend)[1], exp[1], name="no-grad lse", **tol)
    assert torch.equal(_branch(name, x, idx, cu, backend)[0].detach(),
                       (nsa.selected_attention(x[0], x[3], x[4], idx, block_size=CFG.slc_block_size, cu_seqlens=cu,
                                               backend=backend) if name == "slc" else
                        nsa.sliding_window_attention(x[0], x[5], x[6], window=CFG.window_size, cu_seqlens=cu,
                                                     backend=backend)).detach())


@pytest.mark.parametrize("name", ["slc", "win"])
def test_reference_lse_gradcheck(name):
    x = make_inputs(1, 21, 4, 2, 8, 8, CFG, seed=2, requires_grad=True)
    idx = nsa.select_blocks(x[0].detach(), x[1].detach(), config=CFG, backend="reference")

    def f(q, k, v):
        y = [q, None, None, k, v, k, v]
        o, lse = _branch(name, y, idx, None, "reference")
        return o, lse

    assert torch.autograd.gradcheck(f, (x[0], x[3], x[4]))


def test_torch_backend_grouped_packed_path_returns_lse(monkeypatch):
    """Equal-length packed sequences run side by side (`_grouped`, pure path): lse comes back in packed order."""
    monkeypatch.setattr(tb, "USE_FUSED_CPU", False)
    cu = torch.tensor([0, 20, 40, 60])
    x = make_inputs(1, 60, 4, 2, 8, 8, CFG, cu_seqlens=cu, seed=3)
    idx = nsa.select_blocks(x[0], x[1], config=CFG, cu_seqlens=cu, backend="reference")
    for name in ("slc", "win"):
        got, exp = _branch(name, x, idx, cu, "torch"), _branch(name, x, idx, cu, "reference")
        assert_close(got[1], exp[1], atol=1e-10, rtol=1e-10, name=f"{name} grouped lse")
