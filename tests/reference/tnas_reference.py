"""Independent PyTorch reference of the tnas supernet, derived network and adaptation.

Written from the T-NAS learner's semantics (T-NAS and DARTS, docs/MODEL_FORMAT.md) as ordinary nn.Modules, so it shares no
code with the Rust implementation it checks. The Rust tests call it as:

    python tnas_reference.py --checkpoint DIR --inputs IN.safetensors --out OUT.safetensors \
        --steps M --lr-w LR --lr-theta LR

It loads DIR/model.json + DIR/model.safetensors (our checkpoint format), reads `support`,
`support_labels`, `query` from IN, and writes logits before and after M SGD steps on [w; θ], in
both BN modes, for the supernet and for the derived network, plus OUT.json with the decoded
genotypes and the parameter count. A proto-head checkpoint gets its head from the support
prototypes, the supernet's before the steps and the derived network's from its own features. With `--meta-gradient first|second` (IN also holding
`query_labels`) it writes instead the task's meta-gradient for every weight and θ.

model.json's `relaxation` (absent: the DARTS softmax) may be `{"type": "annealed", "start": τ0,
"end": τ1, "pairwise_inputs": bool}`, soft pruning: an edge mixes the ops other than `none` by
softmax(θ/τ), and with pairwise inputs each node weighs its input edges by the pair softmax (see
`Relaxation`). Inner step s of M runs at τ0 + (τ1 − τ0)·s/M, queries are predicted at τ1 after
the steps (after none too), and a proto head is built at τ0, where the `initial` logits (the state
before the first step) read θ too. With `"hard_end": true` the weights at τ1 are the decoded genotype's
one-hot weights in the forward pass and the soft weights' in the backward pass. With pairwise inputs or a
hard end the derived network keeps the adapted head instead of rebuilding it. A proto head with `learned_scale` multiplies its logits by exp(classifier.log_scale),
a weight like any other (adapted with lr_w, with a meta-gradient).

With `adaptation.learned_rates` (T-NAS++, MAML++'s per-layer per-step rates) model.safetensors
also holds `inner.lr_w` [M, G] and `inner.lr_theta` [M, 2], which replace --lr-w and --lr-theta:
inner step s reads row min(s, M-1) (steps past the learned ones reuse the last row); every element
of weight tensor i moves by that row's rate i, θ normal by column 0 and θ reduce by column 1. The
G columns are the task's weight tensors in network order: the body's, then the head tensors the
checkpoint stores (a fixed head's weight and bias, or a proto head's log_scale), then a proto
head's weight and bias, which each task builds. In --meta-gradient mode the tables get gradients
too (`grad/inner.lr_w`, `grad/inner.lr_theta`): second order, exactly through the steps; first
order, with each step's support gradient g_s taken as a constant, so that the weights and θ keep
the adapted point's query gradient and d L_q / d rate[s, i] = -<g_s, dL_q/dw_i at the adapted
point> over tensor i's elements, summed over the steps that read row s.
"""
import argparse
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

PRIMITIVES = ["none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
              "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"]


class StatsBN(nn.Module):
    """BatchNorm that always normalises with batch statistics.

    With `stat_rows = n`, the statistics come from the first n rows only and are applied to all
    rows (the `support` prediction mode); with None, from the whole batch.
    """
    stat_rows = None

    def __init__(self, channels, affine):
        super().__init__()
        self.channels, self.affine = channels, affine
        if affine:
            self.weight = nn.Parameter(torch.ones(channels))
            self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        w = self.weight if self.affine else None
        b = self.bias if self.affine else None
        n = StatsBN.stat_rows
        if n is None or n >= x.shape[0]:
            return F.batch_norm(x, None, None, w, b, training=True, eps=1e-5)
        head = x[:n]
        mean = head.mean(dim=(0, 2, 3), keepdim=True)
        var = head.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        # Written out (not F.batch_norm with given statistics) so gradients flow through the
        # statistics too, as meta-training's query loss needs.
        y = (x - mean) / torch.sqrt(var + 1e-5)
        return y * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1) if self.affine else y


class ReLUConvBN(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.op = nn.Sequential(nn.ReLU(), nn.Conv2d(c_in, c_out, 1, bias=False), StatsBN(c_out, False))

    def forward(self, x):
        return self.op(x)


class FactorizedReduce(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.bn = StatsBN(c_out, False)

    def forward(self, x):
        x = F.relu(x)
        if x.shape[2] % 2 == 1:
            x = F.pad(x, (1, 0, 1, 0))
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1))


class SepConv(nn.Module):
    def __init__(self, c, k, stride):
        super().__init__()
        p = k // 2
        self.op = nn.Sequential(
            nn.ReLU(), nn.Conv2d(c, c, k, stride, p, groups=c, bias=False), nn.Conv2d(c, c, 1, bias=False),
            StatsBN(c, False),
            nn.ReLU(), nn.Conv2d(c, c, k, 1, p, groups=c, bias=False), nn.Conv2d(c, c, 1, bias=False),
            StatsBN(c, False))

    def forward(self, x):
        return self.op(x)


class DilConv(nn.Module):
    def __init__(self, c, k, stride):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(), nn.Conv2d(c, c, k, stride, k - 1, dilation=2, groups=c, bias=False),
            nn.Conv2d(c, c, 1, bias=False), StatsBN(c, False))

    def forward(self, x):
        return self.op(x)


class Pool(nn.Module):
    def __init__(self, c, kind, stride):
        super().__init__()
        self.kind, self.stride = kind, stride
        self.bn = StatsBN(c, False)

    def forward(self, x):
        if self.kind == "max":
            y = F.max_pool2d(x, 3, self.stride, 1)
        else:
            y = F.avg_pool2d(x, 3, self.stride, 1, count_include_pad=False)
        return self.bn(y)


class Zero(nn.Module):
    def __init__(self, stride):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        return torch.zeros_like(x[:, :, ::self.stride, ::self.stride])


class Identity(nn.Module):
    def forward(self, x):
        return x


def make_op(name, c, stride):
    if name == "none":
        return Zero(stride)
    if name == "max_pool_3x3":
        return Pool(c, "max", stride)
    if name == "avg_pool_3x3":
        return Pool(c, "avg", stride)
    if name == "skip_connect":
        return Identity() if stride == 1 else FactorizedReduce(c, c)
    kind, k = name.split("_conv_")
    k = int(k[0])
    return SepConv(c, k, stride) if kind == "sep" else DilConv(c, k, stride)


class MixedOp(nn.Module):
    def __init__(self, c, stride):
        super().__init__()
        self._ops = nn.ModuleList([make_op(p, c, stride) for p in PRIMITIVES])

    def forward(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights, self._ops))


def reduction_cells(layers):
    return {1} if layers == 2 else {layers // 3, 2 * layers // 3}


class Relaxation:
    """θ → an edge's op mixing weights, written from the description of soft pruning (MetaNAS)."""

    def __init__(self, spec, steps):
        spec = spec or {"type": "softmax"}
        self.kind = spec["type"]
        assert self.kind in ("softmax", "annealed"), spec
        self.start, self.end = spec.get("start", 1.0), spec.get("end", 1.0)
        self.pairwise = bool(spec.get("pairwise_inputs", False))
        self.hard_end = bool(spec.get("hard_end", False))
        self.steps = steps

    def tau(self, step, total):
        """Temperature of inner step `step` of `total`; step == total is where queries are predicted."""
        if self.kind == "softmax":
            return 1.0
        if total == 0 or step >= total:
            return self.end
        return self.start + (self.end - self.start) * step / total

    def weights(self, theta, tau):
        if self.kind == "softmax":
            return F.softmax(theta, dim=-1)
        soft = self.soft_weights(theta, tau)
        if self.hard_end and tau <= self.end:
            # The forward pass is the genotype's network; the gradient is the soft weights'.
            return self.genotype_weights(theta) + (soft - soft.detach())
        return soft

    def genotype_weights(self, theta):
        """1 on each node's two strongest input edges (by best non-none probability), at that
        edge's best non-none op."""
        probs = F.softmax(theta.detach(), dim=-1)[:, 1:]
        hard = torch.zeros_like(theta)
        first = 0
        for node in range(self.steps):
            inputs = list(range(first, first + node + 2))
            kept = sorted(inputs, key=lambda e: -probs[e].max().item())[:2]
            for e in kept:
                hard[e, 1 + probs[e].argmax().item()] = 1.0
            first += node + 2
        return hard

    def soft_weights(self, theta, tau):
        kept = F.softmax(theta[:, 1:] / tau, dim=-1)
        ops = torch.cat([torch.zeros_like(theta[:, :1]), kept], dim=1)
        if not self.pairwise:
            return ops
        # An edge's strength: its best non-none log-probability under softmax(θ) (τ = 1).
        strength = F.log_softmax(theta, dim=-1)[:, 1:].max(dim=1).values
        scales, first = [], 0
        for node in range(self.steps):
            inputs = node + 2
            pairs = [(i, j) for i in range(inputs) for j in range(i + 1, inputs)]
            logits = torch.stack([strength[first + i] + strength[first + j] for i, j in pairs]) / tau
            p = F.softmax(logits, dim=0)
            for e in range(inputs):
                scales.append(sum(p[k] for k, pair in enumerate(pairs) if e in pair))
            first += inputs
        return ops * torch.stack(scales).unsqueeze(1)


class Classifier(nn.Linear):
    """The linear head; with a learned scale its logits are multiplied by exp(log_scale)."""

    def __init__(self, features, n_way, learned_scale):
        super().__init__(features, n_way)
        self.learned_scale = learned_scale
        if learned_scale:
            self.log_scale = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        y = super().forward(x)
        return y * torch.exp(self.log_scale) if self.learned_scale else y


class Cell(nn.Module):
    """A search cell; with `genotype` (list of (op, input) pairs) a derived cell instead."""

    def __init__(self, steps, multiplier, c_pp, c_p, c, reduction, reduction_prev, genotype=None, concat=None):
        super().__init__()
        self.reduction, self.steps, self.multiplier = reduction, steps, multiplier
        self.preprocess0 = FactorizedReduce(c_pp, c) if reduction_prev else ReLUConvBN(c_pp, c)
        self.preprocess1 = ReLUConvBN(c_p, c)
        self.genotype, self.concat = genotype, concat
        self._ops = nn.ModuleList()
        for i in range(steps):
            for j in range(2 + i):
                self._ops.append(MixedOp(c, 2 if reduction and j < 2 else 1))

    def forward(self, s0, s1, weights):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for i in range(self.steps):
            if self.genotype is None:
                s = sum(self._ops[offset + j](h, weights[offset + j]) for j, h in enumerate(states))
            else:
                s = 0
                for name, j in self.genotype[2 * i: 2 * i + 2]:
                    s = s + self._ops[offset + j]._ops[PRIMITIVES.index(name)](states[j])
            offset += len(states)
            states.append(s)
        if self.concat is not None:
            return torch.cat([states[k] for k in self.concat], dim=1)
        return torch.cat(states[-self.multiplier:], dim=1)


class Network(nn.Module):
    def __init__(self, space, n_way, genotype=None, relaxation=None, learned_scale=False):
        super().__init__()
        self.relaxation = Relaxation(relaxation, space["steps"])
        # The temperature the next forward pass reads θ at (set by whoever runs the schedule).
        self.tau = 1.0
        c = space["init_channels"]
        c_stem = space["stem_multiplier"] * c
        pools = space["stem_pools"]
        self.stem0 = nn.Sequential(
            nn.Conv2d(space["in_channels"], c_stem // 2, 3, padding=1, bias=False), StatsBN(c_stem // 2, True),
            nn.MaxPool2d(2, 2) if pools >= 1 else nn.Identity(), nn.ReLU(),
            nn.Conv2d(c_stem // 2, c_stem, 3, padding=1, bias=False), StatsBN(c_stem, True),
            nn.MaxPool2d(2, 2) if pools >= 2 else nn.Identity())
        c_pp, c_p, c_cur = c_stem, c_stem, c
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(space["layers"]):
            reduction = i in reduction_cells(space["layers"])
            if reduction:
                c_cur *= 2
            gene = None
            concat = None
            if genotype is not None:
                gene = genotype["reduce"] if reduction else genotype["normal"]
                concat = genotype["reduce_concat"] if reduction else genotype["normal_concat"]
            self.cells.append(Cell(space["steps"], space["multiplier"], c_pp, c_p, c_cur, reduction, reduction_prev, gene, concat))
            reduction_prev = reduction
            c_pp, c_p = c_p, space["multiplier"] * c_cur
        self.classifier = Classifier(c_p, n_way, learned_scale)

    def features(self, x, alphas_normal, alphas_reduce):
        s0 = s1 = self.stem0(x)
        wn = self.relaxation.weights(alphas_normal, self.tau)
        wr = self.relaxation.weights(alphas_reduce, self.tau)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, wr if cell.reduction else wn)
        return F.adaptive_avg_pool2d(s1, 1).flatten(1)

    def forward(self, x, alphas_normal, alphas_reduce):
        return self.classifier(self.features(x, alphas_normal, alphas_reduce))


def decode(weights, steps):
    """DARTS rule: top-2 inputs by strongest non-none op, strongest first; ties to the lower index."""
    gene, start = [], 0
    for i in range(steps):
        rows = weights[start:start + i + 2]
        best = [max((w, -k) for k, w in enumerate(row) if k != 0) for row in rows]
        order = sorted(range(i + 2), key=lambda j: -best[j][0])[:2]
        for j in order:
            gene.append([PRIMITIVES[-best[j][1]], j])
        start += i + 2
    return gene


def genotype_of(alphas_normal, alphas_reduce, space):
    concat = list(range(2 + space["steps"] - space["multiplier"], space["steps"] + 2))
    return {
        "normal": decode(F.softmax(alphas_normal, -1).tolist(), space["steps"]), "normal_concat": concat,
        "reduce": decode(F.softmax(alphas_reduce, -1).tolist(), space["steps"]), "reduce_concat": concat,
    }


class LearnedRates:
    """The tables `inner.lr_w` [M, G] and `inner.lr_theta` [M, 2] and the column of each weight."""

    def __init__(self, w, theta, columns):
        assert w.dim() == 2 and theta.dim() == 2 and theta.shape == (w.shape[0], 2) and w.shape[1] == len(columns), \
            (tuple(w.shape), tuple(theta.shape), len(columns))
        self.w, self.theta, self.columns = w, theta, {name: i for i, name in enumerate(columns)}

    def row(self, step):
        return min(step, self.w.shape[0] - 1)

    def for_weight(self, step, name):
        return self.w[self.row(step), self.columns[name]]

    def for_theta(self, step):
        return self.theta[self.row(step), 0], self.theta[self.row(step), 1]


def rate_columns(net, stored, proto):
    """The G weight tensors of a task in network order: body, the stored head tensors, then a proto
    head's built weight and bias."""
    body = [n for n, _ in net.named_parameters() if not n.startswith("classifier.")]
    head = [n for n in ["classifier.weight", "classifier.bias", "classifier.log_scale"] if n in stored]
    built = ["classifier.weight", "classifier.bias"] if proto else []
    return body + head + built


def adapt(net, a_n, a_r, support, labels, steps, lr_w, lr_theta, rates=None):
    """T-NAS Algorithm 2 with the official optimisers: plain SGD on w and on θ. Returns the losses.
    With learned `rates`, the same SGD at each step's rate of each tensor (and of each θ)."""
    if rates is not None:
        losses = []
        for step in range(steps):
            net.tau = net.relaxation.tau(step, steps)
            loss = F.cross_entropy(net(support, a_n, a_r), labels)
            params = list(net.named_parameters())
            grads = torch.autograd.grad(loss, [p for _, p in params] + [a_n, a_r])
            with torch.no_grad():
                for (name, p), g in zip(params, grads):
                    p -= rates.for_weight(step, name) * g
                lr_n, lr_r = rates.for_theta(step)
                a_n -= lr_n * grads[-2]
                a_r -= lr_r * grads[-1]
            losses.append(loss.item())
        net.tau = net.relaxation.tau(steps, steps)
        return losses
    opt_w = torch.optim.SGD(net.parameters(), lr=lr_w)
    opt_theta = torch.optim.SGD([a_n, a_r], lr=lr_theta)
    losses = []
    for step in range(steps):
        net.tau = net.relaxation.tau(step, steps)
        loss = F.cross_entropy(net(support, a_n, a_r), labels)
        opt_w.zero_grad()
        opt_theta.zero_grad()
        loss.backward()
        opt_w.step()
        opt_theta.step()
        losses.append(loss.item())
    net.tau = net.relaxation.tau(steps, steps)
    return losses


def set_proto_head(net, a_n, a_r, support, labels, n_way):
    """Proto-MAML's head from the support set: W_k = 2 c_k, b_k = -|c_k|^2 for the class means c_k
    of the support features (batch statistics)."""
    with torch.no_grad():
        features = net.features(support, a_n, a_r)
        prototypes = torch.stack([features[labels == k].mean(0) for k in range(n_way)])
        net.classifier.weight.copy_(2 * prototypes)
        net.classifier.bias.copy_(-(prototypes ** 2).sum(1))


def meta_gradient(net, a_n, a_r, support, labels, query, query_labels, steps, lr_w, lr_theta, second_order, rates=None):
    """One task's meta-gradient (T-NAS Algorithm 1, lines 4-8), written functionally: M SGD steps
    on (w, θ) from the meta-weights, the query loss with BN statistics from the support rows, and
    its gradient with respect to the meta-weights through the steps (second order) or with respect
    to the adapted weights (first order, Eq. 7). With learned `rates`, the steps use them and the
    tables get gradients too (see the module's description). Returns the gradients by name and
    the loss."""
    names = [n for n, _ in net.named_parameters()] + ["alphas_normal", "alphas_reduce"]
    meta = [p for _, p in net.named_parameters()] + [a_n, a_r]
    tables = []
    if rates is not None:
        rates.w, rates.theta = rates.w.detach().requires_grad_(True), rates.theta.detach().requires_grad_(True)
        tables = [rates.w, rates.theta]

    def step_rates(step):
        if rates is None:
            return [lr_w] * (len(meta) - 2) + [lr_theta, lr_theta]
        return [rates.for_weight(step, n) for n in names[:-2]] + list(rates.for_theta(step))

    def logits(point, x):
        return torch.func.functional_call(net, dict(zip(names[:-2], point[:-2])), (x, point[-2], point[-1]))

    point, support_grads = meta, []
    for step in range(steps):
        net.tau = net.relaxation.tau(step, steps)
        loss = F.cross_entropy(logits(point, support), labels)
        grads = torch.autograd.grad(loss, point, create_graph=second_order)
        support_grads.append([g.detach() for g in grads])
        if second_order:
            point = [p - r * g for p, r, g in zip(point, step_rates(step), grads)]
        else:
            with torch.no_grad():
                point = [p - r * g for p, r, g in zip(point, step_rates(step), grads)]
            point = [p.detach().requires_grad_(True) for p in point]
    net.tau = net.relaxation.tau(steps, steps)
    StatsBN.stat_rows = support.shape[0]
    query_logits = logits(point, torch.cat([support, query]))[support.shape[0]:]
    StatsBN.stat_rows = None
    loss = F.cross_entropy(query_logits, query_labels)
    if second_order:
        grads = torch.autograd.grad(loss, meta + tables)
        out = dict(zip(names + ["inner.lr_w", "inner.lr_theta"], grads))
    else:
        grads = torch.autograd.grad(loss, point)
        out = dict(zip(names, grads))
        if rates is not None:
            # w_M = w_0 - sum_s rate[row(s), i] * g_s with constant g_s: d L_q / d rate[r, i] is
            # -sum over the steps s reading row r of <g_s, dL_q/dw_i (w_M)>.
            d_w, d_theta = torch.zeros_like(rates.w), torch.zeros_like(rates.theta)
            for step, g in enumerate(support_grads):
                r = rates.row(step)
                for name, g_i, q_i in zip(names[:-2], g, grads):
                    d_w[r, rates.columns[name]] -= (g_i * q_i).sum()
                d_theta[r, 0] -= (g[-2] * grads[-2]).sum()
                d_theta[r, 1] -= (g[-1] * grads[-1]).sum()
            out["inner.lr_w"], out["inner.lr_theta"] = d_w, d_theta
    return out, loss.item()


def logits_both_modes(net, a_n, a_r, support, query):
    with torch.no_grad():
        StatsBN.stat_rows = None
        transductive = net(query, a_n, a_r)
        StatsBN.stat_rows = support.shape[0]
        both = net(torch.cat([support, query]), a_n, a_r)
        StatsBN.stat_rows = None
    return transductive, both[support.shape[0]:]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--lr-w", type=float, default=0.01)
    ap.add_argument("--lr-theta", type=float, default=30.0)
    ap.add_argument("--meta-gradient", choices=["first", "second"],
                    help="write the task's meta-gradient (inputs also hold query_labels) instead")
    ap.add_argument("--float64", action="store_true",
                    help="compute in float64 (a diagnostic: how far float32 rounding alone moves the outputs)")
    args = ap.parse_args()

    torch.set_num_threads(1)
    meta = json.load(open(os.path.join(args.checkpoint, "model.json")))
    weights = load_file(os.path.join(args.checkpoint, "model.safetensors"))
    inputs = load_file(args.inputs)
    if args.float64:
        torch.set_default_dtype(torch.float64)
        weights = {k: v.double() for k, v in weights.items()}
        inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    support, labels, query = inputs["support"], inputs["support_labels"], inputs["query"]
    space, proto = meta["search_space"], meta["head"]["type"] == "proto"
    n_way = int(labels.max()) + 1 if proto else meta["head"]["n_way"]
    learned_scale = proto and bool(meta["head"].get("learned_scale", False))
    relaxation = meta.get("relaxation")

    net = Network(space, n_way, relaxation=relaxation, learned_scale=learned_scale)
    a_n = weights.pop("alphas_normal").clone().requires_grad_(True)
    a_r = weights.pop("alphas_reduce").clone().requires_grad_(True)
    tables = (weights.pop("inner.lr_w", None), weights.pop("inner.lr_theta", None))
    learned_rates = bool(meta.get("adaptation", {}).get("learned_rates", False))
    assert learned_rates == (tables[0] is not None) == (tables[1] is not None), "learned_rates and the tables disagree"
    rates = LearnedRates(*tables, rate_columns(net, weights, proto)) if learned_rates else None
    missing, unexpected = net.load_state_dict(weights, strict=False)
    assert not unexpected and sorted(missing) == (["classifier.bias", "classifier.weight"] if proto else []), (missing, unexpected)
    # Before any step θ is read at the first step's temperature; a proto head is built there.
    net.tau = net.relaxation.tau(0, 1)
    if proto:
        set_proto_head(net, a_n, a_r, support, labels, n_way)
    out, info = {}, {"param_count": sum(p.numel() for p in net.parameters())}
    if args.meta_gradient:
        grads, info["query_loss"] = meta_gradient(net, a_n, a_r, support, labels, query, inputs["query_labels"],
                                                  args.steps, args.lr_w, args.lr_theta, args.meta_gradient == "second", rates)
        save_file({f"grad/{k}": v.float().contiguous() for k, v in grads.items()}, args.out)
        json.dump(info, open(args.out + ".json", "w"))
        return

    def record(tag):
        g = genotype_of(a_n.detach(), a_r.detach(), space)
        info[f"genotype_{tag}"] = g
        t, s = logits_both_modes(net, a_n, a_r, support, query)
        out[f"{tag}_transductive"], out[f"{tag}_support"] = t, s
        derived = Network(space, n_way, genotype=g, learned_scale=learned_scale)
        derived.load_state_dict(net.state_dict(), strict=True)
        # Soft pruning with pairwise inputs or a hard end ends as the derived network: it keeps the
        # adapted head.
        if proto and not (net.relaxation.pairwise or net.relaxation.hard_end):
            set_proto_head(derived, a_n, a_r, support, labels, n_way)
        t, s = logits_both_modes(derived, a_n, a_r, support, query)
        out[f"{tag}_derived_transductive"], out[f"{tag}_derived_support"] = t, s

    record("initial")
    info["losses"] = adapt(net, a_n, a_r, support, labels, args.steps, args.lr_w, args.lr_theta, rates)
    record("adapted")
    save_file({k: v.float().contiguous() for k, v in out.items()}, args.out)
    json.dump(info, open(args.out + ".json", "w"))


if __name__ == "__main__":
    main()
