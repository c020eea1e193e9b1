"""The NVIDIA driver against what torch's CUDA needs, checked before any time is spent when a GPU is expected.

A GPU is expected when NVIDIA_VISIBLE_DEVICES names devices (the CUDA image sets `all`; Kubernetes' device plugin
sets the granted GPUs' ids) or when --precision bf16/fp16 asks for one. Then a missing driver, a driver older than
torch's CUDA needs, or CUDA that will not initialise is exit 11 (DRIVER) with one line: the driver found, the
driver needed, and the two fixes. Never a silent CPU run.

The minimums are NVIDIA's "CUDA Toolkit and Corresponding Driver Versions" (CUDA Toolkit release notes, Linux
x86_64, each version's GA release). NVIDIA's minor-version compatibility lets some CUDA 12.x programs run on an
older 12.x driver (R535 and up), but not code compiled to PTX at run time; this check holds to the toolkit's own
minimum, as the container toolkit does with the image's NVIDIA_REQUIRE_CUDA=cuda>=X.Y.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import warnings
from collections.abc import Mapping
from pathlib import Path

from entrypoint.errors import DriverError

MINIMUM_DRIVER = {
    "13.0": "580.65.06",
    "12.9": "575.51.03",
    "12.8": "570.26",
    "12.6": "560.28.03",
    "12.5": "555.42.02",
    "12.4": "550.54.14",
    "12.3": "545.23.06",
    "12.2": "535.54.03",
    "12.1": "530.30.02",
    "12.0": "525.60.13",
    "11.8": "520.61.05",
}
# The image's CUDA_FLAVOUR build argument -> the CUDA version of its torch wheels and its base image, newest first.
FLAVOURS = {"cu130": "13.0", "cu128": "12.8", "cu126": "12.6"}
NO_DEVICES = {"", "void", "none"}  # NVIDIA_VISIBLE_DEVICES values that mean "no GPU in this container"
PROC_VERSION = Path("/proc/driver/nvidia/version")


def version_tuple(version: str) -> tuple[int, ...]:
    """'570.172.08' -> (570, 172, 8); compares driver versions by number, not as text."""
    return tuple(int(part) for part in re.findall(r"\d+", version))


def required_driver(cuda: str) -> str | None:
    """The oldest Linux driver NVIDIA supports for CUDA `cuda` ('12.8'). A newer minor release of a known major
    than the table holds gets the newest entry of that major (a lower bound); an unknown major gets None."""
    if cuda in MINIMUM_DRIVER:
        return MINIMUM_DRIVER[cuda]
    wanted = version_tuple(cuda)[:2]
    known = [v for v in MINIMUM_DRIVER if version_tuple(v)[0] == wanted[0] and version_tuple(v) < wanted]
    return MINIMUM_DRIVER[max(known, key=version_tuple)] if known else None


def flavour_for(driver: str) -> str | None:
    """The newest image flavour whose CUDA this driver supports, or None when even the oldest needs more."""
    for flavour, cuda in FLAVOURS.items():
        if version_tuple(driver) >= version_tuple(MINIMUM_DRIVER[cuda]):
            return flavour
    return None


def parse_proc_version(text: str) -> str | None:
    """The driver version from /proc/driver/nvidia/version ('... Kernel Module  535.230.02  Thu ...', or
    '... Open Kernel Module for x86_64  580.65.06  Release Build ...')."""
    match = re.search(r"Kernel Module.*?\s(\d+\.\d+(?:\.\d+)?)\s", text)
    return match.group(1) if match else None


def driver_version() -> str | None:
    """The loaded NVIDIA kernel driver's version: from /proc (no process needed), else nvidia-smi; None if none."""
    try:
        found = parse_proc_version(PROC_VERSION.read_text())
        if found:
            return found
    except OSError:
        pass
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        done = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.split()
    return lines[0] if done.returncode == 0 and lines else None


def gpu_expected(precision: str, environ: Mapping[str, str]) -> str | None:
    """Why this run expects a GPU, or None when it does not."""
    devices = environ.get("NVIDIA_VISIBLE_DEVICES")
    if devices is not None and devices.strip().lower() not in NO_DEVICES:
        return f"NVIDIA_VISIBLE_DEVICES={devices}"
    if precision in ("bf16", "fp16"):
        return f"--precision {precision}"
    return None


def driver_problem(found: str | None, cuda: str | None, why: str, torch_version: str = "torch") -> str | None:
    """The one line that stops a run expecting a GPU (`why`) with driver `found` and torch built for CUDA `cuda`,
    or None when the driver is new enough. Pure, so every combination is testable without a GPU."""
    cpu_fix = "or set NVIDIA_VISIBLE_DEVICES=void and --precision auto to train on the CPU"
    if cuda is None:
        return (f"a GPU is expected ({why}) but {torch_version} is a CPU-only build; use the CUDA image "
                f"(make image), {cpu_fix}.")
    needed = required_driver(cuda)
    if found is None:
        return (f"a GPU is expected ({why}) but no NVIDIA driver is loaded (no {PROC_VERSION}, no nvidia-smi); "
                f"{torch_version} uses CUDA {cuda}, which needs driver {needed or 'of its release'} or newer: run "
                f"with --gpus all (docker) or a GPU resource request (Kubernetes) on a node with that driver, "
                f"{cpu_fix}.")
    if needed is None or version_tuple(found) >= version_tuple(needed):
        return None
    flavour = flavour_for(found)
    older = (f"or build the image for this driver: make image CUDA_FLAVOUR={flavour} (CUDA {FLAVOURS[flavour]}, "
             f"needs {MINIMUM_DRIVER[FLAVOURS[flavour]]})" if flavour else
             f"(no image flavour runs on it: the oldest, make image CUDA_FLAVOUR={list(FLAVOURS)[-1]}, needs "
             f"{MINIMUM_DRIVER[FLAVOURS[list(FLAVOURS)[-1]]]})")
    return (f"NVIDIA driver {found} is too old for {torch_version}'s CUDA {cuda}, which needs driver {needed} or "
            f"newer (a GPU is expected: {why}); upgrade the driver to {needed} or newer, {older}.")


def cuda_unusable(why: str | None, torch_version: str, cuda: str | None, found: str | None, reason: str) -> str:
    """The line for a driver that looks new enough while CUDA still fails to initialise."""
    expected = f"a GPU is expected ({why})" if why else "an NVIDIA driver is loaded, so a GPU was meant to be used"
    return (f"{expected} but CUDA does not initialise ({reason}; driver {found or 'not found'}, {torch_version} "
            f"built for CUDA {cuda}); check the GPU with nvidia-smi and the container's --gpus/resource request, "
            "or set NVIDIA_VISIBLE_DEVICES=void and --precision auto to train on the CPU.")


def check(precision: str, environ: Mapping[str, str]) -> None:
    """Raise DriverError when a GPU is expected (or a driver is present) and CUDA cannot be used for training.

    Without a driver and without NVIDIA_VISIBLE_DEVICES this returns quietly (a CPU run; --precision bf16/fp16
    there stays the caller's usage error). With a driver loaded but CUDA failing, even `--precision auto` stops:
    a CPU fallback there would quietly train at a hundredth of the speed.
    """
    import torch

    devices = gpu_expected("auto", environ)
    why = devices or gpu_expected(precision, environ)
    found = driver_version()
    if found is None and devices is None:
        return  # nothing promised a GPU here: a CPU run, or --precision bf16/fp16 refused as a usage error
    if torch.version.cuda is None and why is None:
        return  # a CPU build of torch on a host that has a driver: the CPU run it was installed for
    label = f"torch {torch.__version__}"
    if found is None and torch.version.cuda is not None and torch.cuda.is_available():
        return  # CUDA works though its driver's version is hidden (no /proc entry, no nvidia-smi): nothing to fix
    if line := driver_problem(found, torch.version.cuda, why or f"driver {found} is loaded", label):
        raise DriverError(line)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if not available and torch.version.cuda is not None:
        reason = next((str(w.message).splitlines()[0] for w in caught), "torch.cuda.is_available() is False")
        raise DriverError(cuda_unusable(why, label, torch.version.cuda, found, reason[:160]))
