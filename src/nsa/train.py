"""`nsa train`: AdamW + warmup/cosine, grad clipping, bf16 autocast on GPU, packed batches, JSONL metrics,
safetensors checkpoints (model, optimizer, RNG) with exact resume, and DDP / FSDP2 under torchrun.

The batch of step s is a pure function of (data seed, s) (`nsa.data.DataMix`), and the learning rate a pure
function of s, so a run resumed from a checkpoint replays the uninterrupted run exactly. Under torchrun each rank
takes every world-th row of the global batch; the loss is the global token mean, so a 2-process run matches a
single-process run with the same global batch.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import check_int, check_number
from .data import IGNORE, DataMix, stdlib_corpus
from .models import LlamaLM, ModelConfig


@dataclass
class TrainConfig:
    """A training run. `model` holds ModelConfig fields; `data_weights` the DataMix weights."""

    model: dict = field(default_factory=dict)
    seq_len: int = 512
    batch_rows: int = 8  # global batch, in rows of seq_len tokens
    data_weights: dict = field(default_factory=lambda: {"lm": 1.0})
    mqar_pairs: tuple = (8, 32)
    task_lengths: tuple | None = None  # NIAH/MQAR example lengths packed into rows (divisors of seq_len)
    niah_lengths: tuple | None = None  # NIAH example lengths, when they differ from task_lengths
    corpus_max_bytes: int | None = None
    val_fraction: float = 0.05
    steps: int = 1000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float | None = 1.0  # None: no clipping
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 0  # 0: only at the end
    parallel: str = "auto"  # "auto" (ddp when WORLD_SIZE > 1) | "none" | "ddp" | "fsdp"
    device: str = "auto"
    threads: int = 0  # torch.set_num_threads when > 0
    compile: bool | str = False  # torch.compile the model (True: inductor; a string: that torch.compile backend)

    def __post_init__(self):
        """Every field checked here, with a ValueError naming it: a bad value must not surface as a crash deep in
        a step, a NaN loss or a silently odd schedule."""
        if self.parallel not in ("auto", "none", "ddp", "fsdp"):
            raise ValueError(f"parallel must be auto, none, ddp or fsdp, got {self.parallel!r}")
        for name in ("seq_len", "batch_rows", "steps", "log_every"):
            check_int(name, getattr(self, name), 1)
        for name in ("warmup_steps", "ckpt_every", "threads", "seed"):
            check_int(name, getattr(self, name), 0)
        if self.corpus_max_bytes is not None:
            check_int("corpus_max_bytes", self.corpus_max_bytes, 1)
        self.lr = check_number("lr", self.lr, 0.0, lo_open=True, hi_open=True)
        self.min_lr_ratio = check_number("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        self.weight_decay = check_number("weight_decay", self.weight_decay, 0.0, hi_open=True)
        self.val_fraction = check_number("val_fraction", self.val_fraction, 0.0, 1.0, lo_open=True, hi_open=True)
        if self.grad_clip is not None:  # None: no clipping
            self.grad_clip = check_number("grad_clip", self.grad_clip, 0.0, lo_open=True)
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = tuple(check_number("betas", b, 0.0, 1.0, hi_open=True) for b in self.betas)
        if (not isinstance(self.mqar_pairs, (list, tuple)) or len(self.mqar_pairs) != 2
                or not all(isinstance(p, int) and not isinstance(p, bool) for p in self.mqar_pairs)
                or not 1 <= self.mqar_pairs[0] <= self.mqar_pairs[1]):
            raise ValueError(f"mqar_pairs must be two ints (lo, hi) with 1 <= lo <= hi, got {self.mqar_pairs!r}")
        self.mqar_pairs = tuple(self.mqar_pairs)
        for name in ("task_lengths", "niah_lengths"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, (list, tuple)) or not value:
                raise ValueError(f"{name} must be a list of positive ints, got {value!r}")
            setattr(self, name, tuple(check_int(name, L, 1) for L in value))
        if not isinstance(self.data_weights, dict):
            raise ValueError(f"data_weights must map 'lm'/'niah'/'mqar' to weights, got {self.data_weights!r}")
        self.data_weights = {k: check_number(f"data_weights.{k}", w, 0.0) for k, w in self.data_weights.items()}
        if not (isinstance(self.compile, (bool, str)) and self.compile != ""):
            raise ValueError(f"compile must be true, false or a torch.compile backend name, got {self.compile!r}")
        if isinstance(self.compile, str):
            from torch import _dynamo

            backends = _dynamo.list_backends(exclude_tags=())  # debug ones (aot_eager, eager) included
            if self.compile not in backends:
                raise ValueError(f"compile must be true, false or a torch.compile backend (e.g. inductor, aot_eager; "
                                 f"see torch._dynamo.list_backends()), got {self.compile!r}")
        _check_device_name(self.device)
        if not isinstance(self.model, dict):
            raise ValueError(f"model must be a mapping of ModelConfig fields, got {self.model!r}")
        model = ModelConfig.from_dict(self.model)  # validate early
        self.model = model.to_dict()  # every model setting, numbers as numbers
        if model.vocab_size < 256:
            raise ValueError(f"model.vocab_size must be >= 256 (the data are bytes), got {model.vocab_size}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"train config has unknown keys {sorted(unknown)}")
        return cls(**d)


# A demo-sized geometry: l=8, d=4, l'=32, n=8 (1 init + 2 local + 5 chosen of up to 16 blocks at 512 tokens), w=64.
# n=8 over n=6: NIAH@512 beyond the window 42% vs 19% and MQAR 88% vs 56% in one 800-step NSA run each.
# l=8 over l=16: the needle's value byte is 1 of l keys of its compressed token, and the selection score (Eq. 8)
# sees the query's match with it diluted by ~1/l; with l=8 layer 0 (the layer that reads the needle) selected the
# needle block for 97-99% of the needles beyond the window, vs 63-95% with l=16 (one 800-step run each).
# d=4 (overlapping blocks, d = l/2 as in the paper) over d=8: NSA NIAH@512 over seeds 0-5 mean 92.0% (worst seed
# 83.9%) vs 88.7% (worst 59.8%); the val-loss target held in every seed with both.
DEMO_NSA = dict(cmp_block_size=8, cmp_stride=4, slc_block_size=32, num_selected=8, num_init_blocks=1,
                num_local_blocks=2, window_size=64)
PRESETS: dict[str, dict] = {
    # what `nsa demo` trains on a 2-core CPU (both attention types, same everything else)
    "tiny-cpu": dict(
        # init_std 0.08 (~ hidden^-1/2) instead of 0.02: with the small init, recall did not emerge in 600 steps
        # 4 KV heads (G = 1: each head selects its own blocks) instead of 2: NSA NIAH@512 over seeds 0-5 went from
        # 97.3/83.9/96.4/86.6/92.9/94.6% to 98.2/99.1/99.1/99.1/99.1/76.8% (mean 92.0 -> 95.2%)
        model=dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=32, intermediate_size=384,
                   attention="nsa", nsa=DEMO_NSA, shared_kv=True, token_shift=True, init_std=0.08,
                   # NSA's gates start at 0.5 (gate_bias left at 0). A high cmp-gate start (bias 2, 0, 0 or 2, 1, 0)
                   # rescued seed 1 (NIAH@512 63 -> 91-92%), but seeds 4 and 5 then lost NIAH (12-70%, also inside
                   # the window): NSA NIAH@512 mean over seeds 0-5 87.4% with bias 0, 74.9% / 69.6% with those
                   # (on the chunked torch path, before the dense one).
                   # RoPE base 5e5 (as Llama 3) instead of 1e4: with 1e4 both models read a needle > 256 tokens back
                   # badly (full attention 26-56% at gaps 320-512, NSA the same even with the needle block forced
                   # into its selection), since few head-dim pairs rotate slowly enough to match content 512 apart
                   rope_theta=500000.0),
        # NIAH-heavy mix with examples of 64-512 tokens: short ones (dense answers) make the one-step lookup
        # emerge early; with NIAH only at 128-512 tokens (0.4 NIAH / 0.5 MQAR) NSA stayed at chance on NIAH
        seq_len=512, batch_rows=8, data_weights={"lm": 0.1, "niah": 0.5, "mqar": 0.4}, mqar_pairs=(2, 24),
        # NIAH rows: 512 tokens half the time (niah_lengths draws uniformly from the list), 64/128/256 otherwise:
        # only 512-token needles make NSA's selection matter (at <= 256 tokens all 8 blocks are selected).
        # 1000 steps (NSA ~0.35 s/step on one core: ~6 min, within the demo's 10-minute budget): at 800 steps
        # the lookup was still being learned (NSA NIAH@512 74%, 90% even inside the window), at 900 it was 95-96%;
        # 1000 kept NIAH at 95.5% and raised MQAR (91 -> 96%) and val loss (-0.023) for both models
        task_lengths=(64, 128, 256, 512), niah_lengths=(64, 128, 256, 512, 512, 512), steps=1000, lr=3e-3,
        warmup_steps=30, log_every=10,
    ),
    # a GPU-sized starting point (paper geometry, 8k context)
    "small-gpu": dict(
        model=dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4, head_dim=64,
                   intermediate_size=2048, attention="nsa", nsa={}, shared_kv=False),
        seq_len=8192, batch_rows=16, data_weights={"lm": 0.8, "niah": 0.1, "mqar": 0.1}, mqar_pairs=(16, 256),
        steps=20000, lr=1e-3, warmup_steps=1000, log_every=50, ckpt_every=1000,
    ),
    # seconds on a CPU: for tests and smoke runs
    "micro": dict(
        model=dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64,
                   attention="nsa", nsa=dict(cmp_block_size=8, cmp_stride=4, slc_block_size=16, num_selected=4,
                                             window_size=16), shared_kv=True),
        seq_len=64, batch_rows=4, data_weights={"lm": 0.5, "niah": 0.3, "mqar": 0.2}, mqar_pairs=(2, 4),
        corpus_max_bytes=300_000, steps=6, lr=3e-3, warmup_steps=2, log_every=1,
    ),
}


def load_config(preset: str | None = None, path: str | Path | None = None, overrides: dict | None = None,
                base: dict | None = None) -> TrainConfig:
    """A preset (or `base`, a TrainConfig dict), then a YAML file, then `overrides` (dotted keys allowed:
    "model.attention"), merged in order."""
    d: dict = copy.deepcopy(base) if base is not None else {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        d = copy.deepcopy(PRESETS[preset])
    if path is not None:
        import yaml

        if not Path(path).is_file():
            raise ValueError(f"config: no such file {path}")
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping of settings, got {type(loaded).__name__}")
        _merge(d, loaded)
    for key, value in (overrides or {}).items():
        node = d
        *parents, leaf = key.split(".")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {key!r}: {'.'.join(parents[:i + 1])} is not a section of settings")
        node[leaf] = value
    return TrainConfig.from_dict(d)


def _merge(base: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then cosine decay to lr * min_lr_ratio at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ------------------------------------------------------------------------------------------------- distributed
def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _dist_info()[1] > 1:
        dist.all_reduce(x)
    return x


def setup_distributed(device: torch.device) -> None:
    """Initialise the process group from torchrun's environment (gloo on CPU, nccl on CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def wrap_model(model: torch.nn.Module, mode: str, device: torch.device) -> torch.nn.Module:
    """DDP, or FSDP2 (`fully_shard` on every block, then the root); unchanged on one process."""
    if _dist_info()[1] == 1 or mode == "none":
        return model
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


# ------------------------------------------------------------------------------------------------- checkpoints
def _state_dicts(model, opt):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(path: Path, model, opt, step: int, cfg: TrainConfig) -> None:
    """One safetensors file: model.*, optim.* tensors and rng.torch; config, step, param groups in metadata."""
    from safetensors.torch import save_file

    model_sd, optim_sd = _state_dicts(model, opt)  # full state on rank 0 (collective under FSDP)
    if _dist_info()[0] != 0:
        return
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model_sd.items()}
    for fqn, state in optim_sd["state"].items():
        for key, value in state.items():
            tensors[f"optim.{fqn}::{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {"step": str(step), "config": json.dumps(cfg.to_dict()),
            "param_groups": json.dumps(optim_sd["param_groups"]), "format": "nsa-train-v1"}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def read_checkpoint(path: str | Path) -> tuple[dict, dict]:
    """(tensors, metadata) of a checkpoint file, or of the latest checkpoint in a run folder."""
    from safetensors import safe_open

    path = checkpoint_path(path)

    tensors, meta = {}, {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    if meta.get("format") != "nsa-train-v1":
        raise ValueError(f"path {path} is not an nsa training checkpoint")
    return tensors, meta


def load_model(path: str | Path, device="cpu") -> tuple[LlamaLM, TrainConfig, int]:
    """The model of a checkpoint (either attention type), its TrainConfig and step."""
    tensors, meta = read_checkpoint(path)
    cfg = TrainConfig.from_dict(json.loads(meta["config"]))
    model = LlamaLM(ModelConfig.from_dict(cfg.model))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    return model.to(device), cfg, int(meta["step"])


def _restore(path: Path, model, opt) -> int:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    tensors, meta = read_checkpoint(path)
    model_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            fqn, key = k[6:].split("::")
            state.setdefault(fqn, {})[key] = v
    optim_sd = {"state": state, "param_groups": json.loads(meta["param_groups"])}
    for group in optim_sd["param_groups"]:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=True))
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return int(meta["step"])


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = sorted(Path(out_dir).glob("ckpt_*.safetensors"))
    return found[-1] if found else None


def checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file as given, or a run folder's latest checkpoint; ValueError when there is none."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise ValueError(f"checkpoint: the folder {path} holds no ckpt_*.safetensors")
        return found
    if not path.is_file():
        raise ValueError(f"checkpoint: no such file {path}")
    return path


def checkpoint_config(path: str | Path) -> TrainConfig:
    """The TrainConfig a checkpoint (or a run folder's latest checkpoint) was trained with."""
    return TrainConfig.from_dict(json.loads(read_checkpoint(path)[1]["config"]))


def _check_resumable(ckpt: Path, cfg: TrainConfig) -> None:
    """Resuming continues the same model: its settings must equal the checkpoint's (the schedule may change)."""
    def settings(model: dict) -> dict:  # the NSA geometry with its defaults filled in; the backend may change
        m = ModelConfig.from_dict(model)
        return {**m.to_dict(), "nsa": dataclasses.asdict(m.nsa_config()), "backend": None}

    old, new = settings(checkpoint_config(ckpt).model), settings(cfg.model)
    diff = sorted(k for k in old if old[k] != new[k])
    if diff:
        details = ", ".join(f"model.{k}: {old[k]!r} in the checkpoint, {new[k]!r} now" for k in diff)
        raise ValueError(f"resume: {ckpt} was trained with another model ({details})")


def _prepare_out_dir(out_dir: Path, start: int, resume, overwrite: bool, ckpt: Path | None = None) -> None:
    """A fresh run, or one resumed from another folder's checkpoint, refuses a folder holding another run's
    checkpoints or metrics (unless overwrite, which deletes them); a run resumed from this folder drops the
    checkpoints and metrics rows after the step it resumes from (the abandoned continuation's: a later `--resume`
    or `nsa eval` of the folder would pick them)."""
    metrics = out_dir / "metrics.jsonl"
    old = sorted(out_dir.glob("ckpt_*.safetensors")) + ([metrics] if metrics.exists() else [])
    if ckpt is not None and ckpt.resolve().parent != out_dir.resolve():
        resume = False  # continuing another folder's run here: this folder's own run must not be spliced in
    if not resume and old:
        if not overwrite:
            raise ValueError(f"out_dir {out_dir} holds a previous run ({old[0].name}, ...): resume it, pick another "
                             f"folder, or overwrite it (nsa train --overwrite)")
        for f in old:
            f.unlink()
    if resume:
        for f in out_dir.glob("ckpt_*.safetensors"):
            if int(f.stem.split("_")[1]) > start:
                f.unlink()
    if resume and metrics.exists():
        rows = [line for line in metrics.read_text().splitlines() if line.strip()]
        metrics.write_text("".join(line + "\n" for line in rows if json.loads(line)["step"] <= start))


# ------------------------------------------------------------------------------------------------- training
def _check_device_name(device) -> None:
    """A device's spelling ('auto', 'cpu', 'cuda', 'cuda:1', ...), else ValueError naming it. Whether the device
    exists here is checked when training starts (a checkpoint's config may name a device this machine lacks)."""
    if not isinstance(device, str):
        raise ValueError(f"device must be a string such as 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "auto":
        return
    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device must be 'auto' or a torch device such as 'cpu', 'cuda' or 'cuda:1', got "
                         f"{device!r}") from exc
    if parsed.type == "meta":
        raise ValueError("device must hold data: 'meta' cannot train")


def _device(cfg: TrainConfig) -> torch.device:
    """The training device; ValueError naming `device` when it is not available here."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "auto":
        return torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(cfg.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {cfg.device!r}: CUDA is not available here (use device=auto or cpu)")
        if device.index is None:  # torch.cuda.set_device needs an index: this process's GPU, as for auto
            device = torch.device("cuda", local)
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"device {cfg.device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as exc:
            raise ValueError(f"device {cfg.device!r} is not available here: {exc}") from exc
    return device


def train(cfg: TrainConfig, out_dir: str | Path, resume: bool | str = False, stop_at: int | None = None,
          progress: bool = True, corpus=None, progress_position: int = 0, overwrite: bool = False) -> dict:
    """Train, writing `metrics.jsonl` and `ckpt_<step>.safetensors` under out_dir; returns a summary dict.

    resume: True = latest checkpoint in out_dir (if any), or a checkpoint path (or run folder); the model
    settings must match the checkpoint's, and metrics rows past its step are dropped. Without resume, out_dir
    must not hold another run unless `overwrite` (which deletes its checkpoints and metrics). stop_at: stop after
    this step (the schedule still follows cfg.steps), to simulate an interruption.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    device = _device(cfg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    setup_distributed(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank, world = _dist_info()
    mode = cfg.parallel if cfg.parallel != "auto" else ("ddp" if world > 1 else "none")

    torch.manual_seed(cfg.seed)
    model = LlamaLM(ModelConfig.from_dict(cfg.model)).to(device)
    num_params = model.num_params()
    model = wrap_model(model, mode, device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
    start = 0
    ckpt = (latest_checkpoint(out_dir) if resume is True else checkpoint_path(resume)) if resume else None
    if ckpt is not None:
        _check_resumable(ckpt, cfg)
        start = _restore(ckpt, model, opt)
        if start > cfg.steps:
            raise ValueError(f"resume: {ckpt} is at step {start}, past steps = {cfg.steps}")
    if corpus is None:
        corpus = stdlib_corpus("train", cfg.val_fraction, cfg.corpus_max_bytes)
    mix = DataMix(corpus, cfg.seq_len, cfg.batch_rows, cfg.data_weights, cfg.seed, cfg.mqar_pairs, cfg.task_lengths,
                  cfg.niah_lengths)
    out_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        _prepare_out_dir(out_dir, start, resume, overwrite, ckpt)
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    log = open(out_dir / "metrics.jsonl", "a") if rank == 0 else None
    end = max(start, min(cfg.steps, stop_at if stop_at is not None else cfg.steps))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    bar = tqdm(total=end, initial=start, disable=not progress or rank != 0, desc=f"train {cfg.model.get('attention')}",
               dynamic_ncols=True, position=progress_position)
    tokens_seen, train_time, loss_value = 0, 0.0, None
    model.train()
    if cfg.compile:
        # packed batches: the compressed-block count is a dynamic size (one graph per model, no graph break)
        torch._dynamo.config.capture_dynamic_output_shape_ops = True
        forward = torch.compile(model, **({} if cfg.compile is True else {"backend": cfg.compile}))
    else:
        forward = model
    for step in range(start, end):
        t0 = time.perf_counter()
        batch = mix.batch(step, rank, world).to(device)
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        with autocast:
            logits = forward(batch.input_ids, cu_seqlens=batch.cu_seqlens)
        ce_sum = F.cross_entropy(logits.float().flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE,
                                 reduction="sum")
        counts = _all_reduce(torch.tensor([float((batch.labels != IGNORE).sum()), float(batch.input_ids.numel())],
                                          device=device))
        # global token mean; DDP/FSDP average gradients over ranks, hence the factor `world`
        (ce_sum * (world / counts[0].clamp_min(1))).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                   math.inf if cfg.grad_clip is None else cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = float(_all_reduce(ce_sum.detach().clone()) / counts[0].clamp_min(1))
        dt = time.perf_counter() - t0
        train_time += dt
        tokens_seen += int(counts[1])
        done = step + 1
        if log is not None and (done % cfg.log_every == 0 or done == end or done == 1):
            rec = dict(step=done, loss=loss_value, lr=lr, grad_norm=float(grad_norm), tokens=done * int(counts[1]),
                       tokens_per_s=tokens_seen / max(train_time, 1e-9), time=train_time)
            log.write(json.dumps(rec) + "\n")
            log.flush()
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.1e}")
        bar.update(1)
        if cfg.ckpt_every and done % cfg.ckpt_every == 0 and done != end:
            save_checkpoint(out_dir / f"ckpt_{done:06d}.safetensors", model, opt, done, cfg)
    bar.close()
    final = out_dir / f"ckpt_{end:06d}.safetensors"
    if end > start:
        save_checkpoint(final, model, opt, end, cfg)
    else:  # nothing left to train: the checkpoint resumed from is the result
        final = ckpt if ckpt is not None else final
    if log is not None:
        log.close()
    if world > 1:  # every rank leaves with its collectives done, so a caller may tear the process group down
        dist.barrier()
    return dict(final_step=end, final_loss=loss_value, checkpoint=str(final), num_params=num_params,
                tokens_per_s=tokens_seen / max(train_time, 1e-9), train_time=train_time, world=world, mode=mode)


def read_metrics(out_dir: str | Path) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
