"""nsa.train: schedule, config loading, checkpoints, exact resume."""
import dataclasses
import json

import pytest
import torch

from nsa.data import stdlib_corpus
from nsa.train import (PRESETS, TrainConfig, load_config, load_model, lr_at, read_checkpoint, read_metrics,
                       train)

CORPUS = stdlib_corpus("train", max_bytes=300_000)


def test_lr_schedule():
    cfg = load_config("micro", overrides={"steps": 100, "warmup_steps": 10, "lr": 1.0, "min_lr_ratio": 0.1})
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # cosine decay is monotone
    assert lr_at(100, cfg) == pytest.approx(0.1)


def test_config_loading(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 7\nmodel:\n  attention: full\n")
    cfg = load_config("micro", path, overrides={"model.hidden_size": 16, "lr": 0.5})
    assert cfg.steps == 7 and cfg.model["attention"] == "full" and cfg.model["hidden_size"] == 16
    assert cfg.model["num_heads"] == PRESETS["micro"]["model"]["num_heads"] and cfg.lr == 0.5
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for preset in PRESETS:
        load_config(preset)
    with pytest.raises(ValueError, match="preset"):
        load_config("huge")
    with pytest.raises(ValueError, match="unknown"):
        load_config("micro", overrides={"stepz": 3})
    with pytest.raises(ValueError, match="attention"):
        load_config("micro", overrides={"model.attention": "linear"})


@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_resume_reproduces_uninterrupted_run(tmp_path, attention):
    """Stop at step 3, resume from its checkpoint: losses, weights and optimizer state equal a straight run."""
    cfg = load_config("micro", overrides={"model.attention": attention, "steps": 6, "ckpt_every": 3})
    straight = train(cfg, tmp_path / "a", progress=False, corpus=CORPUS)
    train(cfg, tmp_path / "b", stop_at=3, progress=False, corpus=CORPUS)
    assert sorted(p.name for p in (tmp_path / "b").glob("ckpt_*")) == ["ckpt_000003.safetensors"]
    resumed = train(cfg, tmp_path / "b", resume=True, progress=False, corpus=CORPUS)
    la = [m["loss"] for m in read_metrics(tmp_path / "a")]
    lb = [m["loss"] for m in read_metrics(tmp_path / "b")]
    assert [m["step"] for m in read_metrics(tmp_path / "b")] == [1, 2, 3, 4, 5, 6]
    assert la == lb and la[-1] < la[0]
    ta, _ = read_checkpoint(straight["checkpoint"])
    tb, meta = read_checkpoint(resumed["checkpoint"])
    assert meta["step"] == "6" and ta.keys() == tb.keys()
    assert any(k.startswith("optim.") for k in ta) and "rng.torch" in ta
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    model, cfg2, step = load_model(straight["checkpoint"])
    assert step == 6 and cfg2 == cfg and model.cfg.attention == attention


def test_read_checkpoint_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="path"):
        read_checkpoint(tmp_path / "x.safetensors")


def test_compiled_training_matches_eager(tmp_path):
    """`compile` (here the aot_eager backend: AOTAutograd and the NSA custom ops without inductor's build time)
    trains like eager: the same losses to float32 rounding, with packed batches whose offsets change every step."""
    cfg = load_config("micro", overrides={"steps": 4, "log_every": 1, "task_lengths": [16, 32, 64]})
    eager = train(cfg, tmp_path / "eager", progress=False, corpus=CORPUS)
    compiled = train(dataclasses.replace(cfg, compile="aot_eager"), tmp_path / "compiled", progress=False,
                     corpus=CORPUS)
    le = [m["loss"] for m in read_metrics(tmp_path / "eager")]
    lc = [m["loss"] for m in read_metrics(tmp_path / "compiled")]
    assert len(le) == len(lc) == 4 and le[-1] < le[0]
    assert lc == pytest.approx(le, rel=1e-4)
    assert compiled["final_loss"] == pytest.approx(eager["final_loss"], rel=1e-4)
