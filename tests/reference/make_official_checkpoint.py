"""Writes a checkpoint in the official T-NAS training script's layout, with its expected logits.

The network is our PyTorch reference (tnas_reference.Network) with random weights, the stem's
BatchNorm scales and shifts included; its state dict is saved the way the official Meta wrapper
saves it: keys prefixed `model.`, the head named `classifier_meta_nas`, every BatchNorm's running
buffers under the official module path (1078 entries for this configuration, as the official
learner's state dict has), θ as `state_dict_theta` (still requiring grad), the epoch and the best
accuracy beside them. Alongside,
it writes transductive query logits (what the official code computes) before and after
`--steps` SGD steps on [w; θ], for the importer test to compare against.
"""
import argparse
import json
import re

import numpy as np

import torch
from safetensors.torch import load_file, save_file

from tnas_reference import Network, StatsBN, adapt, genotype_of


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="path of the .pth to write")
    ap.add_argument("--inputs", required=True, help="safetensors with support, support_labels, query")
    ap.add_argument("--expected", required=True, help="safetensors to write the expected logits to")
    ap.add_argument("--in-channels", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--init-channels", type=int, default=8)
    ap.add_argument("--n-way", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr-w", type=float, default=0.01)
    ap.add_argument("--lr-theta", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    space = {"in_channels": args.in_channels, "image_size": args.image_size, "init_channels": args.init_channels,
             "layers": 2, "steps": 4, "multiplier": 4, "stem_multiplier": 3, "stem_pools": 2}
    net = Network(space, args.n_way)
    with torch.no_grad():
        for bn in (net.stem0[1], net.stem0[5]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    a_n = torch.randn(14, 8, requires_grad=True)
    a_r = torch.randn(14, 8, requires_grad=True)

    state = {}
    for key, value in net.state_dict().items():
        key = key.replace("classifier.", "classifier_meta_nas.")
        state["model." + key] = value.clone()
    for path, module in net.named_modules():
        if isinstance(module, StatsBN):
            # The official pools are Sequential(pool, BatchNorm2d): their BN is `.1`, ours `.bn`.
            prefix = "model." + re.sub(r"(\._ops\.[12])\.bn$", r"\1.1", path) + "."
            state[prefix + "running_mean"] = torch.randn(module.channels)
            state[prefix + "running_var"] = torch.rand(module.channels)
            state[prefix + "num_batches_tracked"] = torch.tensor(7)
    if (space["layers"], space["steps"]) == (2, 4):
        assert len(state) == 1078, len(state)
    torch.save({"state_dict_w": state, "state_dict_theta": [a_n, a_r], "epoch": 3, "best_pred": np.float64(0.5)}, args.out)

    inputs = load_file(args.inputs)
    support, labels, query = inputs["support"], inputs["support_labels"], inputs["query"]
    StatsBN.stat_rows = None
    expected = {}
    with torch.no_grad():
        expected["initial"] = net(query, a_n, a_r)
    adapt(net, a_n, a_r, support, labels, args.steps, args.lr_w, args.lr_theta)
    with torch.no_grad():
        expected["adapted"] = net(query, a_n, a_r)
    save_file(expected, args.expected)
    json.dump(genotype_of(a_n.detach(), a_r.detach(), space), open(args.expected + ".json", "w"))


if __name__ == "__main__":
    main()
