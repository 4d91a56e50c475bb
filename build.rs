//! Links the binaries against the libtorch that ships inside the `torch` Python wheel.
//!
//! torch-sys finds the libraries (with `LIBTORCH_USE_PYTORCH=1`); this script adds what it does not:
//! an rpath, so the binaries find libtorch without `LD_LIBRARY_PATH`; a forced link of
//! `libtorch_cuda`, whose static initialisers register the CUDA backend but which the linker would
//! otherwise drop as unused (`--as-needed`), leaving a CPU-only build; and, with a CUDA libtorch,
//! the small C++ shim over libtorch's CUDA graphs (`csrc/cuda_graph.cpp`, cfg `tnas_cuda_graphs`).
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=PYTHON_SYS_EXECUTABLE");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-changed=csrc/cuda_graph.cpp");
    println!("cargo:rustc-check-cfg=cfg(tnas_cuda_graphs)");
    let lib_dir = match std::env::var("LIBTORCH") {
        Ok(root) => PathBuf::from(root).join("lib"),
        Err(_) => torch_lib_dir_from_python(),
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    if !lib_dir.join("libtorch_cuda.so").exists() {
        return;
    }
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    if let Some(cuda_include) = cuda_include_dir(&lib_dir) {
        build_cuda_graph_shim(&lib_dir, &cuda_include);
    } else {
        println!("cargo:warning=no CUDA headers (cuda_runtime_api.h) found, so this build replays no CUDA graphs; set CUDA_HOME to a CUDA toolkit to build them");
    }
}

/// Compiles the CUDA graph shim against libtorch's headers (with the C++ ABI torch-sys uses).
fn build_cuda_graph_shim(lib_dir: &Path, cuda_include: &Path) {
    let torch_include = lib_dir
        .parent()
        .expect("libtorch's lib has a parent")
        .join("include");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .file("csrc/cuda_graph.cpp")
        .include(&torch_include)
        .include(cuda_include)
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .warnings(false)
        .compile("tnas_cuda_graph");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-lc10_cuda,--as-needed");
    println!("cargo:rustc-cfg=tnas_cuda_graphs");
}

/// The folder holding `cuda_runtime_api.h`: `CUDA_HOME`, the NVIDIA wheels beside torch, or the
/// system toolkit.
fn cuda_include_dir(lib_dir: &Path) -> Option<PathBuf> {
    let site_packages = lib_dir
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf);
    let mut candidates: Vec<PathBuf> = std::env::var_os("CUDA_HOME")
        .map(|home| PathBuf::from(home).join("include"))
        .into_iter()
        .collect();
    if let Some(site) = site_packages {
        candidates
            .extend(["nvidia/cu13/include", "nvidia/cuda_runtime/include"].map(|p| site.join(p)));
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    candidates
        .into_iter()
        .find(|dir| dir.join("cuda_runtime_api.h").exists())
}

fn torch_lib_dir_from_python() -> PathBuf {
    let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python3".into());
    let output = Command::new(&python)
        .args([
            "-c",
            "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))",
        ])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {python} to locate torch: {e}; run `make setup` first")
        });
    assert!(
        output.status.success(),
        "{python} cannot import torch: {}; run `make setup` first",
        String::from_utf8_lossy(&output.stderr)
    );
    PathBuf::from(
        String::from_utf8(output.stdout)
            .expect("torch path is UTF-8")
            .trim(),
    )
}
