use candle_core::{Result, Tensor};

use super::NormalCache;

#[derive(Debug, Clone)]
pub struct SingleCache {
    // all_data is an option on a Tensor, this makes it possible to only create the actual tensor
    // on the first call where the batch size is easily known.
    // Also this makes it safe to clone a KvCache that has been reset (as in it will not share
    // its internal state with the cloned instance).
    pub all_data: Option<Tensor>,
    pub dim: usize,
    pub current_seq_len: usize,
    pub capacity_seq_len: usize,
    pub max_seq_len: usize,
    /// sluice: each row's own length when a batch holds sequences of different lengths (a
    /// ragged decode batch: see `NormalCacheManager::clone_in_cache`); `current_seq_len` is then
    /// the longest, and the rows past their own length are padding the attention masks out.
    /// Empty when every row is `current_seq_len` long.
    pub row_lens: Vec<usize>,
}

impl SingleCache {
    pub fn new(dim: usize, max_seq_len: usize, capacity_seq_len: usize) -> Self {
        Self {
            all_data: None,
            dim,
            current_seq_len: 0,
            max_seq_len,
            capacity_seq_len,
            row_lens: Vec::new(),
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn current_seq_len(&self) -> usize {
        self.current_seq_len
    }

    pub fn max_seq_len(&self) -> usize {
        self.max_seq_len
    }

    pub fn all_data(&self) -> Option<&Tensor> {
        self.all_data.as_ref()
    }

    pub fn current_data(&self) -> Result<Option<Tensor>> {
        let data = match self.all_data.as_ref() {
            None => None,
            Some(d) => Some(d.narrow(self.dim, 0, self.current_seq_len)?),
        };
        Ok(data)
    }

    pub fn reset(&mut self) {
        self.current_seq_len = 0;
        self.all_data = None;
        self.row_lens.clear();
    }

    pub fn try_set_len(&self, len: usize) -> candle_core::Result<()> {
        if len > self.capacity_seq_len {
            candle_core::bail!(
                "kv-cache: requested length ({}) exceeds current capacity ({})",
                len,
                self.capacity_seq_len
            );
        }
        Ok(())
    }

    pub fn set_len(&mut self, len: usize) -> candle_core::Result<()> {
        self.try_set_len(len)?;
        if !self.row_lens.is_empty() {
            candle_core::bail!("kv-cache: cannot set one length on a ragged batch");
        }
        self.current_seq_len = len;
        Ok(())
    }

    pub fn append(&mut self, src: &Tensor) -> Result<()> {
        let seq_len = src.dim(self.dim)?;
        // This doesn't seem very idiomatic but because the creation can fail, it's tricky to use
        // self.all_data.get_or_insert_with.
        if self.all_data.is_none() {
            let mut shape = src.dims().to_vec();
            shape[self.dim] = self.capacity_seq_len;
            let ad = Tensor::zeros(shape, src.dtype(), src.device())?;
            self.all_data = Some(ad);
        };

        self.ensure_capacity(src, self.current_seq_len + seq_len)?;
        let ad = self.all_data.as_mut().unwrap();
        if self.row_lens.is_empty() {
            ad.slice_set(src, self.dim, self.current_seq_len)?;
            self.current_seq_len += seq_len;
            return Ok(());
        }
        // sluice: a ragged batch: each row's new positions go after its own length.
        for (row, len) in self.row_lens.iter_mut().enumerate() {
            ad.narrow(0, row, 1)?
                .slice_set(&src.narrow(0, row, 1)?, self.dim, *len)?;
            *len += seq_len;
        }
        self.current_seq_len = self.row_lens.iter().copied().max().unwrap_or(0);
        Ok(())
    }

    /// Grows the cache (in `NormalCache::CACHE_GROW_SIZE` steps) to hold `needed` positions.
    fn ensure_capacity(&mut self, src: &Tensor, needed: usize) -> Result<()> {
        if needed <= self.capacity_seq_len {
            return Ok(());
        }
        let diff = needed - self.capacity_seq_len;
        let n_blocks_needed = diff.div_ceil(NormalCache::CACHE_GROW_SIZE);
        self.capacity_seq_len += n_blocks_needed * NormalCache::CACHE_GROW_SIZE;
        if self.capacity_seq_len > self.max_seq_len {
            candle_core::bail!(
                "kv-cache: requested capacity ({}) above max seq len ({})",
                self.capacity_seq_len,
                self.max_seq_len
            )
        }
        let mut shape = src.dims().to_vec();
        shape[self.dim] = self.capacity_seq_len;
        let ad = Tensor::zeros(shape, src.dtype(), src.device())?;
        ad.slice_set(self.all_data.as_ref().unwrap(), self.dim, 0)?;
        self.all_data = Some(ad);
        Ok(())
    }
}
