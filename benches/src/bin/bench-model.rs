//! `bench-model [438m|mini|tiny]`: writes the benchmark's random-weight Phi-3 checkpoint (once; it is
//! cached under `target/bench-models/`) and prints its folder, so scripts can serve it.

use anyhow::{bail, Result};
use phi_serve_benches::{ensure_bench_model, BenchModelSpec};

fn main() -> Result<()> {
    let spec = match std::env::args().nth(1).as_deref() {
        None | Some("438m") => BenchModelSpec::phi3_438m(),
        Some("mini") => BenchModelSpec::phi3_mini(),
        Some("tiny") => BenchModelSpec::tiny(),
        Some(other) => bail!("unknown bench model {other:?}: use 438m, mini or tiny"),
    };
    println!("{}", ensure_bench_model(&spec)?.display());
    Ok(())
}
