"""What torch.compile needs from the machine, checked before the model loads: a compiler, Python.h, and kernel
caches it may load code from.

Inductor builds CPU kernels as C++ with `$CXX` or `g++` (torch/_inductor/config.py `cpp.cxx`, tried with
`--version` by cpp_builder.cpp_compiler_search); Triton builds each GPU kernel's launcher as C with `$CC`, else
`gcc`, else `clang` (triton/runtime/build.py). Both compile against Python.h from sysconfig's include path, and
both load the result (.so) from their cache directory, which must not be on a `noexec` mount: Docker mounts a
`--tmpfs` noexec unless told `--tmpfs /tmp:exec`. Without these the run dies at its first compiled step with a
traceback (InvalidCxxCompiler, or "failed to map segment from shared object"); here it is one line per problem.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Toolchain:
    """What this machine offers torch.compile, found once (`find`) and judged for a device (`problems`)."""

    cxx: str | None  # the C++ compiler inductor will use for CPU kernels, if it runs
    cxx_wanted: str  # what inductor asks for: $CXX or g++
    cc: str | None  # the C compiler Triton will use for GPU launchers, if it is there
    cc_wanted: str  # what Triton looks for: $CC, else gcc or clang on PATH
    python_h: Path  # where Python.h must be
    inductor_cache: Path
    triton_cache: Path

    def problems(self, cuda: bool, asked: str) -> list[str]:
        """One line per missing piece for compiling on a GPU (`cuda`) or the CPU; `asked` names the setting
        that turned compile on, e.g. '--compile on'."""
        found = []
        if cuda and self.cc is None:
            found.append(f"{asked} needs a C compiler for Triton's kernel launchers and none was found (looked for "
                         f"{self.cc_wanted}); install gcc (apt-get install gcc), set CC to a working compiler, or use "
                         "--compile off.")
        if not cuda and self.cxx is None:
            found.append(f"{asked} needs a C++ compiler for inductor's CPU kernels and {self.cxx_wanted!r} does not "
                         "run; install g++ (apt-get install g++), set CXX to a working compiler, or use "
                         "--compile off.")
        if not self.python_h.is_file():
            found.append(f"{asked} compiles against {self.python_h}, which is missing; install the Python headers "
                         "(apt-get install python3-dev) or use --compile off.")
        caches = {self.inductor_cache: "TORCHINDUCTOR_CACHE_DIR"}
        if cuda:
            caches[self.triton_cache] = "TRITON_CACHE_DIR"
        for cache, variable in caches.items():
            if noexec(cache):
                found.append(f"{asked} loads the kernels it builds from {cache}, which is on a noexec mount; mount "
                             f"it with exec (docker run --tmpfs /tmp:exec), point {variable} at a directory that "
                             "allows it, or use --compile off.")
        return found

    def describe(self, cuda: bool) -> str:
        """The compiler, the headers and the kernel cache a compiled run will use, for `doctor`."""
        compiler = f"C compiler {self.cc}" if cuda else f"C++ compiler {self.cxx}"
        cache = self.triton_cache if cuda else self.inductor_cache
        return f"{compiler}, {self.python_h}, kernels built in {cache}"


def find(environ: Mapping[str, str]) -> Toolchain:
    """Look for what torch.compile would use, as inductor and Triton look for it; runs `$CXX --version` once."""
    wanted = environ.get("CXX") or "g++"
    path = environ.get("PATH", os.defpath)
    # Triton takes $CC as it is, with no fallback, when it is set.
    cc = shutil.which(environ["CC"], path=path) if environ.get("CC") else \
        shutil.which("gcc", path=path) or shutil.which("clang", path=path)
    inductor_cache = Path(environ.get("TORCHINDUCTOR_CACHE_DIR") or default_inductor_cache())
    return Toolchain(cxx=wanted if runs(wanted, path) else None, cxx_wanted=wanted, cc=cc,
                     cc_wanted=f"CC={environ['CC']!r}" if environ.get("CC") else "gcc or clang on PATH; CC is unset",
                     python_h=Path(sysconfig.get_path("include")) / "Python.h", inductor_cache=inductor_cache,
                     triton_cache=Path(environ.get("TRITON_CACHE_DIR") or inductor_cache / "triton"))


def default_inductor_cache() -> str:
    """Inductor's own default, /tmp/torchinductor_<user> (importing it costs seconds: only when needed)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return default_cache_dir()


def runs(compiler: str, path: str) -> bool:
    """Whether `compiler --version` succeeds, as inductor tries it (a name is looked up on `path`)."""
    executable = shutil.which(compiler, path=path)
    if executable is None:
        return False
    try:
        return subprocess.run([executable, "--version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def noexec(directory: Path) -> bool:
    """Whether `directory` (or, before it exists, the nearest folder above it) is on a noexec mount."""
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_NOEXEC)
    except OSError:
        return False
