"""Compile every Triton kernel ahead of time for sm_90 (H100/H200) without a GPU, with the block sizes the host code
picks (autotuned kernels once per config), and report each build's shared memory against the sm_90 limit and, from
cuobjdump, its registers per thread and stack bytes (register spills). It checks that the kernels still build for
the GPU after a change the interpreter tests cannot see (the interpreter never compiles). Needs a triton with its
CUDA backend (the pip wheel has it); prints ALL OK or FAILURES.

    PYTHONPATH=src python benchmarks/triton_aot_check.py DTYPES DKxDV,... G,... MODES
    e.g.  PYTHONPATH=src python benchmarks/triton_aot_check.py bf16,fp32 192x128,64x64 1,4,16 0,1
"""
import inspect
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from nsa import NSAConfig  # noqa: E402
from nsa.ops import triton_decode as dec  # noqa: E402
from nsa.ops.triton import combine, flash, selection, topk  # noqa: E402
from nsa.ops.triton.utils import next_pow2  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SMEM_MAX = 232448  # bytes of shared memory per block on sm_90
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def compile_one(kernel, types, consts, num_warps=4, num_stages=2):
    """Build for sm_90; an autotuned kernel once per config of its list (what the GPU would build and time)."""
    if hasattr(kernel, "configs"):  # unwrap @triton.autotune (configs that set a constexpr: those matching consts)
        return all([compile_one(kernel.fn, types, consts, c.num_warps, c.num_stages) for c in kernel.configs
                    if all(consts.get(k) == v for k, v in c.kwargs.items())])
    fn = kernel
    sig = {p: ("constexpr" if p in consts else types.get(p, "i32")) for p in inspect.signature(fn.fn).parameters}
    try:
        k = triton.compile(ASTSource(fn, sig, constexprs=dict(consts), attrs=divisibility(sig)), target=TARGET,
                           options=dict(num_warps=num_warps, num_stages=num_stages))
    except Exception as e:  # report every failure, keep going
        print(f"ERR {fn.__name__} {consts}: {str(e)[:2000]}", flush=True)
        return False
    smem = k.metadata.shared
    print(("OK  " if smem <= SMEM_MAX else "SMEM") + f" {fn.__name__} {consts} warps={num_warps} stages={num_stages} "
          f"smem={smem} {resource_usage(k)} {pipelining(k)}", flush=True)
    return smem <= SMEM_MAX


def divisibility(sig: dict) -> dict:
    """The JIT's specialisation at the benchmark shapes: 16-byte aligned pointers, and strides and head dims that
    are multiples of 16 (HQ, HKV, Dk, Dv, n all are there). Without it loads are not vectorised and the register
    counts are not the GPU's."""
    dims = {"DK", "DV", "Dk", "Dv", "S_SC"}
    return {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(sig.items())
            if ty.startswith("*") or (ty == "i32" and (name.startswith("s") or name in dims))}


def resource_usage(k) -> str:
    """Registers per thread and stack bytes (spills show as stack) from cuobjdump -res-usage on the cubin."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if "cubin" not in k.asm or not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return f"regs={m.group(1)} stack={m.group(2)}" if m else ""


def pipelining(k) -> str:
    """Copy groups a loop keeps in flight while it computes: the largest `num` of the TTGIR's async_wait ops (0: each
    iteration waits for its own loads, i.e. the loop is not software-pipelined)."""
    waits = [int(n) for n in re.findall(r"ttg\.async_wait[^\n]*\{num = (\d+)", k.asm.get("ttgir", ""))]
    return f"inflight={max(waits)}" if waits else "inflight=-"


def check_decode(P, prec, dims, groups):
    """The decode kernels with the paper geometry and the block sizes `triton_decode` picks."""
    ok = True
    cfg = NSAConfig()
    f32 = "*fp32"
    types = dict(Q=P, K=P, V=P, K2=P, V2=P, LENS="*i64", WSTART="*i64", IDX="*i64", PO=f32, PM=f32, PL=f32, SC=f32,
                 PC=f32, GATES=P, O=P, PO_C=f32, PM_C=f32, PL_C=f32, PO_SW=f32, PM_SW=f32, PL_SW=f32, scale="fp32")
    geo = dict(CMP_L=cfg.cmp_block_size, CMP_D=cfg.cmp_stride, SLC=cfg.slc_block_size, NSEL=cfg.num_selected)
    for dk, dv in dims:
        for G in groups:
            bg, bd, bdv = dec._pow2(G), dec._pow2(dk), dec._pow2(dv)
            warps, bk_c, bk_s = dec.partial_tiles(bd, cfg.slc_block_size, DTYPES["fp32" if P == "*fp32" else "bf16"])
            for mode, has_wst in ((0, False), (1, False), (1, True)):
                ok &= compile_one(dec._attn_partial, types, dict(
                    geo, WIN=cfg.window_size, MODE=mode, HAS_WST=has_wst, PREC=prec, BG=bg, BD=bd, BDV=bdv,
                    BK=bk_c if mode == 0 else bk_s), num_warps=warps, num_stages=dec.PARTIAL_STAGES[mode])
            ok &= compile_one(dec._select, types, dict(geo, INIT=cfg.num_init_blocks, LOCAL=cfg.num_local_blocks,
                                                       UB=16, BG=bg, BK=dec.SELECT_TILE, BNB=dec.SELECT_BLOCKS, BN=16),
                              num_warps=8, num_stages=1)
            ok &= compile_one(dec._merge_gate, types, dict(UB=dec.MERGE_STEP, BG=bg, BDV=bdv), num_warps=8,
                              num_stages=1)
    return ok


def main(dtypes, dims, groups, modes):
    ok = True
    for dt in dtypes:
        tdt, P = DTYPES[dt], "*" + dt
        prec = "ieee" if dt == "fp32" else "tf32"
        types = dict(Q=P, K=P, V=P, O=P, DO=P, DQ=P, DK_=P, DV_=P, KC=P, LSE="*fp32", DELTA="*fp32", TILES="*i32",
                     CU_Q="*i64", CU_K="*i64", CU="*i64", CCU="*i64", OUT="*i64", qk_scale="fp32", scale="fp32",
                     IDX="*i32", UNION="*i32", COUNT="*i32", REV="*i32", REV_OFF="*i32", KV_BLOCKS="*i32",
                     SEGMENTS="*i32", SPLITS="*i32", SEQ_OF="*i32", PART_K="*fp32", PART_V="*fp32")
        for dk, dv in dims:
            for mode in modes:
                for blocks, kernels in ((flash._blocks, (flash._fwd_kernel, flash._bwd_dq_kernel)),
                                        (flash._bwd_blocks, (flash._bwd_dkv_kernel,))):
                    bm, bn = blocks(dk, dv, tdt)
                    bdk, bdk2 = flash.split_head_dim(dk)
                    base = dict(MODE=mode, PREC=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_DK=bdk, BLOCK_DK2=bdk2,
                                BLOCK_DV=next_pow2(dv))
                    for kernel in kernels:
                        ok &= compile_one(kernel, types, base)
            for G in groups:
                rows, bt = selection.tile_shape(G)
                bdk, bdk2 = flash.split_head_dim(dk)
                base = dict(PREC=prec, ROWS=rows, BT=bt, NPAD=16, BLOCK_DK=bdk, BLOCK_DK2=bdk2, BLOCK_DV=next_pow2(dv),
                            BLOCK_N=selection._block_n(64, rows, max(dk, dv), tdt))
                base_fwd = dict(base, NSUB=64 // base["BLOCK_N"])
                for kernel in (selection._slc_fwd_kernel, selection._slc_bwd_dq_kernel):
                    ok &= compile_one(kernel, types, base_fwd)
                ok &= compile_one(selection._slc_bwd_dkv_kernel, types, dict(base, LP_PAD=64, PART_DK=next_pow2(dk)))
                ok &= compile_one(selection._slc_dkv_reduce_kernel, types,
                                  dict(BLOCK_N=base["BLOCK_N"], BLOCK_DK=next_pow2(dk), BLOCK_DV=base["BLOCK_DV"],
                                       LP_PAD=64), num_warps=selection.REDUCE_WARPS)
            for G in groups:
                gp, bt, bj, ci = topk._tile(G, 16, 64, 32, 16, dk, tdt)
                for split in sorted({0, int(flash.split_head_dim(dk)[1] > 0)}):
                    ok &= compile_one(topk._topn_kernel, types, dict(
                        PREC=prec, GP=gp, BT=bt, DK_PAD=next_pow2(dk), DK_A=flash.split_head_dim(dk)[0],
                        DK_B=flash.split_head_dim(dk)[1], BJ=bj, CI=ci, SPLIT=split))
        ok &= check_decode(P, prec, dims, groups)
        ctypes = dict(A=P, B=P, C=P, GATE=P, O=P, DO=P, DA=P, DB=P, DC=P, DG=P, R="i64", D="i32", s_g="i32")
        for kernel in (combine._combine_fwd_kernel, combine._combine_bwd_kernel):
            ok &= compile_one(kernel, ctypes, dict(BLOCK_R=32, BLOCK_D=128), num_warps=combine.COMBINE_WARPS)
    print("ALL OK" if ok else "FAILURES", flush=True)
    return ok


if __name__ == "__main__":
    dtypes = sys.argv[1].split(",")
    dims = [tuple(map(int, x.split("x"))) for x in sys.argv[2].split(",")]
    ok = main(dtypes, dims, [int(g) for g in sys.argv[3].split(",")], [int(m) for m in sys.argv[4].split(",")])
    sys.exit(0 if ok else 1)
