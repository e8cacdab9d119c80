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
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let zeros = || Tensor::zeros((n_kv_head, capacity, head_dim), dtype, device);
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

/// Values per write when saving a cache.
const WRITE_CHUNK: usize = 1 << 16;

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
        // Little-endian bytes through one small buffer (a copy that vectorizes: collecting
        // `flat_map(to_le_bytes)` was 30 times slower).
        let mut bytes = vec![0u8; WRITE_CHUNK * 4];
        for layer in 0..self.layers.len() {
            let (k, v) = self.read(layer, occupied)?;
            for t in [k, v] {
                let t = t.to_dtype(DType::F32)?;
                for values in t.flatten_all()?.to_vec1::<f32>()?.chunks(WRITE_CHUNK) {
                    for (b, x) in bytes.chunks_exact_mut(4).zip(values) {
                        b.copy_from_slice(&x.to_le_bytes());
                    }
                    out.write_all(&bytes[..4 * values.len()])?;
                }
            }
        }
        Ok(())
    }

    /// The inverse of [`KvCache::write_safetensors`]: a cache of capacity `occupied` (an engine
    /// grows it as it needs) in `dtype` from `tensors`, which must be exactly the `k.N` and `v.N`
    /// of `n_layer` layers, each (n_kv_head, occupied, head_dim) f32.
    pub fn from_safetensors(
        mut tensors: HashMap<String, Tensor>,
        [n_layer, n_kv_head, occupied, head_dim]: [usize; 4],
        dtype: DType,
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
            t.to_dtype(dtype)
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
                // A copy first: source and destination may overlap. (`contiguous` would not copy
                // a slice of a single-KV-head cache, which is contiguous already.)
                let src = t.narrow(1, from, len)?.force_contiguous()?;
                t.slice_set(&src, 1, to)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache of `n_layer` layers whose slot `i` of layer `l` holds keys `l * 1000 + i` and
    /// values their negation.
    fn numbered_cache(n_layer: usize, slots: usize) -> KvCache {
        let mut cache = KvCache::new(n_layer, 2, 3, slots, DType::F32, &Device::Cpu).unwrap();
        for layer in 0..n_layer {
            let k: Vec<f32> = (0..2 * slots * 3)
                .map(|i| (layer * 1000 + (i / 3) % slots) as f32)
                .collect();
            let k = Tensor::from_vec(k, (2, slots, 3), &Device::Cpu).unwrap();
            cache.write(layer, 0, &k, &k.neg().unwrap()).unwrap();
        }
        cache
    }

    #[test]
    fn moving_overlapping_slots_works_with_one_kv_head() {
        let mut cache = KvCache::new(1, 1, 2, 6, DType::F32, &Device::Cpu).unwrap();
        let k = Tensor::arange(0f32, 12., &Device::Cpu)
            .unwrap()
            .reshape((1, 6, 2))
            .unwrap();
        cache.write(0, 0, &k, &k).unwrap();
        cache.move_slots(2, 1, 4).unwrap();
        let (k, _) = cache.read(0, 5).unwrap();
        let firsts: Vec<f32> = k.to_vec3::<f32>().unwrap()[0]
            .iter()
            .map(|r| r[0])
            .collect();
        assert_eq!(firsts, vec![0.0, 4.0, 6.0, 8.0, 10.0]);
    }

    #[test]
    fn growth_doubles_keeps_the_contents_and_stops_at_the_ceiling() {
        let mut cache = numbered_cache(2, 5);
        cache.ensure_capacity(6, 100).unwrap();
        assert_eq!(cache.capacity(), 10);
        cache.ensure_capacity(11, 15).unwrap();
        assert_eq!(cache.capacity(), 15, "capped at the ceiling");
        cache.ensure_capacity(40, 15).unwrap();
        assert_eq!(cache.capacity(), 40, "what is needed wins over the ceiling");
        let (k, _) = cache.read(1, 5).unwrap();
        assert_eq!(k.to_vec3::<f32>().unwrap()[1][4], vec![1004.0; 3]);
        let mut empty = KvCache::new(2, 2, 3, 0, DType::F32, &Device::Cpu).unwrap();
        empty.ensure_capacity(3, 8).unwrap();
        assert_eq!(empty.capacity(), 3);
    }

    #[test]
    fn safetensors_hold_the_occupied_slots_and_read_back_exactly() {
        let mut cache = numbered_cache(3, 7);
        cache.ensure_capacity(8, 16).unwrap(); // capacity 14, 7 occupied
        let mut bytes = Vec::new();
        cache.write_safetensors(7, &mut bytes).unwrap();
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
        let back = KvCache::from_safetensors(tensors, [3, 2, 7, 3], DType::F32).unwrap();
        assert_eq!(back.capacity(), 7);
        for layer in 0..3 {
            let (k, v) = cache.read(layer, 7).unwrap();
            let (k2, v2) = back.read(layer, 7).unwrap();
            assert_eq!(k.to_vec3::<f32>().unwrap(), k2.to_vec3::<f32>().unwrap());
            assert_eq!(v.to_vec3::<f32>().unwrap(), v2.to_vec3::<f32>().unwrap());
        }
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
        let err = KvCache::from_safetensors(tensors, [3, 2, 8, 3], DType::F32).unwrap_err();
        assert!(err.to_string().contains("expected F32 [2, 8, 3]"), "{err}");
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
        let err = KvCache::from_safetensors(tensors, [2, 2, 7, 3], DType::F32).unwrap_err();
        assert!(err.to_string().contains("unexpected tensor"), "{err}");
    }
}
