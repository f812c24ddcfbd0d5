"""Broken MD17 npz files: one-line errors naming the file and the defect (never numpy's traceback or
its hint to unpickle), and exit code 2 from ``equireann-train``. Crafted files next to a real rMD17 split."""
import re

import numpy as np
import pytest

import pyg_equireann.datamodules

from .conftest import DATA
from .test_pipeline import TINY, cli

GOOD = {k: (v if k == "nuclear_charges" else v[:12]) for k, v in np.load(DATA / "rmd17" / "rmd17_ethanol_train_01.npz").items()}


def _with(**arrays):
    return dict(GOOD, **arrays)


def _truncated(path):
    np.savez(path, **GOOD)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _corrupt_member(path):
    np.savez(path, **GOOD)
    data = bytearray(path.read_bytes())
    data[3000:3050] = bytes(50)  # inside the 'coords' member: the CRC check fails
    path.write_bytes(bytes(data))


Z_BAD = GOOD["nuclear_charges"].copy()
Z_BAD[3] = 0
Z_HUGE = GOOD["nuclear_charges"].copy()
Z_HUGE[5] = 119
FORCES_NAN = GOOD["forces"].copy()
FORCES_NAN[4, 2, 1] = np.nan

CASES = {
    "empty": (lambda p: p.write_bytes(b""), r"cannot read it as an npz archive \(0 bytes\): the file is empty"),
    "truncated": (_truncated, r"cannot read it as an npz archive \(\d+ bytes\): it is truncated or corrupt"),
    "random bytes": (lambda p: p.write_bytes(np.random.default_rng(0).bytes(3000)),
                     r"cannot read it as an npz archive \(3000 bytes\): it is truncated or corrupt"),
    "corrupt member": (_corrupt_member, r"key '\w+' cannot be read: the file is truncated or corrupt"),
    "npy array": (lambda p: np.save(open(p, "wb"), GOOD["coords"]), r"holds a single array \(\.npy format\), not an npz"),
    "object array": (lambda p: np.savez(p, **_with(coords=np.array(list(GOOD["coords"]), dtype=object))),
                     r"key 'coords' holds Python objects \(a pickled object array\), not numbers"),
    "atomic number 0": (lambda p: np.savez(p, **_with(nuclear_charges=Z_BAD)),
                        r"key 'nuclear_charges': atom 3 has atomic number 0; expected an integer 1\.\.118"),
    "atomic number 119": (lambda p: np.savez(p, **_with(nuclear_charges=Z_HUGE)), r"atom 5 has atomic number 119"),
    "fractional atomic number": (lambda p: np.savez(p, **_with(nuclear_charges=GOOD["nuclear_charges"] + 0.5)),
                                 r"atom 0 has atomic number 6\.5"),
    "text energies": (lambda p: np.savez(p, **_with(energies=np.array(["a"] * 12))), r"key 'energies' holds text"),
    "short energies": (lambda p: np.savez(p, **_with(energies=GOOD["energies"][:7])),
                       r"key 'energies' has 7 frames \(shape \(7,\)\) but 'coords' has 12"),
    "short forces": (lambda p: np.savez(p, **_with(forces=GOOD["forces"][:7])), r"key 'forces' has 7 frames"),
    "too few charges": (lambda p: np.savez(p, **_with(nuclear_charges=GOOD["nuclear_charges"][:5])),
                        r"key 'coords' has shape \(12, 9, 3\); expected \(frames, 5, 3\)"),
    "missing key": (lambda p: np.savez(p, **{k: v for k, v in GOOD.items() if k != "forces"}), r"missing keys \['forces'\]"),
    "nan forces": (lambda p: np.savez(p, **_with(forces=FORCES_NAN)),
                   r"frame 4: forces \('forces'\) of atom 2 contains a non-finite value"),
}


def _bad_root(tmp_path, case):
    folder = tmp_path / "rmd17"
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "rmd17_ethanol_test_01.npz", **GOOD)
    bad = folder / "rmd17_ethanol_train_01.npz"
    CASES[case][0](bad)
    return bad


@pytest.mark.parametrize("case", list(CASES))
def test_broken_npz_names_file_and_defect(tmp_path, case):
    bad = _bad_root(tmp_path, case)
    dm = pyg_equireann.datamodules.MD17DataModule(molecule="ethanol", root=tmp_path, num_train=5, num_val=2, download=False,
                                    progress=False, cache=True)
    with pytest.raises((ValueError, KeyError)) as err:
        dm.setup()
    message = err.value.args[0]
    assert message.startswith(f"{bad}: ") and "\n" not in message, message
    assert re.search(CASES[case][1], message), message
    assert "allow_pickle" not in message


def test_original_md17_broken_file(tmp_path):
    """The original-MD17 path counts frames before processing: the same error there."""
    (tmp_path / "md17").mkdir()
    bad = tmp_path / "md17" / "md17_ethanol.npz"
    bad.write_bytes(b"")
    dm = pyg_equireann.datamodules.MD17DataModule(molecule="ethanol", variant="original", root=tmp_path, num_train=5, num_val=2,
                                    num_test=5, download=False, progress=False)
    with pytest.raises(ValueError, match=rf"^{bad}: cannot read it as an npz archive \(0 bytes\): the file is empty$"):
        dm.setup()


def test_broken_npz_exit_code(tmp_path):
    """``equireann-train`` on an npz with atomic number 0: exit code 2 and one error line, no traceback."""
    bad = _bad_root(tmp_path / "data", "atomic number 0")
    r = cli("equireann-train", *TINY, "data.molecule=ethanol", f"data.root={tmp_path / 'data'}",
            f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=180)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {bad}: key 'nuclear_charges': atom 3 has atomic number 0; expected an integer 1..118"], r.stderr
    assert "Traceback" not in r.stderr
