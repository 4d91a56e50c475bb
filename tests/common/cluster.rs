//! The pieces around several `tnas-server` replicas, as real processes on loopback: a
//! `redis-server` that keeps its data across restarts, and an HAProxy load balancer (round robin)
//! in front of the replicas. `make replica-setup` (which `make test` runs) installs both from
//! Debian's packages.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port, as the OS hands one out.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn(program: &str, args: &[String]) -> Child {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("{program} does not start ({e}); `make replica-setup` installs redis-server and haproxy")
        })
}

fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A `redis-server` on a loopback port whose data (an append-only file, synced on every write)
/// lives in its own folder, so that stopping and starting it again keeps what it held.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_on(free_port())
    }

    /// Starts it on `port` (where servers already expect it, say).
    pub fn start_on(port: u16) -> RedisServer {
        let mut redis = RedisServer {
            child: None,
            port,
            dir: tempfile::tempdir().unwrap(),
        };
        redis.restart();
        redis
    }

    /// `redis://127.0.0.1:<port>/<db>`.
    pub fn url(&self, db: u32) -> String {
        format!("redis://127.0.0.1:{}/{db}", self.port)
    }

    /// Starts it (again) on the same port and data folder, and waits until it answers PING.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "redis-server is already running");
        let args: Vec<String> = [
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--dir",
            self.dir.path().to_str().unwrap(),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--protected-mode",
            "no",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        self.child = Some(spawn("redis-server", &args));
        let started = Instant::now();
        while !self.answers() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "redis-server did not answer PING on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Shuts it down as an operator would (SIGTERM: it syncs its data and exits).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop(&mut child);
        }
    }

    /// Stalls it (SIGSTOP): connections stay open and nothing answers, as with a Redis stuck on
    /// a slow disk. [`RedisServer::resume`] lets it go on.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.pid().expect("redis-server is running");
        let sent = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill {signal} {pid}");
    }

    fn answers(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let mut reply = [0u8; 5];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut reply).is_ok()
            && &reply == b"+PONG"
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// HAProxy balancing round robin over `replicas` (loopback ports), checking each one's `/readyz`
/// every 200 ms (two failed checks take a replica out, one passed puts it back). It names the replica that answered in an `X-Served-By` header (`replica-<i>`), and
/// sends a request a replica dropped without answering (killed, say) on to another one.
pub struct Balancer {
    child: Child,
    pub url: String,
    _config: tempfile::TempDir,
}

impl Balancer {
    pub fn start(replicas: &[u16]) -> Balancer {
        let port = free_port();
        let config = tempfile::tempdir().unwrap();
        let path = config.path().join("haproxy.cfg");
        std::fs::write(&path, haproxy_config(port, replicas)).unwrap();
        check_config(&path);
        let child = spawn(
            "haproxy",
            &[
                "-db".into(),
                "-q".into(),
                "-f".into(),
                path.to_str().unwrap().into(),
            ],
        );
        let balancer = Balancer {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _config: config,
        };
        balancer.poll_healthz("HAProxy did not forward /healthz to a replica", |r| {
            r.status() == 200
        });
        balancer
    }

    /// Waits until the balancer routes to `replica` again: its health check marks a restarted
    /// replica up only at its next interval, and until then every request goes to the others.
    pub fn wait_until_routed_to(&self, replica: &str) {
        let failure = format!("the balancer did not route to the restarted {replica} within 20 s");
        self.poll_healthz(&failure, |r| {
            r.headers().get("x-served-by").and_then(|v| v.to_str().ok()) == Some(replica)
        });
    }

    /// Asks for `/healthz` through the balancer every 50 ms until an answer is `accepted`; fails
    /// the test with `failure` after 20 s.
    fn poll_healthz(&self, failure: &str, accepted: impl Fn(&reqwest::blocking::Response) -> bool) {
        let client = reqwest::blocking::Client::new();
        let started = Instant::now();
        while !client
            .get(format!("{}/healthz", self.url))
            .send()
            .is_ok_and(|r| accepted(&r))
        {
            assert!(started.elapsed() < Duration::from_secs(20), "{failure}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

fn haproxy_config(port: u16, replicas: &[u16]) -> String {
    let servers: String = replicas
        .iter()
        .enumerate()
        .map(|(i, replica)| {
            format!("  server replica-{i} 127.0.0.1:{replica} check inter 200ms fall 2 rise 1\n")
        })
        .collect();
    format!(
        "global\n  maxconn 512\n\
         defaults\n  mode http\n  timeout connect 1s\n  timeout client 60s\n  timeout server 60s\n\
         \x20 timeout check 2s\n\
         \x20 retries 3\n  option redispatch 1\n  retry-on conn-failure empty-response\n\
         frontend tnas\n  bind 127.0.0.1:{port}\n  default_backend replicas\n\
         backend replicas\n  balance roundrobin\n  option httpchk GET /readyz\n\
         \x20 http-response set-header X-Served-By %s\n{servers}"
    )
}

fn check_config(path: &Path) {
    let output = Command::new("haproxy")
        .args(["-c", "-q", "-f"])
        .arg(PathBuf::from(path))
        .output()
        .expect("haproxy is installed (`make replica-setup` installs it)");
    assert!(
        output.status.success(),
        "the HAProxy configuration is refused: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
