"""The alternative a user would write: T-NAS adaptation in PyTorch eager, timed like tnas's bench.

Same checkpoint, same inputs, same work: start from the meta-weights (Proto-MAML head from the
support prototypes when the model has one), `--steps` SGD steps on [w; θ] with support-batch BN,
decode the genotype, predict the queries with support-statistics BN. Prints one JSON line with
the per-run milliseconds and writes the last run's query logits for the caller to compare.

    python bench/pytorch_eager.py --checkpoint DIR --inputs IN.safetensors --out LOGITS.safetensors \
        --steps 10 --runs 20 --threads 2 [--device cuda]
"""
import argparse
import copy
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "reference"))
from tnas_reference import Network, StatsBN, adapt, genotype_of  # noqa: E402


def load(checkpoint):
    meta = json.load(open(os.path.join(checkpoint, "model.json")))
    weights = load_file(os.path.join(checkpoint, "model.safetensors"))
    head = meta["head"]
    n_way = head.get("n_way") or head["max_way"]
    net = Network(meta["search_space"], n_way)
    alphas = (weights.pop("alphas_normal"), weights.pop("alphas_reduce"))
    missing = net.load_state_dict(weights, strict=False).missing_keys
    assert set(missing) <= {"classifier.weight", "classifier.bias"}, missing
    return meta, net, alphas


def one_task(meta, meta_net, meta_alphas, support, labels, query, n_way, steps, lr_w, lr_theta):
    net = copy.deepcopy(meta_net)
    a_n = meta_alphas[0].clone().requires_grad_(True)
    a_r = meta_alphas[1].clone().requires_grad_(True)
    if meta["head"]["type"] == "proto":
        with torch.no_grad():
            feats = net.features(support, a_n, a_r)
            protos = torch.stack([feats[labels == c].mean(0) for c in range(n_way)])
            net.classifier = torch.nn.Linear(protos.shape[1], n_way, device=protos.device)
            net.classifier.weight.copy_(2 * protos)
            net.classifier.bias.copy_(-(protos ** 2).sum(1))
    adapt(net, a_n, a_r, support, labels, steps, lr_w, lr_theta)
    genotype_of(a_n.detach(), a_r.detach(), meta["search_space"])
    with torch.no_grad():
        StatsBN.stat_rows = support.shape[0]
        logits = net(torch.cat([support, query]), a_n, a_r)[support.shape[0]:]
        StatsBN.stat_rows = None
    return logits


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    meta, net, alphas = load(args.checkpoint)
    net.to(device)
    alphas = tuple(a.to(device) for a in alphas)
    inputs = {k: v.to(device) for k, v in load_file(args.inputs).items()}
    support, labels, query = inputs["support"], inputs["support_labels"], inputs["query"]
    n_way = int(labels.max()) + 1
    lr_w, lr_theta = meta["adaptation"]["lr_w"], meta["adaptation"]["lr_theta"]
    one_task(meta, net, alphas, support, labels, query, n_way, args.steps, lr_w, lr_theta)  # warm-up
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        logits = one_task(meta, net, alphas, support, labels, query, n_way, args.steps, lr_w, lr_theta)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    save_file({"logits": logits.cpu().contiguous()}, args.out)
    print(json.dumps({"ms": times}))


if __name__ == "__main__":
    main()
