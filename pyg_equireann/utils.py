"""Small helpers shared by tests, benchmarks and examples."""
import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Union

import numpy as np
import torch
from torch import nn


def perturb_parameters(model: nn.Module, seed: int = 0, scale: float = 1.0) -> nn.Module:
    """Add seeded Gaussian noise to every parameter (std scale/√fan-in for matrices, 0.1·scale for
    vectors), so that zero-initialised output layers become non-zero. Physics tests need this:
    zero last layers make outputs constant and hide bugs. Returns the model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.add_(scale * noise / p.shape[-1] ** 0.5 if p.dim() >= 2 else 0.1 * scale * noise)
    return model


#: The floating-point dtypes of models and data, by name.
DTYPES = {"float32": torch.float32, "float64": torch.float64}
_DTYPE_ALIASES = {"float": "float32", "double": "float64"}


@contextlib.contextmanager
def default_dtype(dtype: Optional[torch.dtype]) -> Iterator[None]:
    """``torch.set_default_dtype(dtype)`` inside the block (None: unchanged), restored afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or previous)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def resolve_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """``torch.float32`` or ``torch.float64`` from a dtype or its name (``"float32"``, ``"torch.float64"``,
    ``"float"``, ``"double"``); ValueError for anything else."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        return dtype
    key = str(dtype).replace("torch.", "")
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """``"float32"`` for ``torch.float32``."""
    return str(dtype).replace("torch.", "")


def plain(value: Any) -> Any:
    """``value`` with OmegaConf containers (also nested) turned into dicts and lists, paths into strings
    and NumPy values into Python ones, so that a checkpoint holding it (hyperparameters of a module or a
    data module) loads with ``torch.load(weights_only=True)``, which refuses OmegaConf and pathlib objects."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        return plain(OmegaConf.to_container(value, resolve=True))  # may hold pathlib.Path values
    if isinstance(value, Mapping):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    return value


#: Distributions whose versions :func:`environment_info` records.
PACKAGES = ("pyg_equireann", "torch", "torch_geometric", "lightning", "hydra-core", "omegaconf", "ase", "numpy",
            "vesin", "scipy", "torch-cluster", "torch-scatter")


def source_checkout() -> Optional[Path]:
    """The repository folder when pyg_equireann runs from a source checkout (editable install: the package
    folder next to ``pyproject.toml`` and ``datamodules/``), else None (an installed wheel)."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "datamodules").is_dir() else None


def git_state(folder) -> Optional[Dict[str, object]]:
    """``{"commit", "dirty", "root"}`` of the git work tree whose top level is ``folder``; None without
    git, outside a repository, or when ``folder`` is inside some other repository (e.g. an installed
    copy in a virtual environment that lives in the user's project)."""
    import subprocess

    def git(*args):
        r = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None

    try:
        root = git("rev-parse", "--show-toplevel")
        if root is None or Path(root).resolve() != Path(folder).resolve():
            return None
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    if commit is None:
        return None
    return {"commit": commit, "dirty": bool(status), "root": root}


def environment_info() -> Dict[str, object]:
    """What a run needs to be reproduced: package versions, Python, platform, torch settings and the
    git commit of the pyg_equireann source (when it is a git checkout)."""
    import platform
    import sys
    from importlib import metadata

    checkout = source_checkout()
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "hostname": platform.node(),
        "packages": versions,
        "git": None if checkout is None else git_state(checkout),
        "torch": {
            "num_threads": torch.get_num_threads(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "default_dtype": str(torch.get_default_dtype()),
            "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(),
        },
        "command": list(sys.argv),
        "cwd": str(Path.cwd()),
    }


#: Operators that make the host wait for the device: reading a value (``.item()``, ``bool()``, ``int()``) and
#: operators whose output shape depends on the data.
HOST_SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::unique", "aten::_unique2",
                 "aten::unique_consecutive", "aten::masked_select", "aten::bincount", "aten::repeat_interleave")


def count_host_syncs(fn: Callable[[], Any], device: Optional[torch.device] = None) -> Dict[str, int]:
    """Run ``fn()`` under :mod:`torch.profiler` and count the operators in :data:`HOST_SYNC_OPS`
    (``aten::item`` calls ``aten::_local_scalar_dense``, counted once): ``{op: count}`` of those that ran.
    Each is a host synchronisation on a GPU. On a CPU (``device`` cpu, the default) the reads of the fused
    optimisers' step counters inside their kernel are left out: those counters live on the parameters'
    device, so on a GPU the kernel reads them there."""
    from torch.profiler import ProfilerActivity, profile

    on_cpu = device is None or torch.device(device).type == "cpu"
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts: Dict[str, int] = {}
    for event in prof.events():
        if event.name not in HOST_SYNC_OPS:
            continue
        parent = event.cpu_parent
        while on_cpu and parent is not None and not parent.name.startswith(("aten::_fused_adam", "aten::_fused_sgd")):
            parent = parent.cpu_parent
        if on_cpu and parent is not None:
            continue
        counts[event.name] = counts.get(event.name, 0) + 1
    return counts
