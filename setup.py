"""Build shim: all metadata lives in pyproject.toml; this file only adds the native extension.

csrc/ -> ``chatterbox_rt._C`` (TORCH_LIBRARY ops, see csrc/README.md). The build degrades:

- ``CHATTERBOX_RT_NO_NATIVE=1``, or torch not importable at build time: no extension;
- CUDA sources (csrc/cuda/*.cu) only with a CUDA build of torch, nvcc (CUDA_HOME) and no
  ``CHATTERBOX_RT_NO_CUDA=1``;
- a compile or link error prints one warning and the package installs without the extension
  (kernels/_native.py then reports it unavailable and the plain-torch paths run).

torch is imported here, so install with ``pip install --no-build-isolation`` once torch is in the
environment (scripts/setup_env.sh does).
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "chatterbox_rt._C"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _warn(msg: str) -> None:
    print(f"\nWARNING (chatterbox-rt): {msg}\n", file=sys.stderr, flush=True)


def _rel(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def native_extension():
    """(ext_modules, cmdclass) for chatterbox_rt._C, or ([], {}) when it is not to be built."""
    if _env_flag("CHATTERBOX_RT_NO_NATIVE"):
        print("chatterbox-rt: CHATTERBOX_RT_NO_NATIVE set, skipping the native extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as e:  # noqa: BLE001 - any import failure means: build without it
        _warn(f"torch is not importable at build time ({e}); installing without the native extension "
              "(install torch first, then pip install --no-build-isolation)")
        return [], {}

    sources = _rel("csrc/*.cpp") + _rel("csrc/cpu/*.cpp")
    # -fopenmp: at::parallel_for is header-inline over OpenMP in torch builds; without it the loops run on
    # one thread. The extension links libgomp.so.1, which resolves to the copy torch already loaded
    # (same soname; rpath to torch/lib below), so torch.set_num_threads governs our loops too.
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno"]  # torch adds its -std
    with_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and not _env_flag("CHATTERBOX_RT_NO_CUDA"))
    if with_cuda:
        sources += _rel("csrc/cuda/*.cu")
        ext_cls = cpp_extension.CUDAExtension
        extra = {"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]}
    else:
        ext_cls = cpp_extension.CppExtension
        extra = {"cxx": cxx_flags}
    print(f"chatterbox-rt: building {EXT_NAME} ({'CPU + CUDA' if with_cuda else 'CPU only'})", file=sys.stderr)
    # optional=True: setuptools neither fails the install nor copies a missing file when it does not build.
    # rpath to torch's libraries: `import chatterbox_rt._C` then works before `import torch` too.
    rpath = [f"-Wl,-rpath,{d}" for d in cpp_extension.library_paths()] if sys.platform.startswith("linux") else []
    ext = ext_cls(EXT_NAME, sources, extra_compile_args=extra, extra_link_args=rpath + ["-fopenmp"],
                  include_dirs=[os.path.join(HERE, "csrc")], optional=True)

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """BuildExtension whose failures (compiler missing, compile or link error) only warn."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as e:  # noqa: BLE001
                self._give_up(e)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001
                self._give_up(e)

        def _give_up(self, e):
            if getattr(self, "_warned", False):
                return
            self._warned = True
            _warn(f"building the native extension {EXT_NAME} failed ({type(e).__name__}: {e}); installing "
                  "without it. The plain-torch code paths still work. Set CHATTERBOX_RT_NO_NATIVE=1 to skip "
                  "the attempt, CHATTERBOX_RT_NO_CUDA=1 to build the CPU ops only.")

    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
