"""A task model from tnas in plain PyTorch (torch only).

`GET /tasks/{task_id}/model` gives a zip of one folder holding `model.json`, `model.safetensors`
and `support.safetensors`. For a `genotype` task model (adapted with `predict_with: derived`, or
from a genotype model), this module builds the DARTS network of its genotype, loads its weights
and gives the logits the server gives:

    model = TaskModel.load("task-<id>")
    logits = model(query)          # query: [N, C, S, S], prepared as model.json's `input` says
    labels = model.labels          # column i of the logits is class labels[i]

Images are prepared as the server prepares them: resized to `input.size`, scaled to [0, 1],
inverted when `input.invert`, then normalised by `input.mean` and `input.std`. Every BatchNorm
uses batch statistics, as in the server: in `support` mode those of the task's support images
(kept in `support.safetensors`), so a query's logits do not depend on the other queries; in
`transductive` mode those of the query batch. A task adapted with test-time views
(`adaptation.views` > 1) answers each query with the mean log-probability of its one-pixel shifts,
as the server does.

Run as a script, it prints the logits of the tensor `query` in a safetensors file as JSON:

    python tools/task_model.py task-<id> queries.safetensors
"""

import json
import struct
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

BN_EPS = 1e-5


def read_safetensors(path):
    """The float32 tensors of a safetensors file, by name (the format read by hand: an 8-byte
    little-endian header length, a JSON header, then the data)."""
    data = Path(path).read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    body = data[8 + length :]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F32":
            raise ValueError(f"{path}: {name} is {info['dtype']}, expected F32")
        begin, end = info["data_offsets"]
        values = torch.frombuffer(bytearray(body[begin:end]), dtype=torch.float32)
        tensors[name] = values.reshape(info["shape"])
    return tensors


def cells(space):
    """Each cell's (reduction, reduction_prev, C_prev_prev, C_prev, C), as DARTS's Network builds them."""
    c_pp = c_p = space["stem_multiplier"] * space["init_channels"]
    c = space["init_channels"]
    layers, reduction_prev, out = space["layers"], False, []
    for i in range(layers):
        reduction = i == 1 if layers == 2 else i in (layers // 3, 2 * layers // 3)
        if reduction:
            c *= 2
        out.append((reduction, reduction_prev, c_pp, c_p, c))
        reduction_prev, c_pp, c_p = reduction, c_p, space["multiplier"] * c
    return out


# The test-time views' shifts (dx, dy) in pixels, in the server's order; a positive dx moves the
# picture left.
SHIFTS = [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, -1), (1, -1), (-1, 1)]


def shifted(images, dx, dy):
    """`images` moved by whole pixels, the uncovered edge repeating the border (the server's warp)."""
    n, side = images.shape[0], images.shape[-1]
    theta = torch.tensor([[1.0, 0.0, dx * 2.0 / side], [0.0, 1.0, dy * 2.0 / side]]).expand(n, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


PRIMITIVES = ["none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
              "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"]


class TaskModel(torch.nn.Module):
    """The derived DARTS network of a genotype task model, with its weights."""

    def __init__(self, meta, weights, support_images):
        super().__init__()
        if meta["kind"] != "genotype":
            raise ValueError(f"a {meta['kind']} task model runs in tnas-server; this module builds genotype models")
        self.meta, self.w = meta, weights
        self.space, self.genotype = meta["search_space"], meta["genotype"]
        self.support_bn = meta["adaptation"]["bn"] == "support"
        self.views = meta["adaptation"].get("views", 1)
        self.support_images = support_images
        self.labels = meta["task"]["labels"] if meta.get("task") else None

    @classmethod
    def load(cls, folder):
        folder = Path(folder)
        meta = json.loads((folder / "model.json").read_text())
        support = folder / "support.safetensors"
        support_images = read_safetensors(support)["support_images"] if support.exists() else None
        return cls(meta, read_safetensors(folder / "model.safetensors"), support_images)

    def forward(self, query):
        """Logits [N, n_way] of `query` [N, C, S, S]: with test-time views, the mean of its views'
        log-probabilities."""
        if self.views == 1:
            return self.forward_views(query)
        views = torch.cat([shifted(query, dx, dy) for dx, dy in SHIFTS[: self.views]])
        log_p = F.log_softmax(self.forward_views(views), dim=-1)
        return log_p.view(self.views, query.shape[0], -1).mean(0)

    def forward_views(self, query):
        """Logits of every row of `query`, BatchNorm reading the support set or the batch."""
        if not self.support_bn:
            self.n_stats = query.shape[0]
            return self.logits(query)
        n = self.support_images.shape[0]
        self.n_stats = n
        return self.logits(torch.cat([self.support_images, query]))[n:]

    def bn(self, x, prefix=None):
        """BatchNorm with the statistics of the first `n_stats` rows (biased variance), affine when
        `prefix` names its weight and bias."""
        rows = x[: self.n_stats]
        mean = rows.mean(dim=(0, 2, 3), keepdim=True)
        var = rows.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        x = (x - mean) / torch.sqrt(var + BN_EPS)
        if prefix is not None:
            x = x * self.w[f"{prefix}.weight"].view(1, -1, 1, 1) + self.w[f"{prefix}.bias"].view(1, -1, 1, 1)
        return x

    def conv(self, x, name, stride=1, padding=0, dilation=1):
        weight = self.w[name]
        return F.conv2d(x, weight, None, stride, padding, dilation, groups=x.shape[1] // weight.shape[1])

    def factorized_reduce(self, x, prefix):
        x = F.relu(x)
        if x.shape[2] % 2:
            x = F.pad(x, (1, 0, 1, 0))
        return self.bn(torch.cat([self.conv(x, f"{prefix}.conv_1.weight", 2),
                                  self.conv(x[:, :, 1:, 1:], f"{prefix}.conv_2.weight", 2)], 1))

    def op(self, name, x, prefix, stride):
        if name == "skip_connect":
            return x if stride == 1 else self.factorized_reduce(x, prefix)
        if name in ("max_pool_3x3", "avg_pool_3x3"):
            pooled = (F.max_pool2d(x, 3, stride, 1) if name == "max_pool_3x3"
                      else F.avg_pool2d(x, 3, stride, 1, count_include_pad=False))
            return self.bn(pooled)
        k = int(name[-1])
        if name.startswith("sep_conv"):
            h = self.conv(F.relu(x), f"{prefix}.op.1.weight", stride, k // 2)
            h = F.relu(self.bn(self.conv(h, f"{prefix}.op.2.weight")))
            h = self.conv(h, f"{prefix}.op.5.weight", 1, k // 2)
            return self.bn(self.conv(h, f"{prefix}.op.6.weight"))
        h = self.conv(F.relu(x), f"{prefix}.op.1.weight", stride, k - 1, 2)
        return self.bn(self.conv(h, f"{prefix}.op.2.weight"))

    def logits(self, x):
        h = self.bn(self.conv(x, "stem0.0.weight", 1, 1), "stem0.1")
        if self.space["stem_pools"] >= 1:
            h = F.max_pool2d(h, 2, 2)
        h = self.bn(self.conv(F.relu(h), "stem0.4.weight", 1, 1), "stem0.5")
        if self.space["stem_pools"] >= 2:
            h = F.max_pool2d(h, 2, 2)
        s0 = s1 = h
        for i, (reduction, reduction_prev, *_channels) in enumerate(cells(self.space)):
            p0 = (self.factorized_reduce(s0, f"cells.{i}.preprocess0") if reduction_prev
                  else self.bn(self.conv(F.relu(s0), f"cells.{i}.preprocess0.op.1.weight")))
            states = [p0, self.bn(self.conv(F.relu(s1), f"cells.{i}.preprocess1.op.1.weight"))]
            kind = "reduce" if reduction else "normal"
            edges = self.genotype[kind]
            for node in range(self.space["steps"]):
                first_edge = sum(2 + j for j in range(node))
                total = 0
                for name, j in edges[2 * node : 2 * node + 2]:
                    prefix = f"cells.{i}._ops.{first_edge + j}._ops.{PRIMITIVES.index(name)}"
                    total = total + self.op(name, states[j], prefix, 2 if reduction and j < 2 else 1)
                states.append(total)
            s0, s1 = s1, torch.cat([states[k] for k in self.genotype[f"{kind}_concat"]], 1)
        features = s1.mean(dim=(2, 3))
        return F.linear(features, self.w["classifier.weight"], self.w["classifier.bias"])


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: task_model.py TASK_MODEL_FOLDER QUERIES.safetensors (a tensor named query, [N, C, S, S])")
    model = TaskModel.load(sys.argv[1])
    with torch.no_grad():
        print(json.dumps(model(read_safetensors(sys.argv[2])["query"]).tolist()))
