//! What the launchers of the engine's own GPU kernels share: the PTX modules the build script
//! compiles from `kernels/*.cu`, and the checks every launch makes on its arguments.

use candle_core::{DType, Layout};

/// One of `kernels/*.cu`, compiled to PTX by the build script.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Module {
    /// The name candle caches the loaded module under.
    pub name: &'static str,
    /// The PTX text.
    pub ptx: &'static str,
}

/// `kernels/paged_attention.cu`: writes into the KV pool and paged decode attention.
pub(crate) const PAGED_ATTENTION: Module = Module {
    name: "phi_engine_paged_attention",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/paged_attention.ptx")),
};

/// `kernels/greedy.cu`: greedy decoding's argmax over the logits rows.
pub(crate) const GREEDY: Module = Module {
    name: "phi_engine_greedy",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/greedy.ptx")),
};

/// `kernels/sampling.cu`: temperature and top_p sampling of the logits rows.
pub(crate) const SAMPLING: Module = Module {
    name: "phi_engine_sampling",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/sampling.ptx")),
};

/// `kernels/layer_ops.cu`: the fused element-wise steps of a decoder layer.
pub(crate) const LAYER_OPS: Module = Module {
    name: "phi_engine_layer_ops",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/layer_ops.ptx")),
};

/// The name of the `dtype` variant of `kernel` (`{kernel}_{f32|f16|bf16}`).
pub(crate) fn kernel_name(kernel: &str, dtype: DType) -> candle_core::Result<String> {
    let suffix = match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        d => candle_core::bail!("the engine's kernels take f32, f16 or bf16, not {d:?}"),
    };
    Ok(format!("{kernel}_{suffix}"))
}

/// `load_kernel!(device, module, "kernel", dtype)`: the kernel's `dtype` variant from `module`
/// on `device`, the module loaded on first use. (A macro because candle does not export the
/// type of the function it returns.)
macro_rules! load_kernel {
    ($dev:expr, $module:expr, $kernel:expr, $dtype:expr) => {
        $dev.get_or_load_custom_func(
            &$crate::cuda_kernels::kernel_name($kernel, $dtype)?,
            $module.name,
            $module.ptx,
        )
    };
}
pub(crate) use load_kernel;

/// The element range of a contiguous layout; an error names `what` otherwise.
pub(crate) fn contiguous(l: &Layout, what: &str) -> candle_core::Result<(usize, usize)> {
    l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{what} not contiguous")))
}

/// `n` as a kernel's 32-bit size argument.
pub(crate) fn u32_arg(n: usize, what: &str) -> candle_core::Result<u32> {
    u32::try_from(n).map_err(|_| candle_core::Error::Msg(format!("{what} of {n} is too large")))
}
