//! The real `tnas-server` process: graceful shutdown, and refusal to start on a damaged model.

mod common;

use common::{b64, omniglot_pngs, random_supernet, ServerProcess};
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;
use tnas::metadata::HeadSpec;
use tnas::search_space::SearchSpace;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn sigterm_finishes_the_request_in_flight_then_exits_cleanly() {
    let models = tempfile::tempdir().unwrap();
    random_supernet(SearchSpace::tnas_official(1, 28, 8), HeadSpec::Proto { max_way: 20, learned_scale: false }, 9, 1.0).save(&models.path().join("fixture")).unwrap();
    let mut server = ServerProcess::start(models.path(), &["--device", "cpu", "--threads", "1"]);
    let (url, port) = (server.url.clone(), server.port);

    let pngs = omniglot_pngs("Greek", 2, 2);
    let task = json!({
        "support": [{"label": "a", "image": b64(&pngs[0][0])}, {"label": "b", "image": b64(&pngs[1][0])}],
        "query": [{"id": "q", "image": b64(&pngs[0][1])}],
        "steps": 60
    });
    let in_flight = std::thread::spawn(move || reqwest::blocking::Client::new().post(format!("{url}/adapt")).json(&task).send().map(|r| (r.status().as_u16(), r.json::<Value>().ok())));
    std::thread::sleep(Duration::from_millis(300));
    let status = Command::new("kill").args(["-TERM", &server.pid().to_string()]).status().unwrap();
    assert!(status.success());

    let (code, body) = in_flight.join().unwrap().expect("the request in flight gets its answer");
    assert_eq!(code, 200, "{body:?}");
    let body = body.unwrap();
    assert_eq!(body["steps"], 60);
    // The signal came 300 ms after the request; a longer request was still adapting then.
    assert!(body["timing_ms"]["total"].as_f64().unwrap() > 300.0, "the adaptation ended before the signal: {body}");
    let exit = server.wait();
    assert!(exit.success(), "server exited with {exit:?}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "new connections are refused after shutdown");
}

#[test]
fn a_damaged_model_stops_start_up_with_the_file_named() {
    let models = tempfile::tempdir().unwrap();
    let dir = models.path().join("fixture");
    random_supernet(SearchSpace::tnas_official(1, 28, 8), HeadSpec::Proto { max_way: 20, learned_scale: false }, 9, 1.0).save(&dir).unwrap();
    let weights = dir.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() - 100]).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_tnas-server"))
        .args(["--models", models.path().to_str().unwrap(), "--port", &free_port().to_string(), "--device", "cpu"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("model.safetensors") && stderr.contains("sha256"), "{stderr}");
}
