"""The EquiREANN potential (Wu, Xia, Zhang, Jiang, J. Phys. Chem. A 128, 11061 (2024))."""
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from pyg_equireann.graph.checks import MIN_DISTANCE, check_inputs
from pyg_equireann.graph.edges import edge_vectors, ensure_graph, image_shifts, reverse_edges
from pyg_equireann.models.base import Potential
from pyg_equireann.nn.conv import EquiREANNConv, OrbitalContraction
from pyg_equireann.nn.elastic import OrbitalElasticity, terminal_index
from pyg_equireann.nn.elements import element_mask, species_table
from pyg_equireann.nn.orbitals import AngularBasis, CenterWeight, CosineCutoff, NeighborTableEmbedding, PairEmbedding
from pyg_equireann.nn.readout import MLP, ElementMLPs


def _graph_kwargs(batch) -> Dict[str, Tensor]:
    """``edge_index``/``edge_shift`` of a data batch with a cached neighbour list (else empty)."""
    edge_index = getattr(batch, "edge_index", None)
    if edge_index is None:
        return {}
    offsets = getattr(batch, "cell_offsets", None)
    if offsets is None:
        return {"edge_index": edge_index}
    shift = image_shifts(edge_index, offsets.to(batch.pos.dtype), batch.cell.view(-1, 3, 3), batch.batch)
    return {"edge_index": edge_index, "edge_shift": shift}


class _SharedMLP(nn.Module):
    """An MLP that ignores the element index (one network for every element)."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.mlp = MLP(*args, **kwargs)

    def forward(self, x: Tensor, element_index: Optional[Tensor] = None) -> Tensor:
        return self.mlp(x)


class EquiREANN(Potential):
    r"""EquiREANN: equivariant recursively embedded atom neural network.

    Primitive orbitals of every edge (i centre, j neighbour, :math:`r_{ij} = x_j - x_i + S_{ij}`):

    .. math::
        O_{ij,a,k} = f(d_{ij})\, e^{-(\alpha_{ij,k}(d_{ij}-\mu_{ij,k}))^2}\, Y_a(\hat r_{ij})

    with the cutoff :math:`f`, K Gaussians whose parameters come from the element pair, and real
    spherical harmonics :math:`Y_a`, :math:`a = l^2+l+m`, :math:`l \le L`. Iteration 0 builds
    :math:`\Psi^{(0)}_i = \sum_j c^0_{ij} O_{ij}`; each iteration t = 1..T (:class:`EquiREANNConv`)
    updates the invariant coefficients from the neighbours' densities and passes the neighbours'
    orbitals on:

    .. math::
        c^{(t)}_{ij} = c^{(t-1)}_{ij} + M_t(\rho^{(t-1)}_j), \qquad
        \Psi^{(t)}_i = \sum_j c^{(t)}_{ij} O_{ij} + f(d_{ij}) \Psi^{(t-1)}_j,

    densities :math:`\rho^{(t)}_{i,c} = w_{i,c} \sum_a (\sum_k \Psi^{(t)}_{i,a,k} W^{(t)}_{l(a),k,c})^2`,
    and the energy :math:`E = \sum_i E^0_{Z_i} + s\,\Phi(\rho^{(T)}_i) + b`.

    Differences from the authors' reference code (spec §9), each changing results:

    * species enter through the one-hot ordered pair (:math:`Z_i`, :math:`Z_j`), an injective encoding;
      the reference's :math:`Z_iZ_j/(Z_i+Z_j)` maps (C, Mg) and (O, O) to the same value;
    * per-element reference energies :math:`E^0_Z` and an energy scale s and per-atom shift b, set
      from data (:meth:`set_energy_statistics`); the reference gives every isolated atom the same energy;
    * initialisation does not depend on padding-buffer sizes, T or L: coefficients and centre weights
      start from N(0, 1), message nets from zero output, contraction weights from N(0, 1/K), Gaussian
      centres spread over [0, r_c];
    * optional division of each aggregated orbital by the average neighbour count ``avg_num_neighbors``
      (a constant, so equivariance is kept): the passed orbitals then do not grow like
      :math:`(\sum_j f)^t` in dense systems.

    The constructor's defaults are the paper's model (``model=equireann_paper``); the recommended recipe
    (``model=equireann``, docs/accuracy.md) adds ``density_invariants="cubic"`` and ``mlp_activation="silu"``:
    about 40 % lower force errors at equal optimiser steps on rMD17 aspirin.

    Args:
        cutoff: cutoff radius r_c (Å).
        max_l: highest angular degree L.
        num_radial: number of Gaussians K.
        num_channels: width C of the density vector.
        num_iterations: number of message-passing iterations T.
        equivariant_passing: pass the neighbours' orbitals on (False gives the zero-parameter
            invariant ablation with identical parameters and initial weights).
        avg_num_neighbors: if given, aggregated orbitals are divided by it.
        elements: atomic numbers the model accepts (all if None); other elements raise an error.
        angular: ``"spherical"`` or ``"cartesian"`` (REANN's tensor powers of the raw edge vector).
        species_embedding: ``"pair"`` (MLP of the element pair) or ``"neighbor"`` (tables indexed by
            the neighbour element, REANN).
        center_weight: multiply densities by the centre-element weight :math:`w_i`.
        shared_contraction: one contraction W for all iterations (REANN) instead of one per iteration.
        per_element_readout / per_element_messages: one readout / message MLP per element (REANN);
            needs ``elements``.
        density_invariants: the invariants each iteration makes of its contracted orbital
            (:class:`~pyg_equireann.nn.conv.OrbitalContraction`): ``"norm"`` (the paper's squared norm, C per
            atom), ``"degree"`` (one squared norm per degree, (L+1)·C) or ``"cubic"`` (those and the
            four-body Gaunt triple products).
        embedding_hidden, message_hidden, readout_hidden: hidden widths of the MLPs.
        layer_norm: LayerNorm inside the message and readout MLPs.
        mlp_activation: activation of the message and readout MLPs, ``"scaled_silu"`` (the reference's,
            almost linear at initialisation) or ``"silu"``.
        neighbor_backend: ``"auto"``, ``"torch"``, ``"torch_cluster"``, ``"vesin"`` or ``"vesin_torch"``
            (:mod:`~pyg_equireann.graph.neighbors`; ``"auto"`` keeps CUDA positions on the GPU).
        learnable_passing: multiply the passed orbital by a learned weight per iteration, degree and
            radial channel (an extension of the paper: :class:`EquiREANNConv`).
        passing_init: initial learned passing weights, ``"ones"`` (the paper's model) or
            ``"alternating"`` (+1, −1, … over the radial channels), times ``passing_gain``.
        passing_gain: initial magnitude of the learned passing weights (and hop gains).
        passing_hops: orbital hops per iteration (1: the paper's model); P > 1 adds P − 1 parameter-free
            hops with a learned gain per hop, degree and radial channel to iterations 1..T, so orientations
            travel P bonds per iteration: receptive field (T·P + 1)·r_c (:class:`EquiREANNConv`, docs/nonlocal.md).
        passing_norm: hop weight f(d_ij) / (ε + Σ_k f(d_ik)) instead of f(d_ij)/n̄: no damping per bond.
        passing_norm_eps: ε of ``passing_norm`` (and of the non-backtracking hops).
        passing_hop_channels: the hops move only the first K' radial channels (None: all), at K'/K of the cost.
        passing_hop_cutoff: r_hop (Å): the hops run only on the edges shorter than r_hop (the bonds), with weight
            f(d; r_hop) instead of f(d; r_c) (None: every edge, f(d; r_c)). Orientations travel along bonds; in
            dense matter most of the r_c edges are not bonds (water at r_c = 4 Å: 26 edges per atom, 2.4 within
            2 Å), so the hops cost a fraction. Smooth at r_hop (the weight and its derivatives vanish there).
            The short list is a ``nonzero`` (one host sync); on CUDA (:attr:`compact_hop_edges` None) the hops
            run on every edge with that weight instead, the same numbers with no host sync.
        passing_hop_tied_gain: one learned hop gain per iteration, degree and channel shared by all P − 1 hops
            (instead of one per hop), so that an orientation changes by the same factor at every bond.
        elastic_channels: K_e > 0 adds the elastic orbital energy
            (:class:`~pyg_equireann.nn.elastic.OrbitalElasticity`): the first K_e radial channels of Ψ⁽ᵀ⁾, anchored
            to each atom with a learned stiffness, are relaxed along the bonds, and each atom's share of the elastic
            energy per degree and channel enters its energy linearly (learned weights, zero at initialisation).
            Along a chain this is a series of springs: a twist's energy falls as 1/length and reaches the whole
            chain (docs/nonlocal.md). None: off (the paper's model).
        elastic_iterations: the most conjugate-gradient steps of the relaxation (each reaches one bond further).
        elastic_tolerance: on a CPU, stop the relaxation once every residual is below this fraction of its
            first (one host sync per step; the energy is then within ~tolerance² of the minimum); None, on CUDA
            and under ``torch.compile``: every step runs.
        elastic_cutoff: r_b (Å), the bonds: edges shorter than r_b with weight f(d; r_b).
        elastic_min_anchor: floor of the learned anchor stiffness (along a chain anchored at the floor the field decays
            over ~(s w / a_min)^½ bonds; 10⁻⁵ transferred no better than 10⁻³ on cumulenes, docs/nonlocal.md).
        elastic_initial_anchor: every anchor's stiffness at initialisation (None: ≈ 0.69, softplus(0)).
        elastic_anchor_per_degree: one learned anchor per degree and channel (each degree relaxed as its own system)
            instead of one per channel.
        elastic_terminal_anchor: a_t: a fixed anchor stiffness added in proportion to how terminal an atom is
            (1 when its bonds all point one way, an H; :func:`~pyg_equireann.nn.elastic.terminal_index`), so a
            chain's ends stay pinned however the learned anchors go (None: off).
        elastic_learned_anchors: False: no anchor network, anchors a_min + a_t τ only (needs elastic_terminal_anchor).
        elastic_dense_max_atoms: on a CPU, eagerly, graphs of at most this many atoms are relaxed exactly by one
            batched dense solve (faster than the conjugate-gradient steps on molecules; 0: always the steps).
        passing_nonbacktracking: with ``passing_hops`` ≥ 3, the intermediate hops run on directed edges and never
            hand an orbital straight back, each normalised over the sender's other edges: an orientation travels
            along a chain with weight ≈ 1 per bond instead of spreading both ways (:class:`EquiREANNConv`).
        compile: compute energy and forces (and stress) with ``torch.compile`` as one graph, in training too
            (:func:`~pyg_equireann.graph.forces.compiled_derivatives`; ``model.compile=true`` in a config). The
            first call of each kind compiles (about a minute on a CPU); same results as eager to rounding.

    Input checks (:meth:`check_inputs`: unknown elements, non-finite positions, atoms closer than
    :attr:`min_distance` Å, 0 disables the distance check) run where data enters: when the model builds
    its own neighbour list (``edge_index=None``), in :func:`~pyg_equireann.graph.forces.energy_forces_stress`,
    the data modules, the ASE calculator and the exported-model wrapper, each with one host sync. With a
    neighbour list given, :meth:`forward` neither checks nor synchronises with the host (pass ``num_graphs``
    too): the path that training, ``torch.compile`` and ``torch.export`` take (on a CPU, ``passing_hop_cutoff``
    adds one: :attr:`compact_hop_edges`).
    """

    min_distance: float = MIN_DISTANCE
    # passing_hop_cutoff (and elastic_cutoff): hops (bonds) on the edges shorter than r_hop only (True), or on every
    # edge with weight f(d; r_hop), 0 beyond (False); the same numbers. None: True on a CPU (fewer edges), False on
    # CUDA (no sync)
    compact_hop_edges: Optional[bool] = None
    caches_graph = True
    supports_pbc = True
    calibrates_densities = True
    deployable = True

    def __init__(
        self,
        cutoff: float = 4.0,
        max_l: int = 2,
        num_radial: int = 8,
        num_channels: int = 36,
        num_iterations: int = 2,
        equivariant_passing: bool = True,
        avg_num_neighbors: Optional[float] = None,
        elements: Optional[Sequence[int]] = None,
        angular: str = "spherical",
        species_embedding: str = "pair",
        center_weight: bool = True,
        shared_contraction: bool = False,
        per_element_readout: bool = False,
        per_element_messages: bool = False,
        density_invariants: str = "norm",
        embedding_hidden: Sequence[int] = (8, 8),
        message_hidden: Sequence[int] = (64, 64),
        readout_hidden: Sequence[int] = (64, 64),
        layer_norm: bool = False,
        mlp_activation: str = "scaled_silu",
        neighbor_backend: str = "auto",
        learnable_passing: bool = False,
        passing_init: str = "ones",
        passing_gain: float = 1.0,
        passing_hops: int = 1,
        passing_norm: bool = False,
        passing_norm_eps: float = 0.1,
        passing_nonbacktracking: bool = False,
        passing_hop_channels: Optional[int] = None,
        passing_hop_cutoff: Optional[float] = None,
        passing_hop_tied_gain: bool = False,
        elastic_channels: Optional[int] = None,
        elastic_iterations: int = 32,
        elastic_tolerance: Optional[float] = 1e-4,
        elastic_cutoff: float = 2.0,
        elastic_min_anchor: float = 1e-3,
        elastic_dense_max_atoms: int = 256,
        elastic_initial_anchor: Optional[float] = None,
        elastic_anchor_per_degree: bool = False,
        elastic_terminal_anchor: Optional[float] = None,
        elastic_learned_anchors: bool = True,
        compile: bool = False,
    ):
        super().__init__()
        if num_iterations < 0:
            raise ValueError(f"num_iterations must be >= 0, got {num_iterations}")
        if species_embedding not in ("pair", "neighbor"):
            raise ValueError(f"species_embedding must be 'pair' or 'neighbor', got {species_embedding!r}")
        if (per_element_readout or per_element_messages) and elements is None:
            raise ValueError("per-element readout or message networks need `elements` (a list of atomic numbers)")
        if learnable_passing and not equivariant_passing:
            raise ValueError("learnable_passing=True needs equivariant_passing=True (there is nothing to weight)")
        if (passing_hops != 1 or passing_norm) and not equivariant_passing:
            raise ValueError("passing_hops > 1 and passing_norm need equivariant_passing=True (nothing is passed)")
        if passing_hops < 1:
            raise ValueError(f"passing_hops must be >= 1, got {passing_hops}")
        if not passing_norm_eps > 0:
            raise ValueError(f"passing_norm_eps must be positive, got {passing_norm_eps}")
        if passing_init not in ("ones", "alternating"):
            raise ValueError(f"passing_init must be 'ones' or 'alternating', got {passing_init!r}")
        if passing_hop_cutoff is not None:
            if passing_hops < 2:
                raise ValueError(f"passing_hop_cutoff needs passing_hops >= 2 (it is the hops' edge list), "
                                 f"got passing_hops={passing_hops}")
            if not 0 < passing_hop_cutoff <= cutoff:
                raise ValueError(f"passing_hop_cutoff must be in (0, cutoff={cutoff}] Å, got {passing_hop_cutoff}")
        if elastic_channels is not None:
            if not 1 <= elastic_channels <= num_radial:
                raise ValueError(f"elastic_channels must be in 1..num_radial={num_radial}, got {elastic_channels}")
            if not 0 < elastic_cutoff <= cutoff:
                raise ValueError(f"elastic_cutoff must be in (0, cutoff={cutoff}] Å, got {elastic_cutoff}")
        if avg_num_neighbors is not None and not avg_num_neighbors > 0:
            raise ValueError(f"avg_num_neighbors must be positive, got {avg_num_neighbors}")
        self.cutoff = float(cutoff)
        self.max_l = int(max_l)
        self.num_radial = int(num_radial)
        self.num_channels = int(num_channels)
        self.num_iterations = int(num_iterations)
        self.equivariant_passing = bool(equivariant_passing)
        self.learnable_passing = bool(learnable_passing)
        self.passing_hops = int(passing_hops)
        self.passing_norm = bool(passing_norm)
        self.neighbor_backend = neighbor_backend
        self.compile_forces = bool(compile)
        self.elements = None if elements is None else sorted(int(e) for e in set(elements))

        self.register_buffer("element_mask", element_mask(self.elements))
        # species_slot[Z]: the index of element Z among the species tables (and the per-element networks)
        species, species_slot = species_table(self.elements)
        self.register_buffer("species", species, persistent=False)
        self.register_buffer("species_slot", species_slot, persistent=False)
        self.register_buffer("avg_num_neighbors", torch.tensor(float(avg_num_neighbors or 1.0)))

        self.cutoff_fn = CosineCutoff(cutoff)
        self.angular = AngularBasis(max_l, angular)
        if species_embedding == "pair":
            self.species_embedding = PairEmbedding(num_radial, cutoff, embedding_hidden, layer_norm=True)
        else:
            self.species_embedding = NeighborTableEmbedding(num_radial, cutoff)
        self.center_weight = CenterWeight(num_channels, embedding_hidden) if center_weight else None

        degrees = self.angular.degrees
        if density_invariants == "cubic" and angular != "spherical":
            raise ValueError("density_invariants='cubic' needs angular='spherical' (Gaunt couplings)")
        num_contractions = 1 if shared_contraction else num_iterations + 1
        contractions = [OrbitalContraction(degrees, num_radial, num_channels, density_invariants)
                        for _ in range(num_contractions)]
        self.density_invariants = density_invariants
        self.num_density_groups = contractions[0].num_groups
        # ρ⁽ᵗ⁾ is divided by density_scale[t] (per invariant group when there are several; 1 until
        # calibrate_density_scale sets it from data)
        shape = (num_iterations + 1,) if self.num_density_groups == 1 else (num_iterations + 1, self.num_density_groups)
        self.register_buffer("density_scale", torch.ones(shape))
        density_width = num_channels * self.num_density_groups

        def make_mlp(in_features, hidden, out_features, per_element):
            if per_element:
                return ElementMLPs(len(self.elements), in_features, hidden, out_features, layer_norm,
                                   activation=mlp_activation)
            return _SharedMLP(in_features, hidden, out_features, layer_norm, activation=mlp_activation)

        self.convs = nn.ModuleList()
        for t in range(num_iterations + 1):
            self.convs.append(
                EquiREANNConv(
                    contractions[0 if shared_contraction else t],
                    make_mlp(density_width, message_hidden, num_radial, per_element_messages) if t > 0 else None,
                    equivariant_passing,
                    degrees=degrees,
                    num_radial=num_radial,
                    learnable_passing=learnable_passing,
                    passing_init=passing_init,
                    passing_gain=passing_gain,
                    passing_hops=passing_hops,
                    passing_norm=passing_norm,
                    passing_norm_eps=passing_norm_eps,
                    passing_nonbacktracking=passing_nonbacktracking,
                    passing_hop_channels=passing_hop_channels,
                    passing_hop_tied_gain=passing_hop_tied_gain,
                )
            )
        self.readout = make_mlp(density_width, readout_hidden, 1, per_element_readout)
        # the convolutions decide (P ≥ 3, not iteration 0); compute() then builds the reverse-edge index once
        self.passing_nonbacktracking = any(conv.nonbacktracking for conv in self.convs)
        uses_hops = any(conv.hop_gain is not None for conv in self.convs)
        self.hop_cutoff_fn = CosineCutoff(passing_hop_cutoff) if passing_hop_cutoff is not None and uses_hops else None
        self.elastic: Optional[OrbitalElasticity] = None
        self.elastic_cutoff_fn: Optional[CosineCutoff] = None
        if elastic_channels is not None:
            self.elastic = OrbitalElasticity(degrees, elastic_channels, density_width, iterations=elastic_iterations,
                                             min_anchor=elastic_min_anchor, activation=mlp_activation,
                                             tolerance=elastic_tolerance, dense_max_atoms=elastic_dense_max_atoms,
                                             initial_anchor=elastic_initial_anchor,
                                             anchor_per_degree=elastic_anchor_per_degree,
                                             terminal_anchor=elastic_terminal_anchor,
                                             learned_anchors=elastic_learned_anchors)
            self.elastic_cutoff_fn = CosineCutoff(elastic_cutoff)
            width = self.elastic.num_degrees * elastic_channels
            # e / elastic_scale (1 until calibrate_density_scale sets the RMS), times learned weights γ
            self.register_buffer("elastic_scale", torch.ones(width))
            self.elastic_weight = nn.Parameter(torch.zeros(width))

    @torch.no_grad()
    def calibrate_density_scale(self, batches) -> Tensor:
        """Set ``density_scale[t]`` to the root-mean-square of ρ⁽ᵗ⁾ (of each invariant group) over ``batches``
        (objects with ``z``, ``pos``, ``batch`` and optionally ``cell``, ``pbc``, ``edge_index``, ``cell_offsets``),
        so that the message and readout networks start with O(1) inputs. A fixed constant per iteration (and
        group): invariance, smoothness and the cutoff behaviour are unchanged. Returns the scales."""
        batches = list(batches)
        self.density_scale.fill_(1.0)
        for t in range(self.num_iterations + 1):
            total, count = 0.0, 0
            for b in batches:
                densities = self.compute(b.z, b.pos, b.batch, getattr(b, "cell", None), getattr(b, "pbc", None),
                                         **_graph_kwargs(b))["densities"]
                grouped = densities[t].double().view(densities[t].shape[0], self.num_density_groups, -1)
                total = total + grouped.square().sum((0, 2))
                count += grouped.shape[0] * grouped.shape[2]
            rms = (total / max(count, 1)).sqrt().to(self.density_scale.dtype)
            scale = torch.where(rms > 0, rms, torch.ones_like(rms))
            self.density_scale[t] = scale.view(self.density_scale[t].shape)
        if self.elastic is not None:
            self.elastic_scale.fill_(1.0)
            total, count = 0.0, 0
            for b in batches:
                energies = self.compute(b.z, b.pos, b.batch, getattr(b, "cell", None), getattr(b, "pbc", None),
                                        **_graph_kwargs(b))["elastic_energies"]
                total = total + energies.double().square().sum(0)
                count += energies.shape[0]
            rms = (total / max(count, 1)).sqrt().to(self.elastic_scale.dtype)
            self.elastic_scale.copy_(torch.where(rms > 0, rms, torch.ones_like(rms)))
        return self.density_scale.clone()

    @torch.no_grad()
    def set_energy_statistics(self, atomic_energies: Union[Dict[int, float], Tensor, None] = None,
                              scale: Optional[float] = None, shift: Optional[float] = None,
                              avg_num_neighbors: Optional[float] = None) -> None:
        """As :meth:`~pyg_equireann.nn.readout.EnergyReference.set_energy_statistics`, and optionally the
        average neighbour count that divides the aggregated orbitals (so ``**compute_statistics(...)`` fits)."""
        super().set_energy_statistics(atomic_energies, scale, shift)
        if avg_num_neighbors is not None:
            self.avg_num_neighbors.fill_(float(avg_num_neighbors))

    def known_elements(self) -> Optional[List[int]]:
        """The ``elements`` the model was built for (None: any element)."""
        return self.elements

    def build_graph(self, pos: Tensor, batch: Optional[Tensor] = None, cell: Optional[Tensor] = None,
                    pbc: Optional[Tensor] = None):
        """Neighbour list within the cutoff (:func:`~pyg_equireann.graph.edges.ensure_graph`): edge_index
        (2, E) and integer cell offsets (E, 3) or None."""
        return ensure_graph(pos, self.cutoff, batch, cell, pbc, backend=self.neighbor_backend)

    def forward(
        self,
        z: Tensor,
        pos: Tensor,
        batch: Optional[Tensor] = None,
        cell: Optional[Tensor] = None,
        pbc: Optional[Tensor] = None,
        edge_index: Optional[Tensor] = None,
        edge_shift: Optional[Tensor] = None,
        num_graphs: Optional[int] = None,
    ) -> Tensor:
        """Energy of each graph.

        Args:
            z: (N,) atomic numbers.
            pos: (N, 3) positions (Å).
            batch: (N,) graph index of each atom, sorted (default: one graph).
            cell: (B, 3, 3) or (3, 3) lattice vectors as rows (Å), for periodic systems.
            pbc: (B, 3) or (3,) periodic directions (default all True when a cell is given).
            edge_index: (2, E) precomputed neighbour list [neighbour j, centre i]; built when None.
            edge_shift: (E, 3) Cartesian image shifts S_ij (Å) for a precomputed periodic list.
            num_graphs: B; default the number of cells, else ``batch.max() + 1`` (a host sync).

        Returns:
            (B,) energies in float64 (eV when trained on eV).

        Without ``edge_index`` the inputs are checked (:meth:`check_inputs`) and the neighbour list is built;
        with it (and ``num_graphs``) nothing is checked and nothing synchronises with the host.
        """
        return self.compute(z, pos, batch, cell, pbc, edge_index, edge_shift, num_graphs)["energy"]

    def check_inputs(self, z: Tensor, pos: Tensor, batch: Optional[Tensor] = None,
                     edge_index: Optional[Tensor] = None, edge_shift: Optional[Tensor] = None) -> None:
        """Raise a ValueError naming the atom for an atomic number the model was not built for, a
        non-finite position, or an edge of ``edge_index`` (2, E) shorter than :attr:`min_distance` (Å) or
        not finite (``edge_shift`` (E, 3) tells periodic images apart). One host sync when all is well."""
        check_inputs(z, pos, self.element_mask, batch, edge_index, edge_shift, self.min_distance)

    def compute(
        self,
        z: Tensor,
        pos: Tensor,
        batch: Optional[Tensor] = None,
        cell: Optional[Tensor] = None,
        pbc: Optional[Tensor] = None,
        edge_index: Optional[Tensor] = None,
        edge_shift: Optional[Tensor] = None,
        num_graphs: Optional[int] = None,
    ) -> Dict[str, Union[Tensor, List[Tensor]]]:
        """As :meth:`forward`, but returns a dict with ``energy`` (B,), ``atomic_energies`` (N,),
        ``node_orbitals`` [Ψ⁽⁰⁾…Ψ⁽ᵀ⁾] (N, A, K), ``densities`` [ρ⁽⁰⁾…] (N, C), ``edge_coefficients``
        [c⁽⁰⁾…] (E, K), ``edge_index`` and ``edge_vectors`` (E, 3); with ``elastic_channels`` also
        ``elastic_energies`` (N, (L+1)·K_e), each atom's elastic energy per degree and channel before scaling."""
        if pos.dim() != 2 or pos.shape[-1] != 3:
            raise ValueError(f"pos must have shape (N, 3), got {tuple(pos.shape)}")
        if z.shape != pos.shape[:1]:
            raise ValueError(f"z has shape {tuple(z.shape)} but pos has {pos.shape[0]} atoms")
        z = z.long()
        num_atoms = pos.shape[0]
        if batch is None:
            batch = torch.zeros(num_atoms, dtype=torch.long, device=pos.device)
        if num_graphs is None:
            if cell is not None and cell.dim() == 3:
                num_graphs = cell.shape[0]
            else:
                num_graphs = int(batch.max()) + 1 if num_atoms else 1
        if edge_index is None:  # an entry point: check, then build the neighbour list
            edge_index, cell_offsets = self.build_graph(pos, batch, cell, pbc)
            if cell_offsets is not None:
                edge_shift = image_shifts(edge_index, cell_offsets, cell.view(-1, 3, 3), batch)
            self.check_inputs(z, pos, batch, edge_index, edge_shift)
        vectors = edge_vectors(pos, edge_index, edge_shift)
        edge_lengths = torch.linalg.vector_norm(vectors, dim=-1)

        species, atom_species = self.species, self.species_slot.index_select(0, z)
        coefficients, alpha, mu = self.species_embedding(species, atom_species, edge_index)
        edge_cutoff = self.cutoff_fn(edge_lengths)
        radial = torch.exp(-(alpha * (edge_lengths.unsqueeze(-1) - mu)).square())  # (E, K)
        angular = self.angular(vectors, edge_lengths) * edge_cutoff.unsqueeze(-1)  # (E, A)
        edge_orbitals = angular.unsqueeze(-1) * radial.unsqueeze(1)  # (E, A, K)
        center_weight = None
        if self.center_weight is not None:
            center_weight = self.center_weight(species, atom_species)
        element_index = atom_species  # per-element networks need `elements`: their slots are the species'
        inv_n = self.avg_num_neighbors.reciprocal()

        compact = self.compact_hop_edges if self.compact_hop_edges is not None else not pos.is_cuda

        def short_edges(cutoff_fn: CosineCutoff):
            """(edge_index, weight f(d; r)) of the edges shorter than r, and their shifts; with ``compact`` False
            every edge (weight 0 beyond r: the same numbers, no host sync)."""
            if not compact:
                return (edge_index, cutoff_fn(edge_lengths)), edge_shift
            keep = torch.nonzero(edge_lengths.detach() < cutoff_fn.cutoff).squeeze(1)
            shift = None if edge_shift is None else edge_shift.index_select(0, keep)
            return (edge_index.index_select(1, keep), cutoff_fn(edge_lengths.index_select(0, keep))), shift

        hop_edges, hop_index, hop_shift = None, edge_index, edge_shift
        if self.hop_cutoff_fn is not None:  # the hops' edges and weights f(d; r_hop), 0 beyond r_hop
            hop_edges, hop_shift = short_edges(self.hop_cutoff_fn)
            hop_index = hop_edges[0]
        reverse = reverse_edges(hop_index, num_atoms, hop_shift) if self.passing_nonbacktracking else None
        node_orbitals, density = None, None
        orbitals_list, density_list, coefficient_list = [], [], []
        for t, conv in enumerate(self.convs):
            node_orbitals, density, coefficients = conv(
                edge_index, edge_orbitals, edge_cutoff, coefficients, center_weight,
                node_orbitals, density, element_index, inv_n, num_atoms, reverse, hop_edges,
            )
            density = (density.view(num_atoms, self.num_density_groups, -1)
                       / self.density_scale[t].view(-1, 1)).view(num_atoms, -1)
            orbitals_list.append(node_orbitals)
            density_list.append(density)
            coefficient_list.append(coefficients)

        readout = self.readout(density, element_index).squeeze(-1)
        elastic_energies = None
        if self.elastic is not None:
            if self.hop_cutoff_fn is not None and self.hop_cutoff_fn.cutoff == self.elastic_cutoff_fn.cutoff:
                bonds = hop_edges
            else:
                bonds = short_edges(self.elastic_cutoff_fn)[0]
            relaxed = node_orbitals[..., :self.elastic.num_channels].contiguous()
            terminal = None
            if self.elastic.terminal_anchor is not None:  # on every edge: weight 0 beyond r_b, no host sync
                terminal = terminal_index(vectors, self.elastic_cutoff_fn(edge_lengths), edge_index[1], num_atoms)
            elastic_energies = self.elastic(relaxed, density, bonds[0], bonds[1], batch, num_graphs,
                                            terminal).flatten(1)
            readout = readout + (elastic_energies / self.elastic_scale) @ self.elastic_weight
        atomic, energy = self.total_energy(z, readout, batch, num_graphs)
        result = {
            "energy": energy,
            "atomic_energies": atomic,
            "node_orbitals": orbitals_list,
            "densities": density_list,
            "edge_coefficients": coefficient_list,
            "edge_index": edge_index,
            "edge_vectors": vectors,
        }
        if elastic_energies is not None:
            result["elastic_energies"] = elastic_energies  # (N, (L+1)·K_e), before elastic_scale
        return result

    def extra_repr(self) -> str:
        return (
            f"cutoff={self.cutoff}, max_l={self.max_l}, num_radial={self.num_radial}, "
            f"num_channels={self.num_channels}, num_iterations={self.num_iterations}, "
            f"equivariant_passing={self.equivariant_passing}, learnable_passing={self.learnable_passing}, "
            f"density_invariants={self.density_invariants!r}"
            + (f", passing_hops={self.passing_hops}" if self.passing_hops > 1 else "")
            + (", passing_norm=True" if self.passing_norm else "")
            + (", passing_nonbacktracking=True" if self.passing_nonbacktracking else "")
            + (f", passing_hop_cutoff={self.hop_cutoff_fn.cutoff}" if self.hop_cutoff_fn is not None else "")
            + (f", elastic_channels={self.elastic.num_channels}" if self.elastic is not None else "")
            + (", compile=True" if self.compile_forces else "")
        )
