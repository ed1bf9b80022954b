"""Patch a stock timm ViT with NoRGa prompts and run it: the short demo of README's main job.

Runs offline on CPU in well under a minute:
1. patches `vit_small_patch16_224` (random init, `pretrained=False`) and checks that, with no prompt,
   the output equals the unpatched model's;
2. attaches a per-task prefix pool with NoRGa gates on blocks 0-4 and gives every sample its own task;
3. trains only the prompts, gates and head for a few steps on a tiny synthetic task and shows the loss fall.

    python examples/demo.py [--steps 30] [--activation tanh]
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

import norga


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--activation", default="tanh", choices=["tanh", "sigmoid", "gelu"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    model = timm.create_model(args.model, pretrained=False, num_classes=4, img_size=args.img_size).eval()
    x = torch.randn(8, 3, args.img_size, args.img_size)
    with torch.no_grad():
        before = model(x)

    pool = norga.PrefixPool(num_tasks=2, num_layers=5, length=5, dim=model.embed_dim)
    norga.patch_vit(model, gate=norga.NoRGaGate(args.activation), prompt=pool)  # blocks 0-4, in place
    layers = norga.patch.patched_layers(model)
    print(f"patched {len(layers)} layers of {args.model}: {', '.join(layer.name for layer in layers)}")

    # With the pool detached from the layers' view, the patched model is the timm model.
    with torch.no_grad():
        prompts = [layer.module.prompt for layer in layers]
        for layer in layers:
            layer.module.prompt = None
        same = (model(x) - before).abs().max().item()
        for layer, prompt in zip(layers, prompts):
            layer.module.prompt = prompt
    print(f"no prompt: max |patched - unpatched| = {same:.2e}")

    # Each sample gets its own task's prompt; outputs do not depend on the rest of the batch.
    tasks = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    with torch.no_grad(), norga.use_task(model, tasks):
        batched = model(x)
    with torch.no_grad(), norga.use_task(model, tasks[:1]):
        alone = model(x[:1])
    print(f"per-sample tasks: max |batched - alone| for sample 0 = {(batched[:1] - alone).abs().max().item():.2e}")

    # Train prompts, gates and head only, on task 1: labels are a function of the image's mean colour.
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [pool.prompts, *model.get_classifier().parameters()]
    trainable += [p for layer in layers for p in layer.module.prefix_gate.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    n_train = sum(p.numel() for p in trainable)
    optim = torch.optim.Adam(trainable, lr=0.01)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    norga.set_task(model, 1)
    start = time.perf_counter()
    losses = []
    for _ in range(args.steps):
        xb = torch.randn(16, 3, args.img_size, args.img_size, generator=gen)
        yb = xb.mean(dim=(2, 3)).argmax(dim=1)  # classes 0..2
        xb = xb + 0.05 * torch.nn.functional.one_hot(yb, 3).float()[:, :, None, None]
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    k = max(1, args.steps // 5)
    print(
        f"trained {n_train:,} parameters ({args.steps} steps, {time.perf_counter() - start:.1f}s): "
        f"loss {sum(losses[:k]) / k:.3f} -> {sum(losses[-k:]) / k:.3f}"
    )
    alphas = [round(layer.module.prefix_gate.alpha.item(), 3) for layer in layers]
    print(f"learned gate alphas per layer: {alphas}")


if __name__ == "__main__":
    main()
