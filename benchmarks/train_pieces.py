"""Two pieces of the training step, each against its plain version, in one process.

* Backbone: one forward + backward of the student's crop sets (2 global + ``local`` local crops per
  image), ``forward_features_list`` (one pass per crop size) vs ``forward_features_packed``.
* Student heads: DINO (class tokens) + iBOT (masked patches) head and cross-entropy, plain
  (``DINOHead`` then ``DINOLoss`` / ``iBOTPatchLoss``) vs ``dinokit.losses.chunked`` and vs the loss terms
  compiled (``train.compile_loss``).

Run from the repo root: ``PYTHONPATH=src python benchmarks/train_pieces.py`` (a GPU when there is one,
bf16 autocast there; ``--device cpu --arch vit_small --batch 4`` for a CPU check; ``--flex`` adds the packed
forward with compiled ``flex_attention``). Prints milliseconds per
iteration, the ratio and, on CUDA, the peak memory of each variant.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dinokit.layers.dino_head import DINOHead
from dinokit.losses import DINOLoss, iBOTPatchLoss
from dinokit.losses.chunked import chunked_dino_loss, chunked_ibot_loss
from dinokit.models import build_backbone
from dinokit.models.packed import forward_features_packed


def measure(fn, device: torch.device, steps: int) -> tuple[float, float | None]:
    """(ms per call, peak GB on CUDA or None)."""
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps * 1e3, torch.cuda.max_memory_allocated() / 1e9
    return (time.perf_counter() - start) / steps * 1e3, None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", default="vit_large")
    p.add_argument("--patch", type=int, default=14)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=98)
    p.add_argument("--local", type=int, default=8)
    p.add_argument("--prototypes", type=int, default=65536)
    p.add_argument("--chunk-rows", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--parts", default="backbone,heads")
    p.add_argument("--flex", action="store_true", help="also the packed forward with compiled flex_attention")
    args = p.parse_args()
    device = torch.device(args.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    results = {}

    parts = args.parts.split(",")
    n_patches = (args.global_size // args.patch) ** 2
    masks = torch.rand(2 * args.batch, n_patches, device=device) < 0.3
    if "backbone" in parts:
        backbone_part(args, device, autocast, masks, results)
    if "heads" in parts:
        heads_part(args, device, autocast, masks, results)

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{args.arch}/{args.patch}, batch {args.batch}, 2x{args.global_size} + {args.local}x{args.local_size}, "
          f"K={args.prototypes}, {name}, torch {torch.__version__}")
    for label, (ms, peak) in results.items():
        memory = f", peak {peak:.1f} GB" if peak is not None else ""
        print(f"{label:24s} {ms:9.1f} ms{memory}")
    for plain, fast in (("backbone per crop size", "backbone packed"), ("heads plain", "heads chunked"),
                        ("heads plain", "heads compiled loss")):
        if plain in results:
            print(f"{fast} vs {plain}: {results[plain][0] / results[fast][0]:.2f}x speed")
    print(json.dumps({label: [round(ms, 2), peak] for label, (ms, peak) in results.items()}))


def backbone_part(args, device, autocast, masks, results) -> None:
    model = build_backbone(args.arch, patch_size=args.patch, img_size=args.global_size, drop_path_rate=0.0).to(device)
    model.train()
    x_list = [
        torch.randn(2 * args.batch, 3, args.global_size, args.global_size, device=device),
        torch.randn(args.local * args.batch, 3, args.local_size, args.local_size, device=device),
    ]
    masks_list = [masks, None]

    def backbone(forward):
        def run():
            model.zero_grad(set_to_none=True)
            with autocast:
                outputs = forward(x_list, masks_list)
                loss = sum(o["x_norm_clstoken"].float().square().mean() for o in outputs)
            loss.backward()

        return run

    results["backbone per crop size"] = measure(backbone(model.forward_features_list), device, args.steps)
    results["backbone packed"] = measure(
        backbone(lambda xs, ms: forward_features_packed(model, xs, ms)), device, args.steps
    )
    if args.flex:
        # flex_attention is only fused under torch.compile; compiling the whole packed forward compiles it too.
        packed_flex = torch.compile(lambda xs, ms: forward_features_packed(model, xs, ms, attention="flex"))
        results["backbone packed flex"] = measure(backbone(packed_flex), device, args.steps)


def heads_part(args, device, autocast, masks, results) -> None:
    dim = {"vit_small": 384, "vit_base": 768, "vit_large": 1024, "vit_giant2": 1536}.get(args.arch, 384)
    head = DINOHead(dim, args.prototypes).to(device)
    n_masked = int(masks.sum())
    cls_global = torch.randn(2 * args.batch, dim, device=device, requires_grad=True)
    cls_local = torch.randn(args.local * args.batch, dim, device=device, requires_grad=True)
    patches = torch.randn(n_masked, dim, device=device, requires_grad=True)
    teacher = [torch.softmax(torch.randn(args.batch, args.prototypes, device=device), -1) for _ in range(2)]
    patch_targets = torch.softmax(torch.randn(n_masked, args.prototypes, device=device), -1)
    weights = torch.full((n_masked,), 1.0 / max(n_masked, 1), device=device)
    dino_loss, ibot_loss = DINOLoss(args.prototypes).to(device), iBOTPatchLoss(args.prototypes).to(device)

    def plain(dino=dino_loss, ibot_masked=ibot_loss.forward_masked):
        head.zero_grad(set_to_none=True)
        with autocast:
            local = dino(list(head(cls_local).chunk(args.local)), teacher)
            glob = dino(list(head(cls_global).chunk(2)), teacher)
            ibot = ibot_masked(head(patches), patch_targets, masks, masks_weight=weights)
        (local + glob + ibot).backward()

    def compiled_loss():  # train.compile_loss: the same head, the loss terms through torch.compile
        plain(compiled_dino, compiled_ibot)

    compiled_dino = DINOLoss(args.prototypes).to(device)
    compiled_dino.compile(dynamic=None)
    compiled_ibot = torch.compile(iBOTPatchLoss(args.prototypes).to(device).forward_masked, dynamic=None)

    def chunked():
        head.zero_grad(set_to_none=True)
        with autocast:
            local = chunked_dino_loss(head, list(cls_local.chunk(args.local)), teacher, chunk_rows=args.chunk_rows)
            glob = chunked_dino_loss(head, list(cls_global.chunk(2)), teacher, chunk_rows=args.chunk_rows)
            ibot = chunked_ibot_loss(head, patches, patch_targets, weights, masks.shape[0], chunk_rows=args.chunk_rows)
        (local + glob + ibot).backward()

    results["heads plain"] = measure(plain, device, args.steps)
    results["heads chunked"] = measure(chunked, device, args.steps)
    results["heads compiled loss"] = measure(compiled_loss, device, args.steps)


if __name__ == "__main__":
    main()
