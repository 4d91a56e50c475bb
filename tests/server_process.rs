//! The real `tnas-server` process: graceful shutdown, what a connection may cost, refusal to start
//! on a damaged or senseless model, and responses that never carry libtorch's text.

mod common;

use common::cluster::free_port;
use common::{b64, fixture_models, fixture_supernet, omniglot_pngs, ServerProcess};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn sigterm_finishes_the_request_in_flight_then_exits_cleanly() {
    let models = fixture_models();
    let mut server = ServerProcess::start(models.path(), &["--device", "cpu", "--threads", "1"]);
    let (url, port) = (server.url.clone(), server.port);

    let pngs = omniglot_pngs("Greek", 2, 2);
    let task = json!({
        "support": [{"label": "a", "image": b64(&pngs[0][0])}, {"label": "b", "image": b64(&pngs[1][0])}],
        "query": [{"id": "q", "image": b64(&pngs[0][1])}],
        "steps": 60
    });
    let in_flight = std::thread::spawn(move || {
        reqwest::blocking::Client::new()
            .post(format!("{url}/adapt"))
            .json(&task)
            .send()
            .map(|r| (r.status().as_u16(), r.json::<Value>().ok()))
    });
    std::thread::sleep(Duration::from_millis(300));
    let status = Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());

    let (code, body) = in_flight
        .join()
        .unwrap()
        .expect("the request in flight gets its answer");
    assert_eq!(code, 200, "{body:?}");
    let body = body.unwrap();
    assert_eq!(body["steps"], 60);
    // The signal came 300 ms after the request; a longer request was still adapting then.
    assert!(
        body["timing_ms"]["total"].as_f64().unwrap() > 300.0,
        "the adaptation ended before the signal: {body}"
    );
    let exit = server.wait();
    assert!(exit.success(), "server exited with {exit:?}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "new connections are refused after shutdown"
    );
}

/// A raw connection that has sent `bytes`.
fn sent(port: u16, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream.write_all(bytes).unwrap();
    stream
}

/// Everything the server sends until it closes the connection, and how long that took.
fn until_closed(stream: &mut TcpStream) -> (String, Duration) {
    let started = Instant::now();
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    (text, started.elapsed())
}

#[test]
fn a_half_open_connection_does_not_keep_the_process_alive_after_sigterm() {
    let models = fixture_models();
    let mut server = ServerProcess::start(models.path(), &["--device", "cpu", "--threads", "1"]);
    // Half a request head, and a kept-alive connection that has had its answer and sends nothing.
    let half_open = sent(
        server.port,
        b"POST /adapt HTTP/1.1\r\nHost: x\r\nContent-Le",
    );
    let mut idle = sent(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut answer = [0u8; 12];
    idle.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200");
    assert!(Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status()
        .unwrap()
        .success());
    let exit = server
        .exit_within(Duration::from_secs(10))
        .expect("the server exits at once, its half-open and idle connections closed");
    assert!(exit.success(), "server exited with {exit:?}");
    drop((half_open, idle));
}

#[test]
fn connections_are_bounded_in_number_and_in_time() {
    let models = fixture_models();
    let limits = [
        "--header-read-timeout-ms",
        "500",
        "--idle-timeout-ms",
        "1500",
        "--max-connections",
        "3",
    ];
    let server = ServerProcess::start(
        models.path(),
        &[&["--device", "cpu", "--threads", "1"][..], &limits].concat(),
    );
    let port = server.port;

    // Half a request line is closed once the header-read timeout passes, unanswered.
    let (text, took) = until_closed(&mut sent(port, b"GET /heal"));
    assert!(
        text.is_empty() && took >= Duration::from_millis(400) && took < Duration::from_secs(5),
        "{text:?} after {took:?}"
    );
    // A kept-alive connection is answered, then closed once idle for the idle timeout.
    let (text, took) = until_closed(&mut sent(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"));
    assert!(
        text.starts_with("HTTP/1.1 200")
            && took >= Duration::from_millis(1400)
            && took < Duration::from_secs(6),
        "{text:?} after {took:?}"
    );

    // Three connections hold every place; a fourth is answered 503 at once and closed.
    std::thread::sleep(Duration::from_millis(300));
    let holders: Vec<TcpStream> = (0..3).map(|_| sent(port, b"GET ")).collect();
    std::thread::sleep(Duration::from_millis(100));
    let (text, took) = until_closed(&mut sent(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"));
    assert!(
        text.starts_with("HTTP/1.1 503")
            && text.contains("too_many_connections")
            && text.contains("retry-after: 1"),
        "{text}"
    );
    assert!(took < Duration::from_secs(2), "{took:?}");
    // The holders time out like any half-read request, and their places are free again.
    std::thread::sleep(Duration::from_millis(1000));
    let healthz = reqwest::blocking::Client::new()
        .get(format!("{}/healthz", server.url))
        .send()
        .unwrap();
    assert_eq!(healthz.status(), 200);
    drop(holders);
}

/// A flood of connections past the limit costs a bounded number of sockets: the first ones over it
/// are answered 503 (each holds its socket up to a second), and while those answers are under way
/// the rest are closed unanswered; the server serves as before afterwards.
#[test]
fn a_flood_of_connections_over_the_limit_is_answered_only_in_part() {
    let models = fixture_models();
    let server = ServerProcess::start(
        models.path(),
        &[
            "--device",
            "cpu",
            "--threads",
            "1",
            "--max-connections",
            "1",
            "--header-read-timeout-ms",
            "20000",
        ],
    );
    let holder = sent(server.port, b"GET ");
    std::thread::sleep(Duration::from_millis(100));
    let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    // Sent within well under a second, before the first answers' sockets are let go.
    let mut flood: Vec<TcpStream> = (0..200).map(|_| sent(server.port, request)).collect();
    let texts: Vec<String> = flood.iter_mut().map(|s| until_closed(s).0).collect();
    let answered = texts.iter().filter(|t| !t.is_empty()).count();
    assert!(
        texts
            .iter()
            .filter(|t| !t.is_empty())
            .all(|t| t.starts_with("HTTP/1.1 503") && t.contains("too_many_connections")),
        "every answer is a 503"
    );
    assert!(
        texts[..10].iter().all(|t| !t.is_empty()),
        "the first connections over the limit are answered"
    );
    assert!(answered < texts.len(), "all {answered} were answered");
    drop((holder, flood));
    let client = reqwest::blocking::Client::new();
    let healthy = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        client
            .get(format!("{}/healthz", server.url))
            .send()
            .is_ok_and(|r| r.status() == 200)
    });
    assert!(healthy, "the server serves once the flood is gone");
}

#[test]
fn a_damaged_model_stops_start_up_with_the_file_named() {
    let models = fixture_models();
    let dir = models.path().join("fixture");
    let weights = dir.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() - 100]).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_tnas-server"))
        .args([
            "--models",
            models.path().to_str().unwrap(),
            "--port",
            &free_port().to_string(),
            "--device",
            "cpu",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("model.safetensors") && stderr.contains("sha256"),
        "{stderr}"
    );
}

/// Starts the server on `models` and returns what it wrote to stderr once it exits; fails if it is
/// still running after a minute (it should have refused to start).
fn start_up_error(models: &std::path::Path) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tnas-server"))
        .args([
            "--models",
            models.to_str().unwrap(),
            "--port",
            &free_port().to_string(),
            "--device",
            "cpu",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the server started on a model it should have refused");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success());
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `models/<dir>/model.json` of the fixture model, with `edit` applied to its JSON.
fn edited_fixture(models: &std::path::Path, dir: &str, edit: impl FnOnce(&mut Value)) {
    let path = models.join(dir);
    fixture_supernet().save(&path).unwrap();
    let mut meta: Value =
        serde_json::from_slice(&std::fs::read(path.join("model.json")).unwrap()).unwrap();
    edit(&mut meta);
    std::fs::write(
        path.join("model.json"),
        serde_json::to_vec_pretty(&meta).unwrap(),
    )
    .unwrap();
}

/// A field of `model.json` and how to make it senseless.
type Edit = (&'static str, fn(&mut Value));

#[test]
fn a_model_json_without_sense_stops_start_up_naming_the_field() {
    let cases: [Edit; 6] = [
        ("input.size", |m| m["input"]["size"] = json!(0)),
        ("input.channels", |m| m["input"]["channels"] = json!(0)),
        ("adaptation.lr_w", |m| m["adaptation"]["lr_w"] = json!(-0.1)),
        ("adaptation.lr_theta", |m| {
            m["adaptation"]["lr_theta"] = json!(1e300)
        }),
        ("adaptation.views", |m| m["adaptation"]["views"] = json!(0)),
        ("head.max_way", |m| m["head"]["max_way"] = json!(1)),
    ];
    for (field, edit) in cases {
        let models = tempfile::tempdir().unwrap();
        edited_fixture(models.path(), "fixture", edit);
        let stderr = start_up_error(models.path());
        assert!(
            stderr.contains(field) && stderr.contains("model.json"),
            "{field}: {stderr}"
        );
    }
}

#[test]
fn two_models_with_one_name_stop_start_up() {
    let models = tempfile::tempdir().unwrap();
    for dir in ["first", "second"] {
        edited_fixture(models.path(), dir, |m| m["name"] = json!("same"));
    }
    let stderr = start_up_error(models.path());
    assert!(
        stderr.contains("first/model.json")
            && stderr.contains("second/model.json")
            && stderr.contains("'same'"),
        "{stderr}"
    );
}

#[test]
fn a_model_that_fails_its_warm_up_is_reported_without_libtorch_text() {
    let models = tempfile::tempdir().unwrap();
    let mut checkpoint = fixture_supernet();
    // Weights that load (their hash is right) but make every adaptation's numbers NaN.
    tch::no_grad(|| {
        let _ = checkpoint.params.tensors()[0]
            .shallow_clone()
            .fill_(f64::NAN);
    });
    checkpoint.save(&models.path().join("fixture")).unwrap();
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tnas-server"))
        .args([
            "--models",
            models.path().to_str().unwrap(),
            "--port",
            &port.to_string(),
            "--device",
            "cpu",
        ])
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let client = reqwest::blocking::Client::new();
    let started = Instant::now();
    let readyz = loop {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the warm-up never failed"
        );
        if let Ok(response) = client.get(format!("{url}/readyz")).send() {
            let body = response.text().unwrap();
            if !body.contains("loading") {
                break body;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let pngs = omniglot_pngs("Greek", 2, 2);
    let support = json!([{"label": "a", "image": b64(&pngs[0][0])}, {"label": "b", "image": b64(&pngs[1][0])}]);
    let task = json!({"support": support, "query": [{"id": "q", "image": b64(&pngs[0][1])}]});
    let adapt = client
        .post(format!("{url}/adapt"))
        .json(&task)
        .send()
        .unwrap();
    assert_eq!(adapt.status(), 503);
    let adapt = adapt.text().unwrap();
    let _ = child.kill();
    let log = String::from_utf8_lossy(&child.wait_with_output().unwrap().stderr).into_owned();
    for body in [&readyz, &adapt] {
        assert!(body.contains("warm-up adaptation"), "{body}");
        for internal in ["succeeds", "Diverged", "panicked", "frame #", ".rs:"] {
            assert!(
                !body.contains(internal),
                "a response carries '{internal}': {body}"
            );
        }
    }
    assert!(
        log.contains("Diverged") || log.contains("not finite"),
        "the log has the error: {log}"
    );
}

#[test]
fn start_up_removes_the_temp_files_of_interrupted_saves_only() {
    let models = fixture_models();
    let dir = models.path().join("fixture");
    let temp = |name: &str| dir.join(format!("{}{name}", tnas::model::checkpoint::TEMP_PREFIX));
    std::fs::write(temp("left-by-a-crash"), b"half a safetensors file").unwrap();
    // One still being written by a live writer (a training run saving into the folder): locked.
    let writing = std::fs::File::create(temp("being-written")).unwrap();
    writing.lock().unwrap();
    let _server = ServerProcess::start(models.path(), &["--device", "cpu", "--threads", "1"]);
    assert!(
        !temp("left-by-a-crash").exists(),
        "the interrupted save's temp file is removed at start"
    );
    assert!(
        temp("being-written").exists(),
        "a temp file still being written is left alone"
    );
}
