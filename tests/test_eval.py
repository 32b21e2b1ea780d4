"""nsa.evaluate and the CLI: task scoring against an oracle, val loss, checkpoint evaluation, the demo on micro."""
import json

import pytest
import torch

from nsa.cli import generate_text, main
from nsa.data import IGNORE, mqar_example, niah_example, stdlib_corpus
from nsa.evaluate import evaluate_checkpoint, mqar_accuracy, niah_grid, run_demo, val_loss, window_split
from nsa.models import LlamaLM, ModelConfig
from nsa.train import load_model

VAL = stdlib_corpus("val", max_bytes=200_000)


class Oracle(torch.nn.Module):
    """Predicts the true next byte of the sequences it was shown (`wrong`: those whose answers it gets wrong)."""

    def __init__(self, examples, wrong=()):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.table = {tuple(e.tokens): (e.labels, i in wrong, e.answer) for i, e in enumerate(examples)}

    def forward(self, ids, cu_seqlens=None):
        out = torch.zeros(*ids.shape, 256)
        for b, row in enumerate(ids.tolist()):
            labels, wrong, answer = self.table[tuple(row)]
            for t, (lab, ans) in enumerate(zip(labels, answer)):
                tok = 0 if lab == IGNORE else lab
                if wrong and ans:  # spoil only the last answer byte
                    tok = (tok + 1) % 256 if t == max(i for i, a in enumerate(answer) if a) else tok
                out[b, t, tok] = 1.0
        return out


def _niah_examples(L, depths, samples, seed=4321):
    exs = []
    for j, d in enumerate(depths):
        g = torch.Generator().manual_seed(seed + 1000 * L + j)
        exs += [niah_example(VAL, L, d, g) for _ in range(samples)]
    return exs


def test_niah_scoring_against_oracle():
    depths = (0.0, 0.5, 1.0)
    exs = _niah_examples(160, depths, 4)
    res = niah_grid(Oracle(exs), VAL, (160,), depths, 4, window=48)
    assert res["accuracy"] == [[1.0, 1.0, 1.0]] and res["mean"] == 1.0
    assert res["n_inside"] + res["n_beyond"] == 12 and res["n_beyond"] > 0 and res["inside_window"] == 1.0
    wrong = {0, 1, 4}  # two at depth 0, one at depth 0.5
    res = niah_grid(Oracle(exs, wrong), VAL, (160,), depths, 4, window=48)
    assert res["accuracy"] == [[0.5, 0.75, 1.0]]


def test_window_split():
    recs = [dict(length=8, gap=g, correct=c) for g, c in [(1, True), (5, False), (9, True), (12, True)]]
    recs.append(dict(length=4, gap=20, correct=False))
    s = window_split(recs, 6, length=8)
    assert (s["inside_window"], s["beyond_window"], s["n_inside"], s["n_beyond"]) == (0.5, 1.0, 2, 2)
    assert window_split(recs, 6)["beyond_window"] == pytest.approx(2 / 3)


def test_mqar_scoring_against_oracle():
    g = torch.Generator().manual_seed(999)
    exs = [mqar_example(120, 6, g) for _ in range(5)]
    assert mqar_accuracy(Oracle(exs), 120, 6, samples=5)["accuracy"] == 1.0
    res = mqar_accuracy(Oracle(exs, wrong={2}), 120, 6, samples=5)  # one query of 30 spoiled (the last)
    assert res["queries"] == 30 and res["accuracy"] == pytest.approx(29 / 30)


def test_eval_of_a_model_trained_shorter_than_one_mqar_pair(tmp_path):
    """seq_len 8 holds no MQAR pair: eval skips MQAR with a reason (it raised "too short for 1 pairs")."""
    from nsa.evaluate import evaluate_checkpoint
    from nsa.train import load_config, train

    cfg = load_config("micro", overrides={"seq_len": 8, "data_weights": {"lm": 1.0}, "steps": 1})
    train(cfg, tmp_path / "s", progress=False)
    res = evaluate_checkpoint(tmp_path / "s", None, [32], [0.5], 1, 2, 1)
    assert res["mqar"]["accuracy"] is None and "no MQAR pair" in res["mqar"]["skipped"]
    with pytest.raises(ValueError, match="depths"):
        evaluate_checkpoint(tmp_path / "s", None, [32], [2.0], 1, 2, 1)


def test_val_loss_matches_model_loss():
    torch.manual_seed(0)
    model = LlamaLM(ModelConfig(hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=32,
                                attention="full"))
    res = val_loss(model, VAL, 64, num_batches=2, rows=2)
    from nsa.data import DataMix

    mix = DataMix(VAL, 64, 2, {"lm": 1.0}, 1234)
    sums = [model.loss(b.input_ids, b.labels, b.cu_seqlens, reduction="sum").item() for b in map(mix.batch, (0, 1))]
    counts = [int((mix.batch(s).labels != IGNORE).sum()) for s in (0, 1)]
    assert res["tokens"] == sum(counts)
    assert res["loss"] == pytest.approx(sum(sums) / sum(counts), rel=1e-5)
    assert 4.0 < res["loss"] < 7.0


def test_cli_train_eval_and_demo(tmp_path, capsys):
    main(["train", "--preset", "micro", "--steps", "2", "--attention", "full", "--out", str(tmp_path / "t"),
          "--set", "log_every=1", "--no-progress"])
    ckpt = tmp_path / "t" / "ckpt_000002.safetensors"
    assert ckpt.exists()
    main(["eval", str(ckpt), "--out", str(tmp_path / "e"), "--niah-samples", "2", "--mqar-samples", "4",
          "--val-batches", "1"])
    res = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert res["attention"] == "full" and res["step"] == 2 and (tmp_path / "e" / "niah.png").stat().st_size > 0
    assert 0 <= res["niah"]["mean"] <= 1 and res["val"]["loss"] > 0
    capsys.readouterr()
    main(["generate", str(ckpt), "--prompt", "def f(x):", "--prompt", "import", "--max-new-tokens", "5"])
    lines = capsys.readouterr().out
    texts = generate_text(str(ckpt), ["def f(x):", "import"], max_new_tokens=5)
    assert lines.startswith("def f(x):" + texts[0]) and ("import" + texts[1]) in lines
    assert all(len(t.encode(errors="replace")) >= 1 for t in texts)
    alone = generate_text(str(ckpt), ["import"], max_new_tokens=5)
    assert alone == texts[1:]  # a prompt's continuation does not depend on the rest of the batch
    with pytest.raises(ValueError, match="stop"):
        generate_text(str(ckpt), ["x"], stop="ab")
    with pytest.raises(ValueError, match="cuda_graph"):  # a full-attention checkpoint on the CPU
        main(["generate", str(ckpt), "--prompt", "x", "--cuda-graph"])
    # a run folder stands for its latest checkpoint; zero samples or batches are refused
    res_dir = evaluate_checkpoint(tmp_path / "t", None, [64], [0.5], 1, 1, 1)
    assert res_dir["checkpoint"] == str(ckpt)
    for kw in ({"val_batches": 0}, {"niah_samples": 0}, {"mqar_samples": 0}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            evaluate_checkpoint(ckpt, **kw)
    with pytest.raises(ValueError, match="checkpoint"):
        evaluate_checkpoint(tmp_path / "nothing_here")
    with pytest.raises(ValueError, match="steps"):
        main(["train", "--preset", "micro", "--steps", "0", "--out", str(tmp_path / "z"), "--no-progress"])
    with pytest.raises(ValueError, match="holds no checkpoint"):  # it started a 1000-step tiny-cpu run
        main(["train", "--out", str(tmp_path / "empty"), "--resume", "--no-progress"])
    # --resume without --preset continues with the checkpoint's settings (micro, full attention), not tiny-cpu
    main(["train", "--out", str(tmp_path / "t"), "--resume", "--steps", "3", "--no-progress"])
    _, resumed_cfg, step = load_model(tmp_path / "t" / "ckpt_000003.safetensors")
    assert step == 3 and resumed_cfg.model["attention"] == "full" and resumed_cfg.seq_len == 64
    summary = run_demo(tmp_path / "demo", "micro", {"steps": 2}, progress=False, niah_samples=2, mqar_samples=4)
    for name in ("loss_curves.png", "niah_nsa.png", "niah_full.png", "table.md", "summary.json"):
        assert (tmp_path / "demo" / name).stat().st_size > 0, name
    out = capsys.readouterr().out
    assert "| val loss" in out and "NIAH @ 64" in out
    sample = summary["sample"]  # a needle beyond the window, asked of both models by greedy generation
    assert "Sample needle" in out and sample["gap"] >= 16 and set(sample["answers"]) == {"nsa", "full"}
    assert all(len(a.encode()) >= 1 for a in sample["answers"].values())
    n, f = summary["results"]["nsa"], summary["results"]["full"]
    assert n["train"]["num_params"] > f["train"]["num_params"] and n["train"]["final_step"] == 2
    with pytest.raises(SystemExit):
        main(["train", "--attention", "linear"])
