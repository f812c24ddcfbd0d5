"""Elastic relaxation of the orbital field along bonds (an extension of EquiREANN, docs/nonlocal.md)."""
import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from pyg_equireann.nn.readout import MLP


class OrbitalElasticity(nn.Module):
    r"""An orbital field relaxed along the bonds, and its elastic energy per atom.

    Each atom's orbital :math:`\Psi_i` (the first K_e radial channels of the last iteration) is the rest
    position of a spring of stiffness :math:`a_{i,k} > 0` (an anchor, learned from the atom's density),
    and each bond a spring of stiffness :math:`s_k\, w_{ij}` (:math:`w_{ij} = f(d_{ij}; r_b)`, the
    bond weight, :math:`s_k > 0` learned) that pulls :math:`X_j` towards :math:`\sigma_k X_i`, with
    :math:`\sigma_k = +1, -1, +1, …` over the channels. The relaxed field X minimises, per radial channel k,

    .. math::
        J_k = \sum_{\{i,j\}} \tfrac12 s_k w_{ij} \lVert X_{i,:,k} - \sigma_k X_{j,:,k} \rVert^2
            + \sum_i \tfrac12 a_{i,k} \lVert X_{i,:,k} - \Psi_{i,:,k} \rVert^2,
        \qquad (s_k (D_w - \sigma_k W) + A_k)\, X_{:,:,k} = A_k \Psi_{:,:,k},

    and the energy of atom i is its share of the minimum, per degree l:
    :math:`e_{i,l,k} = \tfrac14 \sum_j s_k w_{ij} \lVert X_{i,l,k} - \sigma_k X_{j,l,k}\rVert^2 + \tfrac12 a_{i,k}
    \lVert X_{i,l,k} - \Psi_{i,l,k}\rVert^2` (norms over the 2l+1 components: invariant),
    :math:`\sum_{i,l} e_{i,l,k} = J_k`.

    Why: along a chain whose atoms are anchored weakly (the middle of a cumulene) and whose ends are
    anchored strongly (the CH₂ groups), X interpolates between the two end orientations and J is that of n
    springs in series, :math:`\propto \lVert \Psi_A - R\Psi_A \rVert^2 / n` for an end twisted by R: the
    1/n fall-off of a conjugated chain's twist energy is built in, not fitted per length, and it reaches as
    far as the chain goes. In dense matter every atom is anchored and X stays local. The channels with
    σ = −1 are the cumulene's: consecutive π systems are perpendicular, and a quarter turn about the bond
    negates the m = ±2 components, so an end's orientation arrives with the sign (−1)^bonds and the springs'
    rest state is the untwisted chain for either parity (the existing passing learns the same sign, docs/nonlocal.md).

    On a CPU, eagerly, when every graph has at most ``dense_max_atoms`` atoms, X is the exact minimiser from one
    batched dense solve per graph and channel (a few ops instead of ~30 per step, and an exact gradient).
    Otherwise (larger graphs, CUDA, ``torch.compile``/``torch.export``: no host sync and static shapes there),
    X is found by conjugate gradients with a Jacobi preconditioner, started from Ψ, until the residual is
    below ``tolerance`` of its first (on a CPU, eager) or for ``iterations`` steps. The step sizes are sums over
    the atoms of one graph and all angular components, so graphs in a batch do not affect each other and
    rotations commute with every step (equivariant at any step count). Each step moves information one bond
    further: on a tree of m atoms (a chain) the steps are exact after at most m steps; steps after
    convergence do nothing.

    Args:
        degrees: (A,) degree of each angular component.
        num_channels: K_e, the radial channels relaxed.
        density_width: width of the density that sets the anchors.
        anchor_hidden: hidden widths of the anchor network.
        iterations: the most conjugate-gradient steps.
        tolerance: stop when the preconditioned residual norm of every graph and channel is below this fraction
            of its first (None: always ``iterations`` steps, no host sync).
        min_anchor: floor of a (keeps the system positive definite on a graph without anchors). It also bounds
            the reach: along a chain anchored at the floor the field decays over ~(s w / a_min)^½ bonds (at 10⁻³,
            5–8 bonds of a cumulene). A lower floor conditions the system worse (more conjugate-gradient steps)
            and, over 15 cumulene runs, transferred no better (docs/nonlocal.md, "The anchor floor").
        activation: activation of the anchor network.
        dense_max_atoms: the largest graph solved densely on a CPU (0: always conjugate gradients).
        initial_anchor: every anchor's stiffness at initialisation (> min_anchor; None: softplus(0) + min_anchor
            ≈ 0.69, as strong as a bond at ~1.5 Å). A weak start (e.g. 0.01) relaxes X over whole chains from the
            first step; training then strengthens the anchors where the energy needs a local X.
        anchor_per_degree: one anchor per degree and channel, a_{i,l,k}, instead of one per channel: each degree
            relaxes as its own system (L+1 solves), so a degree whose field is frustrated by the sign σ (the l = 0
            scalars in a σ = −1 channel) can be anchored strongly without anchoring the others.
        terminal_anchor: a_t, a fixed stiffness added to every anchor of an atom in proportion to how terminal it
            is, :math:`a_{i,k} \mathrel{+}= a_t \tau_i` (:func:`terminal_index`: 1 for an atom whose bonds all point
            one way, an H or a carbonyl O; 0 for the middle of a chain or an isolated atom). The ends of a bonded
            chain stay pinned whatever the anchor network learns, so the springs-in-series fall-off cannot be lost
            by the anchors of the ends collapsing onto the floor (the failure of docs/nonlocal.md, session 12).
            None: off.
        learned_anchors: False: no anchor network, a_{i,k} = a_min + a_t τ_i (needs ``terminal_anchor``): the field
            is pinned at the ends of the bond network and free elsewhere by construction, so training cannot make it
            local by strengthening the middle anchors (what the anchor network did in runs that did not transfer).

    Shapes: orbitals Ψ (N, A, K_e); density (N, D); bond_index (2, E_b) [j, i], bond_weight w (E_b,),
    batch (N,), terminal τ (N,) (with ``terminal_anchor``) → per-atom energies (N, L+1, K_e); anchors (N, K_e), or
    (N, L+1, K_e) with ``anchor_per_degree``.
    """

    def __init__(self, degrees: Tensor, num_channels: int, density_width: int, anchor_hidden: Sequence[int] = (16,),
                 iterations: int = 32, min_anchor: float = 1e-3, activation: str = "silu",
                 tolerance: Optional[float] = 1e-4, dense_max_atoms: int = 256,
                 initial_anchor: Optional[float] = None, anchor_per_degree: bool = False,
                 terminal_anchor: Optional[float] = None, learned_anchors: bool = True):
        super().__init__()
        if not learned_anchors and terminal_anchor is None:
            raise ValueError("elastic_learned_anchors=false needs elastic_terminal_anchor "
                             "(else every anchor is the floor)")
        if terminal_anchor is not None and not terminal_anchor > 0:
            raise ValueError(f"elastic_terminal_anchor must be positive (or null: off), got {terminal_anchor}")
        if iterations < 1:
            raise ValueError(f"elastic_iterations must be >= 1, got {iterations}")
        if not min_anchor > 0:
            raise ValueError(f"elastic_min_anchor must be positive, got {min_anchor}")
        if initial_anchor is not None and not initial_anchor > min_anchor:
            raise ValueError(f"elastic_initial_anchor must be above elastic_min_anchor={min_anchor}, "
                             f"got {initial_anchor}")
        self.register_buffer("degrees", degrees.clone(), persistent=False)
        self.num_degrees = int(degrees.max()) + 1
        self.num_channels = int(num_channels)
        self.iterations = int(iterations)
        self.min_anchor = float(min_anchor)
        self.tolerance = None if tolerance is None else float(tolerance)
        self.dense_max_atoms = int(dense_max_atoms)
        self.anchor_per_degree = bool(anchor_per_degree)
        self.terminal_anchor = None if terminal_anchor is None else float(terminal_anchor)
        # (A, L+1): sums the components of each degree
        degree_sum = nn.functional.one_hot(degrees, self.num_degrees).to(torch.get_default_dtype())
        self.register_buffer("degree_sum", degree_sum, persistent=False)
        # the output layer starts at zero weights, so every anchor starts at softplus(bias) + a_min
        bias = None if initial_anchor is None else math.log(math.expm1(initial_anchor - min_anchor))
        anchors = num_channels * (self.num_degrees if self.anchor_per_degree else 1)
        self.anchors_per_atom = anchors
        self.anchor = (MLP(density_width, anchor_hidden, anchors, activation=activation, output_bias=bias)
                       if learned_anchors else None)
        # softplus(log(e − 1)) = 1: unit bond stiffness at initialisation
        self.stiffness = nn.Parameter(torch.full((num_channels,), math.log(math.e - 1.0)))
        # σ_k = +1, −1, +1, …: even channels pull a neighbour's orbital towards X_i, odd ones towards −X_i
        sign = torch.ones(num_channels)
        sign[1::2] = -1.0
        self.register_buffer("sign", sign, persistent=False)

    def _per_graph(self, values: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
        """Sum (N, A, K) over the atoms of each graph and all components: (N, 1, K), each atom its graph's sum; with
        ``anchor_per_degree`` over each degree's components, (N, A, K), one system per graph, degree and channel."""
        if not self.anchor_per_degree:
            summed = values.new_zeros((num_graphs, values.shape[-1])).index_add(0, batch, values.sum(1))  # (B, K)
            return summed.index_select(0, batch).unsqueeze(1)
        per_degree = torch.einsum("nak,al->nlk", values, self.degree_sum.to(values.dtype))  # (N, L+1, K)
        summed = values.new_zeros((num_graphs, *per_degree.shape[1:])).index_add(0, batch, per_degree)
        return summed.index_select(0, batch).index_select(1, self.degrees)

    @staticmethod
    def _dense_solve(diagonal: Tensor, coupling: Tensor, rhs: Tensor, neighbors: Tensor, centers: Tensor,
                     weight: Tensor, batch: Tensor, counts: Tensor, size: int,
                     groups: Optional[Tensor] = None) -> Tensor:
        """Solve (diag(d) − s σ W) X = rhs exactly, graph by graph and channel by channel, as one batched Cholesky
        solve of (B, G, K, n, n) matrices (n the largest graph; padding rows are the identity; each graph's atoms
        together, in ``batch`` order). The matrices are symmetric positive definite: a signed graph Laplacian times
        s > 0 plus anchors > 0.

        diagonal (N, G, K): G = 1, one system per channel for all components, or G diagonals (the degrees) with
        ``groups`` (A,) the diagonal of each component (one factorisation for all of them, each component solved
        with its own); coupling s σ (K,), rhs (N, A, K), bonds [j, i] with weights (E_b, 1, 1), ``counts`` (B,)
        atoms per graph, ``size`` = max(counts) → X (N, A, K)."""
        num_atoms, num_components, num_channels = rhs.shape
        num_groups = diagonal.shape[1]
        num_graphs = counts.shape[0]
        uniform = num_graphs * size == num_atoms  # every graph has n atoms (a batch of one molecule): no padding
        if uniform:
            slot = torch.arange(num_atoms, device=batch.device)  # (N,) row of each atom in the (B·n) rows
            local = slot - batch * size
            padded_diagonal, dense = diagonal, rhs
        else:  # the padding rows get 1 on the diagonal and 0 on the right
            first = counts.cumsum(0) - counts  # (B,) index of each graph's first atom
            local = torch.arange(num_atoms, device=batch.device) - first.index_select(0, batch)
            slot = batch * size + local
            padded_diagonal = diagonal.new_ones((num_graphs * size, num_groups, num_channels)).index_copy(
                0, slot, diagonal)
            dense = rhs.new_zeros((num_graphs * size, num_components, num_channels)).index_copy(0, slot, rhs)
        padded_diagonal = padded_diagonal.view(num_graphs, size, num_groups, num_channels)
        dense = dense.view(num_graphs, size, num_components, num_channels)
        entries = rhs.new_zeros((num_graphs * size * size, num_channels))
        bond_slot = slot.index_select(0, centers) * size + local.index_select(0, neighbors)
        entries = entries.index_add(0, bond_slot, -coupling * weight.view(-1, 1))
        off_diagonal = entries.view(num_graphs, 1, size, size, num_channels).permute(0, 1, 4, 2, 3)
        matrix = off_diagonal + torch.diag_embed(padded_diagonal.permute(0, 2, 3, 1))  # (B, G, K, n, n)
        # in float64: weak anchors (a ≥ a_min) under stiff springs make the condition number large, and a float32
        # factorisation could fail or lose the small bond differences the energy is made of; the matrices are small
        factor = torch.linalg.cholesky(matrix.double())
        right = dense.permute(0, 3, 1, 2).unsqueeze(1).double()  # (B, 1, K, n, A)
        if groups is not None:  # each group's system sees only its own components (the others' right sides are 0)
            mask = nn.functional.one_hot(groups, num_groups).T.to(right.dtype)  # (G, A)
            right = right * mask.view(1, num_groups, 1, 1, num_components)
        solution = torch.cholesky_solve(right, factor)  # (B, G, K, n, A)
        solution = (solution.sum(1) if groups is not None else solution.squeeze(1)).to(rhs.dtype)
        solution = solution.permute(0, 2, 3, 1).reshape(num_graphs * size, num_components, num_channels)
        return solution if uniform else solution.index_select(0, slot)

    def anchor_stiffness(self, density: Tensor, terminal: Optional[Tensor] = None) -> Tensor:
        """a = softplus(net(ρ)) + a_min (+ a_t τ) of the atoms' densities (N, D) and terminal indices τ (N,): (N, K),
        or (N, L+1, K) per degree."""
        if self.anchor is not None:
            anchor = nn.functional.softplus(self.anchor(density)) + self.min_anchor
        else:
            anchor = density.new_full((density.shape[0], self.anchors_per_atom), self.min_anchor)
        if self.terminal_anchor is not None:
            if terminal is None:
                raise ValueError("OrbitalElasticity with terminal_anchor needs the atoms' terminal indices")
            anchor = anchor + self.terminal_anchor * terminal.unsqueeze(-1)
        return anchor.view(-1, self.num_degrees, self.num_channels) if self.anchor_per_degree else anchor

    def forward(self, orbitals: Tensor, density: Tensor, bond_index: Tensor, bond_weight: Tensor, batch: Tensor,
                num_graphs: int, terminal: Optional[Tensor] = None) -> Tensor:
        num_atoms = orbitals.shape[0]
        neighbors, centers = bond_index[0], bond_index[1]
        anchor = self.anchor_stiffness(density, terminal)
        if self.anchor_per_degree:  # (N, L+1, K) → each component its degree's anchor, (N, A, K)
            anchor = anchor.index_select(1, self.degrees)
        else:
            anchor = anchor.unsqueeze(1)  # (N, 1, K)
        stiffness = nn.functional.softplus(self.stiffness)  # (K,)
        weight = bond_weight.view(-1, 1, 1)
        degree = bond_weight.new_zeros(num_atoms).index_add(0, centers, bond_weight).view(-1, 1, 1)  # Σ_j w_ij
        diagonal = degree * stiffness + anchor  # (N, 1 or A, K), the Jacobi preconditioner

        sign = self.sign.to(stiffness.dtype)
        coupling = stiffness * sign  # s_k σ_k

        x = None
        if (self.dense_max_atoms > 0 and not orbitals.is_cuda and not torch.compiler.is_compiling()
                and num_atoms > 0):
            counts = torch.bincount(batch, minlength=num_graphs)
            size = int(counts.max())  # host syncs: CPU only
            # the dense layout needs each graph's atoms together (PyG's batches); any other order takes the steps
            if size <= self.dense_max_atoms and bool((batch[1:] >= batch[:-1]).all()):
                rhs = anchor * orbitals
                if self.anchor_per_degree:  # one system per degree (its diagonal at its first component, l²)
                    first = torch.arange(self.num_degrees, device=diagonal.device).square()
                    x = self._dense_solve(diagonal.index_select(1, first), coupling, rhs, neighbors, centers, weight,
                                          batch, counts, size, groups=self.degrees)
                else:
                    x = self._dense_solve(diagonal, coupling, rhs, neighbors, centers, weight, batch, counts, size)
        if x is None:
            x = self._relax(orbitals, anchor, diagonal, coupling, weight, neighbors, centers, batch, num_graphs)
        return self._energies(x, orbitals, anchor, stiffness, sign, weight, neighbors, centers)

    def _energies(self, x: Tensor, orbitals: Tensor, anchor: Tensor, stiffness: Tensor, sign: Tensor, weight: Tensor,
                  neighbors: Tensor, centers: Tensor) -> Tensor:
        """Each atom's share of J per degree and channel, (N, L+1, K), at the relaxed field X (N, A, K)."""
        difference = x.index_select(0, centers) - sign * x.index_select(0, neighbors)  # (E_b, A, K)
        bonds = x.new_zeros(x.shape).index_add(0, centers, difference.square() * weight)  # Σ_j w_ij (X_i − σ X_j)²
        energy = 0.25 * stiffness * bonds + 0.5 * anchor * (x - orbitals).square()  # (N, A, K)
        return torch.einsum("nak,al->nlk", energy, self.degree_sum.to(energy.dtype))

    def _relax(self, orbitals: Tensor, anchor: Tensor, diagonal: Tensor, coupling: Tensor, weight: Tensor,
               neighbors: Tensor, centers: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
        """X by preconditioned conjugate gradients started from Ψ (N, A, K)."""

        def apply(x: Tensor) -> Tensor:  # (s L_w + A) x, (L_w x)_i = Σ_j w_ij (x_i − σ x_j)
            neighbor_sum = x.new_zeros(x.shape).index_add(0, centers, x.index_select(0, neighbors) * weight)
            return diagonal * x - coupling * neighbor_sum

        x = orbitals
        residual = anchor * orbitals - apply(orbitals)  # A Ψ − (s L + A) Ψ
        z = residual / diagonal
        direction = z
        rz = self._per_graph(residual * z, batch, num_graphs)
        # A converged system gives 0/0 steps: denominators are kept above 1e-12 of the first residual (the
        # absolute 1e-18 keeps 1/floor² finite in float32), and a system below that floor stops moving (step and β
        # 0), so that the steps after convergence, which run on CUDA and when compiled, cannot divide rounding noise
        # by rounding noise.
        floor = 1e-12 * rz + 1e-18
        zero = torch.zeros_like(rz)
        # stop once every graph's preconditioned residual is below `tolerance` of its first (one host sync per
        # step; J is then within ~tolerance² of its minimum); on CUDA and compiled every step runs (no sync)
        stop = None
        if self.tolerance is not None and not orbitals.is_cuda and not torch.compiler.is_compiling():
            stop = torch.maximum(self.tolerance ** 2 * rz, floor).detach()
        for _ in range(self.iterations):
            if stop is not None and bool((rz.detach() <= stop).all()):
                break
            applied = apply(direction)
            moving = rz > floor
            step = torch.where(moving, rz / torch.maximum(self._per_graph(direction * applied, batch, num_graphs),
                                                          floor), zero)
            x = x + step * direction
            residual = residual - step * applied
            z = residual / diagonal
            rz_next = self._per_graph(residual * z, batch, num_graphs)
            beta = torch.where(moving & (rz_next > floor), rz_next / torch.maximum(rz, floor), zero)
            direction = z + beta * direction
            rz = rz_next
        return x

    def extra_repr(self) -> str:
        return (f"channels={self.num_channels}, iterations={self.iterations}, tolerance={self.tolerance}, "
                f"min_anchor={self.min_anchor}, dense_max_atoms={self.dense_max_atoms}"
                + (", anchor_per_degree=True" if self.anchor_per_degree else "")
                + (f", terminal_anchor={self.terminal_anchor}" if self.terminal_anchor is not None else "")
                + (", learned_anchors=False" if self.anchor is None else ""))


def terminal_index(vectors: Tensor, weight: Tensor, centers: Tensor, num_atoms: int, eps: float = 1e-3) -> Tensor:
    r"""How much each atom is the end of the bond network:
    :math:`\tau_i = \lVert \sum_j w_{ij} \hat r_{ij} \rVert^2 / ((\sum_j w_{ij})^2 + \epsilon)` over its bonds
    (weights w = f(d; r_b), smooth at r_b). ≈ 1 when every bond points one way (an H, a terminal O; w ≫ √ε ≈ 0.03),
    0 where the bonds cancel (the middle of a straight chain, an sp³ centre) and for an atom without bonds; the
    (planar, 120°) end carbon of a CH₂ group ~0.1. Invariant and smooth in the positions (no norm at zero).

    Shapes: vectors (E_b, 3) of the bonds, weight (E_b,), centers (E_b,) → (N,)."""
    unit = vectors / torch.linalg.vector_norm(vectors, dim=-1, keepdim=True).clamp_min(1e-9)
    polar = vectors.new_zeros(num_atoms, 3).index_add(0, centers, weight.unsqueeze(-1) * unit)
    total = vectors.new_zeros(num_atoms).index_add(0, centers, weight)
    return polar.square().sum(-1) / (total.square() + eps)
