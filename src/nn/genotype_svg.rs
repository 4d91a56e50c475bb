//! A genotype drawn as SVG the way DARTS's `visualize.py` draws a cell with graphviz (rankdir=LR),
//! but generated in-process so that serving a picture needs no external program.
//!
//! A cell reads left to right: the inputs `c_{k-2}` (above) and `c_{k-1}` (below) share the first
//! column, intermediate node `i` sits in column `i + 1` and the output `c_{k}` in the last. Edges
//! between neighbouring columns are straight; longer ones arc (above for `c_{k-2}` and node-to-node
//! edges, below for `c_{k-1}` and the edges into `c_{k}`) so that they pass around the boxes they skip.

use crate::nn::genotype::{Edge, Genotype, EDGES_PER_NODE};
use std::fmt::Write;

const NODE_W: f64 = 72.0;
const NODE_H: f64 = 32.0;
/// Distance between column centres: wide enough for two op labels side by side.
const COLUMN: f64 = 190.0;
/// How far `c_{k-2}` sits above, and `c_{k-1}` below, the row of intermediate nodes.
const INPUT_DY: f64 = 64.0;
/// How far an edge's control point moves off its chord per column it skips.
const ARC: f64 = 70.0;
const LABEL_H: f64 = 16.0;
/// Estimated advance of one 12px Helvetica character, for sizing a label's white patch.
const CHAR_W: f64 = 6.8;
const MARGIN: f64 = 16.0;
const TITLE_H: f64 = 22.0;
/// Spots along an edge tried for its label, middle first, until one covers no node or earlier label.
const LABEL_SPOTS: [f64; 7] = [0.5, 0.4, 0.6, 0.3, 0.7, 0.2, 0.8];
/// A gray arrowhead whose tip is the end of the path, so arrows stop on a box's outline.
const DEFS: &str = "<defs><marker id=\"genotype-arrowhead\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" \
    markerWidth=\"7\" markerHeight=\"7\" orient=\"auto\"><path d=\"M 0 0 L 10 5 L 0 10 z\" fill=\"gray\"/></marker></defs>";

/// The normal cell above the reduction cell, each under its title.
pub fn render(genotype: &Genotype) -> String {
    let cells = [
        draw_cell(&genotype.normal, "normal cell"),
        draw_cell(&genotype.reduce, "reduction cell"),
    ];
    let width = cells.iter().map(|c| c.width).fold(0.0, f64::max);
    let height: f64 = cells.iter().map(|c| c.height).sum();
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" \
         viewBox=\"0 0 {width:.0} {height:.0}\" font-family=\"Helvetica, Arial, sans-serif\" font-size=\"14\">\n\
         {DEFS}\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for (cell, top) in cells.iter().zip([0.0, cells[0].height]) {
        let _ = writeln!(
            svg,
            "<g transform=\"translate(0 {top:.0})\">{}</g>",
            cell.body
        );
    }
    svg + "</svg>\n"
}

#[derive(Clone, Copy)]
struct Point {
    x: f64,
    y: f64,
}

/// An axis-aligned box: a node outline, a label's patch, or the extent of a whole drawing.
#[derive(Clone, Copy)]
struct Rect {
    x0: f64,
    y0: f64,
    x1: f64,
    y1: f64,
}

impl Rect {
    fn around(centre: Point, width: f64, height: f64) -> Rect {
        let (w, h) = (width / 2.0, height / 2.0);
        Rect {
            x0: centre.x - w,
            y0: centre.y - h,
            x1: centre.x + w,
            y1: centre.y + h,
        }
    }

    fn overlaps(&self, other: &Rect) -> bool {
        self.x0 < other.x1 && other.x0 < self.x1 && self.y0 < other.y1 && other.y0 < self.y1
    }

    fn union(self, o: Rect) -> Rect {
        Rect {
            x0: self.x0.min(o.x0),
            y0: self.y0.min(o.y0),
            x1: self.x1.max(o.x1),
            y1: self.y1.max(o.y1),
        }
    }
}

/// One state of a cell: its name (also its label), where it sits, and its graphviz fill.
struct Node {
    name: String,
    at: Point,
    fill: &'static str,
}

/// One cell's SVG fragment (in cell coordinates, origin top left) and its size.
struct Drawing {
    body: String,
    width: f64,
    height: f64,
}

/// The cell's states indexed as genotype edges index them (0 = `c_{k-2}`, 1 = `c_{k-1}`,
/// `i + 2` = intermediate node `i`), followed by the output `c_{k}`.
fn place_nodes(steps: usize) -> Vec<Node> {
    let node = |name: String, column: usize, y: f64, fill| Node {
        name,
        at: Point {
            x: column as f64 * COLUMN,
            y,
        },
        fill,
    };
    let input = |name: &str, y: f64| node(name.into(), 0, y, "darkseagreen2");
    let mut nodes = vec![input("c_{k-2}", -INPUT_DY), input("c_{k-1}", INPUT_DY)];
    nodes.extend((0..steps).map(|i| node(i.to_string(), i + 1, 0.0, "lightblue")));
    nodes.push(node("c_{k}".into(), steps + 1, 0.0, "palegoldenrod"));
    nodes
}

/// The arrows of a cell as (source state, target state, op label). Edges no DARTS cell can have
/// (a source that is not yet computed, a trailing odd edge) are left out: the server draws stored
/// genotypes and a picture missing a bad edge is better than a panic.
fn arrows(edges: &[Edge]) -> Vec<(usize, usize, Option<&str>)> {
    let steps = edges.len() / EDGES_PER_NODE;
    let mut arrows: Vec<_> = edges
        .iter()
        .enumerate()
        .map(|(i, Edge(op, j))| (*j, i / EDGES_PER_NODE + 2, Some(op.as_str())))
        .filter(|&(from, to, _)| to < steps + 2 && from < to)
        .collect();
    arrows.extend((2..steps + 2).map(|node| (node, steps + 2, None)));
    arrows
}

/// One cell in its own coordinates. The drawing is sized from everything drawn (boxes, sampled
/// curves, labels) because how far arcs reach depends on the genotype, and nothing may be clipped.
fn draw_cell(edges: &[Edge], title: &str) -> Drawing {
    let nodes = place_nodes(edges.len() / EDGES_PER_NODE);
    let output = nodes.len() - 1;
    let mut taken: Vec<Rect> = nodes
        .iter()
        .map(|n| Rect::around(n.at, NODE_W, NODE_H))
        .collect();
    let mut extent = taken.iter().fold(taken[0], |a, &b| a.union(b));
    let (mut paths, mut labels) = (String::new(), String::new());
    for (from, to, label) in arrows(edges) {
        let below = from == 1 || to == output;
        let curve = Curve::between(nodes[from].at, nodes[to].at, if below { 1.0 } else { -1.0 });
        extent = (0..=10).fold(extent, |e, k| {
            e.union(Rect::around(curve.at(k as f64 / 10.0), 0.0, 0.0))
        });
        let name = escape(&format!("{}->{}", nodes[from].name, nodes[to].name));
        let _ = write!(
            paths,
            "<g class=\"edge\"><title>{name}</title>{}</g>",
            curve.svg()
        );
        if let Some(text) = label {
            let patch = place_label(&curve, text, &taken);
            taken.push(patch);
            extent = extent.union(patch);
            labels.push_str(&label_svg(patch, text));
        }
    }
    let (dx, dy) = (MARGIN - extent.x0, MARGIN + TITLE_H - extent.y0);
    let boxes: String = nodes.iter().map(node_svg).collect();
    let body = format!(
        "<text x=\"{MARGIN}\" y=\"{:.0}\" font-size=\"16\" font-weight=\"bold\">{}</text>\
         <g transform=\"translate({dx:.1} {dy:.1})\">{paths}{labels}{boxes}</g>",
        MARGIN + 14.0,
        escape(title)
    );
    Drawing {
        body,
        width: extent.x1 - extent.x0 + 2.0 * MARGIN,
        height: extent.y1 - extent.y0 + 2.0 * MARGIN + TITLE_H,
    }
}

/// A quadratic Bézier edge from one box's outline to another's.
struct Curve {
    start: Point,
    control: Point,
    end: Point,
}

impl Curve {
    /// Straight between neighbouring columns; otherwise the control point moves `side` (+1 down,
    /// -1 up) in proportion to the columns skipped, so the curve clears the boxes in between.
    fn between(from: Point, to: Point, side: f64) -> Curve {
        let skipped = ((to.x - from.x) / COLUMN).round() - 1.0;
        let control = Point {
            x: (from.x + to.x) / 2.0,
            y: (from.y + to.y) / 2.0 + side * ARC * skipped.max(0.0),
        };
        Curve {
            start: clip(from, control),
            control,
            end: clip(to, control),
        }
    }

    fn at(&self, t: f64) -> Point {
        let (a, b, c) = ((1.0 - t) * (1.0 - t), 2.0 * t * (1.0 - t), t * t);
        Point {
            x: a * self.start.x + b * self.control.x + c * self.end.x,
            y: a * self.start.y + b * self.control.y + c * self.end.y,
        }
    }

    fn svg(&self) -> String {
        let (s, c, e) = (self.start, self.control, self.end);
        format!(
            "<path d=\"M {:.1} {:.1} Q {:.1} {:.1} {:.1} {:.1}\" fill=\"none\" stroke=\"gray\" stroke-width=\"1.3\" \
             marker-end=\"url(#genotype-arrowhead)\"/>",
            s.x, s.y, c.x, c.y, e.x, e.y
        )
    }
}

/// Where the segment from a node box's centre toward `toward` crosses its outline, so that an edge
/// starts and its arrowhead ends on the box rather than under it.
fn clip(centre: Point, toward: Point) -> Point {
    let (dx, dy) = (toward.x - centre.x, toward.y - centre.y);
    let scale = (NODE_W / 2.0 / dx.abs()).min(NODE_H / 2.0 / dy.abs());
    Point {
        x: centre.x + dx * scale,
        y: centre.y + dy * scale,
    }
}

/// The white patch behind an op label: the first spot along the edge that hides no node and no
/// earlier label (the middle if none is free).
fn place_label(curve: &Curve, text: &str, taken: &[Rect]) -> Rect {
    let width = text.chars().count() as f64 * CHAR_W + 8.0;
    let patch = |t: f64| Rect::around(curve.at(t), width, LABEL_H);
    LABEL_SPOTS
        .iter()
        .map(|&t| patch(t))
        .find(|p| !taken.iter().any(|r| r.overlaps(p)))
        .unwrap_or_else(|| patch(0.5))
}

/// The op name centred on its white patch, so it stays legible over any edge it crosses.
fn label_svg(patch: Rect, text: &str) -> String {
    let (x, y, width) = (
        (patch.x0 + patch.x1) / 2.0,
        (patch.y0 + patch.y1) / 2.0,
        patch.x1 - patch.x0,
    );
    format!(
        "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{width:.1}\" height=\"{LABEL_H}\" fill=\"white\"/>\
         <text x=\"{x:.1}\" y=\"{y:.1}\" dy=\"0.35em\" text-anchor=\"middle\" font-size=\"12\">{}</text>",
        patch.x0,
        patch.y0,
        escape(text)
    )
}

/// A rounded box; the graphviz colour name is kept as the class, since `darkseagreen2` is an X11
/// name that SVG does not define.
fn node_svg(node: &Node) -> String {
    let (class, name, Point { x, y }) = (node.fill, escape(&node.name), node.at);
    let fill = if class == "darkseagreen2" {
        "#b4eeb4"
    } else {
        class
    };
    format!(
        "<g class=\"node\"><title>{name}</title><rect class=\"{class}\" x=\"{:.1}\" y=\"{:.1}\" width=\"{NODE_W}\" \
         height=\"{NODE_H}\" rx=\"7\" fill=\"{fill}\" stroke=\"black\"/><text x=\"{x:.1}\" y=\"{y:.1}\" dy=\"0.35em\" \
         text-anchor=\"middle\">{name}</text></g>",
        x - NODE_W / 2.0,
        y - NODE_H / 2.0
    )
}

/// Text safe inside both element content and double-quoted attribute values.
fn escape(text: &str) -> String {
    let amp = text.replace('&', "&amp;");
    amp.replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(pairs: &[(&str, usize)]) -> Vec<Edge> {
        pairs
            .iter()
            .map(|&(op, j)| Edge(op.to_string(), j))
            .collect()
    }

    fn both(edges: Vec<Edge>) -> Genotype {
        Genotype {
            normal: edges.clone(),
            normal_concat: vec![],
            reduce: edges,
            reduce_concat: vec![],
        }
    }

    /// A DARTS-like normal cell, and a reduction cell of pools and dilated convolutions.
    fn genotype() -> Genotype {
        let (sep, skip, max, dil) = (
            "sep_conv_3x3",
            "skip_connect",
            "max_pool_3x3",
            "dil_conv_5x5",
        );
        Genotype {
            normal: cell(&[
                (sep, 0),
                (sep, 1),
                (skip, 0),
                (sep, 1),
                (skip, 0),
                (sep, 1),
                (sep, 0),
                (skip, 2),
            ]),
            normal_concat: vec![2, 3, 4, 5],
            reduce: cell(&[
                (max, 0),
                (max, 1),
                (dil, 2),
                (max, 1),
                (max, 0),
                (dil, 3),
                (dil, 4),
                (max, 2),
            ]),
            reduce_concat: vec![2, 3, 4, 5],
        }
    }

    /// Enough of XML to catch broken output without an XML crate: one root element, tags closed in
    /// order, attribute values quoted, and every `&` starting a known entity.
    fn well_formed(svg: &str) -> Result<(), String> {
        let (mut open, mut roots, mut rest) = (Vec::new(), 0, svg);
        while let Some(lt) = rest.find('<') {
            let gt = lt + rest[lt..].find('>').ok_or("unterminated tag")?;
            let (text, tag) = (&rest[..lt], &rest[lt + 1..gt]);
            if open.is_empty() && !text.trim().is_empty() {
                return Err(format!("text outside the root: {text:?}"));
            }
            for piece in [text, tag] {
                let entities = ["amp;", "lt;", "gt;", "quot;", "apos;"];
                if piece
                    .split('&')
                    .skip(1)
                    .any(|e| !entities.iter().any(|n| e.starts_with(n)))
                {
                    return Err(format!("bad entity in {piece:?}"));
                }
            }
            if tag.contains('<') || tag.matches('"').count() % 2 == 1 {
                return Err(format!("bad tag <{tag}>"));
            }
            if let Some(name) = tag.strip_prefix('/') {
                if open.pop() != Some(name) {
                    return Err(format!("unexpected </{name}>"));
                }
            } else {
                roots += usize::from(open.is_empty());
                if !tag.ends_with('/') {
                    open.push(tag.split_whitespace().next().unwrap_or(""));
                }
            }
            rest = &rest[gt + 1..];
        }
        match (open.is_empty(), roots, rest.trim().is_empty()) {
            (true, 1, true) => Ok(()),
            _ => Err(format!(
                "unclosed {open:?}, {roots} roots, trailing {rest:?}"
            )),
        }
    }

    #[test]
    fn draws_both_cells_as_darts_does() {
        let g = genotype();
        let svg = render(&g);
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        well_formed(&svg).unwrap();
        for colour in [
            "darkseagreen2",
            "lightblue",
            "palegoldenrod",
            "stroke=\"gray\"",
        ] {
            assert!(svg.contains(colour), "{colour}");
        }
        let (normal, reduce) = svg.split_once(">reduction cell</text>").unwrap();
        let names = ["c_{k-2}", "c_{k-1}", "0", "1", "2", "3"];
        for (drawn, cell) in [(normal, &g.normal), (reduce, &g.reduce)] {
            for name in names.iter().chain(&["c_{k}"]) {
                assert_eq!(
                    drawn.matches(&format!("\">{name}</text>")).count(),
                    1,
                    "node {name}"
                );
            }
            for Edge(op, _) in cell.iter() {
                let kept = cell.iter().filter(|e| &e.0 == op).count();
                assert_eq!(
                    drawn.matches(&format!(">{op}</text>")).count(),
                    kept,
                    "{op} labels"
                );
            }
            let edge = |from: &str, to: &str| {
                drawn
                    .matches(&format!("<title>{from}-&gt;{to}</title>"))
                    .count()
            };
            for (i, Edge(_, j)) in cell.iter().enumerate() {
                assert!(
                    edge(names[*j], names[i / EDGES_PER_NODE + 2]) >= 1,
                    "edge {i} is drawn"
                );
            }
            for node in &names[2..] {
                assert_eq!(edge(node, "c_{k}"), 1, "node {node} feeds c_{{k}}");
            }
            assert_eq!(
                drawn.matches("<g class=\"edge\">").count(),
                12,
                "8 op edges and 4 edges into c_{{k}}"
            );
        }
    }

    #[test]
    fn the_node_count_follows_the_edge_count() {
        let skip = "skip_connect";
        let svg = render(&both(cell(&[
            (skip, 0),
            ("sep_conv_5x5", 1),
            ("avg_pool_3x3", 2),
            (skip, 1),
            ("dil_conv_3x3", 3),
            (skip, 0),
        ])));
        well_formed(&svg).unwrap();
        assert_eq!(svg.matches("\">2</text>").count(), 2);
        assert!(!svg.contains("\">3</text>"));
        assert_eq!(svg.matches("-&gt;c_{k}</title>").count(), 6);
    }

    #[test]
    fn text_is_escaped_and_impossible_edges_are_skipped() {
        let odd = [
            ("a<b>&\"c'", 0),
            ("skip_connect", 1),
            ("future", 3),
            ("skip_connect", 9),
            ("trailing", 0),
        ];
        let svg = render(&both(cell(&odd)));
        well_formed(&svg).unwrap();
        assert_eq!(
            svg.matches(">a&lt;b&gt;&amp;&quot;c&apos;</text>").count(),
            2
        );
        assert!(!svg.contains("future") && !svg.contains("trailing"));
    }

    #[test]
    fn the_checker_rejects_broken_xml() {
        for bad in [
            "<svg><g></svg>",
            "<svg a=\"1></svg>",
            "<svg>&nbsp;</svg>",
            "<svg/><svg/>",
            "<svg>",
        ] {
            assert!(well_formed(bad).is_err(), "{bad}");
        }
    }
}
