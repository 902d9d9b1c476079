//! Where the engine computes (`--device`), chosen once at start-up, before a port is bound: a
//! request the pod cannot honour (CUDA in a CPU-only build, no driver, no GPU visible) stops
//! the sidecar with one line, never a silent fall back to the CPU.

use std::{fmt, str::FromStr};

use sluice_crds::device::{DEVICE_AUTO, DEVICE_CPU, DEVICE_CUDA};

use super::Activations;
use crate::{error::StartupError, memory_limit::memory_limit};

/// The devices this build can compute on, as `sluice-sidecar devices` lists them.
pub const BUILT_DEVICES: &[&str] = if cfg!(feature = "cuda") {
    &[DEVICE_CPU, DEVICE_CUDA]
} else {
    &[DEVICE_CPU]
};

/// What `--device` asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceRequest {
    /// The first CUDA device when the build has CUDA and the process sees one, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// The CUDA device of this ordinal (among those `CUDA_VISIBLE_DEVICES` leaves visible).
    Cuda(usize),
}

impl FromStr for DeviceRequest {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || {
            format!("{s:?}: expected {DEVICE_AUTO}, {DEVICE_CPU}, {DEVICE_CUDA} or {DEVICE_CUDA}:N")
        };
        match s {
            DEVICE_AUTO => Ok(Self::Auto),
            DEVICE_CPU => Ok(Self::Cpu),
            DEVICE_CUDA => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix(DEVICE_CUDA)
                .and_then(|rest| rest.strip_prefix(':'))
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(invalid),
        }
    }
}

impl fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str(DEVICE_AUTO),
            Self::Cpu => f.write_str(DEVICE_CPU),
            Self::Cuda(n) => write!(f, "{DEVICE_CUDA}:{n}"),
        }
    }
}

/// The device the engine runs on, and what the start-up log and `/metrics` say of it.
#[derive(Clone, Debug)]
pub struct EngineDevice {
    /// What the engine is handed.
    pub device: mistralrs::Device,
    /// `cpu` or `cuda:N`.
    pub label: String,
    /// The processor's or GPU's name.
    pub name: String,
    /// Its memory in bytes (the GPU's; for the CPU, what this process may use).
    pub memory_bytes: u64,
    /// The activation dtype in use.
    pub dtype: Activations,
}

/// Resolves `request` to a device, with `dtype` (`auto`: F32 on the CPU, BF16 on a GPU that
/// has it, else F16).
pub fn select(request: DeviceRequest, dtype: Activations) -> Result<EngineDevice, StartupError> {
    let cuda = |ordinal| cuda::open(ordinal, dtype).map_err(StartupError::Device);
    match request {
        DeviceRequest::Cpu => Ok(cpu(dtype)),
        DeviceRequest::Cuda(ordinal) => cuda(ordinal),
        DeviceRequest::Auto => match cuda::visible() {
            Ok(n) if n > 0 => cuda(0),
            visible => {
                let reason = match visible {
                    Err(why) => why,
                    Ok(_) if cfg!(feature = "cuda") => "no CUDA device visible".to_owned(),
                    Ok(_) => "this build has no CUDA".to_owned(),
                };
                tracing::info!(%reason, "--device auto: computing on the CPU");
                Ok(cpu(dtype))
            }
        },
    }
}

/// `sluice-sidecar devices`: the devices this build computes on, and whether each is usable
/// here (name and memory), one per line.
pub fn report() -> String {
    let gib = |bytes: u64| bytes as f64 / f64::from(1u32 << 30);
    let cpu = cpu(Activations::Auto);
    let mut lines = vec![
        format!("built with: {}", BUILT_DEVICES.join(", ")),
        format!(
            "{}: {}, {:.1} GiB",
            cpu.label,
            cpu.name,
            gib(cpu.memory_bytes)
        ),
    ];
    match cuda::visible() {
        Ok(0) if cfg!(feature = "cuda") => {
            lines.push(format!("{DEVICE_CUDA}: no CUDA device visible"))
        }
        Ok(n) => lines.extend((0..n).map(|i| match cuda::describe(i) {
            Ok((name, memory, _)) => format!("{DEVICE_CUDA}:{i}: {name}, {:.1} GiB", gib(memory)),
            Err(why) => format!("{DEVICE_CUDA}:{i}: {why}"),
        })),
        Err(why) => lines.push(format!("{DEVICE_CUDA}: {why}")),
    }
    if !cfg!(feature = "cuda")
        && let Err(why) = cuda::describe(0)
    {
        lines.push(format!("{DEVICE_CUDA}: {why}"));
    }
    lines.join("\n")
}

fn cpu(dtype: Activations) -> EngineDevice {
    let name = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, name)| name.trim().to_owned())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_owned());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    EngineDevice {
        device: mistralrs::Device::Cpu,
        label: DEVICE_CPU.to_owned(),
        name: format!("{name} ({cores} cores)"),
        memory_bytes: memory_limit().map_or(0, |m| m.bytes),
        dtype: match dtype {
            Activations::Auto => Activations::F32,
            other => other,
        },
    }
}

#[cfg(not(feature = "cuda"))]
mod cuda {
    use super::{Activations, EngineDevice};

    const NOT_BUILT: &str = "not in this build (the sluice-sidecar-cuda image has it)";

    /// CUDA devices visible to this process: none without CUDA in the build.
    pub fn visible() -> Result<usize, String> {
        Ok(0)
    }

    pub fn describe(_ordinal: usize) -> Result<(String, u64, i32), String> {
        Err(NOT_BUILT.to_owned())
    }

    pub fn open(_ordinal: usize, _dtype: Activations) -> Result<EngineDevice, String> {
        Err(
            "--device cuda: this sidecar was built without CUDA; run the CUDA image \
             (sluice-sidecar-cuda) or pass --device cpu"
                .to_owned(),
        )
    }
}

// The driver's C API through cudarc: each call below says why it is sound.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};

    use super::{Activations, DEVICE_CUDA, EngineDevice};

    /// CUDA devices visible to this process (after `CUDA_VISIBLE_DEVICES`), or why none can be.
    pub fn visible() -> Result<usize, String> {
        // cudarc loads the driver library on first use and panics when it is missing: ask first.
        // SAFETY: only tries to dlopen the library by its usual names.
        if !unsafe { sys::is_culib_present() } {
            return Err(
                "no NVIDIA driver library (libcuda.so.1) in this container: \
                        the pod needs a GPU from the NVIDIA device plugin (nvidia.com/gpu)"
                    .to_owned(),
            );
        }
        result::init().map_err(|e| format!("the NVIDIA driver failed to start: {e}"))?;
        let n =
            result::device::get_count().map_err(|e| format!("cannot count CUDA devices: {e}"))?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    /// Name, memory in bytes and compute capability (major) of visible device `ordinal`.
    pub fn describe(ordinal: usize) -> Result<(String, u64, i32), String> {
        let visible = visible().map_err(|e| format!("--device {DEVICE_CUDA}:{ordinal}: {e}"))?;
        if ordinal >= visible {
            let seen = std::env::var("CUDA_VISIBLE_DEVICES").map_or_else(
                |_| String::new(),
                |v| format!(" (CUDA_VISIBLE_DEVICES={v:?})"),
            );
            return Err(format!(
                "--device {DEVICE_CUDA}:{ordinal}: {visible} CUDA device(s) visible{seen}"
            ));
        }
        let failed = |what: &str, e: result::DriverError| {
            format!("--device {DEVICE_CUDA}:{ordinal}: cannot read the GPU's {what}: {e}")
        };
        let cu_device = i32::try_from(ordinal)
            .map_err(|_| format!("--device {DEVICE_CUDA}:{ordinal}: no such device"))
            .and_then(|n| result::device::get(n).map_err(|e| failed("handle", e)))?;
        let name = result::device::get_name(cu_device).map_err(|e| failed("name", e))?;
        // SAFETY: `cu_device` is a valid device handle from the driver.
        let memory =
            unsafe { result::device::total_mem(cu_device) }.map_err(|e| failed("memory", e))?;
        // SAFETY: as above; the attribute is one the driver defines for every device.
        let major = unsafe {
            result::device::get_attribute(
                cu_device,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
            )
        }
        .map_err(|e| failed("compute capability", e))?;
        Ok((name, memory as u64, major))
    }

    pub fn open(ordinal: usize, dtype: Activations) -> Result<EngineDevice, String> {
        let (name, memory_bytes, major) = describe(ordinal)?;
        let device = mistralrs::Device::new_cuda(ordinal)
            .map_err(|e| format!("--device {DEVICE_CUDA}:{ordinal}: {e}"))?;
        Ok(EngineDevice {
            device,
            label: format!("{DEVICE_CUDA}:{ordinal}"),
            name,
            memory_bytes,
            dtype: match dtype {
                // bfloat16 arithmetic needs compute capability 8.0 (Ampere) or newer.
                Activations::Auto if major >= 8 => Activations::Bf16,
                Activations::Auto => Activations::F16,
                other => other,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_operator_sets_and_what_users_type() {
        assert_eq!(DEVICE_CPU.parse(), Ok(DeviceRequest::Cpu));
        assert_eq!(DEVICE_CUDA.parse(), Ok(DeviceRequest::Cuda(0)));
        assert_eq!(DEVICE_AUTO.parse(), Ok(DeviceRequest::Auto));
        assert_eq!("cuda:3".parse(), Ok(DeviceRequest::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda3", "CPU", ""] {
            let err = bad.parse::<DeviceRequest>().unwrap_err();
            assert!(
                err.contains("expected auto, cpu, cuda or cuda:N"),
                "{bad}: {err}"
            );
        }
        assert_eq!(DeviceRequest::Cuda(1).to_string(), "cuda:1");
    }

    #[test]
    fn cpu_computes_in_f32_unless_told() {
        let d = select(DeviceRequest::Cpu, Activations::Auto).unwrap();
        assert_eq!((d.label.as_str(), d.dtype), (DEVICE_CPU, Activations::F32));
        assert!(d.memory_bytes > 0);
        let d = select(DeviceRequest::Cpu, Activations::F16).unwrap();
        assert_eq!(d.dtype, Activations::F16);
    }
}
