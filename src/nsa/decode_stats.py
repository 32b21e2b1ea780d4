"""Memory access of one decoding step, per KV head (paper §5.2, Table 4)."""
from __future__ import annotations

import math

from .config import NSAConfig, num_compressed_tokens


def decode_memory_access(context_len: int, config: NSAConfig = NSAConfig()) -> dict:
    """Tokens (one K row + one V row each) read per KV head to decode the query at position s - 1, where
    s = `context_len` tokens are cached (the new one included).

    Exact NSA count, branch by branch (each branch reads its own K/V; with shared K/V the selected blocks and the
    window overlap, so this is then an upper bound):
      compressed = Tc(s) = max(0, (s - l)//d + 1)                      (Eq. 7: every compressed token is visible)
      selected   = s when all ceil(s/l') blocks fit in n, else (n - 1)*l' full blocks + the query's own partial
                   block s - (ceil(s/l') - 1)*l' (it is always chosen when num_local_blocks >= 1; otherwise n*l',
                   an upper bound)                                     (Eq. 11-12, causal inside a block)
      window     = min(w, s)
    The paper's Table 4 rounds this to s/d + n*l' + w ("nsa_paper"): 2048, 2560, 3584, 5632 at 8k..64k.
    Returns a dict with those counts, "nsa" (their sum), "dense" (= s), "ratio" (dense / nsa) and "ratio_paper".
    """
    if not isinstance(context_len, int) or isinstance(context_len, bool) or context_len < 1:
        raise ValueError(f"context_len must be a positive int, got {context_len!r}")
    if not isinstance(config, NSAConfig):
        raise ValueError(f"config must be an nsa.NSAConfig, got {type(config).__name__}")
    s, l, d, lp = context_len, config.cmp_block_size, config.cmp_stride, config.slc_block_size
    n, w = config.num_selected, config.window_size
    compressed = num_compressed_tokens(s, l, d)
    nb = math.ceil(s / lp)
    if nb <= n:
        selected = s
    elif config.num_local_blocks >= 1:
        selected = (n - 1) * lp + (s - (nb - 1) * lp)
    else:
        selected = n * lp
    window = min(w, s)
    nsa = compressed + selected + window
    paper = s // d + n * lp + w
    return {
        "context_len": s, "compressed": compressed, "selected": selected, "window": window, "nsa": nsa,
        "dense": s, "ratio": s / nsa, "nsa_paper": paper, "ratio_paper": s / paper,
    }
