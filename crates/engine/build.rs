//! With the `cuda` feature, compiles the engine's own GPU kernels (`kernels/*.cu`, which share
//! `kernels/common.cuh`) to PTX with nvcc, for the generation `CUDA_COMPUTE_CAP` names (default
//! 90), as candle's kernels are. The PTX is embedded in the library (`include_str!`) and loaded
//! by the driver at run time. nvcc is `$NVCC`, else `$CUDA_HOME/bin/nvcc`, else `nvcc` on the
//! PATH (docker/cuda-toolchain.sh sets them all). Without the feature this does nothing.
use std::path::PathBuf;
use std::process::Command;

const KERNELS: &[&str] = &["greedy", "layer_ops", "paged_attention", "sampling"];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("bin/nvcc")))
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for name in KERNELS {
        let src = format!("kernels/{name}.cu");
        let ptx = out.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17"])
            .arg(format!("-arch=compute_{cap}"))
            .arg(&src)
            .arg("-o")
            .arg(&ptx)
            .status()
            .unwrap_or_else(|e| panic!("cannot run nvcc ({}): {e}", nvcc.display()));
        assert!(status.success(), "nvcc failed on {src} ({status})");
    }
}
