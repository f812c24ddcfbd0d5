"""The interface of the potentials trained here, and the capabilities that training, evaluation and
deployment read from them."""
import abc
from typing import List, Optional

from pyg_equireann.nn.readout import EnergyReference


class Potential(EnergyReference, abc.ABC):
    """Base of every trained potential: ``forward(z (N,), pos (N, 3) Å, batch (N,) = None, cell=None,
    pbc=None) -> (B,)`` float64 energies (eV), with the per-element reference energies, energy scale and
    shift of :class:`~pyg_equireann.nn.readout.EnergyReference`.

    Capabilities are class attributes (an adapter may set them per instance), read as ``model.<name>``
    rather than by probing for methods:

    * ``caches_graph``: ``forward`` also takes ``edge_index`` (2, E) and ``edge_shift`` (E, 3) Å, and the
      model has ``cutoff`` (Å), ``neighbor_backend`` and ``build_graph(pos, batch, cell, pbc)``. Training
      then uses the data module's cached neighbour list (its cutoff must equal the model's) and
      :func:`~pyg_equireann.graph.forces.energy_forces_stress`, which also gives the stress.
    * ``supports_pbc``: ``forward`` accepts periodic ``cell`` (B, 3, 3) Å and ``pbc`` (B, 3).
    * ``calibrates_densities``: ``calibrate_density_scale(batches)`` sets input scales from training
      batches once, before training.
    * ``deployable``: :class:`~pyg_equireann.deploy.export.ForceField` can export it.
    """

    caches_graph: bool = False
    supports_pbc: bool = False
    calibrates_densities: bool = False
    deployable: bool = False

    @abc.abstractmethod
    def known_elements(self) -> Optional[List[int]]:
        """Atomic numbers ``forward`` accepts (others raise a ValueError naming the atom); None: any."""
