//! DARTS genotypes: the discrete architecture decoded from architecture weights.
//!
//! Plain serde data and pure functions; no tensors. The JSON form is DARTS's `Genotype` namedtuple
//! (`{"normal": [["sep_conv_3x3", 0], ...], "normal_concat": [2, 3, 4, 5], ...}`) so users can paste
//! it into DARTS or T-NAS code, and [`Genotype::to_python`] prints the namedtuple's repr.

use crate::nn::search_space::{Primitive, SearchSpace, NONE_INDEX, PRIMITIVES};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One kept edge of a cell: the operation and the index of the state it reads
/// (0 = c_{k-2}, 1 = c_{k-1}, 2.. = intermediate nodes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Edge(pub String, pub usize);

/// A DARTS genotype: two kept edges per intermediate node, for the normal and the reduction cell.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Genotype {
    /// `[op, input]` pairs, two per intermediate node.
    #[schema(value_type = Vec<Vec<serde_json::Value>>, example = json!([["sep_conv_3x3", 0], ["skip_connect", 1]]))]
    pub normal: Vec<Edge>,
    pub normal_concat: Vec<usize>,
    #[schema(value_type = Vec<Vec<serde_json::Value>>, example = json!([["max_pool_3x3", 0], ["sep_conv_5x5", 1]]))]
    pub reduce: Vec<Edge>,
    pub reduce_concat: Vec<usize>,
}

/// Edges kept per intermediate node by the DARTS rule.
pub const EDGES_PER_NODE: usize = 2;

/// DARTS decoding rule for one cell (`model_search.Network.genotype._parse`).
///
/// `weights` is softmax(α) with shape [num_edges][8]. For each node, its input edges are ranked by
/// their strongest non-`none` weight and the top two are kept, strongest first; a kept edge's op is
/// the argmax over non-`none` ops. Ties go to the lower index (stable sort, strict `>`).
pub fn decode_cell(weights: &[Vec<f32>], steps: usize) -> Vec<Edge> {
    let mut gene = Vec::with_capacity(steps * EDGES_PER_NODE);
    let mut start = 0;
    for node in 0..steps {
        let inputs = node + 2;
        let rows = &weights[start..start + inputs];
        let mut order: Vec<usize> = (0..inputs).collect();
        order.sort_by(|&a, &b| {
            strongest_op(&rows[b])
                .1
                .total_cmp(&strongest_op(&rows[a]).1)
        });
        for &j in order.iter().take(EDGES_PER_NODE) {
            gene.push(Edge(PRIMITIVES[strongest_op(&rows[j]).0].to_string(), j));
        }
        start += inputs;
    }
    gene
}

/// (index, weight) of the strongest non-`none` op on one edge; the lower index wins a tie.
fn strongest_op(row: &[f32]) -> (usize, f32) {
    let mut best = (usize::MAX, f32::NEG_INFINITY);
    for (k, &w) in row.iter().enumerate() {
        if k != NONE_INDEX && (best.0 == usize::MAX || w > best.1) {
            best = (k, w);
        }
    }
    best
}

impl Genotype {
    /// Decodes both cells from softmaxed architecture weights (T-NAS / DARTS `genotype()`).
    pub fn decode(space: &SearchSpace, normal: &[Vec<f32>], reduce: &[Vec<f32>]) -> Genotype {
        let concat: Vec<usize> = (2 + space.steps - space.multiplier..space.steps + 2).collect();
        Genotype {
            normal: decode_cell(normal, space.steps),
            normal_concat: concat.clone(),
            reduce: decode_cell(reduce, space.steps),
            reduce_concat: concat,
        }
    }

    /// The repr of DARTS's `Genotype` namedtuple, ready to paste into `genotypes.py`.
    pub fn to_python(&self) -> String {
        let edges = |cell: &[Edge]| {
            let items: Vec<String> = cell
                .iter()
                .map(|Edge(op, j)| format!("('{op}', {j})"))
                .collect();
            format!("[{}]", items.join(", "))
        };
        let concat = |c: &[usize]| format!("{c:?}");
        format!(
            "Genotype(normal={}, normal_concat={}, reduce={}, reduce_concat={})",
            edges(&self.normal),
            concat(&self.normal_concat),
            edges(&self.reduce),
            concat(&self.reduce_concat)
        )
    }

    /// Checks that every op is a known non-`none` primitive, every input index is reachable, and
    /// each cell concatenates `multiplier` of its node states (the width the next cell expects).
    pub fn validate(&self, space: &SearchSpace) -> Result<(), String> {
        let nodes = 2..space.steps + 2;
        for (name, concat) in [
            ("normal_concat", &self.normal_concat),
            ("reduce_concat", &self.reduce_concat),
        ] {
            if concat.len() != space.multiplier || concat.iter().any(|s| !nodes.contains(s)) {
                return Err(format!(
                    "{name} {concat:?}: expected {} of the node states {} to {}",
                    space.multiplier,
                    nodes.start,
                    nodes.end - 1
                ));
            }
        }
        for (name, cell) in [("normal", &self.normal), ("reduce", &self.reduce)] {
            if cell.len() != space.steps * EDGES_PER_NODE {
                return Err(format!(
                    "{name} has {} edges, expected {}",
                    cell.len(),
                    space.steps * EDGES_PER_NODE
                ));
            }
            for (i, Edge(op, input)) in cell.iter().enumerate() {
                let node = i / EDGES_PER_NODE;
                match Primitive::from_name(op) {
                    Some(Primitive::None) | None => {
                        return Err(format!("{name} edge {i}: unusable op '{op}'"))
                    }
                    Some(_) => {}
                }
                if *input >= node + 2 {
                    return Err(format!(
                        "{name} edge {i}: node {node} cannot read state {input}"
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uniform_rows(n: usize) -> Vec<Vec<f32>> {
        vec![vec![0.125; 8]; n]
    }

    #[test]
    fn keeps_the_two_strongest_inputs_strongest_first() {
        let mut w = uniform_rows(14);
        // node 0 (edges 0, 1): edge 1 has sep_conv_5x5 strongest.
        w[1][5] = 0.5;
        w[0][6] = 0.3;
        // node 1 (edges 2..5): input 2 strongest, then input 0; `none` must be ignored.
        w[4][3] = 0.6;
        w[2][1] = 0.4;
        w[3][0] = 0.9;
        let gene = decode_cell(&w, 4);
        assert_eq!(gene[0], Edge("sep_conv_5x5".into(), 1));
        assert_eq!(gene[1], Edge("dil_conv_3x3".into(), 0));
        assert_eq!(gene[2], Edge("skip_connect".into(), 2));
        assert_eq!(gene[3], Edge("max_pool_3x3".into(), 0));
        assert_eq!(gene.len(), 8);
    }

    #[test]
    fn exact_ties_go_to_the_lower_index() {
        let gene = decode_cell(&uniform_rows(14), 4);
        // Every edge ties: inputs 0 and 1 are kept, op max_pool_3x3 (index 1, the first non-none).
        for pair in gene.chunks(2) {
            assert_eq!(pair[0], Edge("max_pool_3x3".into(), 0));
            assert_eq!(pair[1], Edge("max_pool_3x3".into(), 1));
        }
    }

    #[test]
    fn python_repr_matches_the_darts_namedtuple() {
        let space = SearchSpace::tnas_official(1, 28, 8);
        let g = Genotype::decode(&space, &uniform_rows(14), &uniform_rows(14));
        let repr = g.to_python();
        assert!(repr.starts_with("Genotype(normal=[('max_pool_3x3', 0), ('max_pool_3x3', 1), "));
        assert!(repr.ends_with("reduce_concat=[2, 3, 4, 5])"));
        assert!(g.validate(&space).is_ok());
    }

    #[test]
    fn json_form_is_pairs() {
        let space = SearchSpace::tnas_official(1, 28, 8);
        let g = Genotype::decode(&space, &uniform_rows(14), &uniform_rows(14));
        let json = serde_json::to_value(&g).unwrap();
        assert_eq!(json["normal"][0], serde_json::json!(["max_pool_3x3", 0]));
        assert_eq!(json["normal_concat"], serde_json::json!([2, 3, 4, 5]));
        let back: Genotype = serde_json::from_value(json).unwrap();
        assert_eq!(back, g);
    }

    #[test]
    fn invalid_genotypes_are_rejected() {
        let space = SearchSpace::tnas_official(1, 28, 8);
        let mut g = Genotype::decode(&space, &uniform_rows(14), &uniform_rows(14));
        g.normal[3] = Edge("none".into(), 0);
        assert!(g.validate(&space).unwrap_err().contains("none"));
        g.normal[3] = Edge("sep_conv_3x3".into(), 3);
        assert!(g.validate(&space).unwrap_err().contains("cannot read"));
        g.normal[3] = Edge("sep_conv_3x3".into(), 0);
        assert!(g.validate(&space).is_ok());
        g.reduce_concat = vec![2, 3, 4, 6];
        assert!(g.validate(&space).unwrap_err().contains("reduce_concat"));
        g.reduce_concat = vec![2, 3, 4];
        assert!(g.validate(&space).unwrap_err().contains("reduce_concat"));
    }
}
