//! Soft pruning end to end: a model whose θ is annealed over the inner steps answers, through the
//! server, as the network of the genotype it returns: up to the end temperature, or exactly with a
//! hard end even at a mild end temperature; a softmax model does not.

mod common;

use common::{b64, omniglot_pngs, random_supernet, serve};
use reqwest::blocking::Client;
use serde_json::{json, Value};
use tch::{Device, Tensor};
use tnas::model::checkpoint::task_tensors;
use tnas::model::metadata::HeadSpec;
use tnas::nn::head::LOGIT_SCALE;
use tnas::nn::learned_rates::LearnedRates;
use tnas::nn::relaxation::Relaxation;
use tnas::nn::search_space::SearchSpace;

/// A T-NAS++-shaped fixture: annealed relaxation with pairwise inputs, a learned logit scale and
/// learned inner rates (random weights: a fixture for the plumbing, not a trained model).
fn save_fixture(dir: &std::path::Path, relaxation: Relaxation) {
    let space = SearchSpace {
        stem_pools: 2,
        ..SearchSpace::tnas_official(1, 28, 8)
    };
    let head = HeadSpec::Proto {
        max_way: 20,
        learned_scale: true,
    };
    let mut checkpoint = random_supernet(space, head, 11, 1.0);
    checkpoint
        .params
        .insert(LOGIT_SCALE.into(), Tensor::from_slice(&[0.3f32.ln()]));
    checkpoint.meta.relaxation = relaxation;
    checkpoint.meta.adaptation.learned_rates = true;
    checkpoint.rates = Some(LearnedRates::initial(
        3,
        task_tensors(&checkpoint.params, head),
        0.05,
        10.0,
        Device::Cpu,
    ));
    checkpoint.meta.name = "fixture".into();
    checkpoint.save(dir).unwrap();
}

/// The query probabilities of a 4-way 1-shot Greek task adapted for 3 steps, predicted by `with`.
fn probabilities(url: &str, with: &str) -> Vec<f64> {
    let pngs = omniglot_pngs("Greek", 4, 3);
    let support: Vec<Value> = pngs
        .iter()
        .enumerate()
        .map(|(c, d)| json!({"label": format!("c{c}"), "image": b64(&d[0])}))
        .collect();
    let query: Vec<Value> = pngs
        .iter()
        .enumerate()
        .flat_map(|(c, d)| {
            (1..3).map(move |i| json!({"id": format!("q{c}{i}"), "image": b64(&d[i])}))
        })
        .collect();
    let body = json!({"support": support, "query": query, "steps": 3, "predict_with": with});
    let response = Client::new()
        .post(format!("{url}/adapt"))
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().unwrap();
    assert_eq!(body["genotype"]["normal"].as_array().unwrap().len(), 8);
    body["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            p["probabilities"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn largest_difference(relaxation: Relaxation) -> f64 {
    let models = tempfile::tempdir().unwrap();
    save_fixture(&models.path().join("fixture"), relaxation);
    let url = serve(models.path(), &[]);
    let (supernet, derived) = (
        probabilities(&url, "supernet"),
        probabilities(&url, "derived"),
    );
    supernet
        .iter()
        .zip(&derived)
        .map(|(s, d)| (s - d).abs())
        .fold(0.0, f64::max)
}

#[test]
fn an_annealed_supernet_answers_as_its_genotypes_network() {
    let annealed = largest_difference(Relaxation::Annealed {
        start: 1.0,
        end: 1e-4,
        pairwise_inputs: true,
        hard_end: false,
    });
    assert!(
        annealed < 1e-3,
        "the derived network's probabilities differ from the supernet's by {annealed}"
    );
    let softmax = largest_difference(Relaxation::Softmax);
    assert!(
        softmax > 1e-2,
        "a softmax supernet is not its genotype's network (largest difference {softmax})"
    );
}

#[test]
fn a_hard_end_answers_as_its_genotypes_network_at_a_mild_end_temperature() {
    let mild = Relaxation::Annealed {
        start: 1.0,
        end: 0.1,
        pairwise_inputs: true,
        hard_end: false,
    };
    let hard = largest_difference(Relaxation::Annealed {
        start: 1.0,
        end: 0.1,
        pairwise_inputs: true,
        hard_end: true,
    });
    assert!(
        hard < 1e-4,
        "the derived network's probabilities differ from the hard-end supernet's by {hard}"
    );
    let soft = largest_difference(mild);
    assert!(
        soft > 1e-2,
        "at τ 0.1 a soft end is still a mixture (largest difference {soft})"
    );
}
