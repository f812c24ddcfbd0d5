"""Readout: densities → atomic energies. Feed-forward networks (:class:`MLP`, one per element in
:class:`ElementMLPs`, spec §3) and the energy reference :class:`EnergyReference` (per-element E⁰, scale s and
shift b: E_i = E⁰[Z_i] + s·ε_i + b, summed per structure in float64), shared by EquiREANN and the model
adapters."""
from typing import Dict, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from pyg_equireann.nn.elements import MAX_Z


# ------------------------------------------------------------------------------------- networks
class ScaledSiLU(nn.Module):
    r"""The reference's "Relu_like" activation :math:`y = a \odot \mathrm{SiLU}(b \odot x)` with
    learnable per-unit vectors ``a`` (init 1) and ``b`` (init 1/fan-in of the preceding layer), so that
    each network starts almost linear."""

    def __init__(self, width: int, fan_in: int):
        super().__init__()
        self.fan_in = fan_in
        self.alpha = nn.Parameter(torch.ones(width))
        self.beta = nn.Parameter(torch.full((width,), 1.0 / fan_in))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.alpha)
        nn.init.constant_(self.beta, 1.0 / self.fan_in)

    def forward(self, x: Tensor) -> Tensor:
        return self.alpha * nn.functional.silu(self.beta * x)


ACTIVATIONS = ("scaled_silu", "silu")


def _activation(kind: str, width: int, fan_in: int) -> nn.Module:
    if kind == "scaled_silu":
        return ScaledSiLU(width, fan_in)
    if kind == "silu":
        return nn.SiLU()
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {kind!r}")


class MLP(nn.Sequential):
    """``Linear(n0, h1) → [act → (LayerNorm) → Linear]… → act → Linear(h_p, out)`` (spec §3.2).

    Hidden layers use Xavier-normal weights. The output layer starts with zero weights and a
    prescribed bias (``output_bias``, a scalar or a (out,) tensor), as in the reference: every input
    then gets the same output at initialisation, and training moves away from it.

    Args:
        in_features: input width n0.
        hidden: hidden widths [h1, …, hp] (at least one).
        out_features: output width.
        layer_norm: insert LayerNorm after each inner activation.
        output_bias: initial bias of the output layer (default 0); the public attribute
            ``output_bias`` is what :meth:`reset_parameters` restores (owners set it, then reset).
        activation: ``"scaled_silu"`` (:class:`ScaledSiLU`, the reference's: starts almost linear) or
            ``"silu"`` (plain SiLU: non-linear from the first step).
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        out_features: int,
        layer_norm: bool = False,
        output_bias: Optional[Tensor] = None,
        activation: str = "scaled_silu",
    ):
        hidden = list(hidden)
        if not hidden:
            raise ValueError("an MLP needs at least one hidden layer")
        layers = [nn.Linear(in_features, hidden[0])]
        widths = [in_features] + hidden
        for q in range(1, len(hidden)):
            layers.append(_activation(activation, hidden[q - 1], widths[q - 1]))
            if layer_norm:
                layers.append(nn.LayerNorm(hidden[q - 1]))
            layers.append(nn.Linear(hidden[q - 1], hidden[q]))
        layers.append(_activation(activation, hidden[-1], widths[-2]))
        layers.append(nn.Linear(hidden[-1], out_features))
        super().__init__(*layers)
        self.output_bias = output_bias
        self.reset_parameters()

    def reset_parameters(self) -> None:
        linears = [m for m in self if isinstance(m, nn.Linear)]
        for layer in linears[:-1]:
            nn.init.xavier_normal_(layer.weight)
            fan_in = layer.weight.shape[1]
            nn.init.uniform_(layer.bias, -(fan_in**-0.5), fan_in**-0.5)
        out = linears[-1]
        nn.init.zeros_(out.weight)
        with torch.no_grad():
            if self.output_bias is None:
                out.bias.zero_()
            else:
                out.bias.copy_(torch.as_tensor(self.output_bias, dtype=out.bias.dtype))
        for m in self:
            if isinstance(m, (ScaledSiLU, nn.LayerNorm)):
                m.reset_parameters()


class ElementMLPs(nn.Module):
    """One MLP per element, each applied to the rows of its element (REANN's per-element nets).

    Args:
        num_elements: number of element slots.
        in_features, hidden, out_features, layer_norm, output_bias, activation: as for :class:`MLP`.
    """

    def __init__(self, num_elements: int, in_features: int, hidden: Sequence[int], out_features: int,
                 layer_norm: bool = False, output_bias: Optional[Tensor] = None, activation: str = "scaled_silu"):
        super().__init__()
        self.out_features = out_features
        self.nets = nn.ModuleList(
            [MLP(in_features, hidden, out_features, layer_norm, output_bias, activation) for _ in range(num_elements)]
        )

    def forward(self, x: Tensor, element_index: Tensor) -> Tensor:
        """x (N, in), element_index (N,) in [0, num_elements) → (N, out)."""
        # every net on every row, then each row's own: no data-dependent shapes (sync-free, compilable)
        outputs = torch.stack([net(x) for net in self.nets])  # (S, N, out)
        index = element_index.view(1, -1, 1).expand(1, x.shape[0], self.out_features)
        return outputs.gather(0, index).squeeze(0)


# ----------------------------------------------------------------------------- energy reference
class EnergyReference(nn.Module):
    """Holds E0 per element (float64, also in float32 models), an energy scale s and a per-atom
    shift b, so that E = Σ_i E0[Z_i] + s·ε_i + b for a model's raw atomic outputs ε_i."""

    def __init__(self):
        super().__init__()
        self.register_buffer("atomic_energies", torch.zeros(MAX_Z + 1, dtype=torch.float64))
        self.register_buffer("energy_scale", torch.tensor(1.0))
        self.register_buffer("energy_shift", torch.tensor(0.0))

    def _apply(self, fn, recurse=True):
        # Keep the reference energies in float64 through .float()/.half()/.to(dtype): totals are
        # ~1e4 eV while errors are meV.
        atomic_energies = self.atomic_energies
        super()._apply(fn, recurse)
        self.atomic_energies = atomic_energies.to(self.atomic_energies.device, torch.float64)
        return self

    @torch.no_grad()
    def set_energy_statistics(
        self,
        atomic_energies: Union[Dict[int, float], Tensor, None] = None,
        scale: Optional[float] = None,
        shift: Optional[float] = None,
    ) -> None:
        """Set per-element reference energies E0 ({Z: eV} or a (119,) tensor), the energy scale s (eV)
        and per-atom shift b (eV), e.g. from :func:`pyg_equireann.training.statistics.compute_statistics`."""
        if atomic_energies is not None:
            if isinstance(atomic_energies, dict):
                for z, e0 in atomic_energies.items():
                    self.atomic_energies[int(z)] = float(e0)
            else:
                self.atomic_energies.copy_(torch.as_tensor(atomic_energies))
        if scale is not None:
            self.energy_scale.fill_(float(scale))
        if shift is not None:
            self.energy_shift.fill_(float(shift))

    def total_energy(self, z: Tensor, raw_atomic: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
        """Atomic energies E0[Z_i] + s·ε_i + b (N,) and their per-graph sums (B,), in float64."""
        atomic = self.atomic_energies[z] + (self.energy_scale * raw_atomic + self.energy_shift).double()
        energy = torch.zeros(num_graphs, dtype=torch.float64, device=z.device).index_add_(0, batch, atomic)
        return atomic, energy
