"""nsa.data: byte tokenizer, stdlib corpus split, NIAH/MQAR generators, packed deterministic batches."""
import pytest
import torch

from nsa.data import (IGNORE, ByteTokenizer, DataMix, is_validation, mqar_example, mqar_max_pairs, niah_example,
                      stdlib_corpus)

CORPUS = stdlib_corpus("train", max_bytes=400_000)


def test_tokenizer_roundtrip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'é' * x\n"
    assert tok.decode(tok.encode(text)) == text
    assert max(tok.encode(text)) < tok.vocab_size == 256


def test_split_is_deterministic_and_disjoint():
    val = stdlib_corpus("val", max_bytes=200_000)
    assert set(val.files).isdisjoint(CORPUS.files)
    assert all(is_validation(f, 0.05) for f in val.files)
    assert not any(is_validation(f, 0.05) for f in CORPUS.files)
    again = stdlib_corpus("train", max_bytes=400_000)
    assert again.files == CORPUS.files and torch.equal(again.tokens, CORPUS.tokens)
    assert len(CORPUS) == 400_000 and CORPUS.doc_starts[-1] == len(CORPUS)
    with pytest.raises(ValueError, match="split"):
        stdlib_corpus("test")


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.7, 1.0])
def test_niah_example(depth):
    tok = ByteTokenizer()
    ex = niah_example(CORPUS, 300, depth, torch.Generator().manual_seed(3))
    assert len(ex.tokens) == len(ex.labels) == len(ex.answer) == 300
    text = tok.decode(ex.tokens)
    key, value = ex.info["key"], ex.info["value"]
    assert text.count(ex.info["needle"]) == 1 and ex.info["needle"] == f"{key}=${value}\n"
    assert len(key) == len(value) == len(set(value)) == 2 and key.islower() and set(value) <= set("JKQVWXYZ")
    assert text.endswith(f"\n{key}=$" + value)  # the last answer byte is only a label
    # the answer positions predict exactly value + closing quote
    answer = tok.decode([l for l, a in zip(ex.labels, ex.answer) if a])
    assert answer == value + "\n"
    # labels are next tokens except over the random needle
    seq = ex.tokens + [ex.labels[-1]]
    assert all(l == seq[i + 1] for i, l in enumerate(ex.labels) if l != IGNORE)
    needle_len = len(ex.info["needle"])
    assert sum(l == IGNORE for l in ex.labels) == needle_len - (ex.info["needle_pos"] == 0)
    depth_frac = ex.info["needle_pos"] / 300
    assert abs(depth_frac - depth) < 0.35  # the needle goes to a line break near the requested depth
    assert ex.info["distance"] == 300 - ex.info["needle_pos"] - len(f"{key}=$")
    assert ex.info["gap"] == ex.info["distance"] - len(value) - 1


def test_niah_depth_is_ordered():
    pos = [niah_example(CORPUS, 400, d, torch.Generator().manual_seed(9)).info["needle_pos"] for d in (0.0, 0.5, 1.0)]
    assert pos[0] < pos[1] < pos[2]


def test_mqar_example():
    tok = ByteTokenizer()
    ex = mqar_example(200, 10, torch.Generator().manual_seed(4))
    text = tok.decode(ex.tokens)  # the final newline is the unsupervised last target
    assert len(ex.tokens) == 200 and ex.labels[-1] == IGNORE
    head, queries = text.strip().split("\n? ")
    pairs = [p for p in head.strip("{} ").split(" ")]
    asked = queries.split(" ")
    assert len(pairs) == 10 and len({p[0] for p in pairs}) == 10 and sorted(asked) == sorted(pairs)
    answers = tok.decode([l for l, a in zip(ex.labels, ex.answer) if a])
    assert answers == "".join(p[1] for p in asked)
    assert all((l != IGNORE) == a for l, a in zip(ex.labels, ex.answer))
    assert mqar_max_pairs(64) == 9 and mqar_max_pairs(10_000) == 52
    with pytest.raises(ValueError, match="too short"):
        mqar_example(50, 10, torch.Generator())


def test_datamix_deterministic_packed_and_sharded():
    mix = DataMix(CORPUS, seq_len=128, rows=4, weights={"lm": 1, "niah": 1, "mqar": 1}, seed=7)
    b = mix.batch(5)
    assert b.input_ids.shape == b.labels.shape == (1, 512)
    cu = b.cu_seqlens.tolist()
    assert cu[0] == 0 and cu[-1] == 512 and all(x in cu for x in (128, 256, 384))
    assert torch.equal(mix.batch(5).input_ids, b.input_ids)
    assert not torch.equal(mix.batch(6).input_ids, b.input_ids)
    # a label never crosses a packed boundary
    for c in cu[1:]:
        assert b.labels[0, c - 1] == IGNORE or c in (128, 256, 384, 512)
    # two ranks together hold exactly the rows of the single-process batch
    r0, r1 = mix.batch(5, 0, 2), mix.batch(5, 1, 2)
    rows = b.input_ids.view(4, 128)
    assert torch.equal(r0.input_ids.view(2, 128), rows[0::2]) and torch.equal(r1.input_ids.view(2, 128), rows[1::2])
    with pytest.raises(ValueError, match="weights"):
        DataMix(CORPUS, 128, 4, weights={"books": 1})
    with pytest.raises(ValueError, match="world"):
        mix.batch(0, 0, 3)


def test_lm_rows_cut_at_file_boundaries():
    mix = DataMix(CORPUS, seq_len=1024, rows=8, weights={"lm": 1}, seed=1)
    found = 0
    for step in range(10):
        b = mix.batch(step)
        rows = set(range(0, 8 * 1024 + 1, 1024))
        for c in b.cu_seqlens.tolist():
            if c not in rows:
                found += 1
                assert b.labels[0, c - 1] == IGNORE
        labs, toks = b.labels[0], b.input_ids[0]
        ok = labs != IGNORE
        ok[torch.tensor(sorted(rows)[1:]) - 1] = False
        assert torch.equal(labs[:-1][ok[:-1]], toks[1:][ok[:-1]])
    assert found > 0


def test_task_rows_pack_short_examples():
    mix = DataMix(CORPUS, seq_len=256, rows=6, weights={"niah": 1, "mqar": 1}, seed=2, task_lengths=(64, 128, 256),
                  mqar_pairs=(2, 20))
    seen = set()
    for step in range(4):
        b = mix.batch(step)
        cu = b.cu_seqlens.tolist()
        assert all(c in cu for c in range(0, 6 * 256 + 1, 256))
        seen |= {e - s for s, e in zip(cu[:-1], cu[1:])}
        # every packed example ends in a supervised answer or the unsupervised MQAR newline
        assert (b.labels != IGNORE).sum() > 0
    assert seen == {64, 128, 256}
    with pytest.raises(ValueError, match="task_lengths"):
        DataMix(CORPUS, 256, 2, task_lengths=(100,))


def test_niah_lengths_apply_to_niah_rows_only():
    mix = DataMix(CORPUS, seq_len=256, rows=6, weights={"niah": 1, "mqar": 1}, seed=3, task_lengths=(64,),
                  niah_lengths=(256,), mqar_pairs=(2, 8))
    sizes = {"niah": set(), "mqar": set()}
    for step in range(4):
        b = mix.batch(step)
        cu = b.cu_seqlens.tolist()
        for s, e in zip(cu[:-1], cu[1:]):
            # a NIAH example's last label (the answer's closing newline) is supervised; an MQAR example's is not
            sizes["niah" if b.labels[0, e - 1] != IGNORE else "mqar"].add(e - s)
    assert sizes == {"niah": {256}, "mqar": {64}}
    with pytest.raises(ValueError, match="niah_lengths"):
        DataMix(CORPUS, 256, 2, niah_lengths=(100,))


@pytest.mark.parametrize("length", [11, 17, 64, 65, 200, 400])
def test_mqar_fits_at_max_pairs(length):
    ex = mqar_example(length, mqar_max_pairs(length), torch.Generator().manual_seed(length))
    assert len(ex.tokens) == length and ex.tokens[0] in (32, ord("{"))
