"""Apply activation checkpointing, compilation and FSDP2 sharding to a task's modules from the outside.

Order matters and is fixed (torchtitan's rule): activation checkpointing -> ``torch.compile`` per
block -> ``fully_shard`` per block -> ``fully_shard`` on the root. Model files never know about any of
this. In a single process without CUDA, only compilation (if asked) applies.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

CHECKPOINT_POLICIES = ("full", "selective")


def saved_ops() -> list:
    """The operators whose outputs selective activation checkpointing keeps: the matrix products and the
    attention kernels (most of a block's compute). LayerNorms, GELU/SwiGLU, LayerScale, residual additions and
    dropouts (cheap, memory-bound) are recomputed in backward."""
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu")
    return [getattr(aten, name).default for name in names if hasattr(aten, name)]


def apply_activation_checkpointing(backbone: nn.Module, policy: str = "full") -> None:
    """Recompute each block's activations in backward: ``full`` keeps only the block's input (trades ~30% compute
    for memory), ``selective`` also keeps the outputs of :func:`saved_ops` (recomputes only elementwise work)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    if policy not in CHECKPOINT_POLICIES:
        raise ValueError(f"activation checkpointing policy {policy!r} is not one of {CHECKPOINT_POLICIES}")
    kwargs = {}
    if policy == "selective":
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, saved_ops())
    for i, block in enumerate(backbone.blocks):
        backbone.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=True, **kwargs)


# Graphs one compiled block may keep: static shapes give one per (token count, batch, grad mode), i.e. 3-4 per
# crop-size triple (student global and local crops, teacher, Gram teacher) plus the k-NN monitor's. Dynamo's
# default of 8 ran out at DINOv3's five triples and silently fell back to eager for the rest (measured).
COMPILED_GRAPHS_PER_BLOCK = 64


def apply_compile(backbone: nn.Module) -> None:
    """Compile each transformer block separately with static shapes (small graphs, each crop size compiled the
    first time it occurs), with room for :data:`COMPILED_GRAPHS_PER_BLOCK` of them."""
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    setattr(dynamo_config, name, max(getattr(dynamo_config, name), COMPILED_GRAPHS_PER_BLOCK))
    for block in backbone.blocks:
        block.compile(dynamic=False)


def fsdp_mixed_precision(param_dtype: torch.dtype | None, reduce_dtype: torch.dtype = torch.float32):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)


def apply_fsdp(module: nn.Module, *, mesh, param_dtype: torch.dtype | None, reshard_after_forward: bool = True) -> None:
    """Shard every transformer block of ``module`` (any depth) with FSDP2 ``fully_shard``, then ``module`` itself."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    # FSDP2 warns when a sharded module returns a view: an in-place op on it would skip the module's
    # pre-backward hook. The backbone returns its class, register and patch tokens as views of one normalised
    # tensor by design, and nothing in dinokit modifies them in place, so that warning (for the backbone only)
    # says nothing here. The blocks return new tensors.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPDinoVisionTransformer\) returned a view")

    kwargs = dict(mesh=mesh, mp_policy=fsdp_mixed_precision(param_dtype), reshard_after_forward=reshard_after_forward)
    for backbone in _backbones(module):
        for block in backbone.blocks:
            fully_shard(block, **kwargs)
    fully_shard(module, **kwargs)
    # a frozen backbone read by a dense head or a linear probe is called through get_intermediate_layers, not
    # forward: FSDP2 must gather its parameters around that method too (a no-op where module is not the backbone)
    if hasattr(module, "get_intermediate_layers"):
        register_fsdp_forward_method(module, "get_intermediate_layers")


def _backbones(module: nn.Module) -> list[nn.Module]:
    """``module`` and its submodules that hold transformer ``blocks``."""
    return [m for m in module.modules() if isinstance(getattr(m, "blocks", None), nn.ModuleList)]


def parallelize(
    trainable: dict[str, nn.Module],
    inference: dict[str, nn.Module],
    *,
    mesh=None,
    compile_blocks: bool = False,
    activation_checkpointing: bool = False,
    checkpoint_policy: str = "full",
    param_dtype: torch.dtype | None = None,
    reshard_after_forward: dict[str, bool] | None = None,
) -> None:
    """Prepare a task's modules in the documented order; ``mesh`` set means shard (FSDP2).

    ``trainable`` modules get activation checkpointing (if asked; ``checkpoint_policy`` full or selective),
    compiled blocks and FSDP2; ``inference`` modules (EMA teachers, frozen teachers) compiled blocks and FSDP2.
    Each module is its own FSDP unit, its blocks nested units; ``reshard_after_forward`` maps trainable module
    names to FSDP2's flag (default True); inference modules always free their gathered parameters after their
    forward.
    """
    for name, module in {**trainable, **inference}.items():
        for backbone in _backbones(module):
            if activation_checkpointing and name in trainable:
                apply_activation_checkpointing(backbone, checkpoint_policy)
            if compile_blocks:
                apply_compile(backbone)
    if mesh is not None:
        for name, module in trainable.items():
            reshard = True if reshard_after_forward is None else reshard_after_forward.get(name, True)
            apply_fsdp(module, mesh=mesh, param_dtype=param_dtype, reshard_after_forward=reshard)
        for module in inference.values():  # no backward follows to reshard them: always free after forward
            apply_fsdp(module, mesh=mesh, param_dtype=param_dtype, reshard_after_forward=True)


def average_buffers(modules) -> None:
    """The floating-point buffers of ``modules`` (BatchNorm's running statistics) averaged over the processes, in
    place; nothing in one process or without such buffers (the ViT has none).

    Each process updates them from its own batches: unsynchronised, every process evaluated with its own statistics,
    and a sharded checkpoint holds one copy of what it takes for replicated, so a resumed run went on from one
    process's statistics where the unbroken run had kept each its own. Averaged after every step, they stay equal
    (and follow all the processes' batches, not one's).
    """
    from .. import distributed as dist_utils

    dist_utils.all_reduce_mean_each([b for m in modules for b in m.buffers() if b.is_floating_point()])


def reshard(module: nn.Module) -> None:
    """Free the gathered parameters of every FSDP2 unit in ``module`` (nothing when it is not sharded).

    FSDP2 reshards a module after its backward; a module that ran forward without gradients (a frozen
    backbone during a head warm-up) and keeps its parameters gathered would otherwise expose full
    tensors where the optimizer and the EMA expect shards.
    """
    from torch.distributed.fsdp import FSDPModule

    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()
