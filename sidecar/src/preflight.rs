//! Checks before anything starts: the CPU has the instructions the build needs, and the model
//! file is a GGUF file. Each fails with a one-line reason.

use std::{io::Read, path::Path};

use crate::error::{Result, StartupError};

/// Checks that `path` is a readable GGUF file (magic bytes), so a wrong path fails at start-up
/// with a clear reason instead of deep inside the loader.
pub fn check_gguf(path: &Path) -> Result<()> {
    let mut file = std::fs::File::open(path)
        .map_err(|e| StartupError::Model(format!("cannot read --model {}: {e}", path.display())))?;
    let mut magic = [0u8; 4];
    let read = file.read_exact(&mut magic);
    if let Err(e) = &read
        && e.kind() != std::io::ErrorKind::UnexpectedEof
    {
        return Err(StartupError::Model(format!(
            "cannot read --model {}: {e}",
            path.display()
        )));
    }
    if read.is_err() || &magic != b"GGUF" {
        return Err(StartupError::Model(format!(
            "--model {} is not a GGUF file",
            path.display()
        )));
    }
    Ok(())
}

/// Refuses to run on an x86-64 CPU without AVX2 and FMA: the build targets x86-64-v3 and
/// candle's quantized kernels need them.
pub fn check_cpu() -> Result<()> {
    #[cfg(target_arch = "x86_64")]
    {
        let missing: Vec<&str> = [
            ("avx2", std::is_x86_feature_detected!("avx2")),
            ("fma", std::is_x86_feature_detected!("fma")),
            ("f16c", std::is_x86_feature_detected!("f16c")),
        ]
        .into_iter()
        .filter(|(_, ok)| !ok)
        .map(|(name, _)| name)
        .collect();
        if !missing.is_empty() {
            return Err(StartupError::Config(format!(
                "this CPU lacks {}; sluice-sidecar is built for x86-64-v3 (AVX2+FMA+F16C) and \
                 needs a CPU that has them",
                missing.join("+")
            )));
        }
    }
    Ok(())
}
