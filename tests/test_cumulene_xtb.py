"""The cumulene generator (GFN2-xTB through tblite, the `xtb` extra): geometry, twist restraint, and that it
reproduces the shipped data."""
from pathlib import Path

import ase.io
import numpy as np
import pytest

from pyg_equireann.experiments.cumulene_xtb import (TwistRestraint, build_chain, end_twist, md_frames, random_rotation,
                                                    rigid_scan_frames, signed_twist, xtb_calculator)

DATA = Path(__file__).resolve().parents[1] / "data" / "cumulene"


def test_build_chain_and_twist():
    for n, twist in [(3, 0.0), (6, 30.0), (9, 90.0), (16, 72.0)]:
        atoms = build_chain(n, twist)
        assert atoms.get_chemical_formula(mode="hill") == f"C{n}H4"
        assert end_twist(atoms.positions) == pytest.approx(twist, abs=1e-9)
        assert np.degrees(abs(signed_twist(atoms.positions)[0])) == pytest.approx(twist, abs=1e-9)
    # folded to 0..90: the H–H line has no direction
    assert end_twist(build_chain(5, 150.0).positions) == pytest.approx(30.0)
    with pytest.raises(ValueError, match="n >= 2"):
        build_chain(1)


def test_signed_twist_gradient():
    rng = np.random.default_rng(0)
    pos = build_chain(7, 40.0).positions + rng.normal(scale=0.1, size=(11, 3))
    _, grad = signed_twist(pos)
    numeric = np.zeros_like(pos)
    for i in range(len(pos)):
        for d in range(3):
            step = np.zeros_like(pos)
            step[i, d] = 1e-6
            numeric[i, d] = (signed_twist(pos + step)[0] - signed_twist(pos - step)[0]) / 2e-6
    assert np.abs(grad - numeric).max() < 1e-7
    rot = random_rotation(rng)
    assert np.allclose(rot @ rot.T, np.eye(3)) and np.linalg.det(rot) == pytest.approx(1.0)


def test_xtb_reproduces_the_shipped_data():
    """The generator's GFN2-xTB settings give the stored energies and forces of data/cumulene."""
    for name, index in (("cumulene_scan.xyz", 30), ("cumulene_test.xyz", 5)):
        ref = ase.io.read(DATA / name, index=index)
        atoms = ref.copy()
        atoms.calc = xtb_calculator()
        assert atoms.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-5)
        assert np.abs(atoms.get_forces() - ref.get_forces()).max() < 5e-4


def test_rigid_scan_is_local_and_non_local():
    """Only the last CH2 turns: every distance below 3 Å is the same at 0 and 90 degrees, yet the GFN2-xTB energy
    changes by ~2 eV (n = 4: planar minimum)."""
    frames = rigid_scan_frames(4, [0.0, 90.0])
    d0, d90 = (f.get_all_distances() for f in frames)
    short = d0 < 3.0
    assert np.abs(d0[short] - d90[short]).max() < 1e-9
    assert [f.info["twist"] for f in frames] == pytest.approx([0.0, 90.0], abs=1e-6)
    assert 1.5 < frames[1].get_potential_energy() - frames[0].get_potential_energy() < 2.5
    assert all(f.info["config_type"] == "rigid_scan" and f.info["n_carbon"] == 4 for f in frames)


def test_md_frames_restrained_and_unbiased():
    frames = md_frames(5, 45.0, seed=3, num_frames=2, equilibration=20, interval=10)
    assert len(frames) == 2
    for f in frames:
        assert abs(f.info["twist"] - 45.0) < 20.0 and 300.0 <= f.info["temperature"] <= 600.0
        assert np.abs(f.positions.mean(0)).max() < 1e-9  # centred
        plain = f.copy()
        plain.calc = xtb_calculator()  # stored values are GFN2-xTB without the restraint
        assert f.get_potential_energy() == pytest.approx(plain.get_potential_energy(), abs=1e-8)
        biased = f.copy()
        biased.calc = TwistRestraint(45.0)
        phi = signed_twist(f.positions)[0]
        bias = 0.5 * 20.0 * (np.arctan2(np.sin(phi - np.pi / 4), np.cos(phi - np.pi / 4))) ** 2
        assert biased.get_potential_energy() == pytest.approx(f.get_potential_energy() + bias, abs=1e-8)
