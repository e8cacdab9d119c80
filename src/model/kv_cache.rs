//! Per-layer key/value storage. Keys are stored BEFORE the rotary embedding, so a strategy can
//! give every cached key a new position at every step (spec section 2, "pos shift").

use std::collections::HashMap;
use std::io::Write;

use candle_core::{DType, Device, Error, Result, Tensor};

/// Keys and values of every layer, in slots `0..capacity`. Which slot holds which token, and
/// at which position it is seen, is the engine's business (see [`super::AttnPlan`]).
#[derive(Debug)]
pub struct KvCache {
    /// Per layer: (keys, values), each (n_kv_head, capacity, head_dim).
    layers: Vec<(Tensor, Tensor)>,
    capacity: usize,
}

impl KvCache {
    pub fn new(
        n_layer: usize,
        n_kv_head: usize,
        head_dim: usize,
        capacity: usize,
        device: &Device,
    ) -> Result<Self> {
        let zeros = || Tensor::zeros((n_kv_head, capacity, head_dim), DType::F32, device);
        let layers = (0..n_layer)
            .map(|_| Ok((zeros()?, zeros()?)))
            .collect::<Result<_>>()?;
        Ok(KvCache { layers, capacity })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Grows to at least `needed` slots, doubling (so a growing cache copies O(n) in total) but
    /// never past `ceiling`, the most slots its engine can ever use (or `needed`, if larger).
    pub fn ensure_capacity(&mut self, needed: usize, ceiling: usize) -> Result<()> {
        if needed <= self.capacity {
            return Ok(());
        }
        let new_cap = self.capacity.saturating_mul(2).min(ceiling).max(needed);
        for (k, v) in self.layers.iter_mut() {
            for t in [k, v] {
                let (h, _, d) = t.dims3()?;
                let grown = Tensor::zeros((h, new_cap, d), t.dtype(), t.device())?;
                if self.capacity > 0 {
                    grown.slice_set(&*t, 1, 0)?;
                }
                *t = grown;
            }
        }
        self.capacity = new_cap;
        Ok(())
    }

    /// Writes keys and values (n_kv_head, T, head_dim) of layer `layer` into slots `at..at + T`.
    pub fn write(&mut self, layer: usize, at: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let (kc, vc) = &self.layers[layer];
        kc.slice_set(&k.contiguous()?, 1, at)?;
        vc.slice_set(&v.contiguous()?, 1, at)?;
        Ok(())
    }

    /// Keys and values of slots `0..n` of layer `layer`, each (n_kv_head, n, head_dim), contiguous.
    pub fn read(&self, layer: usize, n: usize) -> Result<(Tensor, Tensor)> {
        let (k, v) = &self.layers[layer];
        if n == self.capacity {
            return Ok((k.clone(), v.clone()));
        }
        Ok((
            k.narrow(1, 0, n)?.contiguous()?,
            v.narrow(1, 0, n)?.contiguous()?,
        ))
    }
}

/// Safetensors name of layer `layer`'s keys (`k.N`) or values (`v.N`).
fn tensor_name(kind: char, layer: usize) -> String {
    format!("{kind}.{layer}")
}

impl KvCache {
    /// Writes slots `0..occupied` of every layer as a safetensors file (`k.N`, `v.N`, each
    /// (n_kv_head, occupied, head_dim) f32): a checkpoint stores what the cache holds, not its
    /// capacity (a dense cache is up to twice as large as what it holds). One layer is copied
    /// out at a time, so saving needs little memory beyond the cache itself.
    pub fn write_safetensors(&self, occupied: usize, out: &mut impl Write) -> Result<()> {
        let Some((k0, _)) = self.layers.first() else {
            candle_core::bail!("a cache with no layers has nothing to save")
        };
        let (n_kv_head, _, head_dim) = k0.dims3()?;
        let shape = [n_kv_head, occupied, head_dim];
        let tensor_bytes = n_kv_head * occupied * head_dim * DType::F32.size_in_bytes();
        let mut header = serde_json::Map::new();
        for layer in 0..self.layers.len() {
            for (i, kind) in ['k', 'v'].into_iter().enumerate() {
                let start = (2 * layer + i) * tensor_bytes;
                header.insert(
                    tensor_name(kind, layer),
                    serde_json::json!({
                        "dtype": "F32",
                        "shape": shape,
                        "data_offsets": [start, start + tensor_bytes],
                    }),
                );
            }
        }
        let mut header = serde_json::to_vec(&header).map_err(Error::wrap)?;
        // The format pads the header with spaces to a multiple of 8 bytes.
        header.resize(header.len().next_multiple_of(8), b' ');
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(&header)?;
        for layer in 0..self.layers.len() {
            let (k, v) = self.read(layer, occupied)?;
            for t in [k, v] {
                let values = t.flatten_all()?.to_vec1::<f32>()?;
                let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
                out.write_all(&bytes)?;
            }
        }
        Ok(())
    }

    /// The inverse of [`KvCache::write_safetensors`]: a cache of capacity `occupied` (an engine
    /// grows it as it needs) from `tensors`, which must be exactly the `k.N` and `v.N` of
    /// `n_layer` layers, each (n_kv_head, occupied, head_dim) f32.
    pub fn from_safetensors(
        mut tensors: HashMap<String, Tensor>,
        [n_layer, n_kv_head, occupied, head_dim]: [usize; 4],
    ) -> Result<Self> {
        let mut take = |name: String| {
            let t = tensors
                .remove(&name)
                .ok_or_else(|| Error::Msg(format!("no tensor {name}")))?;
            if t.dims() != [n_kv_head, occupied, head_dim] || t.dtype() != DType::F32 {
                candle_core::bail!(
                    "tensor {name} is {:?} {:?}, expected F32 [{n_kv_head}, {occupied}, {head_dim}]",
                    t.dtype(),
                    t.dims()
                )
            }
            Ok(t)
        };
        let layers: Vec<(Tensor, Tensor)> = (0..n_layer)
            .map(|i| Ok((take(tensor_name('k', i))?, take(tensor_name('v', i))?)))
            .collect::<Result<_>>()?;
        if let Some(extra) = tensors.keys().next() {
            candle_core::bail!("unexpected tensor {extra} (not a cache of {n_layer} layers)")
        }
        Ok(KvCache {
            layers,
            capacity: occupied,
        })
    }
}

impl KvCache {
    /// Moves slots `from..from + len` to `to..to + len` in every layer (eviction in the block
    /// engine: the W most recent keys slide down next to the sinks).
    pub fn move_slots(&mut self, from: usize, to: usize, len: usize) -> Result<()> {
        if from == to || len == 0 {
            return Ok(());
        }
        for (k, v) in &self.layers {
            for t in [k, v] {
                // A copy first: source and destination may overlap.
                let src = t.narrow(1, from, len)?.contiguous()?;
                t.slice_set(&src, 1, to)?;
            }
        }
        Ok(())
    }
}
