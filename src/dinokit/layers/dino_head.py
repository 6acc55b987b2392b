"""DINO projection head: MLP -> L2 normalisation -> weight-normalised prototype layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight ``g * v / ||v||`` (row-wise), i.e. ``weight_norm(..., dim=0)``.

    The parameter names ``weight_g`` (K, 1) and ``weight_v`` (K, in) are those of the legacy
    ``torch.nn.utils.weight_norm`` used by the official head, so its checkpoints load unchanged,
    without the deprecated hook (which neither compiles nor shards cleanly).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default init for v; g is then set to 1 (not to ||v||), as the official head does.
        nn.init.kaiming_uniform_(self.weight_v, a=5**0.5)
        nn.init.ones_(self.weight_g)

    def effective_weight(self) -> torch.Tensor:
        """(K, in): ``g * v / ||v||``, the matrix the layer multiplies by."""
        v = self.weight_v
        return v * (self.weight_g / torch.linalg.vector_norm(v, dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight())


class DINOHead(nn.Module):
    """``nlayers`` Linear(+GELU) layers to a ``bottleneck_dim`` code, L2-normalised, then K prototypes.

    Keys: ``mlp.{0,2,4}.{weight,bias}``, ``last_layer.weight_g``, ``last_layer.weight_v``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        mlp_bias: bool = True,
    ) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim, bias=mlp_bias)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=mlp_bias), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim, bias=mlp_bias), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=mlp_bias))
            self.mlp = nn.Sequential(*layers)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.init_weights()

    def init_weights(self) -> None:
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.last_layer.reset_parameters()

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> (..., bottleneck_dim): the L2-normalised code the prototypes score."""
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        return F.normalize(x, dim=-1, p=2, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.bottleneck(x))
