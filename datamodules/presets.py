"""Ready-made data modules for the datasets shipped in ``data/`` (usable as Hydra ``_target_``)."""
from __future__ import annotations

import os
from pathlib import Path

from pyg_equireann.datamodules.base import default_data_root
from pyg_equireann.datamodules.xyz import XYZDataModule

#: GFN2-xTB isolated-atom energies of the cumulene data (eV), from data/cumulene/README.md.
CUMULENE_E0 = {1: -10.70721, 6: -48.79808}


def _folder(root: str | os.PathLike | None, name: str, marker: str) -> Path:
    """``root`` (default: :func:`~pyg_equireann.datamodules.base.default_data_root`) itself if it holds
    ``marker``, else ``root/name``."""
    root = Path(default_data_root() if root is None else root).expanduser()
    return root if (root / marker).is_file() else root / name


def acac_datamodule(root: str | os.PathLike | None = None, **kwargs) -> XYZDataModule:
    """Acetylacetone (BOTNet): train on ``train_300K.xyz`` (5 % random validation), test sets
    ``MD_300K``, ``MD_600K``, ``dihedral``; E0 from ``isolated_atoms.xyz``.

    ``root``: folder with the acac files, or its parent (default: the data folder,
    :func:`~pyg_equireann.datamodules.base.default_data_root`).
    ``kwargs`` override any :class:`XYZDataModule` argument.
    """
    d = _folder(root, "acac", "train_300K.xyz")
    args = dict(
        train_file=d / "train_300K.xyz",
        test_files={
            "MD_300K": d / "test_MD_300K.xyz",
            "MD_600K": d / "test_MD_600K.xyz",
            "dihedral": d / "test_dihedral.xyz",
        },
        atomic_energies=d / "isolated_atoms.xyz",
    )
    args.update(kwargs)
    return XYZDataModule(**args)


def cumulene_datamodule(root: str | os.PathLike | None = None, **kwargs) -> XYZDataModule:
    """Cumulene twist benchmark (GFN2-xTB): train/val files, test sets ``test`` and ``scan``
    (twist scans), and where the files are there ``rigid_xtb`` (rigid twists of n = 3–16 with their own
    GFN2-xTB labels) and ``long`` (MD frames of n = 9–16, longer than any training chain; both from
    ``data/cumulene/generate.py``); E0 = GFN2-xTB isolated atoms (:data:`CUMULENE_E0`).

    ``root``: folder with the cumulene files, or its parent (default: the data folder,
    :func:`~pyg_equireann.datamodules.base.default_data_root`).
    """
    d = _folder(root, "cumulene", "cumulene_train.xyz")
    args = dict(
        train_file=d / "cumulene_train.xyz",
        val_file=d / "cumulene_val.xyz",
        test_files={"test": d / "cumulene_test.xyz", "scan": d / "cumulene_scan.xyz"},
        atomic_energies=dict(CUMULENE_E0),
    )
    for name, file in (("rigid_xtb", "cumulene_rigid.xyz"), ("long", "cumulene_long_test.xyz")):
        if (d / file).is_file():
            args["test_files"][name] = d / file
    args.update(kwargs)
    return XYZDataModule(**args)
