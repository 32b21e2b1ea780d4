# mixed dtypes, strides, partial requires_grad
from common import *
cfg = small_config()
B, T, HQ, HKV, Dk, Dv = 2, 37, 4, 2, 16, 8
xs = make_inputs(B, T, HQ, HKV, Dk, Dv, cfg, dtype=torch.float32, seed=0)
names = "q k_cmp v_cmp k_slc v_slc k_win v_win gates".split()
ref = nsa.native_sparse_attention(*[x.double() for x in xs], config=cfg, backend="reference")
out = []
for backend in ["reference", "torch", "auto"]:
    # mixed dtypes
    for i in range(8):
        for dt in [torch.bfloat16, torch.float16, torch.float64]:
            a = list(xs); a[i] = a[i].to(dt)
            try:
                o = nsa.native_sparse_attention(*a, config=cfg, backend=backend)
                err = (o.double() - ref).abs().max().item()
                out.append(f"{backend} {names[i]}={dt} -> OK dtype {o.dtype} err {err:.2e}")
            except ValueError as e:
                out.append(f"{backend} {names[i]}={dt} -> ValueError: {str(e)[:90]}")
            except Exception as e:
                out.append(f"{backend} {names[i]}={dt} -> !!! {type(e).__name__}: {str(e)[:150]}")
    # gates dtype differing with grad
    for dt in [torch.bfloat16, torch.float64, torch.float16]:
        a = [x.clone().requires_grad_() for x in xs]; a[7] = xs[7].to(dt).requires_grad_()
        try:
            o = nsa.native_sparse_attention(*a, config=cfg, backend=backend)
            gr = torch.autograd.grad(o.sum(), a)
            out.append(f"{backend} grad gates={dt}: out {o.dtype} grads {[str(g.dtype)[6:] for g in gr]} finite {all(torch.isfinite(g).all().item() for g in gr)}")
        except Exception as e:
            out.append(f"{backend} grad gates={dt} -> {type(e).__name__}: {str(e)[:150]}")
    # strides: transposed storage, expanded, sliced
    def variants(x):
        yield "contig", x
        yield "transposed-storage", x.transpose(1, 2).contiguous().transpose(1, 2)
        yield "channels-last-like", x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
        yield "sliced-D", torch.cat([x, x], -1)[..., ::2]
        yield "batch-expanded", x[:1].expand(x.shape[0], *x.shape[1:])
        yield "head-expanded(stride0)", x[:, :, :1].expand(*x.shape) if x.shape[2] > 1 else x
    for i in range(8):
        for vname, v in variants(xs[i]):
            a = list(xs); a[i] = v
            r = nsa.native_sparse_attention(*[x.double().contiguous() for x in a], config=cfg, backend="reference")
            try:
                ag = [x.detach().clone().requires_grad_() if j != i else x.detach().requires_grad_() for j, x in enumerate(a)]
                o = nsa.native_sparse_attention(*ag, config=cfg, backend=backend)
                err = (o.double() - r).abs().max().item()
                gr = torch.autograd.grad(o.sum(), ag)
                r64 = [x.double().contiguous().requires_grad_() for x in a]
                gr64 = torch.autograd.grad(nsa.native_sparse_attention(*r64, config=cfg, backend="reference").sum(), r64)
                gerr = max((g.double() - e).abs().max().item() for g, e in zip(gr, gr64) if e.numel())
                flag = "" if err < 1e-4 and gerr < 1e-3 else "  <<<<<"
                out.append(f"{backend} {names[i]} {vname}: err {err:.2e} gerr {gerr:.2e}{flag}")
            except Exception as e:
                out.append(f"{backend} {names[i]} {vname} -> !!! {type(e).__name__}: {str(e)[:150]}")
    # partial requires_grad
    for i in range(8):
        a = [x.clone() for x in xs]; a[i].requires_grad_()
        try:
            o = nsa.native_sparse_attention(*a, config=cfg, backend=backend)
            (g,) = torch.autograd.grad(o.sum(), [a[i]])
            r64 = [x.double().requires_grad_() for x in xs]
            gr64 = torch.autograd.grad(nsa.native_sparse_attention(*r64, config=cfg, backend="reference").sum(), r64)
            gerr = (g.double() - gr64[i]).abs().max().item()
            out.append(f"{backend} only {names[i]} grad: gerr {gerr:.2e}" + ("" if gerr < 1e-3 else "  <<<<<"))
        except Exception as e:
            out.append(f"{backend} only {names[i]} grad -> !!! {type(e).__name__}: {str(e)[:150]}")
print("\n".join(out))
