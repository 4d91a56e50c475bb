#!/usr/bin/env python3
"""Import a checkpoint saved by the official T-NAS PyTorch training script into tnas's format.

The official script saves a dict with `state_dict_w` (the learner.Network's state dict; keys may
carry a `model.` prefix from the Meta wrapper) and `state_dict_theta` = [alphas_normal,
alphas_reduce]. This writes `OUT/model.safetensors` and `OUT/model.json` (kind `supernet`, fixed
head, official stem with two max-pools), which `tnas-server` loads and verifies.

    python tools/import_tnas_pytorch.py --checkpoint model_best.pth.tar --out models/tnas-official \
        --in-channels 3 --image-size 84 --init-channels 16 --n-way 5

Run it with the Python that the Makefile's setup created (it holds torch and safetensors).
"""
import argparse
import fcntl
import hashlib
import json
import os
import tempfile

import torch
from safetensors.torch import save

PRIMITIVES = ["none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
              "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"]
# The official mini-ImageNet loader's normalisation, the inputs an official RGB model was trained on.
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# BatchNorm bookkeeping the official modules carry; tnas never uses running statistics.
BUFFER_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")


def convert_weights(state_dict_w):
    """Official learner names → tnas names: strip `model.`, drop BN buffers, rename the head."""
    weights = {}
    for key, value in state_dict_w.items():
        name = key[len("model."):] if key.startswith("model.") else key
        if name.endswith(BUFFER_SUFFIXES):
            continue
        name = name.replace("classifier_meta_nas.", "classifier.")
        weights[name] = value.detach().to(torch.float32).contiguous().cpu()
    return weights


def atomic_write(path, data):
    directory = os.path.dirname(path) or "."
    # The prefix tnas-server cleans up at start-up after an interrupted write: only files whose
    # writer no longer holds their lock, so this one is locked while it is written.
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tnas-tmp-")
    fcntl.flock(fd, fcntl.LOCK_EX)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        os.replace(tmp, path)
    sync_directory(directory)


def sync_directory(directory):
    """Makes the renames into `directory` durable, in the order they were made."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="the official .pth / .pth.tar file")
    ap.add_argument("--out", required=True, help="model directory to write")
    ap.add_argument("--in-channels", type=int, required=True, choices=[1, 3])
    ap.add_argument("--image-size", type=int, required=True)
    ap.add_argument("--init-channels", type=int, required=True)
    ap.add_argument("--n-way", type=int, required=True)
    ap.add_argument("--name", help="model name (default: the --out folder's name)")
    ap.add_argument("--mean", type=float, nargs="+",
                    help="per-channel input mean (default: ImageNet's for 3 channels, as the official "
                         "mini-ImageNet loader normalises; 0 for 1 channel)")
    ap.add_argument("--std", type=float, nargs="+",
                    help="per-channel input std (default: ImageNet's for 3 channels; 1 for 1 channel)")
    ap.add_argument("--invert", action="store_true", help="invert pixel values (black-on-white data)")
    ap.add_argument("--steps", type=int, default=10, help="adaptation steps (official update_step_test)")
    ap.add_argument("--lr-w", type=float, default=0.01, help="inner lr on w (official update_lr_w)")
    ap.add_argument("--lr-theta", type=float, default=30.0, help="inner lr on θ (official train_tnas.sh)")
    args = ap.parse_args()

    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    for key in ("state_dict_w", "state_dict_theta"):
        if key not in checkpoint:
            raise SystemExit(f"{args.checkpoint}: no '{key}'; is this a T-NAS checkpoint?")
    weights = convert_weights(checkpoint["state_dict_w"])
    alphas_normal, alphas_reduce = checkpoint["state_dict_theta"][:2]
    weights["alphas_normal"] = alphas_normal.detach().to(torch.float32).contiguous().cpu()
    weights["alphas_reduce"] = alphas_reduce.detach().to(torch.float32).contiguous().cpu()

    channels = args.in_channels
    rgb = channels == 3
    mean = args.mean or (IMAGENET_MEAN if rgb else [0.0])
    std = args.std or (IMAGENET_STD if rgb else [1.0])
    if len(mean) != channels or len(std) != channels:
        raise SystemExit("--mean and --std need one value per input channel")
    payload = save(weights)
    os.makedirs(args.out, exist_ok=True)
    meta = {
        "format_version": 1,
        "name": args.name or os.path.basename(os.path.normpath(args.out)),
        "kind": "supernet",
        "primitives": PRIMITIVES,
        "search_space": {
            "in_channels": channels, "image_size": args.image_size, "init_channels": args.init_channels,
            "layers": 2, "steps": 4, "multiplier": 4, "stem_multiplier": 3, "stem_pools": 2,
        },
        "genotype": None,
        "input": {"channels": channels, "size": args.image_size, "mean": mean, "std": std, "invert": args.invert},
        "head": {"type": "fixed", "n_way": args.n_way},
        "adaptation": {"steps": args.steps, "lr_w": args.lr_w, "lr_theta": args.lr_theta, "bn": "transductive"},
        "training": {"algorithm": "tnas (official PyTorch)", "data": os.path.basename(args.checkpoint),
                     "split": {"train": [], "validation": [], "test": []}, "iterations": 0, "seed": 0,
                     "wall_time_s": 0.0, "command": "imported with tools/import_tnas_pytorch.py"},
        "evaluation": [],
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    # The model format's save order: the pending weights, then model.json naming their hash, then
    # the weights into place, so an interrupted re-import leaves the old model or the new one.
    # Pending weights that model.json already names (an earlier save cut short) move in first.
    pending = os.path.join(args.out, "model.safetensors.new")
    meta_path = os.path.join(args.out, "model.json")
    if os.path.exists(pending) and os.path.exists(meta_path):
        with open(pending, "rb") as f, open(meta_path) as m:
            if hashlib.sha256(f.read()).hexdigest() == json.load(m).get("sha256"):
                os.replace(pending, os.path.join(args.out, "model.safetensors"))
    atomic_write(pending, payload)
    atomic_write(meta_path, json.dumps(meta, indent=2).encode())
    os.replace(pending, os.path.join(args.out, "model.safetensors"))
    sync_directory(args.out)
    print(f"wrote {args.out}: {len(weights) - 2} weight tensors, sha256 {meta['sha256'][:12]}…")


if __name__ == "__main__":
    main()
