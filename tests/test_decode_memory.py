"""decode_memory_access: the paper's Table 4 and the exact per-step count."""
import pytest
import torch

import nsa
from nsa.ops.decode import torch_decode
from tests.kit import make_inputs, small_config


def test_reproduces_paper_table_4():
    """Table 4 (§5.2): tokens loaded per decoding step at 8k/16k/32k/64k, by the paper's rounding s/d + n*l' + w."""
    table = {8192: 2048, 16384: 2560, 32768: 3584, 65536: 5632}
    speedup = {8192: 4.0, 16384: 6.4, 32768: 9.1, 65536: 11.6}
    for s, tokens in table.items():
        m = nsa.decode_memory_access(s, nsa.NSAConfig())
        assert m["nsa_paper"] == tokens and m["dense"] == s
        assert round(m["ratio_paper"], 1) == speedup[s]
        # exact count: floor((s - l)/d) + 1 compressed tokens (one fewer than s/d), 16 full blocks, 512 window
        assert (m["compressed"], m["selected"], m["window"]) == ((s - 32) // 16 + 1, 1024, 512)
        assert m["nsa"] == tokens - 1


def test_short_and_partial_contexts():
    cfg = nsa.NSAConfig()
    m = nsa.decode_memory_access(100, cfg)  # 2 blocks < n: everything is selected; window covers all
    assert (m["compressed"], m["selected"], m["window"]) == (5, 100, 100)
    m = nsa.decode_memory_access(64 * 20 + 5, cfg)  # own block partial: 15 full blocks + 5 tokens
    assert m["selected"] == 15 * 64 + 5
    with pytest.raises(ValueError, match="context_len"):
        nsa.decode_memory_access(0, cfg)
    with pytest.raises(ValueError, match="config"):
        nsa.decode_memory_access(10, {})


@pytest.mark.parametrize("L", [3, 17, 40, 77])
def test_count_matches_the_keys_decode_reads(L):
    """The exact count equals the number of (unmasked) keys the torch decode attends to, branch by branch."""
    cfg = small_config()
    q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates = make_inputs(1, L, 4, 1, 8, 8, cfg, seed=L)
    _, idx = torch_decode(q[:, -1:], k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates[:, -1:],
                          lengths=torch.tensor([L]), config=cfg, return_indices=True)
    blocks = [int(j) for j in idx[0, 0, 0] if j >= 0]
    read_slc = sum(min(L, (j + 1) * 16) - j * 16 for j in blocks)
    m = nsa.decode_memory_access(L, cfg)
    assert m["selected"] == read_slc
    assert m["compressed"] == k_cmp.shape[1] and m["window"] == min(16, L)
