"""Fused CPU kernels for the "torch" backend (float32 math; the decode also reads bfloat16 / float16 caches),
compiled on first use (needs a C++ compiler).

`load()` returns the compiled module, or None when the kernels are disabled (`NSA_CPU_KERNELS=0`) or cannot be
built here: the torch backend then runs its pure-PyTorch path, which computes the same thing. The build goes to
torch's extension cache (TORCH_EXTENSIONS_DIR) and is reused while the source is unchanged; extra compiler flags
can be given in NSA_CPU_KERNELS_CFLAGS (e.g. "-DNSA_TILE_ROWS=128" to try other tile sizes).
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import threading
import warnings
from pathlib import Path

_SOURCE = Path(__file__).with_name("nsa_cpu.cpp")
_LOCK = threading.Lock()
_STATE: dict = {}
_EXTRA = os.environ.get("NSA_CPU_KERNELS_CFLAGS", "").split()


def _cpu_tag() -> str:
    """Short hash of this CPU's model and flags: the build uses -march=native, so a cache shared between machines
    (a network home directory) keeps one build per kind of CPU."""
    info = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            info += "".join(sorted({ln for ln in f if ln.startswith(("model name", "flags"))}))
    except OSError:
        info += platform.processor()
    return hashlib.sha1(info.encode()).hexdigest()[:10]


def _ensure_ninja():
    """torch.utils.cpp_extension runs `ninja` from PATH. Without a system ninja, put the PyPI wheel's (a dependency
    of this package) on PATH; an un-activated virtualenv does not have it there."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def enabled() -> bool:
    return os.environ.get("NSA_CPU_KERNELS", "1") != "0"


def load():
    """The compiled module or None (disabled, or the build failed: warns once with the reason)."""
    if not enabled():
        return None
    with _LOCK:
        if "module" not in _STATE:
            _STATE["module"] = None
            try:
                from torch.utils.cpp_extension import load as build
                _ensure_ninja()
                flags = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp-simd"] + _EXTRA
                _STATE["module"] = build(name=f"nsa_cpu_kernels_{_cpu_tag()}", sources=[str(_SOURCE)],
                                         extra_cflags=flags, verbose=False)
            except Exception as e:  # no compiler, no headers, ...: the pure-PyTorch path takes over
                warnings.warn(f"nsa: fused CPU kernels unavailable ({type(e).__name__}: {e}); "
                              "using the pure-PyTorch path", RuntimeWarning, stacklevel=2)
        return _STATE["module"]
