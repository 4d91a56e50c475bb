"""Decodes many alpha pairs with the reference DARTS rule: IN.safetensors → OUT.json.

IN holds `normal_<i>` and `reduce_<i>` ([14, 8] logits); OUT is the list of genotypes in order.
"""
import json
import sys

from safetensors.torch import load_file

from tnas_reference import genotype_of

SPACE = {"steps": 4, "multiplier": 4}


def main(inp, out):
    tensors = load_file(inp)
    count = len([k for k in tensors if k.startswith("normal_")])
    genotypes = [genotype_of(tensors[f"normal_{i}"], tensors[f"reduce_{i}"], SPACE) for i in range(count)]
    json.dump(genotypes, open(out, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
