//! Where a sidecar computes, agreed between the operator (which sets [`DEVICE_ENV`] on every
//! sidecar container: [`DEVICE_CUDA`] for a variant with GPUs, [`DEVICE_CPU`] otherwise) and the
//! sidecar (whose `--device` flag reads it). A GPU pod that cannot use its GPU then fails at
//! start-up with one line in its status, instead of computing on the CPU unnoticed.

/// The sidecar's environment variable for `--device`.
pub const DEVICE_ENV: &str = "SLUICE_DEVICE";
/// The CPU.
pub const DEVICE_CPU: &str = "cpu";
/// The first CUDA device the pod sees (`cuda:N` names another).
pub const DEVICE_CUDA: &str = "cuda";
/// The first CUDA device when the build has CUDA and the pod sees one, else the CPU.
pub const DEVICE_AUTO: &str = "auto";

/// Bytes of host memory a sidecar uses beyond its weights file: the engine's fixed buffers, the
/// tokenizer, thread stacks, HTTP and a working set of KV cache for a few sequences. The operator
/// adds it to the file's size when it derives a pod's memory request (`model.size`).
pub const ENGINE_OVERHEAD_BYTES: u64 = 512 << 20;
