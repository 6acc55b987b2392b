"""Apply activation checkpointing, compilation and FSDP2 sharding to models from the outside.

Order matters and is fixed (torchtitan's rule): activation checkpointing -> ``torch.compile`` per
block -> ``fully_shard`` per block -> ``fully_shard`` on the root. Model files never know about any of
this. In a single process without CUDA, only compilation (if asked) applies.
"""

from __future__ import annotations

import torch
from torch import nn


def apply_activation_checkpointing(backbone: nn.Module) -> None:
    """Recompute each block's activations in backward (trades ~30% compute for memory)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(backbone.blocks):
        backbone.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=True)


def apply_compile(backbone: nn.Module) -> None:
    """Compile each transformer block separately: small graphs, shared across crop sizes via dynamic shapes."""
    for block in backbone.blocks:
        block.compile(dynamic=False)


def fsdp_mixed_precision(param_dtype: torch.dtype | None, reduce_dtype: torch.dtype = torch.float32):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)


def apply_fsdp(
    modules: nn.ModuleDict, *, mesh, param_dtype: torch.dtype | None, reshard_after_forward: bool = True
) -> None:
    """Shard every block of the backbone and each head with FSDP2 ``fully_shard``, then each root."""
    from torch.distributed.fsdp import fully_shard

    kwargs = dict(mesh=mesh, mp_policy=fsdp_mixed_precision(param_dtype), reshard_after_forward=reshard_after_forward)
    for module in modules.values():
        if hasattr(module, "blocks"):
            for block in module.blocks:
                fully_shard(block, **kwargs)
        fully_shard(module, **kwargs)


def parallelize_ssl_model(
    model: nn.Module,
    *,
    mesh=None,
    compile_blocks: bool,
    activation_checkpointing: bool,
    param_dtype: torch.dtype | None,
) -> None:
    """Prepare ``SSLMetaArch`` student and teacher in the documented order; ``mesh`` set means shard (FSDP2)."""
    for part in (model.student, model.teacher):
        if activation_checkpointing and part is model.student:
            apply_activation_checkpointing(part.backbone)
        if compile_blocks:
            apply_compile(part.backbone)
    if mesh is not None:
        apply_fsdp(model.student, mesh=mesh, param_dtype=param_dtype)
        apply_fsdp(model.teacher, mesh=mesh, param_dtype=param_dtype)
