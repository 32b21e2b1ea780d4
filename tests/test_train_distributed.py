"""2 CPU processes (torchrun, gloo) with DDP and with FSDP2 match a single-process run with the same global batch."""
import json
import subprocess
import sys
import textwrap

import pytest

from nsa.train import load_config, read_metrics, train

SCRIPT = textwrap.dedent("""
    import sys
    import torch.distributed as dist
    from nsa.train import load_config, train
    cfg = load_config("micro", overrides={"parallel": sys.argv[1], "steps": 3, "threads": 1})
    train(cfg, sys.argv[2], progress=False)
    dist.destroy_process_group()
""")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_loss_matches_single_process(tmp_path, mode):
    single = train(load_config("micro", overrides={"steps": 3}), tmp_path / "single", progress=False)
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    out = tmp_path / mode
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), mode, str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = [m["loss"] for m in read_metrics(tmp_path / "single")]
    got = [m["loss"] for m in read_metrics(out)]
    assert len(got) == len(ref) == 3
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert json.loads((out / "config.json").read_text())["parallel"] == mode
    assert single["world"] == 1 and (out / "ckpt_000003.safetensors").exists()
