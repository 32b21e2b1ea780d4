"""The README's own code keeps working.

The Python blocks under "## Usage" and "## Decoding" in README.md are read from the README itself and run here
statement by statement, as a user would paste them, with their placeholders (`x_packed`, `attention_mask`, `B`,
`T`, `cfg`, `prompt`, ...) filled in by small tensors. Only the Usage layer block has literal sizes; they are
shrunk through `SHRINK`, and a README edit that drops one of those literals fails loudly instead of silently
testing other code. The tests assert what the README states next to the code (shapes, zeros at pads, cached decode
equal to one full forward, the Table-4 count). The CUDA-graph block needs a GPU and is not run here.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import torch

import nsa
from tests.kit import assert_close

README = Path(__file__).resolve().parents[1] / "README.md"
# a tiny geometry where selection still chooses: l=8, d=4, l'=8, n=4 (1 initial + 2 local + 1 free), w=16
CFG = nsa.NSAConfig(cmp_block_size=8, cmp_stride=4, slc_block_size=8, num_selected=4, num_init_blocks=1,
                    num_local_blocks=2, window_size=16)
HIDDEN, HQ, HKV, D = 64, 4, 2, 16
TOL64 = dict(atol=1e-10, rtol=1e-10)


def readme_block(section: str, marker: str) -> str:
    """The ```python block of README section `## section` that contains `marker`."""
    text = README.read_text(encoding="utf-8")
    parts = text.split(f"\n## {section}\n", 1)
    assert len(parts) == 2, f"README.md has no '## {section}' section"
    body = parts[1].split("\n## ", 1)[0]
    blocks = [b for b in re.findall(r"```python\n(.*?)```", body, re.S) if marker in b]
    assert len(blocks) == 1, f"README '## {section}': expected one python block with {marker!r}, got {len(blocks)}"
    return blocks[0]


def run_block(code: str, ns: dict) -> list:
    """Run `code` in `ns` one top-level statement at a time (as pasted into a REPL); per statement, the value of an
    expression, the assigned value(s) of an assignment, else None."""
    values = []
    for stmt in ast.parse(code).body:
        if isinstance(stmt, ast.Expr):
            values.append(eval(compile(ast.Expression(stmt.value), "<README.md>", "eval"), ns))
            continue
        exec(compile(ast.Module([stmt], type_ignores=[]), "<README.md>", "exec"), ns)
        target = stmt.targets[0] if isinstance(stmt, ast.Assign) else None
        values.append(eval(ast.unparse(target), ns) if target is not None else None)
    return values


def tiny_layer(dtype=torch.float64, seed=0, **kw):
    """A small layer whose φ is not plain mean pooling and whose gates are not all equal."""
    torch.manual_seed(seed)
    layer = nsa.NativeSparseAttention(HIDDEN, HQ, HKV, D, config=CFG, **kw)
    torch.nn.init.normal_(layer.compress_k.mlp[2].weight, std=0.2)
    torch.nn.init.normal_(layer.compress_v.mlp[2].weight, std=0.2)
    torch.nn.init.normal_(layer.g_proj.bias, std=1.0)
    return layer.to(dtype)


# ------------------------------------------------------------------------------------------------------ Usage
SHRINK = {  # README literal -> the test's size (hidden 64, heads 4/2, head_dim 16, T = 96)
    "hidden_size=1024": f"hidden_size={HIDDEN}",
    "num_heads=16": f"num_heads={HQ}",
    "num_kv_heads=4": f"num_kv_heads={HKV}",
    "head_dim=64": f"head_dim={D}",
    "config=nsa.NSAConfig()": "config=CFG",
    "torch.randn(2, 4096, 1024)": f"torch.randn(2, 96, {HIDDEN})",
    "torch.tensor([0, 1000, 4096])": "torch.tensor([0, 30, 96])",
}


def test_usage_block_layer_forward_and_packed_batch(monkeypatch):
    """`layer(x)` is [B, T, hidden]; a packed batch with `cu_seqlens` equals each sequence run alone; the comment's
    paper geometry is `NSAConfig()`'s default."""
    # float32 on CPU would build the C++ kernels on first use (~25 s); their pure-PyTorch path computes the same
    # (tests/test_cpu_kernels.py), so this file keeps to its time budget on a fresh machine
    monkeypatch.setenv("NSA_CPU_KERNELS", "0")
    code = readme_block("Usage", "nsa.NativeSparseAttention(")
    geometry = dict(re.findall(r"\b(l'|[ldnw])=(\d+)", code.split("paper geometry:", 1)[1].splitlines()[0]))
    default = nsa.NSAConfig()
    assert {k: int(v) for k, v in geometry.items()} == {
        "l": default.cmp_block_size, "d": default.cmp_stride, "l'": default.slc_block_size,
        "n": default.num_selected, "w": default.window_size}
    for literal, small in SHRINK.items():
        assert literal in code, f"README Usage block changed: {literal!r} not found; update SHRINK"
        code = code.replace(literal, small)
    torch.manual_seed(0)
    x_packed = torch.randn(1, 96, HIDDEN)
    _, layer, y_padded, y_packed = run_block(code, {"CFG": CFG, "x_packed": x_packed})  # it imports torch, nsa
    assert isinstance(layer, nsa.NativeSparseAttention) and layer.config == CFG
    assert y_padded.shape == (2, 96, HIDDEN) and bool(torch.isfinite(y_padded).all())
    assert y_packed.shape == (1, 96, HIDDEN)
    with torch.no_grad():
        alone = torch.cat([layer(x_packed[:, :30]), layer(x_packed[:, 30:])], 1)
    assert_close(y_packed, alone, atol=1e-5, rtol=1e-5, name="packed vs per sequence")


def test_usage_return_aux_shapes_and_same_output():
    """`y, aux = layer(x, return_aux=True)`: block_indices [B, T, HKV, n] (ascending, -1 padded), gates
    [B, T, HQ, 3] in [0, 1]; the output is the same as without aux."""
    text = README.read_text(encoding="utf-8")
    line = re.search(r"`(y, aux = layer\(x, return_aux=True\))`", text)
    assert line, "README no longer shows `y, aux = layer(x, return_aux=True)`"
    layer = tiny_layer()
    x = torch.randn(2, 70, HIDDEN, dtype=torch.float64)
    ns = {"layer": layer, "x": x}
    run_block(line.group(1), ns)
    y, aux = ns["y"], ns["aux"]
    B, T = x.shape[:2]
    idx, gates = aux["block_indices"], aux["gates"]
    assert idx.shape == (B, T, HKV, CFG.num_selected) and idx.dtype == torch.int64
    assert gates.shape == (B, T, HQ, 3) and bool(((gates >= 0) & (gates <= 1)).all())
    for row in idx.reshape(-1, CFG.num_selected).tolist():
        chosen = [j for j in row if j >= 0]
        assert chosen == sorted(set(chosen)) and row == chosen + [-1] * (len(row) - len(chosen)), row
    assert int(idx[:, -1].min()) >= 0  # the last position has 9 blocks to choose from: all n slots filled
    assert_close(y, layer(x), **TOL64, name="output with return_aux")


def test_usage_padding_block_unpad_pad_and_position_ids():
    """unpad_input -> [1, N, hidden]; pad_input -> [B, T, hidden] with 0 at the pads, each row as if run alone
    (left and right padding); cu_seqlens_from_position_ids gives the offsets of packed [1, T] positions."""
    code = readme_block("Usage", "nsa.unpad_input(")
    layer = tiny_layer()
    B, T = 3, 40
    x = torch.randn(B, T, HIDDEN, dtype=torch.float64)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[0, :12] = 0  # left padding
    attention_mask[1, 25:] = 0  # right padding (row 2: none)
    position_ids = torch.cat([torch.arange(n) for n in (5, 20, 15)])[None]  # HF-style packing: 3 sequences
    ns = {"torch": torch, "nsa": nsa, "layer": layer, "x": x, "attention_mask": attention_mask, "B": B, "T": T,
          "position_ids": position_ids}
    (x_packed, indices, _, _), y, cu_seqlens = run_block(code, ns)
    assert x_packed.shape == (1, int(attention_mask.sum()), HIDDEN)
    assert y.shape == (B, T, HIDDEN)
    pads = attention_mask == 0
    assert bool((y[pads] == 0).all())
    for b in range(B):
        keep = attention_mask[b].bool()
        assert_close(y[b, keep], layer(x[b:b + 1, keep])[0], **TOL64, name=f"row {b}")
    assert cu_seqlens.tolist() == [0, 5, 25, 40]


def test_usage_functional_ops_block():
    """The functional ops with the block's own literals (the paper geometry): shapes of o/lse, the selection
    [B, T, HKV, n], `return_lse=True` giving (o, lse), Tc = max(0, (T - l)//d + 1), Dk != Dv, and the composed op
    equal to the gate-weighted sum of the branches in (cmp, slc, win) order."""
    code = readme_block("Usage", "nsa.compressed_attention(")
    cfg = nsa.NSAConfig()  # the block's literals (32, 16, 64, 512) are the paper geometry
    B, T, Dk, Dv = 2, 160, 16, 8
    Tc = max(0, (T - cfg.cmp_block_size) // cfg.cmp_stride + 1)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q, k_cmp, v_cmp = rnd(B, T, HQ, Dk), rnd(B, Tc, HKV, Dk), rnd(B, Tc, HKV, Dv)
    k, v = rnd(B, T, HKV, Dk), rnd(B, T, HKV, Dv)
    gates = torch.rand(B, T, HQ, 3, generator=g, dtype=torch.float64)
    ns = {"nsa": nsa, "cfg": cfg, "q": q, "k_cmp": k_cmp, "v_cmp": v_cmp, "k": k, "v": v, "k_slc": k, "v_slc": v,
          "k_win": k, "v_win": v, "gates": gates}
    (o_cmp, lse), idx, o_slc, o_win, o = run_block(code, ns)
    assert o_cmp.shape == (B, T, HQ, Dv) and lse.shape == (B, T, HQ)
    assert idx.shape == (B, T, HKV, cfg.num_selected) and idx.dtype == torch.int64
    assert o_slc.shape == o_win.shape == o.shape == (B, T, HQ, Dv)
    o2, lse2 = nsa.selected_attention(q, k, v, idx, block_size=64, return_lse=True)
    assert_close(o2, o_slc, **TOL64, name="slc with return_lse")
    assert lse2.shape == (B, T, HQ)
    o2, lse2 = nsa.sliding_window_attention(q, k, v, window=512, return_lse=True)
    assert_close(o2, o_win, **TOL64, name="win with return_lse")
    mixed = gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_slc + gates[..., 2:3] * o_win
    assert_close(o, mixed, atol=1e-9, rtol=1e-9, name="composed op vs (cmp, slc, win) gates")


# --------------------------------------------------------------------------------------------------- Decoding
def test_decoding_block_prefill_step_ragged_and_cache_methods():
    """The Decoding block: storage allocated on a layer's first use; prefill + a one-token step equal one full
    forward; a ragged step (`new_lengths`) gives each row its own continuation and 0 at the padding; `lengths`,
    `reset`, `reorder`, `memory_bytes`; `decode_memory_access(65536, NSAConfig())` holds the Table-4 count."""
    code = readme_block("Decoding", "nsa.NSACache(num_layers, batch_size, max_length)")
    layer = tiny_layer()
    num_layers, batch_size, max_length, i = 2, 2, 48, 1  # layer slot 1: slot 0 stays unallocated
    P = 40
    torch.manual_seed(1)
    prompt = torch.randn(batch_size, P, HIDDEN, dtype=torch.float64)
    next_token_x = torch.randn(batch_size, 1, HIDDEN, dtype=torch.float64)
    x_padded = torch.randn(batch_size, 3, HIDDEN, dtype=torch.float64)
    n = torch.tensor([3, 1])
    beam_idx = torch.tensor([1, 0])
    ns = {"torch": torch, "nsa": nsa, "layer": layer, "num_layers": num_layers, "batch_size": batch_size,
          "max_length": max_length, "i": i, "prompt": prompt, "next_token_x": next_token_x, "x_padded": x_padded,
          "n": n, "beam_idx": beam_idx}
    cache, y_prefill, y_step, y_ragged, lengths, _, _, nbytes, access = run_block(code, ns)

    assert cache.layers[0] is None and cache.layers[1] is not None  # allocated per layer on first use
    assert y_prefill.shape == (batch_size, P, HIDDEN) and y_step.shape == (batch_size, 1, HIDDEN)
    assert_close(torch.cat([y_prefill, y_step], 1), layer(torch.cat([prompt, next_token_x], 1)), **TOL64,
                 name="prefill + step vs full forward")
    assert y_ragged.shape == x_padded.shape
    for b, nb in enumerate(n.tolist()):
        whole = torch.cat([prompt[b], next_token_x[b], x_padded[b, :nb]])[None]
        assert_close(y_ragged[b, :nb], layer(whole)[0, -nb:], **TOL64, name=f"ragged row {b}")
        assert bool((y_ragged[b, nb:] == 0).all())
    assert lengths.tolist() == [P + 1 + 3, P + 1 + 1]
    assert cache.lengths.tolist() == [0, 0]  # after reset(); reorder() of empty rows keeps them empty
    assert isinstance(nbytes, int) and nbytes > 0 and nbytes == cache.memory_bytes()
    assert access == 5632  # Table 4's count at 64k; the exact count and the dense one:
    counts = nsa.decode_memory_access(65536, nsa.NSAConfig())
    assert counts["nsa"] == 5631 and counts["dense"] == 65536 and round(counts["ratio_paper"], 1) == 11.6


def test_decoding_functional_decode_attention_block():
    """`nsa.decode_attention(...)` with the block's arguments (win_start=None, backend="auto"): the last Tq positions
    of each sequence, equal to the full op on each row's prefix; slots past a row's length may hold NaN."""
    code = readme_block("Decoding", "nsa.decode_attention(")
    cfg = CFG
    B, S, Tq, Dv = 3, 48, 2, 8
    lengths = torch.tensor([48, 29, 5])  # [B] tokens per sequence, the Tq new ones included
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    full = [rnd(B, S, HQ, D), rnd(B, cfg.num_compressed(S), HKV, D), rnd(B, cfg.num_compressed(S), HKV, Dv),
            rnd(B, S, HKV, D), rnd(B, S, HKV, Dv), rnd(B, S, HKV, D), rnd(B, S, HKV, Dv),
            torch.rand(B, S, HQ, 3, generator=g, dtype=torch.float64)]
    caches = [t.clone() for t in full[1:7]]
    for b, L in enumerate(lengths.tolist()):  # whatever lies past a row's length must not matter
        for j, t in enumerate(caches):
            t[b, cfg.num_compressed(L) if j < 2 else L:] = float("nan")
    pos = lengths[:, None] - Tq + torch.arange(Tq)
    last = [torch.stack([t[b, pos[b]] for b in range(B)]) for t in (full[0], full[7])]
    ns = {"nsa": nsa, "cfg": cfg, "lengths": lengths, "q": last[0], "gates": last[1]}
    ns.update(zip(("k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win"), caches))
    (o,) = run_block(code, ns)
    assert o.shape == (B, Tq, HQ, Dv) and bool(torch.isfinite(o).all())
    for b, L in enumerate(lengths.tolist()):
        tc = cfg.num_compressed(L)
        row = [t[b:b + 1, :tc if j in (1, 2) else L] for j, t in enumerate(full)]
        expected = nsa.native_sparse_attention(*row, config=cfg, backend="reference")[0, L - Tq:]
        assert_close(o[b], expected, **TOL64, name=f"row {b}")
