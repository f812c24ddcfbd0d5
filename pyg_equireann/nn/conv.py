"""One EquiREANN iteration: orbital passing (:class:`EquiREANNConv`, a PyG ``MessagePassing`` layer) and
the contraction of the centre orbitals into invariant densities (:class:`OrbitalContraction`), spec §1.5–§1.6."""
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch_geometric.nn import MessagePassing


# ---------------------------------------------------------------------------------- contraction
DENSITY_INVARIANTS = ("norm", "degree", "cubic")


def gaunt_paths(max_l: int) -> List[Tuple[Tuple[int, int, int], Tensor]]:
    r"""The rotation-invariant trilinear couplings of real spherical harmonics that are not products of
    lower-order invariants: every (l1 ≤ l2 ≤ l3), all ≥ 1, l1 + l2 + l3 even, |l1 − l2| ≤ l3 ≤ l1 + l2, with
    the Gaunt coefficients :math:`G_{abd} = \int Y_a Y_b Y_d \, d\Omega` ((2l1+1, 2l2+1, 2l3+1) float64,
    computed by exact quadrature of :func:`~pyg_equireann.nn.orbitals.spherical_harmonics`, so they match
    its phase convention)."""
    import numpy as np

    from pyg_equireann.nn.orbitals import spherical_harmonics

    paths = [(l1, l2, l3) for l1 in range(1, max_l + 1) for l2 in range(l1, max_l + 1)
             for l3 in range(l2, max_l + 1) if (l1 + l2 + l3) % 2 == 0 and l3 <= l1 + l2]
    if not paths:
        return []
    # Gauss-Legendre in cos(θ) × uniform φ: exact for the products of three harmonics of degree ≤ max_l
    n = 3 * max_l // 2 + 2
    cos_t, w_t = np.polynomial.legendre.leggauss(n)
    phi = np.arange(2 * n) * (np.pi / n)
    sin_t = np.sqrt(1.0 - cos_t**2)
    xyz = np.stack([np.outer(sin_t, np.cos(phi)), np.outer(sin_t, np.sin(phi)), np.outer(cos_t, np.ones_like(phi))], -1)
    weights = torch.from_numpy(np.outer(w_t, np.full_like(phi, np.pi / n)).reshape(-1))
    Y = spherical_harmonics(torch.from_numpy(xyz.reshape(-1, 3)), max_l)  # (Q, (L+1)²) float64
    out = []
    for l1, l2, l3 in paths:
        blocks = [Y[:, l * l:(l + 1) ** 2] for l in (l1, l2, l3)]
        gaunt = torch.einsum("q,qa,qb,qd->abd", weights, *blocks)
        gaunt[gaunt.abs() < 1e-12] = 0.0
        out.append(((l1, l2, l3), gaunt))
    return out


class OrbitalContraction(nn.Module):
    r"""Per-degree linear contraction of the centre orbital and its invariants:

    .. math::
        P_{i,a,c} = \sum_k \Psi_{i,a,k} W_{l(a),k,c}, \qquad
        \rho_{i,c} = w_{i,c} \sum_a P_{i,a,c}^2 \quad \text{(the paper's density)}.

    One K×C matrix per degree l, shared by the 2l+1 components of that degree, so that
    :math:`P` rotates like :math:`\Psi` and :math:`\rho` is O(3)-invariant. ``invariants`` chooses the
    density (each group has C channels, concatenated group after group, all multiplied by :math:`w_{i,c}`):

    * ``"norm"``: the squared norm over every degree, (N, C) (the paper);
    * ``"degree"``: one squared norm per degree, :math:`\rho_{i,l,c} = w_{i,c} \sum_{m} P_{i,lm,c}^2`,
      (N, (L+1)·C): the same contraction, L+1 times as many invariants;
    * ``"cubic"``: those and the cubic Gaunt invariants :math:`w_{i,c} \sum_{abd} G_{abd} P_{i,a,c}
      P_{i,b,c} P_{i,d,c}` of every coupling of :func:`gaunt_paths` (for L = 2: (1, 1, 2) and (2, 2, 2)),
      one body order higher (four-body in the neighbours' orbitals).

    Args:
        degrees: (A,) degree l(a) of each angular channel (real spherical harmonics for ``"cubic"``).
        num_radial: K.
        num_channels: C.
        invariants: ``"norm"``, ``"degree"`` or ``"cubic"``.

    Initialisation: N(0, 1/K) for every (l, k, c), independent of the number of iterations and of L
    (the reference's 4-D Xavier init scales with both, spec §9.12).
    """

    def __init__(self, degrees: Tensor, num_radial: int, num_channels: int, invariants: str = "norm"):
        super().__init__()
        if invariants not in DENSITY_INVARIANTS:
            raise ValueError(f"invariants must be one of {DENSITY_INVARIANTS}, got {invariants!r}")
        self.invariants = invariants
        self.register_buffer("degrees", degrees.clone(), persistent=False)
        num_degrees = int(degrees.max()) + 1
        self.weight = nn.Parameter(torch.empty(num_degrees, num_radial, num_channels))
        # one-hot (A, L+1) of each channel's degree: the per-degree sums as one matmul
        self.register_buffer("degree_onehot", nn.functional.one_hot(degrees, num_degrees).to(torch.get_default_dtype()),
                             persistent=False)
        # per path (l1, l2, l3): the Gaunt coefficients as a ((2l1+1)(2l2+1), 2l3+1) matrix (kept float64, see _apply)
        paths = gaunt_paths(num_degrees - 1) if invariants == "cubic" else []
        self.paths: List[Tuple[int, int, int]] = [path for path, _ in paths]
        for p, (path, gaunt) in enumerate(paths):
            self.register_buffer(f"gaunt_{p}", gaunt.flatten(0, 1), persistent=False)
        self.num_groups = 1 if invariants == "norm" else num_degrees + len(self.paths)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.weight.shape[1] ** -0.5)

    def _apply(self, fn, recurse=True):
        # The Gaunt tables stay float64 through .float()/.double(): a float32-rounded table would break the
        # invariance of a float64 model at 1e-9.
        gaunts = {name: buf for name, buf in self._buffers.items() if name.startswith("gaunt_")}
        super()._apply(fn, recurse)
        for name, buf in gaunts.items():
            self._buffers[name] = buf.to(self._buffers[name].device, torch.float64)
        return self

    def forward(self, node_orbitals: Tensor, center_weight: Optional[Tensor] = None) -> Tensor:
        """node_orbitals Ψ (N, A, K), center_weight w (N, C) or None → density ρ (N, G·C) (G groups)."""
        weight = self.weight.index_select(0, self.degrees)  # (A, K, C)
        contracted = torch.bmm(node_orbitals.transpose(0, 1), weight)  # P: (A, N, C)
        squares = contracted.square()
        if self.invariants == "norm":
            density = squares.sum(0).unsqueeze(1)  # (N, 1, C)
        else:
            groups = [torch.einsum("anc,al->nlc", squares, self.degree_onehot.to(squares.dtype))]  # (N, L+1, C)
            num_atoms, num_channels = contracted.shape[1:]
            for p, (l1, l2, l3) in enumerate(self.paths):
                p1, p2, p3 = (contracted[l * l:(l + 1) ** 2] for l in (l1, l2, l3))
                pairs = (p1.unsqueeze(1) * p2.unsqueeze(0)).flatten(0, 1)  # (n1·n2, N, C)
                gaunt = getattr(self, f"gaunt_{p}").to(contracted.dtype)  # (n1·n2, n3)
                coupled = (gaunt.T @ pairs.flatten(1)).view(-1, num_atoms, num_channels)  # (n3, N, C)
                groups.append((coupled * p3).sum(0).unsqueeze(1))
            density = torch.cat(groups, 1)  # (N, G, C)
        if center_weight is not None:
            density = density * center_weight.unsqueeze(1)
        return density.flatten(1)


# ------------------------------------------------------------------------------ message passing
class EquiREANNConv(MessagePassing):
    r"""One EquiREANN iteration t (spec §1.7):

    .. math::
        c^{(t)}_{ij} &= c^{(t-1)}_{ij} + M_t(\rho^{(t-1)}_j) \\
        \Psi^{(t)}_i &= \frac{1}{\bar n} \sum_{j \in \mathcal N(i)}
            c^{(t)}_{ij} O_{ij} + f(d_{ij})\, \Psi^{(t-1)}_j \\
        \rho^{(t)}_i &= \text{contraction}_t(\Psi^{(t)}_i, w_i)

    The second term of the message, the equivariant orbital passing, has no parameters: it hands
    the neighbour's whole orbital (every l, m, k) on, scaled by the cutoff only, so orientation
    information travels along chains. With ``equivariant_passing=False`` (or no previous orbitals,
    as in iteration 0) the message is the invariant part only. :math:`\bar n` is the optional average
    neighbour count (a constant, so equivariance is kept); 1 when not set.

    With ``learnable_passing=True`` (an extension, not in the paper) the passed orbital is first
    multiplied by a weight :math:`\lambda^{(t)}_{l,k}` per degree and radial channel, shared by the
    2l+1 components of a degree (so equivariance is kept), initialised to 1 (the paper's model) or
    to +1, −1, +1, … over k (``passing_init="alternating"``).
    A negative weight lets the sign of a passed orientation alternate from hop to hop, which is how
    the twist energy of a cumulene alternates with the parity of the chain (docs/nonlocal.md).

    Multi-hop passing (``passing_hops`` = P > 1, an extension): after the message step, P − 1 more
    parameter-free hops of the orbital along the same edges, each with its own learned gain
    :math:`\mu^{(t)}_{p,l,k}` (shared by the 2l+1 components of a degree):

    .. math::
        \Psi^{(t)}_{i,[p]} = \Psi^{(t)}_{i,[0]} + \mu^{(t)}_p \odot \sum_j w_{ij} \Psi^{(t)}_{j,[p-1]},
        \qquad p = 1 … P-1,

    a truncated Neumann series of the fixed point :math:`\Psi = \Psi_{[0]} + \mu F \Psi`, so orientations
    travel P bonds per passing iteration instead of one and the receptive field grows from (T+1)·r_c to
    (T·P+1)·r_c (iteration 0 builds Ψ⁽⁰⁾ and does not hop) at the cost of P − 1 gathers and scatters of Ψ
    per iteration (no new edges, no MLP).
    The hop weight :math:`w_{ij}` is :math:`f(d_{ij})/\bar n`, or with ``passing_norm=True``
    :math:`f(d_{ij}) / (\epsilon + \sum_{k} f(d_{ik}))` (also for the message's own passing term): each
    hop then averages over the neighbours instead of damping by f ≈ 0.36 per C=C bond at r_c = 3 Å, the
    same in a chain and in a dense liquid (row sums below 1), so a learned |μ| ≈ 1–2 carries an orientation
    over many bonds without blowing up elsewhere. Smooth at the cutoff (f → 0 with its derivatives).

    Non-backtracking hops (``passing_nonbacktracking=True``, with P ≥ 3): the intermediate hops run on the
    directed edges, so that what j hands to i is not what i handed to j one hop earlier:

    .. math::
        h^{[0]}_{j\to i} = \Psi_{j,[0]}, \qquad
        h^{[p]}_{j\to i} = \Psi_{j,[0]} + \mu_p \odot
            \frac{\sum_{k \ne i} f(d_{kj})\, h^{[p-1]}_{k\to j}}{\epsilon + \sum_{k \ne i} f(d_{kj})},
        \qquad \Psi_{i,[P-1]} = \Psi_{i,[0]} + \mu_{P-1} \odot \sum_j w_{ij} h^{[P-2]}_{j\to i}.

    On a node hop an orientation spreads both ways and returns, so after p hops the part that went p bonds
    straight on has weight (f/Σf)^p ≈ 0.44^p in a chain; a non-backtracking hop carries it on with
    f/(ε + f) ≈ 1 per bond (ε ≪ f), so the far end of a chain arrives undamped, while the weights stay a
    convex combination (≤ 1) in dense systems. Each such hop costs one more gather (the reverse edge) than a
    node hop and keeps an (E, A, K) state.

    The hops may run on their own, shorter edge list (``hop_edges`` in :meth:`forward`; the model's
    ``passing_hop_cutoff``): the bonds along which an orientation travels, with weight f(d; r_hop) in place
    of f(d; r_c). Edges beyond r_hop would have weight 0, so leaving them out changes nothing but the cost.

    Args:
        contraction: the :class:`OrbitalContraction` of this iteration (may be shared).
        message_mlp: :math:`M_t`, a module ``(density (N, C), element_index (N,)) → (N, K)``, or None
            for iteration 0.
        equivariant_passing: pass :math:`\Psi_j` on.
        degrees: (A,) degree of each angular channel; needed with ``learnable_passing``.
        num_radial: K; needed with ``learnable_passing``.
        learnable_passing: learn :math:`\lambda^{(t)}_{l,k}` (shape (L+1, K)) instead of fixing it to 1.
        passing_init: ``"ones"`` (λ = 1, the paper's model at initialisation) or ``"alternating"``
            (λ = +1, −1, +1, … over k: half of the channels flip sign at every hop).
        passing_gain: initial magnitude of the learned λ and μ (1: the paper's weight).
        passing_hops: P, orbital hops per passing iteration (1: the paper's model; ignored in iteration 0).
        passing_norm: divide the hop weight by ε + Σ_k f(d_ik) instead of n̄.
        passing_norm_eps: ε (keeps an atom with one far neighbour smooth).
        passing_hop_channels: hop only the first K' radial channels of Ψ (their Gaussians start at the shortest
            distances; centres and widths are learned per element pair), the others keep Ψ_[0]: the hops cost K'/K
            as much (None: all K). Keep K' ≥ 2 with ``passing_init="alternating"``: it is the −1 channel that
            carries a sign flip per hop.
        passing_nonbacktracking: intermediate hops on directed edges without the reverse edge (above);
            ``forward`` then needs ``reverse_edge`` (:func:`~pyg_equireann.graph.edges.reverse_edges`).
        passing_hop_tied_gain: one learned gain μ (L+1, K') for all P − 1 hops of the iteration instead of one per
            hop: an orientation then changes by the same factor at every bond it crosses, whichever hop carries it.

    Shapes: edge_index (2, E) with row 0 the neighbour j and row 1 the centre i; edge_orbitals O
    (E, A, K); edge_cutoff f (E,); edge_coefficients c (E, K); node_orbitals Ψ (N, A, K);
    node_density ρ (N, C); center_weight w (N, C) or None.
    """

    def __init__(
        self,
        contraction: OrbitalContraction,
        message_mlp: Optional[nn.Module] = None,
        equivariant_passing: bool = True,
        degrees: Optional[Tensor] = None,
        num_radial: Optional[int] = None,
        learnable_passing: bool = False,
        passing_init: str = "ones",
        passing_gain: float = 1.0,
        passing_hops: int = 1,
        passing_norm: bool = False,
        passing_norm_eps: float = 0.1,
        passing_nonbacktracking: bool = False,
        passing_hop_channels: Optional[int] = None,
        passing_hop_tied_gain: bool = False,
    ):
        super().__init__(aggr="add", flow="source_to_target", node_dim=0)
        if passing_hops < 1:
            raise ValueError(f"passing_hops must be >= 1, got {passing_hops}")
        if passing_init not in ("ones", "alternating"):
            raise ValueError(f"passing_init must be 'ones' or 'alternating', got {passing_init!r}")
        self.contraction = contraction
        self.message_mlp = message_mlp
        self.equivariant_passing = equivariant_passing
        self.passing_norm = bool(passing_norm) and equivariant_passing
        self.passing_norm_eps = float(passing_norm_eps)
        self.passing_hops = int(passing_hops) if equivariant_passing else 1
        self.passing_weight: Optional[nn.Parameter] = None
        self.hop_gain: Optional[nn.Parameter] = None
        self.hop_channels = 0
        if message_mlp is None:  # iteration 0 has nothing to pass: it builds Ψ⁽⁰⁾ from the neighbours only
            self.passing_hops = 1
        # with P = 2 the one hop goes from the nodes to the nodes: nothing to backtrack
        self.nonbacktracking = bool(passing_nonbacktracking) and self.passing_hops > 2
        needs_gain = (learnable_passing and message_mlp is not None) or self.passing_hops > 1
        if equivariant_passing and needs_gain:
            if degrees is None or num_radial is None:
                raise ValueError("learnable_passing and passing_hops > 1 need `degrees` and `num_radial`")
            self.register_buffer("degrees", degrees.clone(), persistent=False)
            weight = torch.ones(int(degrees.max()) + 1, num_radial)
            if passing_init == "alternating":
                weight[:, 1::2] = -1.0
            if learnable_passing and message_mlp is not None:
                self.passing_weight = nn.Parameter(weight * passing_gain)
            if self.passing_hops > 1:  # μ_p, (P − 1, L+1, K'), or one μ (1, L+1, K') for every hop
                if passing_hop_channels is not None and not 1 <= passing_hop_channels <= num_radial:
                    raise ValueError(f"passing_hop_channels must be in 1..num_radial={num_radial}, "
                                     f"got {passing_hop_channels}")
                self.hop_channels = num_radial if passing_hop_channels is None else int(passing_hop_channels)
                hop_gains = 1 if passing_hop_tied_gain else self.passing_hops - 1
                gain = (weight[:, :self.hop_channels] * passing_gain).expand(hop_gains, -1, -1)
                self.hop_gain = nn.Parameter(gain.clone())

    def forward(
        self,
        edge_index: Tensor,
        edge_orbitals: Tensor,
        edge_cutoff: Tensor,
        edge_coefficients: Tensor,
        center_weight: Optional[Tensor] = None,
        node_orbitals: Optional[Tensor] = None,
        node_density: Optional[Tensor] = None,
        element_index: Optional[Tensor] = None,
        inv_avg_num_neighbors: Union[Tensor, float] = 1.0,
        num_nodes: Optional[int] = None,
        reverse_edge: Optional[Tuple[Tensor, Tensor]] = None,
        hop_edges: Optional[Tuple[Tensor, Tensor]] = None,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Returns (node_orbitals Ψ⁽ᵗ⁾ (N, A, K), node_density ρ⁽ᵗ⁾ (N, C), edge_coefficients c⁽ᵗ⁾ (E, K)).
        ``hop_edges``: (edge_index (2, E'), hop weight f (E',)), the edges the hops run on (None: ``edge_index``
        with ``edge_cutoff``); ``reverse_edge``: (index of each hop edge's reverse (E',), whether it has one (E',)),
        for non-backtracking hops."""
        if num_nodes is None:
            num_nodes = node_orbitals.shape[0] if node_orbitals is not None else int(edge_index.max()) + 1
        if self.message_mlp is not None and node_density is not None:
            update = self.message_mlp(node_density, element_index)
            edge_coefficients = edge_coefficients + update.index_select(0, edge_index[0])
        passed = node_orbitals if self.equivariant_passing else None
        if passed is not None and self.passing_weight is not None:
            passed = passed * self.passing_weight.index_select(0, self.degrees)  # λ_{l(a),k}, (A, K)
        hop_weight = edge_cutoff * inv_avg_num_neighbors  # w_ij (E,)
        node_scale = inv_avg_num_neighbors  # c_i of w_ij = f(d_ij) c_i: a scalar, or (N, 1, 1) with passing_norm
        passing_cutoff = edge_cutoff
        if self.passing_norm and (passed is not None or self.hop_gain is not None):
            hop_weight, node_scale = self.normalised_weights(edge_index, edge_cutoff, num_nodes)
            passing_cutoff = hop_weight / inv_avg_num_neighbors  # × 1/n̄ below gives w_ij
        aggregated = self.propagate(
            edge_index,
            orbital=edge_orbitals,
            coefficient=edge_coefficients,
            cutoff=passing_cutoff,
            psi=passed,
            size=(num_nodes, num_nodes),
        )
        aggregated = aggregated * inv_avg_num_neighbors  # a () tensor: no host sync to test it for 1
        if self.hop_gain is not None:
            hop_index, hop_cutoff = edge_index, edge_cutoff
            if hop_edges is not None:  # the hops' own (shorter) edge list and weights
                hop_index, hop_cutoff = hop_edges
                hop_weight, node_scale = hop_cutoff * inv_avg_num_neighbors, inv_avg_num_neighbors
                if self.passing_norm:
                    hop_weight, node_scale = self.normalised_weights(hop_index, hop_cutoff, num_nodes)
            rest = None
            if self.hop_channels < aggregated.shape[-1]:
                # contiguous: gathers of the strided slice are ~20x slower on a CPU
                aggregated, rest = aggregated[..., :self.hop_channels].contiguous(), aggregated[..., self.hop_channels:]
            if self.nonbacktracking:
                if reverse_edge is None:
                    raise ValueError("non-backtracking hops need reverse_edge (pyg_equireann.graph.reverse_edges)")
                aggregated = self.nonbacktracking_hops(aggregated, hop_index, hop_cutoff, node_scale,
                                                       reverse_edge[0], reverse_edge[1], num_nodes)
            else:
                aggregated = self.hops(aggregated, hop_index, hop_weight)
            if rest is not None:
                aggregated = torch.cat([aggregated, rest], -1)
        return aggregated, self.contraction(aggregated, center_weight), edge_coefficients

    def normalised_weights(self, edge_index: Tensor, edge_cutoff: Tensor, num_nodes: int) -> Tuple[Tensor, Tensor]:
        """``passing_norm``'s weights w_ij = f(d_ij) c_i with c_i = 1 / (ε + Σ_k f(d_ik)): (w (E,), c (N, 1, 1))."""
        centers = edge_index[1]
        total = edge_cutoff.new_zeros(num_nodes).index_add(0, centers, edge_cutoff)
        scale = (self.passing_norm_eps + total).reciprocal()
        return edge_cutoff * scale.index_select(0, centers), scale.view(-1, 1, 1)

    def hops(self, orbitals: Tensor, edge_index: Tensor, hop_weight: Tensor) -> Tensor:
        """The P − 1 extra hops Ψ_[p] = Ψ_[0] + μ_p ⊙ Σ_j w_ij Ψ_[p−1],j; orbitals (N, A, K), hop_weight (E,)."""
        neighbors, centers = edge_index[0], edge_index[1]
        weight = hop_weight.view(-1, 1, 1)
        current = orbitals
        for gain in self.hop_gain.expand(self.passing_hops - 1, -1, -1):
            scaled = current * gain.index_select(0, self.degrees)  # μ on the N nodes, before the gather
            current = orbitals.index_add(0, centers, scaled.index_select(0, neighbors) * weight)
        return current

    def nonbacktracking_hops(self, orbitals: Tensor, edge_index: Tensor, edge_cutoff: Tensor,
                             node_scale: Union[Tensor, float], reverse: Tensor, found: Tensor,
                             num_nodes: int) -> Tensor:
        """The P − 1 extra hops, the first P − 2 on directed edges without backtracking (class docstring);
        orbitals (N, A, K), edge_cutoff f (E,), node_scale c (N, 1, 1) or a scalar (the last hop's weight is
        w_ij = f(d_ij) c_i), reverse (E,) and found (E,) of :func:`~pyg_equireann.graph.edges.reverse_edges`.

        Carried as s_e = f_e h_e, the quantity an edge sends: s' = f Ψ_[0],j + μ ⊙ α (Σ_k s_kj − [found] s_ij) with the
        per-edge scalar α = f / (ε + Σ_{k≠i} f_kj) (the reverse edge has the same f), and the last hop is
        c_i Σ_j s_ji: few passes over the (E, A, K) state, and few autograd nodes (on small systems each op's overhead
        is what the hops cost)."""
        neighbors, centers = edge_index[0], edge_index[1]
        found = found.to(edge_cutoff.dtype)
        total = edge_cutoff.new_zeros(num_nodes).index_add(0, centers, edge_cutoff)  # Σ_k f(d_kj) per node
        norm = (self.passing_norm_eps + total.index_select(0, neighbors) - edge_cutoff * found).reciprocal()
        alpha = (edge_cutoff * norm).view(-1, 1, 1)
        minus_found = (-found).view(-1, 1, 1)  # the reverse edge's term, 0 where there is none
        gains = self.hop_gain.index_select(1, self.degrees).expand(self.passing_hops - 1, -1, -1)  # μ_p (P − 1, A, K)
        first = orbitals.index_select(0, neighbors) * edge_cutoff.view(-1, 1, 1)  # f Ψ_[0],j on each edge j → i
        sent = first
        for p in range(gains.shape[0] - 1):
            into = orbitals.new_zeros(orbitals.shape).index_add(0, centers, sent)  # Σ_k s_kj, per node j
            others = torch.addcmul(into.index_select(0, neighbors), sent.index_select(0, reverse), minus_found)
            sent = torch.addcmul(first, others * alpha, gains[p])
        arriving = orbitals.new_zeros(orbitals.shape).index_add(0, centers, sent) * node_scale
        return torch.addcmul(orbitals, arriving, gains[-1])

    def message(self, orbital: Tensor, coefficient: Tensor, cutoff: Tensor, psi_j: Optional[Tensor]) -> Tensor:
        message = coefficient.unsqueeze(1) * orbital
        if psi_j is not None:
            # not addcmul: its backward is ~2x slower than that of mul + add here
            message = message + cutoff.view(-1, 1, 1) * psi_j
        return message

    def extra_repr(self) -> str:
        return (f"equivariant_passing={self.equivariant_passing}, learnable_passing={self.passing_weight is not None}"
                + (f", passing_hops={self.passing_hops}" if self.passing_hops > 1 else "")
                + (f", passing_norm=True (eps={self.passing_norm_eps})" if self.passing_norm else "")
                + (", nonbacktracking=True" if self.nonbacktracking else "")
                + (f", hop_channels={self.hop_channels}" if self.hop_gain is not None else ""))
