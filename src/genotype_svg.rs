//! A genotype as an SVG picture, laid out the way DARTS's `visualize.py` (graphviz, rankdir=LR)
//! draws a cell, generated in-process so the server needs no external program.
//!
//! Each cell reads left to right: inputs `c_{k-2}`, `c_{k-1}` (darkseagreen2), intermediate nodes
//! `0..n` (lightblue), output `c_{k}` (palegoldenrod); every kept edge is an arrow labelled with its
//! op, and every intermediate node feeds `c_{k}`.

use crate::genotype::{Edge, Genotype, EDGES_PER_NODE};
use std::fmt::Write;

const NODE_W: f64 = 64.0;
const NODE_H: f64 = 30.0;
const COLUMN: f64 = 170.0;
const ROW: f64 = 56.0;
const MARGIN: f64 = 24.0;
const TITLE_H: f64 = 30.0;

/// Both cells, normal above reduction.
pub fn render(genotype: &Genotype) -> String {
    let normal = cell_svg(&genotype.normal, "normal cell");
    let reduce = cell_svg(&genotype.reduce, "reduction cell");
    let width = normal.width.max(reduce.width);
    let height = normal.height + reduce.height;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" viewBox=\"0 0 {width:.0} {height:.0}\" font-family=\"Helvetica, Arial, sans-serif\" font-size=\"13\">\n\
         <defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"8\" markerHeight=\"8\" orient=\"auto-start-reverse\"><path d=\"M 0 0 L 10 5 L 0 10 z\" fill=\"gray\"/></marker></defs>\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let _ = writeln!(svg, "<g>{}</g>", normal.body);
    let _ = writeln!(svg, "<g transform=\"translate(0 {:.0})\">{}</g>", normal.height, reduce.body);
    svg.push_str("</svg>\n");
    svg
}

/// One cell's drawing and its size.
struct CellDrawing {
    body: String,
    width: f64,
    height: f64,
}

/// Where a node's box is centred.
#[derive(Clone, Copy)]
struct Point {
    x: f64,
    y: f64,
}

fn cell_svg(edges: &[Edge], title: &str) -> CellDrawing {
    let steps = edges.len() / EDGES_PER_NODE;
    let rows = steps.max(2) as f64;
    let height = TITLE_H + rows * ROW + 2.0 * MARGIN;
    let top = TITLE_H + MARGIN + NODE_H / 2.0;
    // Inputs in the first column; node i in column i + 1, staggered up and down so that edges that
    // skip columns and their labels do not run through other boxes; output in the last column.
    let inputs = [Point { x: MARGIN + NODE_W / 2.0, y: top }, Point { x: MARGIN + NODE_W / 2.0, y: top + (rows - 1.0) * ROW }];
    let nodes: Vec<Point> = (0..steps).map(|i| Point { x: MARGIN + NODE_W / 2.0 + (i + 1) as f64 * COLUMN, y: top + (i as f64 * 1.7) % rows * ROW }).collect();
    let output = Point { x: MARGIN + NODE_W / 2.0 + (steps + 1) as f64 * COLUMN, y: top + (rows - 1.0) * ROW / 2.0 };
    let source = |j: usize| if j < 2 { inputs[j] } else { nodes[j - 2] };

    let mut body = format!("<text x=\"{MARGIN}\" y=\"{:.0}\" font-size=\"15\" font-weight=\"bold\">{}</text>", TITLE_H, escape(title));
    for (i, Edge(op, j)) in edges.iter().enumerate() {
        if let Some(&to) = nodes.get(i / EDGES_PER_NODE) {
            body.push_str(&arrow(source(*j), to, Some(op)));
        }
    }
    for &node in &nodes {
        body.push_str(&arrow(node, output, None));
    }
    for (point, label, fill) in [(inputs[0], "c_{k-2}", "darkseagreen2"), (inputs[1], "c_{k-1}", "darkseagreen2"), (output, "c_{k}", "palegoldenrod")] {
        body.push_str(&node_box(point, label, fill));
    }
    for (i, &point) in nodes.iter().enumerate() {
        body.push_str(&node_box(point, &i.to_string(), "lightblue"));
    }
    CellDrawing { body, width: output.x + NODE_W / 2.0 + MARGIN, height }
}

/// The SVG colour of a graphviz/X11 name that SVG does not define.
fn svg_colour(name: &str) -> &str {
    match name {
        "darkseagreen2" => "#b4eeb4",
        other => other,
    }
}

fn node_box(at: Point, label: &str, fill: &str) -> String {
    format!(
        "<g class=\"node\" data-fill=\"{fill}\"><rect x=\"{:.1}\" y=\"{:.1}\" width=\"{NODE_W}\" height=\"{NODE_H}\" rx=\"8\" fill=\"{}\" stroke=\"black\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text></g>",
        at.x - NODE_W / 2.0,
        at.y - NODE_H / 2.0,
        svg_colour(fill),
        at.x,
        at.y + 4.5,
        escape(label)
    )
}

/// A gray arrow between two boxes' facing sides, with the op name at its middle on a white patch.
fn arrow(from: Point, to: Point, label: Option<&str>) -> String {
    let (x1, x2) = (from.x + NODE_W / 2.0, to.x - NODE_W / 2.0);
    let bend = if (to.y - from.y).abs() < 1.0 && to.x - from.x > COLUMN * 1.5 { -ROW * 0.6 } else { 0.0 };
    let (cx, cy) = ((x1 + x2) / 2.0, (from.y + to.y) / 2.0 + bend);
    let mut svg = format!("<path d=\"M {x1:.1} {:.1} Q {cx:.1} {cy:.1} {x2:.1} {:.1}\" fill=\"none\" stroke=\"gray\" marker-end=\"url(#arrow)\"/>", from.y, to.y);
    if let Some(text) = label {
        let (mx, my) = ((x1 + 2.0 * cx + x2) / 4.0, (from.y + 2.0 * cy + to.y) / 4.0);
        let w = 7.2 * text.len() as f64;
        let _ = write!(
            svg,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{w:.1}\" height=\"15\" fill=\"white\" opacity=\"0.85\"/><text x=\"{mx:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"11\" fill=\"#333\">{}</text>",
            mx - w / 2.0,
            my - 11.0,
            my,
            escape(text)
        );
    }
    svg
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn genotype() -> Genotype {
        let edges = |pairs: &[(&str, usize)]| pairs.iter().map(|(op, j)| Edge(op.to_string(), *j)).collect();
        Genotype {
            normal: edges(&[("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2)]),
            normal_concat: vec![2, 3, 4, 5],
            reduce: edges(&[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("dil_conv_5x5", 2), ("max_pool_3x3", 1), ("max_pool_3x3", 0), ("dil_conv_5x5", 2), ("dil_conv_5x5", 3), ("max_pool_3x3", 4)]),
            reduce_concat: vec![2, 3, 4, 5],
        }
    }

    /// Tags open and close in order (a small well-formedness check without an XML crate).
    fn balanced(svg: &str) -> bool {
        let mut stack: Vec<&str> = Vec::new();
        for tag in svg.split('<').skip(1).map(|t| t.split('>').next().unwrap_or("")) {
            let name = tag.trim_start_matches('/').split([' ', '/']).next().unwrap_or("");
            if tag.starts_with('/') {
                if stack.pop() != Some(name) {
                    return false;
                }
            } else if !tag.ends_with('/') {
                stack.push(name);
            }
        }
        stack.is_empty()
    }

    #[test]
    fn draws_both_cells_as_darts_does() {
        let svg = render(&genotype());
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(balanced(&svg), "unbalanced tags");
        for colour in ["darkseagreen2", "lightblue", "palegoldenrod"] {
            assert!(svg.contains(colour), "{colour}");
        }
        for label in ["c_{k-2}", "c_{k-1}", "c_{k}"] {
            assert_eq!(svg.matches(&format!(">{label}<")).count(), 2, "{label} in both cells");
        }
        let labelled = |op: &str| svg.matches(&format!(">{op}</text>")).count();
        assert_eq!(labelled("sep_conv_3x3"), 5);
        assert_eq!(labelled("skip_connect"), 3);
        assert_eq!(labelled("max_pool_3x3"), 5);
        assert_eq!(labelled("dil_conv_5x5"), 3);
        // 16 labelled op edges plus one edge from each of the 8 intermediate nodes to c_{k}.
        assert_eq!(svg.matches("marker-end=\"url(#arrow)\"").count(), 24);
    }
}
