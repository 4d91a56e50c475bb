//! Links the binaries against the libtorch that ships inside the `torch` Python wheel.
//!
//! torch-sys finds the libraries (with `LIBTORCH_USE_PYTORCH=1`); this script adds what it does not:
//! an rpath, so the binaries find libtorch without `LD_LIBRARY_PATH`, and a forced link of
//! `libtorch_cuda`, whose static initialisers register the CUDA backend but which the linker would
//! otherwise drop as unused (`--as-needed`), leaving a CPU-only build.
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=PYTHON_SYS_EXECUTABLE");
    let lib_dir = match std::env::var("LIBTORCH") {
        Ok(root) => format!("{root}/lib"),
        Err(_) => torch_lib_dir_from_python(),
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    if std::path::Path::new(&lib_dir).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-search=native={lib_dir}");
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}

fn torch_lib_dir_from_python() -> String {
    let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python3".into());
    let output = Command::new(&python)
        .args(["-c", "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python} to locate torch: {e}; run `make setup` first"));
    assert!(
        output.status.success(),
        "{python} cannot import torch: {}; run `make setup` first",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("torch path is UTF-8").trim().to_string()
}
