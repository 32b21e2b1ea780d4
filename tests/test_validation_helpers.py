"""Argument validation of the helpers: padding, varlen offsets, compressors, CLI settings."""
import numpy as np
import pytest
import torch

import nsa
from nsa.cli import main
from nsa.train import _device, load_config, train


# ----------------------------------------------------------------------------------------- compressed_cu_seqlens
CU = torch.tensor([0, 9, 9, 30], dtype=torch.int32)  # lengths 9, 0, 21 -> 1, 0, 4 compressed tokens


@pytest.mark.parametrize("args,name", [
    ((torch.tensor([0, 10, 5]), 8, 4), "cu_seqlens"),  # decreasing
    ((torch.tensor([3, 10, 20]), 8, 4), "cu_seqlens"),  # not from 0
    ((torch.tensor([0.0, 10.0, 20.0]), 8, 4), "cu_seqlens"),
    ((torch.tensor([0, 10], dtype=torch.int16), 8, 4), "cu_seqlens"),
    ((torch.tensor([[0, 10, 20]]), 8, 4), "cu_seqlens"),
    ((torch.tensor([0]), 8, 4), "cu_seqlens"),
    (([0, 10, 20], 8, 4), "cu_seqlens"),
    ((CU, 8, 0), "stride"), ((CU, 8, -1), "stride"), ((CU, 8, True), "stride"), ((CU, 8, 4.0), "stride"),
    ((CU, 0, 4), "block_size"), ((CU, np.bool_(True), 4), "block_size"), ((CU, torch.tensor(8), 4), "block_size"),
])
def test_compressed_cu_seqlens_refuses_bad_arguments(args, name):
    with pytest.raises(ValueError, match=name):
        nsa.compressed_cu_seqlens(*args)


def test_compressed_cu_seqlens_valid_inputs():
    assert nsa.compressed_cu_seqlens(CU, 8, 4).tolist() == [0, 1, 1, 5]
    out = nsa.compressed_cu_seqlens(CU.long(), np.int64(8), np.int32(4))
    assert out.tolist() == [0, 1, 1, 5] and out.dtype == torch.int64
    strided = torch.stack([CU, CU], 1)[:, 1]  # non-contiguous
    assert not strided.is_contiguous() and nsa.compressed_cu_seqlens(strided, 8, 4).tolist() == [0, 1, 1, 5]
    zeros = torch.zeros(1, dtype=torch.int64).expand(3)  # stride 0: three empty sequences
    assert nsa.compressed_cu_seqlens(zeros, 8, 4).tolist() == [0, 0, 0]


# ----------------------------------------------------------------------------------------------- compressors
@pytest.mark.parametrize("args,name", [
    ((["mlp"], 8, 8, 4, True), "compression"), (("nope", 8, 8, 4, True), "compression"),
    (("mlp", 0, 8, 4, True), "head_dim"), (("mlp", -1, 8, 4, True), "head_dim"),
    (("mlp", 8.0, 8, 4, True), "head_dim"), (("linear", True, 8, 4, True), "head_dim"),
    (("mean", 8, 0, 4, False), "block_size"), (("mean", 8, 8, 0, False), "stride"),
    (("mean", 8, 8, True, False), "stride"), (("mlp", 8, 8, 4, 1), "position_embedding"),
    (("mean", 8, 8, 4, "no"), "position_embedding"),
])
def test_make_compressor_refuses_bad_arguments(args, name):
    with pytest.raises(ValueError, match=name):
        nsa.make_compressor(*args)


@pytest.mark.parametrize("name", sorted(nsa.COMPRESSORS))
def test_compressor_forward_checks_x_and_takes_strided_inputs(name):
    phi = nsa.make_compressor(name, np.int64(8), np.int64(8), np.int32(4), True).double()
    assert (phi.head_dim, phi.block_size, phi.stride) == (8, 8, 4) and type(phi.stride) is int
    x = torch.randn(2, 20, 3, 8, dtype=torch.float64)
    for bad in (x[0], x[..., :6], x[None], x.tolist()):
        with pytest.raises(ValueError, match="x must be"):
            phi(bad)
    ref = phi(x)
    assert ref.shape == (2, 4, 3, 8)
    strided = x.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous, same values
    assert not strided.is_contiguous() and torch.equal(phi(strided), ref)
    expanded = x[:, :, :1].expand(2, 20, 3, 8)  # stride-0 heads
    assert torch.allclose(phi(expanded), phi(expanded.contiguous()), atol=1e-12)


# ----------------------------------------------------------------------------------------------------- pad_input
X = torch.randn(2, 5, 3)
MASK = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
XP, IDX, _, _ = nsa.unpad_input(X, MASK)


@pytest.mark.parametrize("args,name", [
    ((XP, IDX.tolist(), 2, 5), "indices"), ((XP, IDX.float() + 0.5, 2, 5), "indices"),
    ((XP, IDX.bool(), 2, 5), "indices"), ((XP, torch.zeros_like(IDX), 2, 5), "indices"),  # duplicates
    ((XP, IDX.flip(0).clone().index_fill_(0, torch.tensor([3]), 0), 2, 5), "indices"),  # unsorted duplicates
    ((XP[:, :6], IDX[:6].view(2, 3), 2, 5), "indices"), ((XP, IDX, 1, 5), "indices"),  # out of range
    ((XP, IDX - 1, 2, 5), "indices"),
    ((XP[:, :0], IDX[:0], -1, 5), "batch"), ((XP, IDX, 2.5, 4), "batch"), ((XP[:, :2], IDX[:2], True, 5), "batch"),
    ((XP, IDX, torch.tensor(2), 5), "batch"), ((XP, IDX, 2, -5), "seqlen"), ((XP, IDX, 2, "5"), "seqlen"),
    ((XP[0], IDX, 2, 5), "x_packed"),
])
def test_pad_input_refuses_bad_arguments(args, name):
    with pytest.raises(ValueError, match=name):
        nsa.pad_input(*args)


def test_pad_input_valid_inputs():
    ref = nsa.pad_input(XP, IDX, 2, 5)
    assert torch.equal(ref, X * MASK[..., None])
    assert torch.equal(nsa.pad_input(XP, IDX.int(), np.int64(2), np.int32(5)), ref)
    perm = torch.randperm(IDX.numel(), generator=torch.Generator().manual_seed(0))
    assert torch.equal(nsa.pad_input(XP[:, perm], IDX[perm], 2, 5), ref)  # any order of distinct indices
    strided = torch.stack([IDX, IDX], 1)[:, 0]
    assert not strided.is_contiguous() and torch.equal(nsa.pad_input(XP, strided, 2, 5), ref)
    xs = XP.transpose(0, 1).contiguous().transpose(0, 1)
    assert torch.equal(nsa.pad_input(xs.expand(1, -1, -1), IDX, 2, 5), ref)
    assert nsa.pad_input(XP[:, :0], IDX[:0], 0, 5).shape == (0, 5, 3)
    one = nsa.pad_input(XP[:, :1], torch.zeros(1, dtype=torch.long).expand(1), 1, 1)  # stride-0 [1]
    assert torch.equal(one[0, 0], XP[0, 0])


def test_pad_input_compiles_without_host_reads():
    """While tracing only dtype, rank and shape are checked: one graph (fullgraph), same result."""
    fn = torch.compile(lambda x, i: nsa.pad_input(x, i, 2, 5), backend="eager", fullgraph=True)
    assert torch.equal(fn(XP, IDX), nsa.pad_input(XP, IDX, 2, 5))


# -------------------------------------------------------------------------------------------- CLI and train settings
@pytest.mark.parametrize("override,name", [
    ({"device": "cpux"}, "device"), ({"device": "CPU"}, "device"), ({"device": "meta"}, "device"),
    ({"device": 0}, "device"), ({"compile": "bogus_backend"}, "compile"), ({"compile": 1}, "compile"),
])
def test_bad_device_and_compile_settings(override, name):
    with pytest.raises(ValueError, match=name):
        load_config("micro", overrides=override)


def test_valid_device_and_compile_settings():
    for value in (True, False, "inductor", "aot_eager", "eager"):
        assert load_config("micro", overrides={"compile": value}).compile == value
    for value in ("auto", "cpu", "cpu:0", "cuda", "cuda:1"):  # availability is checked when training starts
        assert load_config("micro", overrides={"device": value}).device == value
    assert _device(load_config("micro", overrides={"device": "cpu"})) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_fails_before_anything_is_built(tmp_path):
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match="device"):
            train(load_config("micro", overrides={"device": device}), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv,name", [
    (["--seqlen", "0"], "seqlen"), (["--seqlen", "-3"], "seqlen"), (["--heads", "0"], "heads"),
    (["--kv-heads", "0"], "kv-heads"), (["--head-dim", "0"], "head-dim"),
    (["--seqlen", "64", "--heads", "3", "--kv-heads", "2"], "heads"),
])
def test_compare_flags(argv, name):
    with pytest.raises(ValueError, match=name):
        main(["compare", *argv])


def test_command_line_reports_value_errors_in_one_line(monkeypatch, capsys, tmp_path):
    """From the command line (argv None) a bad setting exits with status 2 and one line, no traceback."""
    for args, name in ((["compare", "--seqlen", "0"], "seqlen"),
                       (["train", "--preset", "micro", "--out", str(tmp_path), "--set", "device=cpux"], "device"),
                       (["train", "--preset", "micro", "--out", str(tmp_path), "--set", "model.attention=x"],
                        "attention")):
        monkeypatch.setattr("sys.argv", ["nsa", *args])
        with pytest.raises(SystemExit) as exit_info:
            main()
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("ValueError: ") and name in err and err.count("\n") == 1 and "Traceback" not in err
