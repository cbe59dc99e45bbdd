"""Compile the CPU kernels' C++ once per (source, compiler, jaxlib, CPU) into a cache folder and load
them as XLA FFI targets. No compiler, or a failed build, means no kernel: callers take the reference."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings

import jax

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ("panel_gemm.cc", "bgmv.cc", "sgmv.cc", "paged_attention.cc")  # one library; the headers are shared
HEADERS = ("parallel.h", "vec.h")
TARGETS = {  # XLA FFI name -> C symbol
    "jlora_panel_gemm": "PanelGemm",
    "jlora_bgmv": "Bgmv",
    "jlora_sgmv": "Sgmv",
    "jlora_paged_attention": "PagedAttention",
}


def _cpu_identity() -> str:
    """The host CPU's model and feature flags (the library is built for this CPU: -march=native)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def cache_dir() -> str:
    return os.environ.get("JLORA_KERNEL_CACHE", os.path.expanduser("~/.cache/jlora/cpu_kernels"))


def compile_library(compiler: str | None = None, folder: str | None = None) -> str:
    """The shared library's path, compiled now unless the cache has it. Raises RuntimeError on failure."""
    cxx = compiler or os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise RuntimeError("no C++ compiler (g++, c++ or $CXX) on PATH")
    include = jax.ffi.include_dir()
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{include}"]
    texts = []
    for name in SOURCES + HEADERS:
        with open(os.path.join(HERE, name), "rb") as f:
            texts.append(f.read())
    key = hashlib.sha256(
        b"\0".join([*texts, cxx.encode(), " ".join(flags).encode(), jax.__version__.encode()])
        + _cpu_identity().encode()
    ).hexdigest()[:20]
    folder = folder or cache_dir()
    path = os.path.join(folder, f"jlora_cpu-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        sources = [os.path.join(HERE, name) for name in SOURCES]
        done = subprocess.run([cxx, *flags, *sources, "-o", tmp], capture_output=True, text=True)
    except OSError as err:
        os.unlink(tmp)
        raise RuntimeError(f"cannot run the C++ compiler {cxx}: {err}") from err
    if done.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"{cxx} failed on {', '.join(SOURCES)}:\n{done.stderr[-2000:]}")
    os.replace(tmp, path)  # atomic: a concurrent build of the same key leaves one whole library
    return path


@functools.cache
def kernel_available() -> bool:
    """True once the library is built, loaded and its targets registered with XLA for the CPU; False
    (with one warning) where that fails, or where the default backend is not the CPU."""
    if jax.default_backend() != "cpu":
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(compile_library())
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (RuntimeError, OSError, AttributeError) as err:
        warnings.warn(f"CPU kernels unavailable, using the XLA references: {err}", stacklevel=2)
        return False
    return True


def require_kernels() -> None:
    """Raise ValueError unless the CPU kernels are built and registered (the wrappers call this, so a
    direct call fails clearly instead of with XLA's missing-handler error)."""
    if not kernel_available():
        raise ValueError(
            "the C++ CPU kernels are not available here (see pallas_kernels.cpu.build's warning)"
        )
