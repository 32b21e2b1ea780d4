"""The benchmark scripts are run rarely (GPU sessions, long CPU runs): check here that they still parse, that their
shell wrappers are valid bash, and that the GPU suite's report renders every section."""
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_benchmark_script_compiles(script):
    py_compile.compile(str(BENCH / script), doraise=True)


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.sh")))
def test_benchmark_wrapper_is_valid_bash(script):
    subprocess.run(["bash", "-n", str(BENCH / script)], check=True)


def test_gpu_suite_report_renders_every_section(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_suite

    t = dict(fwd=1.0, bwd=2.0, fwd_bwd=3.0)
    row = lambda T, hkv, ms: dict(T=T, HQ=16, HKV=hkv, nsa=dict(t, fwd_bwd=ms), sdpa=t)  # noqa: E731
    res = dict(env=dict(card="card", torch="", triton="", cuda="", commit="", date_utc=""), reps=3,
               correctness=dict(case="c", o_cosine=1.0, o_max_abs_err=0.0, selection_rows_identical=1.0,
                                grad_cosine=dict(q=1.0), **{"pass": True}),
               packing=[dict(T=64, G=1, padded=t, packed=t, packed_speedup_fwd_bwd=1.0)],
               dkv_tiles=[dict(T=64, tiles="chosen", blocks=[32, 32], **t)],
               paper=[dict(row(64, 4, 3.0), HQ=64, breakdown_fwd=dict(cmp=1, topn=1, slc=1, win=1, combine=1),
                           breakdown_fwd_bwd=dict(cmp=1, slc=1, win=1))],
               g_sweep=[row(64, 1, 2.0), row(64, 16, 4.0)], notes=["n"],
               autotune=dict(_fwd_kernel=dict(picks=[dict(key=["0"], config="w4s3")], last_timings_ms={})))
    md = gpu_suite.markdown(res)
    assert "- _fwd_kernel: w4s3 (1 keys)" in md
    for title in ("Correctness", "packed vs padded", "Paper config (", "G sweep (", "relative to G = 16",
                  "forward breakdown", "each branch op alone", "Notes", "dK/dV tiles"):
        assert title in md, title
    assert "| 64 | 1 | 4.00 | 0.50 |" in md  # G = 1 (HKV = 16) at 4 ms vs G = 16 at 2 ms
    out = subprocess.run([sys.executable, str(BENCH / "gpu_suite.py"), "--help"], capture_output=True, text=True,
                         env={"PYTHONPATH": str(BENCH.parent / "src"), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and "--g-hkv" in out.stdout, out.stderr


def test_gpu_suite_records_autotune_picks(monkeypatch):
    """autotune_choices reads each autotuned kernel's cache (key -> config) and its last timings."""
    monkeypatch.syspath_prepend(str(BENCH))
    pytest.importorskip("triton")
    import triton
    from types import SimpleNamespace

    import gpu_suite
    from nsa.ops.triton import flash

    c = triton.Config({"SPLIT": 1}, num_warps=8, num_stages=3)
    monkeypatch.setattr(flash, "_fwd_kernel", SimpleNamespace(cache={(0, "torch.bfloat16"): c},
                                                              configs_timings={c: [0.5, 0.4, 0.6]}))
    got = gpu_suite.autotune_choices()["_fwd_kernel"]
    assert got == dict(picks=[dict(key=["0", "torch.bfloat16"], config="w8s3 SPLIT=1")],
                       last_timings_ms={"w8s3 SPLIT=1": [0.5, 0.4, 0.6]})


def test_gpu_profile_report_and_kernel_table(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_profile

    case = dict(case="forward T=64", wall_ms=2.0, gpu_busy_ms=1.5, idle_share=0.25, launches=7.0,
                kernels=[dict(kernel="_slc_fwd_kernel", ms=1.0, launches=1.0)],
                timeline=[dict(kernel="_fwd_kernel", start_ms=0.0, ms=0.5, gap_ms=0.0),
                          dict(kernel="_slc_fwd_kernel", start_ms=0.7, ms=1.0, gap_ms=0.2)])
    md = gpu_profile.markdown(dict(device="card", setup="setup", cases=[case]))
    assert "## forward T=64" in md and "idle 25%" in md and "| `_slc_fwd_kernel` | 1.000 | 1.0 |" in md
    assert "| 1 | `_slc_fwd_kernel` | 0.700 | 1.000 | 0.200 |" in md

    class Evt:  # the fields kernel_table reads from a profiler event
        def __init__(self, name, us):
            self.name, self.self_cpu_time_total = name, us

    class Prof:
        def events(self):
            return [Evt("a", 1000.0), Evt("b", 3000.0), Evt("a", 1000.0)]

    rows = gpu_profile.kernel_table(Prof(), iters=2, device="cpu")
    assert [(r["kernel"], r["ms"], r["launches"]) for r in rows] == [("b", 1.5, 0.5), ("a", 1.0, 1.0)]


def test_gpu_bounds_counts_match_brute_force(monkeypatch):
    """The per-branch key counts behind the bounds, against masks built position by position."""
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_bounds
    import nsa

    cfg = nsa.NSAConfig(cmp_block_size=8, cmp_stride=4, slc_block_size=16, num_selected=3, window_size=20)
    T = 150
    tc = cfg.num_compressed(T)
    cmp = sum(int(i * 4 + 8 - 1 <= t) for t in range(T) for i in range(tc))
    # the own block (forced local) up to t, plus n - 1 earlier blocks (all full, so which ones does not matter)
    slc = 0
    for t in range(T):
        blocks = {t // 16} | set(range(t // 16)[:2])
        slc += sum(1 for s in range(t + 1) if s // 16 in blocks)
    win = sum(1 for t in range(T) for s in range(T) if t - 20 < s <= t)
    c = gpu_bounds.counts(T, cfg)
    assert (c["cmp"], c["slc"], c["win"], c["dense"]) == (cmp, slc, win, T * (T + 1) // 2)
    b = gpu_bounds.bounds(T, 16, 4, 32, 16, cfg, tflops=1.0, tbps=1.0)
    assert b["bwd"]["cmp"] == 2.5 * b["fwd"]["cmp"] and b["fwd_total"] == sum(b["fwd"].values())


def test_gpu_profile_timeline_orders_kernels_and_measures_gaps(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_profile
    from torch.autograd import DeviceType

    class Span:
        def __init__(self, start, end):
            self.start, self.end = start, end

    class Evt:
        def __init__(self, name, start, end, device=DeviceType.CUDA):
            self.name, self.time_range, self.device_type = name, Span(start, end), device

    class Prof:  # out of order, plus a CPU op that must be ignored
        def events(self):
            return [Evt("b", 700.0, 1700.0), Evt("cpu op", 0.0, 5000.0, DeviceType.CPU), Evt("a", 100.0, 600.0)]

    rows = gpu_profile.timeline(Prof())
    assert [(r["kernel"], r["start_ms"], r["ms"], round(r["gap_ms"], 6)) for r in rows] == [
        ("a", 0.0, 0.5, 0.0), ("b", 0.6, 1.0, 0.1)]


def test_gpu_decode_smoke_run(tmp_path):
    """gpu_decode.py --smoke: the kernel rows and the whole-layer step rows run end to end in the interpreter."""
    pytest.importorskip("triton")
    import json
    import os

    out = tmp_path / "decode.json"
    env = dict(os.environ, PYTHONPATH=str(BENCH.parent / "src"))
    run = subprocess.run([sys.executable, str(BENCH / "gpu_decode.py"), "--smoke", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [r["batch"] for r in res["layer_rows"]] == [1, 2]
    assert all(r["steps_appended"] >= 2 and r["nsa_layer_ms"] > 0 for r in res["layer_rows"])
    assert all(r["max_abs_diff_vs_torch"] < 1e-4 for r in res["rows"] + res["prefill_rows"])
    assert [(r["chunk"], r["batch"]) for r in res["prefill_rows"]] == [(9, 1)]


def test_gpu_generate_smoke_run(tmp_path):
    """gpu_generate.py --smoke: NSA and full-attention generation timed end to end on CPU (no graph there)."""
    import json
    import os

    out = tmp_path / "generate.json"
    env = dict(os.environ, PYTHONPATH=str(BENCH.parent / "src"))
    run = subprocess.run([sys.executable, str(BENCH / "gpu_generate.py"), "--smoke", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]  # timings of 3 tokens on a busy CPU: present, not compared
    assert isinstance(row["nsa_ms_per_token"], float) and isinstance(row["full_ms_per_token"], float)
    assert row["new_tokens"] == 3 and "nsa_graph_ms_per_token" not in row


@pytest.mark.parametrize("script,args", [
    ("cpu_suite.py", ["--T", "512", "--mem-T", "--decode-T", "1024", "--repeat", "1"]),
    ("cpu_decode.py", ["--contexts", "1024", "--batches", "1,2", "--repeats", "1"]),
    ("cpu_short.py", ["--batches", "1", "--repeat", "1", "--steps", "1"]),
])
def test_cpu_benchmark_smoke_run(script, args, tmp_path):
    """The CPU benchmarks run end to end at tiny sizes and write their JSON (they run rarely, so breakage would go
    unnoticed); no timing is asserted."""
    import json
    import os

    out = tmp_path / ("res.json" if script == "cpu_decode.py" else "res")
    env = dict(os.environ, PYTHONPATH=str(BENCH.parent / "src"), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(BENCH / script), *args, "--out", str(out)], capture_output=True,
                         text=True, env=env, timeout=600, cwd=BENCH.parent)
    assert run.returncode == 0, run.stderr[-3000:]
    path = out if script == "cpu_decode.py" else out.with_suffix(".json")
    res = json.loads(path.read_text())
    assert res, script
