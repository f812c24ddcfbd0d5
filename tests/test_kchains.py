"""k-chains (Joshi et al., ICML 2023): invariant messages never separate the pair, EquiREANN's
orbital passing does once information from both ends can meet."""
import pytest
import torch

from pyg_equireann import EquiREANN, REANN
from pyg_equireann.experiments.kchains import kchain_pair, model_factory, separates, smallest_separating_iterations

CUTOFF = 1.75  # bonded neighbours (1.0 Å) only; nearest non-bonded pair 1.79 Å


def factory(cls, seed=0, **kwargs):
    return model_factory(cls, seed, CUTOFF, **kwargs)


def test_kchain_geometry_differs_only_beyond_the_cutoff():
    """The two chains have the same bonds and bond angles; their distance matrices differ only in
    the terminal–terminal entry, which is far beyond the cutoff (trans vs cis end groups)."""
    k = 5
    z, a, b = kchain_pair(k)
    da, db = torch.cdist(a, a), torch.cdist(b, b)
    differ = ~torch.isclose(da, db, atol=1e-12)
    assert differ.nonzero().tolist() == [[0, k + 1], [k + 1, 0]]
    assert da[0, k + 1] > 2 * CUTOFF and db[0, k + 1] > 2 * CUTOFF
    bonded = (da > 0) & (da < CUTOFF)
    assert int(bonded.sum()) == 2 * (k + 1)  # a chain of k+2 atoms, bonds only


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("k", range(2, 9))
@pytest.mark.parametrize("invariants", ["norm", "cubic"])
def test_equireann_separates_from_half_the_chain(k, seed, invariants):
    """Ψ⁽ᵀ⁾ sees T+1 bonds; both ends meet after ⌊k/2⌋+1 bonds, i.e. at T = ⌊k/2⌋ passing iterations
    (iteration 0 is the first aggregation). At T = ⌊k/2⌋ − 1 the pair is exactly degenerate, also with the
    four-body density invariants (they see no further than the orbital they are made of)."""
    make = factory(EquiREANN, seed, density_invariants=invariants)
    t = k // 2
    assert separates(make(t), k)
    assert separates(make(t + 1), k)
    assert not separates(make(t - 1), k)


@pytest.mark.parametrize("hops", [2, 3])
@pytest.mark.parametrize("k", [3, 6, 8])
@pytest.mark.parametrize("norm", [False, True])
def test_multihop_passing_reach(k, hops, norm):
    """With P hops per passing iteration Ψ⁽ᵀ⁾ sees T·P + 1 bonds (iteration 0 does not hop), so the ends meet
    at the smallest T with T·P ≥ ⌊k/2⌋, and not one iteration earlier (exactly degenerate)."""
    make = factory(EquiREANN, passing_hops=hops, passing_norm=norm, learnable_passing=True,
                   passing_init="alternating")
    t = -(-(k // 2) // hops)
    assert separates(make(t), k)
    assert not separates(make(t - 1), k)


def test_smallest_separating_iterations():
    assert smallest_separating_iterations(factory(EquiREANN), 4, max_iterations=4) == 2
    assert smallest_separating_iterations(factory(EquiREANN, equivariant_passing=False), 4, max_iterations=4) == -1


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("name", ["passing_off", "passing_off_cubic", "reann"])
def test_invariant_messages_never_separate(k, name):
    make = {"passing_off": factory(EquiREANN, equivariant_passing=False),
            "passing_off_cubic": factory(EquiREANN, equivariant_passing=False, density_invariants="cubic"),
            "reann": factory(REANN, elements=[6])}[name]
    z, a, b = kchain_pair(k)
    for num_iterations in range(0, 6):
        model = make(num_iterations)
        with torch.no_grad():
            assert abs(float(model(z, a)) - float(model(z, b))) < 1e-13


def test_kchain_rejects_short_chains():
    with pytest.raises(ValueError, match="k >= 2"):
        kchain_pair(1)
