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


@pytest.mark.parametrize("override,field", [
    ({"steps": 0}, "steps"), ({"steps": True}, "steps"), ({"batch_rows": True}, "batch_rows"),
    ({"log_every": 0}, "log_every"), ({"ckpt_every": -1}, "ckpt_every"), ({"warmup_steps": -1}, "warmup_steps"),
    ({"threads": -2}, "threads"), ({"grad_clip": -1.0}, "grad_clip"), ({"grad_clip": 0}, "grad_clip"),
    ({"lr": "fast"}, "lr"), ({"lr": 0}, "lr"), ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
    ({"val_fraction": 0}, "val_fraction"), ({"betas": [0.9]}, "betas"), ({"betas": [0.9, 1.0]}, "betas"),
    ({"mqar_pairs": [0, 4]}, "mqar_pairs"), ({"mqar_pairs": [5, 4]}, "mqar_pairs"),
    ({"task_lengths": [0]}, "task_lengths"), ({"corpus_max_bytes": 0}, "corpus_max_bytes"),
    ({"data_weights": {"lm": -1}}, "data_weights"), ({"compile": ""}, "compile"), ({"model": None}, "model"),
    ({"model.rope_theta": 0}, "rope_theta"), ({"model.rope_theta": -1e4}, "rope_theta"),
    ({"model.norm_eps": -1e-5}, "norm_eps"), ({"model.init_std": 0}, "init_std"),
    ({"model.token_shift": "False"}, "token_shift"), ({"model.vocab_size": 100}, "vocab_size"),
    ({"model.attention": "full", "model.head_dim": 7}, "head_dim"), ({"model.nsa": None}, "nsa"),
])
def test_bad_train_settings_raise_naming_the_field(override, field):
    with pytest.raises(ValueError, match=field):
        load_config("micro", overrides=override)


def test_settings_that_cannot_make_a_batch_fail_at_setup(tmp_path):
    """A corpus shorter than a row, or task lengths too short for one MQAR pair or a needle: ValueError before
    the first step, not a crash at a random step."""
    with pytest.raises(ValueError, match="corpus"):
        train(load_config("micro", overrides={"corpus_max_bytes": 10}), tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="mqar"):
        train(load_config("micro", overrides={"task_lengths": [8, 64], "niah_lengths": [64]}), tmp_path / "b",
              progress=False, corpus=CORPUS)
    with pytest.raises(ValueError, match="niah"):
        train(load_config("micro", overrides={"niah_lengths": [8]}), tmp_path / "c", progress=False, corpus=CORPUS)


def test_config_loading_structure_and_yaml_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 3e-3\nmodel:\n  rope_theta: 5e5\n")  # YAML 1.1 reads these as strings
    cfg = load_config("micro", path)
    assert cfg.lr == 3e-3 and cfg.model["rope_theta"] == 5e5
    path.write_text("- steps\n- 3\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config("micro", path)
    with pytest.raises(ValueError, match="seq_len is not a section"):
        load_config("micro", overrides={"seq_len.x": 1})
    assert load_config("micro", overrides={"grad_clip": None}).grad_clip is None  # None: no clipping


def test_run_folder_rules(tmp_path):
    """A fresh run refuses another run's folder unless overwrite; resume drops metrics rows past its step, refuses
    a checkpoint past `steps` or of another model, and a finished run resumed trains nothing."""
    out = tmp_path / "r"
    cfg = load_config("micro", overrides={"steps": 8, "ckpt_every": 2})
    train(cfg, out, stop_at=5, progress=False, corpus=CORPUS)  # killed after logging step 5, before saving it
    (out / "ckpt_000005.safetensors").unlink()
    with pytest.raises(ValueError, match="previous run"):
        train(cfg, out, progress=False, corpus=CORPUS)
    done = train(cfg, out, resume=True, progress=False, corpus=CORPUS)  # resumes from step 4
    assert [m["step"] for m in read_metrics(out)] == list(range(1, 9)) and done["final_step"] == 8
    again = train(cfg, out, resume=True, progress=False, corpus=CORPUS)
    assert again["final_step"] == 8 and again["checkpoint"] == done["checkpoint"] and again["final_loss"] is None
    with pytest.raises(ValueError, match="past steps"):
        train(load_config("micro", overrides={"steps": 3}), out, resume=True, progress=False, corpus=CORPUS)
    with pytest.raises(ValueError, match="model.attention"):
        train(load_config("micro", overrides={"steps": 9, "model.attention": "full"}), out, resume=True,
              progress=False, corpus=CORPUS)
    fresh = train(load_config("micro", overrides={"steps": 2}), out, progress=False, corpus=CORPUS, overwrite=True)
    assert sorted(p.name for p in out.glob("ckpt_*")) == ["ckpt_000002.safetensors"]
    assert [m["step"] for m in read_metrics(out)] == [1, 2] and fresh["final_step"] == 2


def test_resume_from_an_earlier_checkpoint_drops_the_abandoned_continuation(tmp_path):
    """Resuming from ckpt 2 of a run that reached 6: checkpoints 4 and 6 of the abandoned continuation go with
    their metrics rows, so the folder's latest checkpoint is the new run's. Settings equal up to spelled-out NSA
    defaults or another backend resume the same model."""
    out = tmp_path / "r"
    cfg = load_config("micro", overrides={"steps": 6, "ckpt_every": 2})
    train(cfg, out, progress=False, corpus=CORPUS)
    again = load_config("micro", overrides={"steps": 6, "ckpt_every": 2, "lr": 1e-3, "model.backend": "reference",
                                            "model.nsa.num_local_blocks": 2})
    train(again, out, resume=out / "ckpt_000002.safetensors", stop_at=3, progress=False, corpus=CORPUS)
    assert sorted(p.name for p in out.glob("ckpt_*")) == ["ckpt_000002.safetensors", "ckpt_000003.safetensors"]
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]


def test_data_weights_order_does_not_change_the_batches():
    """Equal settings give equal batches whatever order the data_weights dict was written in (a YAML dump sorts
    its keys: a resumed run left the uninterrupted curve)."""
    from nsa.data import DataMix

    mixes = [DataMix(CORPUS, 64, 4, w, 0, (2, 4)) for w in ({"lm": .5, "niah": .3, "mqar": .2},
                                                           {"mqar": .2, "lm": .5, "niah": .3})]
    for s in range(3):
        a, b = (m.batch(s) for m in mixes)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.cu_seqlens, b.cu_seqlens)


def test_model_settings_checked_for_either_attention():
    for override, field in (({"model.attention": "full", "model.compression": "foo"}, "compression"),
                            ({"model.attention": "full", "model.shared_kv": "maybe"}, "shared_kv"),
                            ({"model.gate_bias": "oops"}, "gate_bias"), ({"model.gate_bias": [1, 2]}, "gate_bias")):
        with pytest.raises(ValueError, match=field):
            load_config("micro", overrides=override)
    assert load_config("micro", overrides={"model.gate_bias": ["2e0", 0, 0]}).model["gate_bias"] == (2.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="config"):
        load_config("micro", "/nonexistent/cfg.yaml")


def test_resuming_another_folders_checkpoint_into_a_used_folder_is_refused(tmp_path):
    """`--resume FILE` from run A into folder B that holds run B: refused (it spliced B's early checkpoints and
    metrics with A's continuation), unless overwrite; into an empty folder it continues A there."""
    cfg = load_config("micro", overrides={"steps": 4, "ckpt_every": 2})
    train(cfg, tmp_path / "a", progress=False, corpus=CORPUS, stop_at=2)
    train(load_config("micro", overrides={"steps": 4, "ckpt_every": 2, "seed": 3}), tmp_path / "b", progress=False,
          corpus=CORPUS, stop_at=2)
    source = tmp_path / "a" / "ckpt_000002.safetensors"
    with pytest.raises(ValueError, match="previous run"):
        train(cfg, tmp_path / "b", resume=source, progress=False, corpus=CORPUS)
    train(cfg, tmp_path / "b", resume=source, progress=False, corpus=CORPUS, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "b").glob("ckpt_*")) == ["ckpt_000004.safetensors"]
    assert [m["step"] for m in read_metrics(tmp_path / "b")] == [3, 4]
    train(cfg, tmp_path / "c", resume=source, progress=False, corpus=CORPUS)
    assert (tmp_path / "c" / "ckpt_000004.safetensors").exists()
