"""Data with nothing downloaded: bytes as tokens, the Python standard library as corpus, synthetic recall tasks.

- `ByteTokenizer`: token = byte value (vocab 256).
- `stdlib_corpus()`: the standard library's own `.py` files (repository-level code), split train/validation by a
  hash of each file's relative path, so the split is the same on every machine with the same Python.
- `niah_example()`: a key-value "needle" line inserted at a chosen depth of a code haystack, asked for at the end.
- `mqar_example()`: multi-query associative recall: key=value pairs, then the keys again, each to be answered.
- `DataMix`: training batches drawn from a weighted mix of the three, packed with `cu_seqlens`. Batch `step` is a
  pure function of (seed, step), so a resumed or distributed run sees exactly the same data.
"""
from __future__ import annotations

import functools
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

IGNORE = -100
_KEY_CHARS = b"abcdefghijklmnopqrstuvwxyz"
_VALUE_CHARS = b"0123456789"  # MQAR values
_NEEDLE_CHARS = b"JKQVWXYZ"  # NIAH values: uppercase letters rare in the stdlib (< 1e-3 of bytes each)


class ByteTokenizer:
    """UTF-8 bytes <-> token ids 0..255."""

    vocab_size = 256

    def encode(self, text: str | bytes) -> list[int]:
        return list(text.encode("utf-8") if isinstance(text, str) else text)

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


# ------------------------------------------------------------------------------------------------------ corpus
@dataclass
class Corpus:
    """Concatenated UTF-8 bytes of a list of files; `doc_starts[i]` is where file i begins in `tokens`."""

    tokens: torch.Tensor  # uint8 [N]
    doc_starts: torch.Tensor  # int64 [num_docs + 1], last = N
    files: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.tokens.numel())


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """Sorted `.py` files of the standard library (site-packages excluded)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())


def is_validation(relpath: str, val_fraction: float) -> bool:
    """Deterministic split: crc32 of the relative path (stable across machines and runs)."""
    return (zlib.crc32(relpath.encode()) % 10_000) < val_fraction * 10_000


@functools.lru_cache(maxsize=8)
def stdlib_corpus(split: str = "train", val_fraction: float = 0.05, max_bytes: int | None = None,
                  root: str | Path | None = None) -> Corpus:
    """The standard library's source as a `Corpus` (`split` = "train" | "val"), at most `max_bytes` bytes.
    Cached per arguments: treat the result as read-only."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    root = Path(root or sysconfig.get_paths()["stdlib"])
    chunks, starts, names, total = [], [0], [], 0
    for path in stdlib_files(root):
        rel = path.relative_to(root).as_posix()
        if is_validation(rel, val_fraction) != (split == "val"):
            continue
        data = path.read_bytes()
        if not data:
            continue
        if max_bytes is not None and total + len(data) > max_bytes:
            data = data[: max_bytes - total]
        chunks.append(data)
        names.append(rel)
        total += len(data)
        starts.append(total)
        if max_bytes is not None and total >= max_bytes:
            break
    if not chunks:
        raise ValueError(f"no {split} files found under {root}")
    tokens = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
    return Corpus(tokens, torch.tensor(starts, dtype=torch.long), names)


def corpus_window(corpus: Corpus, start: int, length: int) -> tuple[list[int], list[int]]:
    """Tokens [start, start + length) and the lengths of the file pieces in it (packing boundaries)."""
    tokens = corpus.tokens[start:start + length].tolist()
    inner = corpus.doc_starts[(corpus.doc_starts > start) & (corpus.doc_starts < start + length)].tolist()
    cuts = [start] + inner + [start + length]
    return tokens, [b - a for a, b in zip(cuts[:-1], cuts[1:])]


def _random_text(chars: bytes, n: int, g: torch.Generator) -> bytes:
    return bytes(chars[i] for i in torch.randint(len(chars), (n,), generator=g).tolist())


# ------------------------------------------------------------------------------------------------------ tasks
@dataclass
class Example:
    """One sequence: tokens [T], labels [T] (next-token targets, IGNORE where unsupervised), and `answer` [T]
    marking the target positions scored by the task (teacher-forced argmax == greedy generation)."""

    tokens: list[int]
    labels: list[int]
    answer: list[bool]
    info: dict = field(default_factory=dict)


# needle `kk=$vv\n` (7) + question `\nkk=$` (5) + answer `vv\n` (3) + one haystack byte - the last answer byte
# (a label only), with the default key_len = value_len = 2
NIAH_MIN_LENGTH = 15


def niah_example(corpus: Corpus, length: int, depth: float, g: torch.Generator, key_len: int = 2,
                 value_len: int = 2) -> Example:
    """Needle in a haystack of `length` tokens.

    haystack: a window of code; needle: a line `<key>=$<value>` inserted at a line break nearest to `depth`
    (0 = start, 1 = just before the question); question at the end: `\n<key>=$`, whose continuation `<value>\n` is
    the answer, scored by exact match. Keys are lowercase letters; values are distinct letters rare in Python
    source (`_NEEDLE_CHARS`), and `$` (rare too) occurs once in the needle, right before the value: each answer
    byte is the byte that follows the previous one in the needle, a one-step lookup (as in MQAR).
    Labels supervise the haystack (language modelling) and the answer, not the random needle itself.
    `info['gap']`: how far back the first answer query must look to read the value's first byte;
    `info['distance']`: from the value to the last query.
    """
    key = _random_text(_KEY_CHARS, key_len, g).decode()
    if not 1 <= value_len <= len(_NEEDLE_CHARS):
        raise ValueError(f"value_len must be in 1..{len(_NEEDLE_CHARS)}, got {value_len}")
    value = bytes(_NEEDLE_CHARS[i] for i in torch.randperm(len(_NEEDLE_CHARS), generator=g)[:value_len]).decode()
    needle = f"{key}=${value}\n".encode()
    question = f"\n{key}=$".encode()
    answer = f"{value}\n".encode()
    hay_len = length - len(needle) - len(question) - len(answer) + 1  # +1: the last answer byte is only a label
    if hay_len < 1:
        raise ValueError(f"length {length} is too short for a needle example")
    start = int(torch.randint(len(corpus) - hay_len, (1,), generator=g))
    hay = bytes(corpus.tokens[start:start + hay_len].tolist())
    target = int(round(min(max(depth, 0.0), 1.0) * hay_len))
    breaks = [i + 1 for i, c in enumerate(hay) if c == 10] + [0, hay_len]
    cut = min(breaks, key=lambda i: (abs(i - target), i))
    seq = hay[:cut] + needle + hay[cut:] + question + answer
    tokens = list(seq[:-1])
    labels = list(seq[1:])
    n = len(tokens)
    ans_start = n - len(answer)  # position whose next token is the first answer byte
    is_answer = [i >= ans_start for i in range(n)]
    for i in range(max(cut - 1, 0), cut + len(needle) - 1):  # positions predicting the random needle bytes
        labels[i] = IGNORE
    value_pos = cut + len(f"{key}=$")
    return Example(tokens, labels, is_answer, dict(depth=depth, needle_pos=cut, distance=n - value_pos,
                                                     gap=ans_start - value_pos, value=value, key=key,
                                                     needle=needle.decode()))


_MQAR_KEYS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def mqar_min_length(num_pairs: int) -> int:
    """Fewest tokens an MQAR example with `num_pairs` pairs needs (the inverse of `mqar_max_pairs`)."""
    return 6 * num_pairs + 5


def mqar_max_pairs(length: int) -> int:
    """Most pairs an MQAR example of `length` tokens holds (6 bytes per pair, 6 of framing, 1 is a label)."""
    return max(0, min(len(_MQAR_KEYS), (length - 5) // 6))


def mqar_example(length: int, num_pairs: int, g: torch.Generator) -> Example:
    """Multi-query associative recall: `{ a7 Q3 ... }` (one-letter keys, distinct; one-digit values), then
    `? Q3 a7 ...` (every key again, in random order), padded at the front with spaces to `length`. Answers: every
    queried value; labels supervise only the answers."""
    if not 1 <= num_pairs <= mqar_max_pairs(length):
        raise ValueError(f"length {length} is too short for {num_pairs} pairs (at most {mqar_max_pairs(length)})")
    keys = [chr(_MQAR_KEYS[i]) for i in torch.randperm(len(_MQAR_KEYS), generator=g)[:num_pairs].tolist()]
    values = [_random_text(_VALUE_CHARS, 1, g).decode() for _ in keys]
    order = torch.randperm(num_pairs, generator=g).tolist()
    head = "{" + "".join(f" {k}{v}" for k, v in zip(keys, values)) + " }\n?"
    parts, answer_at = [head], []
    pos = len(head)
    for i in order:
        answer_at.append(pos + 2)  # " K" then the value byte
        parts.append(f" {keys[i]}{values[i]}")
        pos += 3
    text = "".join(parts) + "\n"
    pad = length + 1 - len(text)
    seq = (" " * pad + text).encode()
    tokens, n = list(seq[:-1]), len(seq) - 1
    is_answer = [False] * n
    for j in answer_at:  # token j + pad is an answer byte: predicted at position j + pad - 1
        is_answer[j + pad - 1] = True
    labels = [seq[i + 1] if is_answer[i] else IGNORE for i in range(n)]
    return Example(tokens, labels, is_answer, dict(num_pairs=num_pairs))


def lm_example(corpus: Corpus, length: int, g: torch.Generator) -> tuple[list[int], list[int]]:
    """A random window of length + 1 bytes: (tokens, file-piece lengths) for packing."""
    start = int(torch.randint(len(corpus) - length - 1, (1,), generator=g))
    return corpus_window(corpus, start, length + 1)


# ------------------------------------------------------------------------------------------------------ batches
@dataclass
class Batch:
    """input_ids/labels [1, N] packed with cu_seqlens [S+1] (int32), N = rows * seq_len."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.labels.to(device), self.cu_seqlens.to(device))


@dataclass
class DataMix:
    """Weighted mix of "lm" (stdlib code), "niah" and "mqar" rows of `seq_len` tokens. A task row packs
    seq_len / L examples of a length L drawn from `task_lengths` (more answers per token at short lengths).

    `batch(step, rank, world)` draws `rows` rows for global step `step` from a generator seeded by (seed, step)
    and returns this rank's share (rows rank, rank + world, ...), packed into one [1, N] sequence whose
    `cu_seqlens` cut at row ends and at file boundaries inside LM rows.
    """

    corpus: Corpus
    seq_len: int
    rows: int
    weights: dict = field(default_factory=lambda: {"lm": 1.0})
    seed: int = 0
    mqar_pairs: tuple = (8, 32)
    task_lengths: tuple | None = None  # NIAH/MQAR example lengths (divisors of seq_len); None: seq_len only
    niah_lengths: tuple | None = None  # NIAH example lengths when they differ from task_lengths

    def __post_init__(self):
        if self.task_lengths is not None and not any(self.seq_len % L == 0 for L in self.task_lengths):
            raise ValueError(f"task_lengths must contain a divisor of seq_len {self.seq_len}, got {self.task_lengths}")
        if self.niah_lengths is not None and not any(self.seq_len % L == 0 for L in self.niah_lengths):
            raise ValueError(f"niah_lengths must contain a divisor of seq_len {self.seq_len}, got {self.niah_lengths}")
        unknown = set(self.weights) - {"lm", "niah", "mqar"}
        if unknown or not self.weights or min(self.weights.values()) < 0 or sum(self.weights.values()) <= 0:
            raise ValueError(f"weights must map 'lm'/'niah'/'mqar' to non-negative numbers, got {self.weights}")
        if len(self.corpus) <= self.seq_len + 1:
            raise ValueError(f"the corpus holds {len(self.corpus)} tokens, fewer than seq_len + 2 = {self.seq_len + 2} "
                             f"(raise corpus_max_bytes or lower seq_len)")
        lo, hi = self.mqar_pairs
        if not 1 <= lo <= hi:
            raise ValueError(f"mqar_pairs must be (lo, hi) with 1 <= lo <= hi, got {self.mqar_pairs}")
        # (mqar_pairs is clipped to what an example's length holds, but one pair must fit)
        for kind, choices, shortest, what in (("niah", self.niah_lengths or self.task_lengths, NIAH_MIN_LENGTH,
                                               "a needle example"),
                                              ("mqar", self.task_lengths, mqar_min_length(1), "one MQAR pair")):
            lengths = [L for L in (choices or (self.seq_len,)) if self.seq_len % L == 0]
            if self.weights.get(kind, 0) > 0 and min(lengths) < shortest:
                raise ValueError(f"{kind} example length {min(lengths)} is too short for {what} (at least "
                                 f"{shortest} tokens): raise task_lengths/niah_lengths or seq_len")

    def row(self, kind: str, g: torch.Generator) -> tuple[list[int], list[int], list[int]]:
        """One row of seq_len tokens: (tokens, labels, cut positions inside the row)."""
        T = self.seq_len
        if kind == "lm":
            seq, pieces = lm_example(self.corpus, T, g)
            tokens, labels = seq[:-1], seq[1:]
            cuts, pos = [], 0
            for p in pieces[:-1]:  # a label may not cross a file boundary
                pos += p
                labels[pos - 1] = IGNORE
                cuts.append(pos)
            return tokens, labels, [c for c in cuts if 0 < c < T]
        # task rows pack T / L examples of one length L drawn from task_lengths
        choices = self.niah_lengths if kind == "niah" and self.niah_lengths is not None else self.task_lengths
        lengths = [L for L in (choices or (T,)) if T % L == 0]
        L = lengths[int(torch.randint(len(lengths), (), generator=g))]
        tokens, labels, cuts = [], [], []
        for _ in range(T // L):
            if kind == "niah":
                ex = niah_example(self.corpus, L, float(torch.rand((), generator=g)), g)
            else:
                lo, hi = self.mqar_pairs
                hi = max(1, min(hi, mqar_max_pairs(L)))
                lo = min(lo, hi)
                ex = mqar_example(L, int(torch.randint(lo, hi + 1, (), generator=g)), g)
            tokens += ex.tokens
            labels += ex.labels
            cuts.append(len(tokens))
        return tokens, labels, cuts[:-1]

    def batch(self, step: int, rank: int = 0, world: int = 1) -> Batch:
        if self.rows % world:
            raise ValueError(f"rows ({self.rows}) must be divisible by world size ({world})")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        kinds = [k for k in ("lm", "niah", "mqar") if k in self.weights]  # not the dict's order: equal settings,
        #                                                                    equal batches (a resumed YAML may sort)
        probs = torch.tensor([float(self.weights[k]) for k in kinds])
        picks = torch.multinomial(probs, self.rows, replacement=True, generator=g).tolist()
        rows = [self.row(kinds[p], g) for p in picks]  # every rank draws all rows: identical generator stream
        ids, labels, cu = [], [], [0]
        for tokens, labs, cuts in rows[rank::world]:
            base = len(ids)
            cu += [base + c for c in cuts] + [base + len(tokens)]
            ids += tokens
            labels += labs
        return Batch(torch.tensor([ids]), torch.tensor([labels]), torch.tensor(cu, dtype=torch.int32))
