//! Soft pruning end to end: a model whose θ is annealed over the inner steps answers, through the
//! server, as the network of the genotype it returns: up to the end temperature, or exactly with a
//! hard end even at a mild end temperature; a softmax model does not. Unadapted, a hard-end model
//! is its meta-genotype's prototypical network.

mod common;

use common::{b64, model_input, omniglot_pngs, random_supernet, relative_error, repo_path, serve};
use reqwest::blocking::Client;
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};
use tnas::adapt::{BnMode, InnerLoop, SupportSet, TaskState};
use tnas::model::checkpoint::{task_tensors, Checkpoint};
use tnas::model::metadata::HeadSpec;
use tnas::nn::derived::DerivedNetwork;
use tnas::nn::head::LOGIT_SCALE;
use tnas::nn::learned_rates::LearnedRates;
use tnas::nn::network::Network;
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

/// With no steps, a task of the default model (a hard end) starts where its queries are predicted:
/// its head is built from the prototypes of its meta-genotype's network, so it answers as that
/// network's prototypical classifier (a head built at the start temperature would hold the soft
/// mixture's prototypes while the queries pass through the discrete network).
#[test]
fn an_unadapted_hard_end_model_is_its_meta_genotypes_prototypical_network() {
    let checkpoint =
        Checkpoint::load(&repo_path("models/omniglot-tnas-six-clean2"), Device::Cpu).unwrap();
    let network = checkpoint.network();
    let Network::Supernet(net) = &network else {
        panic!("the default model is a supernet")
    };
    let pngs = omniglot_pngs("Latin", 5, 3);
    let support: Vec<Tensor> = pngs
        .iter()
        .map(|c| model_input(&checkpoint, &c[0]))
        .collect();
    let query: Vec<Tensor> = pngs
        .iter()
        .flat_map(|c| c[1..].iter().map(|png| model_input(&checkpoint, png)))
        .collect();
    let (support, query) = (Tensor::cat(&support, 0), Tensor::cat(&query, 0));
    let labels = Tensor::arange(5, (Kind::Int64, Device::Cpu));
    let set = SupportSet {
        images: &support,
        labels: &labels,
        n_way: 5,
    };
    let head = checkpoint.meta.head;
    let no_steps = InnerLoop {
        steps: 0,
        lr_w: checkpoint.meta.adaptation.lr_w,
        lr_theta: checkpoint.meta.adaptation.lr_theta,
        second_order: false,
    };
    let (mut state, first_loss) = TaskState::start(
        &network,
        &checkpoint.params,
        checkpoint.alphas.as_ref(),
        head,
        &set,
        no_steps.steps,
        Device::Cpu,
    );
    state
        .adapt(&set.on(&network), &no_steps, first_loss, &|| true)
        .unwrap();
    let supernet = state.predict(&network, &set, &query, BnMode::Support);

    let meta_genotype =
        DerivedNetwork::new(net.space, checkpoint.meta_genotype().unwrap()).unwrap();
    let (derived, mut own, _) = state.derive(&network, &meta_genotype, head, &set);
    own.reset_proto_head(&set.on(&derived));
    let prototypical = own.predict(&derived, &set, &query, BnMode::Support);
    let difference = relative_error(&supernet, &prototypical);
    assert!(
        difference < 1e-5,
        "the unadapted model's logits differ from its meta-genotype's prototypical network's by {difference:.2e}"
    );
}
