"""Block selection (Eq. 8-11): overlap weights, group sum, forced blocks, ties, padding."""
import math

import pytest
import torch

import nsa
from nsa.ops import reference as ref
from tests.kit import CPU_BACKENDS, assert_same_selection, make_inputs, small_config

PAPER = nsa.NSAConfig()


def test_eq9_overlap_weights_paper_geometry():
    W = ref.cmp_to_slc_weights(12, 3, PAPER)
    # selection block j gets 1,2,2,2,1 from compressed blocks 4j-1 .. 4j+3 (block 0: 2,2,2,1 from 0..3)
    assert W[:, 0].tolist() == [2, 2, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    assert W[:, 1].tolist() == [0, 0, 0, 1, 2, 2, 2, 1, 0, 0, 0, 0]
    assert W[:, 2].tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 2, 2, 2, 1]
    # identity when l = l' = d
    eye = ref.cmp_to_slc_weights(5, 5, nsa.NSAConfig(cmp_block_size=64, cmp_stride=64, slc_block_size=64))
    assert torch.equal(eye, torch.eye(5))


def test_block_scores_hand_worked_example():
    """T=128, paper geometry: the last query sees 7 compressed tokens; check Eq. 8-10 by hand."""
    T, HQ, HKV, D = 128, 2, 1, 4
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, T, HQ, D, generator=g, dtype=torch.float64)
    k_cmp = torch.randn(1, 7, HKV, D, generator=g, dtype=torch.float64)
    scores = ref.block_scores(q, k_cmp, config=PAPER)
    total = torch.zeros(2, dtype=torch.float64)
    for h in range(HQ):
        p = torch.softmax((k_cmp[0, :, 0] @ q[0, T - 1, h]) * D ** -0.5, 0)  # all 7 visible: 6*16+31 = 127
        total += torch.stack([2 * p[0] + 2 * p[1] + 2 * p[2] + p[3], p[3] + 2 * p[4] + 2 * p[5] + 2 * p[6]])
    assert torch.allclose(scores[0, T - 1, 0], total, atol=1e-12)
    # query 40 sees compressed tokens 0 (ends at 31) only: block 0 gets weight 2, block 1 nothing
    assert torch.allclose(scores[0, 40, 0], torch.tensor([2.0 * HQ, 0.0], dtype=torch.float64))
    assert torch.equal(scores[0, 30, 0], torch.zeros(2, dtype=torch.float64))  # nothing visible yet


def test_group_sum_shares_selection_across_heads():
    cfg = small_config()
    q, k_cmp, *_ = make_inputs(1, 64, 6, 2, 8, 8, cfg)
    per_head = [ref.block_scores(q[:, :, h:h + 1], k_cmp[:, :, h // 3:h // 3 + 1], config=cfg) for h in range(6)]
    grouped = ref.block_scores(q, k_cmp, config=cfg)
    assert torch.allclose(grouped[:, :, 0], sum(per_head[:3])[:, :, 0], atol=1e-12)
    assert torch.allclose(grouped[:, :, 1], sum(per_head[3:])[:, :, 0], atol=1e-12)


def test_forced_blocks_ties_and_padding():
    cfg = small_config(num_selected=4, num_init_blocks=1, num_local_blocks=2)  # l' = 16
    T, Nb = 160, 10
    scores = torch.zeros(1, T, 1, Nb)  # all ties
    scores[..., 5] = 10.0  # a strong free block
    idx = ref.topn_blocks(scores, config=cfg)
    t = 150  # own block 9: forced {0, 8, 9}, then the best free block 5
    assert idx[0, t, 0].tolist() == [0, 5, 8, 9]
    t = 100  # own block 6: forced {0, 5, 6} + ties among {1..4} -> lowest index 1
    assert idx[0, t, 0].tolist() == [0, 1, 5, 6]
    t = 70  # own block 4: forced {0, 3, 4}, block 5 is in the future, tie -> 1
    assert idx[0, t, 0].tolist() == [0, 1, 3, 4]
    assert idx[0, 20, 0].tolist() == [0, 1, -1, -1]  # only blocks 0, 1 valid
    assert idx[0, 3, 0].tolist() == [0, -1, -1, -1]
    # a huge score never displaces a forced block
    scores[..., 2] = 1e9
    assert idx.shape == (1, T, 1, 4)
    assert ref.topn_blocks(scores, config=cfg)[0, 150, 0].tolist() == [0, 2, 8, 9]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("G", [1, 3, 16])
def test_select_blocks_contract(backend, G):
    cfg = small_config(num_selected=5)
    T = 150
    q, k_cmp, *_ = make_inputs(2, T, 2 * G, 2, 8, 8, cfg, seed=G)
    idx = nsa.select_blocks(q, k_cmp, config=cfg, backend=backend)
    assert idx.shape == (2, T, 2, 5) and idx.dtype == torch.int64
    t = torch.arange(T)[None, :, None]
    own = t // 16
    valid = idx >= 0
    assert bool((idx <= own[..., None]).all())  # never a future block
    for forced in (torch.zeros_like(own), own, own - 1):  # init block and 2 local blocks (when they exist)
        present = (idx == forced[..., None]).any(-1) | (forced < 0)
        assert bool(present.all())
    counts = valid.sum(-1)
    assert torch.equal(counts, torch.clamp(own + 1, max=5).expand_as(counts))
    for b in range(2):
        for tt in range(T):
            for h in range(2):
                row = idx[b, tt, h].tolist()  # ascending, then -1 padding
                n_valid = sum(j >= 0 for j in row)
                assert row[:n_valid] == sorted(set(row[:n_valid])) and all(j == -1 for j in row[n_valid:])
    expected = nsa.select_blocks(q, k_cmp, config=cfg, backend="reference")
    assert_same_selection(idx, expected, ref.block_scores(q, k_cmp, config=cfg), cfg)


def test_select_blocks_fp32_scores_for_half_inputs():
    cfg = small_config()
    q, k_cmp, *_ = make_inputs(1, 80, 4, 2, 8, 8, cfg, dtype=torch.float16)
    scores = ref.block_scores(q, k_cmp, config=cfg)
    assert scores.dtype == torch.float32
    assert nsa.select_blocks(q, k_cmp, config=cfg, backend="reference").shape == (1, 80, 2, cfg.num_selected)
    # each visible compressed token spreads a total weight l/d = 2 over the blocks: a row sums to G * l/d = 4
    assert torch.allclose(scores[0, 79].sum(-1), torch.full((2,), 4.0), atol=1e-4)
