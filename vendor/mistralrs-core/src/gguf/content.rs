use std::{collections::HashMap, fs, sync::Arc};

use anyhow::Context;
use candle_core::{
    quantized::{
        gguf_file::{self, TensorInfo, Value},
        GgmlDType, QTensor,
    },
    Device, Result,
};
use indexmap::IndexMap;
use tracing::info;

use crate::DEBUG;

use super::GGUFArchitecture;

/// List of all GgmlDType variants from Candle.
/// This should be kept in sync with candle_core::quantized::GgmlDType.
/// If Candle adds new dtype variants, add them here to include in error messages.
/// Reference: candle-core/src/quantized/mod.rs in the Candle repository.
const KNOWN_DTYPES: &[GgmlDType] = &[
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q8_1,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
    GgmlDType::Q8K,
    // Add newer ones here if Candle adds more
];

fn get_supported_gguf_dtypes() -> String {
    KNOWN_DTYPES
        .iter()
        .map(|dt| format!("{:?}", dt))
        .collect::<Vec<_>>()
        .join(", ")
}

fn parse_gguf_value(value: &Value) -> String {
    match value {
        Value::Array(vs) => vs
            .iter()
            .map(parse_gguf_value)
            .collect::<Vec<String>>()
            .join(", "),
        Value::Bool(b) => b.to_string(),
        Value::F32(x) => x.to_string(),
        Value::F64(x) => x.to_string(),
        Value::I8(x) => x.to_string(),
        Value::I16(x) => x.to_string(),
        Value::I32(x) => x.to_string(),
        Value::I64(x) => x.to_string(),
        Value::String(x) => x.to_string(),
        Value::U8(x) => x.to_string(),
        Value::U16(x) => x.to_string(),
        Value::U32(x) => x.to_string(),
        Value::U64(x) => x.to_string(),
    }
}

// Internal invariant: contents and readers must be paired.
/// This abstracts the files for a GGUF model and enables multiple files to be used.
pub struct Content<'a, R: std::io::Seek + std::io::Read> {
    contents: Vec<gguf_file::Content>,
    readers: &'a mut [&'a mut R],
    arch: GGUFArchitecture,
    all_metadata: HashMap<String, Value>,
    /// sluice: a read-only mapping of each file (paired with `contents`), where there is one:
    /// `tensor` takes the tensors' data from it instead of reading it.
    mmaps: Vec<Option<Arc<memmap2::Mmap>>>,
}

impl<'a, R: std::io::Seek + std::io::Read> Content<'a, R> {
    /// Create a `Content` from a set of file readers.
    pub fn from_readers(readers: &'a mut [&'a mut R]) -> Result<Self> {
        let mut contents = Vec::new();
        let n_readers = readers.len();
        for (i, reader) in readers.iter_mut().enumerate() {
            match gguf_file::Content::read(reader) {
                Ok(c) => {
                    contents.push(c);
                }
                Err(e) => {
                    let error_msg = format!("{}", e);
                    if error_msg.contains("unknown dtype for tensor") {
                        {
                            candle_core::bail!(
                                "Critical failure loading model part {}\n\
                                Verify you are using a supported quantization type\n\
                                Supported types: {}\n\
                                Candle error: {}",
                                i,
                                get_supported_gguf_dtypes(),
                                e
                            );
                        }
                    }
                    candle_core::bail!(
                        "Critical failure loading model part {}!\n\
                        Check whether your current quantization format is supported: {}",
                        i,
                        e
                    );
                }
            }
        }
        let n_splits = contents
            .iter()
            .filter_map(|ct| {
                ct.metadata
                    .get("split.count")
                    .map(|val| val.to_u64().unwrap())
            })
            .fold(Vec::new(), |mut accum, x| {
                if !accum.contains(&x) {
                    accum.push(x);
                }
                accum
            });
        if n_splits.len() > 1 {
            candle_core::bail!("GGUF files have differing `split.count` values: {n_splits:?}. Perhaps the GGUF files do not match?");
        }
        #[allow(clippy::cast_possible_truncation)]
        if !n_splits.is_empty() && n_readers != n_splits[0] as usize {
            candle_core::bail!(
                "Number of GGUF files does not match the number of splits, expected {} files.",
                n_splits[0]
            );
        } else if n_splits.len() == 1 {
            info!("GGUF file has been split into {} shards", n_splits[0]);
        }

        let mut arch = None;
        for ct in &contents {
            if !ct.metadata.contains_key("general.architecture") {
                continue;
            }

            arch = Some(
                ct.metadata["general.architecture"]
                    .to_string()
                    .context("Model metadata should have declared an architecture")
                    .and_then(GGUFArchitecture::from_value)
                    .unwrap(),
            );
        }
        let arch = arch.expect("GGUF files must specify `general.architecture`");

        let mut all_metadata = HashMap::new();
        for content in &contents {
            all_metadata.extend(content.metadata.clone())
        }

        Ok(Self {
            contents,
            readers,
            arch,
            all_metadata,
            mmaps: Vec::new(),
        })
    }

    /// sluice: take the tensors' data from these read-only mappings of the files (one per
    /// reader, in order; `None` for a file read as before). A mapped tensor's storage on the CPU
    /// is the mapping itself (`candle_core::quantized::MmapBlocks`): the weights stay shared,
    /// clean file pages instead of a private copy on the heap; on a GPU a tensor is uploaded
    /// straight from the mapping. The mapping lives as long as the tensors taken from it.
    pub fn with_mmaps(mut self, mmaps: Vec<Option<Arc<memmap2::Mmap>>>) -> Result<Self> {
        if mmaps.len() != self.contents.len() {
            candle_core::bail!(
                "{} mappings for {} GGUF files",
                mmaps.len(),
                self.contents.len()
            );
        }
        self.mmaps = mmaps;
        Ok(self)
    }

    pub fn arch(&self) -> GGUFArchitecture {
        self.arch
    }

    /// Retrieve a tensor info, searching through each content.
    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo> {
        for ct in &self.contents {
            if let Some(tensor_info) = ct.tensor_infos.get(name) {
                return Ok(tensor_info);
            }
        }
        candle_core::bail!("Cannot find tensor info for {name}")
    }

    /// Retrieve a tensor, searching through each content.
    pub fn tensor(&mut self, name: &str, device: &Device) -> Result<QTensor> {
        for (i, (ct, reader)) in self.contents.iter().zip(self.readers.iter_mut()).enumerate() {
            if let Some(tensor_info) = ct.tensor_infos.get(name) {
                // sluice: from the file's mapping when there is one.
                if let Some(Some(mmap)) = self.mmaps.get(i) {
                    return tensor_info.read_mapped(mmap, ct.tensor_data_offset, device);
                }
                return tensor_info.read(reader, ct.tensor_data_offset, device);
            }
        }
        candle_core::bail!("Cannot find tensor info for {name}")
    }

    /// Check for a tensor, searching through each content.
    pub fn has_tensor(&self, name: &str) -> bool {
        for ct in self.contents.iter() {
            if ct.tensor_infos.contains_key(name) {
                return true;
            }
        }
        false
    }

    /// Print metadata for these contents.
    /// This will also log tensor name, shape and dtype to `mistralrs_gguf_tensors.txt` is DEBUG is enabled.
    pub fn print_metadata(&self) -> anyhow::Result<()> {
        // Find the ct with general.architecture
        let mut keys = Vec::new();
        let mut metadatas = Vec::new();
        let mut tensors = Vec::new();
        for ct in &self.contents {
            keys.extend(ct.metadata.keys());
            metadatas.push(&ct.metadata);

            if DEBUG.load(std::sync::atomic::Ordering::Relaxed) {
                for (name, info) in &ct.tensor_infos {
                    tensors.push(format!(
                        "name = `{name}`, shape = {:?}, dtype = {:?}",
                        info.shape.clone(),
                        info.ggml_dtype
                    ));
                }
            }
        }

        info!("Model config:");
        keys.sort();
        let mut output_keys = IndexMap::new();
        for name in keys {
            if !name.contains("tokenizer") {
                for metadata in &metadatas {
                    if let Some(val) = metadata.get(name) {
                        output_keys.insert(name, parse_gguf_value(val));
                    }
                }
            }
        }
        for (name, val) in output_keys {
            println!("{name}: {val}")
        }

        if DEBUG.load(std::sync::atomic::Ordering::Relaxed) {
            fs::write(
                "mistralrs_gguf_tensors.txt",
                serde_json::to_string_pretty(&tensors).expect("Serialization failed."),
            )?;

            info!("Debug is enabled, wrote the names and information about each tensor to `mistralrs_gguf_tensors.txt`.");
        }

        anyhow::Ok(())
    }

    /// Get all metadatas
    pub fn get_metadata(&self) -> &HashMap<String, Value> {
        &self.all_metadata
    }
}

/// sluice: tensors taken from the files' mappings (`with_mmaps`) against tensors read, and the
/// mapped data copied where it is not aligned for its blocks.
#[cfg(test)]
mod mapped_tests {
    use std::sync::Arc;

    use candle_core::{
        quantized::{gguf_file, GgmlDType, QMatMul, QTensor},
        Device, Module, Result, Shape, Tensor,
    };

    use super::Content;

    #[test]
    fn mapped_tensors_equal_read_ones() -> Result<()> {
        let dev = Device::Cpu;
        let values = Tensor::arange(0f32, 64.0 * 256.0, &dev)?
            .affine(0.01, -20.0)?
            .sin()?
            .reshape((64, 256))?;
        let tensors = [
            GgmlDType::Q8_0,
            GgmlDType::Q4_1,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
            GgmlDType::F32,
        ]
        .map(|dtype| {
            let t = QTensor::quantize(&values, dtype).unwrap();
            (format!("{dtype:?}"), t)
        });
        let path = std::env::temp_dir().join(format!("mapped-{}.gguf", std::process::id()));
        {
            let mut w = std::fs::File::create(&path)?;
            let arch = gguf_file::Value::String("llama".into());
            let named: Vec<(&str, &QTensor)> =
                tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
            gguf_file::write(&mut w, &[("general.architecture", &arch)], &named)?;
        }
        let mut read_file = std::fs::File::open(&path)?;
        let mut mapped_file = std::fs::File::open(&path)?;
        // SAFETY: a private temporary file, not written while mapped.
        let mmap = Arc::new(unsafe { memmap2::Mmap::map(&mapped_file)? });
        std::fs::remove_file(&path)?;
        let mut read_readers = [&mut read_file];
        let mut read = Content::from_readers(&mut read_readers)?;
        let mut mapped_readers = [&mut mapped_file];
        let mut mapped =
            Content::from_readers(&mut mapped_readers)?.with_mmaps(vec![Some(mmap.clone())])?;
        let x = Tensor::arange(0f32, 256.0 * 3.0, &dev)?.reshape((3, 256))?;
        let bits = |t: Tensor| -> Result<Vec<u32>> {
            Ok(t.flatten_all()?
                .to_vec1::<f32>()?
                .into_iter()
                .map(f32::to_bits)
                .collect())
        };
        for (name, _) in &tensors {
            let (r, m) = (read.tensor(name, &dev)?, mapped.tensor(name, &dev)?);
            assert_eq!(r.data()?, m.data()?, "{name}");
            // The storage is the mapping itself, at the tensor's offset in the file.
            let ct = &mapped.contents[0];
            let at = m.data()?.as_ptr() as usize - mmap.as_ptr() as usize;
            assert_eq!(
                at as u64,
                ct.tensor_data_offset + ct.tensor_infos[name].offset,
                "{name}"
            );
            let (r, m) = (QMatMul::from_qtensor(r)?, QMatMul::from_qtensor(m)?);
            assert_eq!(bits(r.forward(&x)?)?, bits(m.forward(&x)?)?, "{name}");
        }

        // Data not aligned for its blocks (2 bytes for Q8_0) is copied, not mapped.
        let ct = &mapped.contents[0];
        let shifted = gguf_file::TensorInfo {
            ggml_dtype: GgmlDType::Q8_0,
            shape: Shape::from((1, 32)),
            offset: ct.tensor_infos["Q8_0"].offset + 1,
        };
        let r = shifted.read(&mut read_file, ct.tensor_data_offset, &dev)?;
        let m = shifted.read_mapped(&mmap, ct.tensor_data_offset, &dev)?;
        assert_eq!(r.data()?, m.data()?);
        let at = m.data()?.as_ptr() as usize;
        let map = mmap.as_ptr() as usize..mmap.as_ptr() as usize + mmap.len();
        assert!(!map.contains(&at));
        // Past the end of the file: an error, not a read out of bounds.
        let past = gguf_file::TensorInfo {
            ggml_dtype: GgmlDType::Q8_0,
            shape: Shape::from((64, 256)),
            offset: mmap.len() as u64,
        };
        assert!(past.read_mapped(&mmap, 0, &dev).is_err());
        Ok(())
    }
}
