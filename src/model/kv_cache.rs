//! Per-layer key/value storage. Keys are stored BEFORE the rotary embedding, so a strategy can
//! give every cached key a new position at every step (spec section 2, "pos shift").

use std::collections::HashMap;
use std::io::Write;

use candle_core::{DType, Device, Error, Result, Tensor};

/// Keys and values of every layer, in slots `0..capacity`. Which slot holds which token, and
/// at which position it is seen, is the engine's business (see [`super::AttnPlan`]).
///
/// A layer may be capped ([`KvCache::with_layer_caps`]): it then stores only the most recent
/// slots, at most its cap, those before [`KvCache::start`] dropped (a layer with a sliding
/// window of its own never sees them again: Gemma 3's local layers hold 512 + B keys whatever
/// the strategy). Slot numbers stay the engine's; the layer maps them.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    capacity: usize,
}

/// One layer's keys and values, each (n_kv_head, stored capacity, head_dim): slot `start + i`
/// in row `i`.
#[derive(Debug)]
struct LayerCache {
    k: Tensor,
    v: Tensor,
    cap: Option<usize>,
    start: usize,
}

impl LayerCache {
    fn stored_capacity(&self) -> Result<usize> {
        self.k.dim(1)
    }

    /// Moves rows `from..from + len` to `to..to + len` (a copy first: they may overlap, and
    /// `contiguous` would not copy a slice of a single-KV-head cache, contiguous already).
    fn move_rows(&self, from: usize, to: usize, len: usize) -> Result<()> {
        if from == to || len == 0 {
            return Ok(());
        }
        for t in [&self.k, &self.v] {
            let src = t.narrow(1, from, len)?.force_contiguous()?;
            t.slice_set(&src, 1, to)?;
        }
        Ok(())
    }
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
            .map(|_| {
                Ok(LayerCache {
                    k: zeros()?,
                    v: zeros()?,
                    cap: None,
                    start: 0,
                })
            })
            .collect::<Result<_>>()?;
        Ok(KvCache { layers, capacity })
    }

    /// Caps layer i at `caps[i]` slots (`None`: uncapped). A cap only ever drops slots, so it
    /// may be set on a cache that holds some already (a restored checkpoint keeps its starts).
    pub fn with_layer_caps(mut self, caps: &[Option<usize>]) -> Result<Self> {
        if caps.len() != self.layers.len() {
            candle_core::bail!(
                "{} layer caps for a cache of {} layers",
                caps.len(),
                self.layers.len()
            )
        }
        for (layer, &cap) in self.layers.iter_mut().zip(caps) {
            layer.cap = cap;
        }
        Ok(self)
    }

    /// The engine's slot capacity (a capped layer stores fewer).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The first slot layer `layer` still stores (0 unless capped).
    pub fn start(&self, layer: usize) -> usize {
        self.layers[layer].start
    }

    /// Bytes allocated for each layer's keys and values.
    pub fn layer_bytes(&self) -> Vec<usize> {
        (self.layers.iter())
            .map(|l| 2 * l.k.elem_count() * l.k.dtype().size_in_bytes())
            .collect()
    }

    /// Grows to at least `needed` slots, doubling (so a growing cache copies O(n) in total) but
    /// never past `ceiling`, the most slots its engine can ever use (or `needed`, if larger). A
    /// capped layer grows to its cap at most.
    pub fn ensure_capacity(&mut self, needed: usize, ceiling: usize) -> Result<()> {
        if needed <= self.capacity {
            return Ok(());
        }
        let new_cap = self.capacity.saturating_mul(2).min(ceiling).max(needed);
        for layer in self.layers.iter_mut() {
            let rows = layer.cap.map_or(new_cap, |cap| cap.min(new_cap));
            let have = layer.stored_capacity()?;
            if rows <= have {
                continue;
            }
            for t in [&mut layer.k, &mut layer.v] {
                let (h, _, d) = t.dims3()?;
                let grown = Tensor::zeros((h, rows, d), t.dtype(), t.device())?;
                if have > 0 {
                    grown.slice_set(&*t, 1, 0)?;
                }
                *t = grown;
            }
        }
        self.capacity = new_cap;
        Ok(())
    }

    /// Before slots `..end` are written: every capped layer drops its oldest slots so that it
    /// stores at most its cap once they are (`occupied` slots are held now).
    pub fn make_room(&mut self, occupied: usize, end: usize) -> Result<()> {
        for layer in self.layers.iter_mut() {
            let Some(cap) = layer.cap else { continue };
            let drop = (end - layer.start).saturating_sub(cap);
            if drop == 0 {
                continue;
            }
            if end - occupied > cap {
                candle_core::bail!(
                    "{} new slots do not fit in a layer capped at {cap}",
                    end - occupied
                )
            }
            let kept = occupied.saturating_sub(layer.start + drop);
            layer.move_rows(drop, 0, kept)?;
            layer.start += drop;
        }
        Ok(())
    }

    /// Writes keys and values (n_kv_head, T, head_dim) of layer `layer` into slots `at..at + T`.
    pub fn write(&mut self, layer: usize, at: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let l = &self.layers[layer];
        let Some(row) = at.checked_sub(l.start) else {
            candle_core::bail!(
                "slot {at} was dropped from layer {layer} (it stores from {})",
                l.start
            )
        };
        l.k.slice_set(&k.contiguous()?, 1, row)?;
        l.v.slice_set(&v.contiguous()?, 1, row)?;
        Ok(())
    }

    /// Keys and values of the slots `start(layer)..n` that layer `layer` stores, each
    /// (n_kv_head, n - start, head_dim): views of the cache, not copies (not contiguous while
    /// the cache has free slots and more than one KV head).
    pub fn read(&self, layer: usize, n: usize) -> Result<(Tensor, Tensor)> {
        let l = &self.layers[layer];
        let rows = n - l.start;
        Ok((l.k.narrow(1, 0, rows)?, l.v.narrow(1, 0, rows)?))
    }
}

/// Values per write when saving a cache.
const WRITE_CHUNK: usize = 1 << 16;

/// Safetensors name of layer `layer`'s keys (`k.N`) or values (`v.N`).
fn tensor_name(kind: char, layer: usize) -> String {
    format!("{kind}.{layer}")
}

impl KvCache {
    /// The first slot each layer stores (see [`KvCache::start`]): a checkpoint records them.
    pub fn starts(&self) -> Vec<usize> {
        self.layers.iter().map(|l| l.start).collect()
    }

    /// Writes the slots `start..occupied` each layer stores as a safetensors file (`k.N`, `v.N`,
    /// each (n_kv_head, occupied - start, head_dim) f32): a checkpoint stores what the cache
    /// holds, not its capacity (a dense cache is up to twice as large as what it holds). One
    /// layer is copied out at a time, so saving needs little memory beyond the cache itself.
    pub fn write_safetensors(&self, occupied: usize, out: &mut impl Write) -> Result<()> {
        let Some(l0) = self.layers.first() else {
            candle_core::bail!("a cache with no layers has nothing to save")
        };
        let (n_kv_head, _, head_dim) = l0.k.dims3()?;
        let mut header = serde_json::Map::new();
        let mut offset = 0;
        for (layer, l) in self.layers.iter().enumerate() {
            let shape = [n_kv_head, occupied - l.start, head_dim];
            let tensor_bytes = shape.iter().product::<usize>() * DType::F32.size_in_bytes();
            for kind in ['k', 'v'] {
                header.insert(
                    tensor_name(kind, layer),
                    serde_json::json!({
                        "dtype": "F32",
                        "shape": shape,
                        "data_offsets": [offset, offset + tensor_bytes],
                    }),
                );
                offset += tensor_bytes;
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
    /// of `n_layer` layers, layer i (n_kv_head, occupied - starts[i], head_dim) f32. The layers
    /// are uncapped until the engine caps them again ([`KvCache::with_layer_caps`]).
    pub fn from_safetensors(
        mut tensors: HashMap<String, Tensor>,
        [n_layer, n_kv_head, occupied, head_dim]: [usize; 4],
        starts: &[usize],
        dtype: DType,
    ) -> Result<Self> {
        if starts.len() != n_layer || starts.iter().any(|&s| s > occupied) {
            candle_core::bail!(
                "layer starts {starts:?} do not fit a cache of {n_layer} layers and {occupied} slots"
            )
        }
        let mut take = |name: String, rows: usize| {
            let t = tensors
                .remove(&name)
                .ok_or_else(|| Error::Msg(format!("no tensor {name}")))?;
            if t.dims() != [n_kv_head, rows, head_dim] || t.dtype() != DType::F32 {
                candle_core::bail!(
                    "tensor {name} is {:?} {:?}, expected F32 [{n_kv_head}, {rows}, {head_dim}]",
                    t.dtype(),
                    t.dims()
                )
            }
            t.to_dtype(dtype)
        };
        let layers: Vec<LayerCache> = (0..n_layer)
            .map(|i| {
                let rows = occupied - starts[i];
                Ok(LayerCache {
                    k: take(tensor_name('k', i), rows)?,
                    v: take(tensor_name('v', i), rows)?,
                    cap: None,
                    start: starts[i],
                })
            })
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
    /// Moves slots `from..from + len` to `to..to + len` (`to < from`), the slots after them
    /// left unused: eviction in the block engine, the W most recent keys sliding down next to
    /// the sinks. A capped layer moves only what it stores, and forgets the evicted slots.
    pub fn move_slots(&mut self, from: usize, to: usize, len: usize) -> Result<()> {
        if from == to || len == 0 {
            return Ok(());
        }
        for l in self.layers.iter_mut() {
            match l.start {
                // It stores only moved slots: they keep their rows, under new slot numbers.
                s if s >= from => l.start = s - (from - to),
                // It stores some evicted slots before the moved ones, and no sink: those go.
                s if s >= to => {
                    l.move_rows(from - s, 0, len)?;
                    l.start = to;
                }
                s => l.move_rows(from - s, to - s, len)?,
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
        let back = KvCache::from_safetensors(tensors, [3, 2, 7, 3], &[0; 3], DType::F32).unwrap();
        assert_eq!(back.capacity(), 7);
        for layer in 0..3 {
            let (k, v) = cache.read(layer, 7).unwrap();
            let (k2, v2) = back.read(layer, 7).unwrap();
            assert_eq!(k.to_vec3::<f32>().unwrap(), k2.to_vec3::<f32>().unwrap());
            assert_eq!(v.to_vec3::<f32>().unwrap(), v2.to_vec3::<f32>().unwrap());
        }
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
        let err =
            KvCache::from_safetensors(tensors, [3, 2, 8, 3], &[0; 3], DType::F32).unwrap_err();
        assert!(err.to_string().contains("expected F32 [2, 8, 3]"), "{err}");
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
        let err =
            KvCache::from_safetensors(tensors, [2, 2, 7, 3], &[0; 2], DType::F32).unwrap_err();
        assert!(err.to_string().contains("unexpected tensor"), "{err}");
    }

    /// Slot numbers (the first key value of each stored row) of layer `layer`'s slots
    /// `start..n`.
    fn stored_slots(cache: &KvCache, layer: usize, n: usize) -> Vec<f32> {
        let (k, _) = cache.read(layer, n).unwrap();
        k.to_vec3::<f32>().unwrap()[0]
            .iter()
            .map(|r| r[0])
            .collect()
    }

    /// Writes slots `at..at + n`, each holding its own number as keys and values.
    fn write_numbered(cache: &mut KvCache, at: usize, n: usize) {
        cache.make_room(at, at + n).unwrap();
        let k: Vec<f32> = (at..at + n).flat_map(|i| [i as f32; 2]).collect();
        let k = Tensor::from_vec(k, (1, n, 2), &Device::Cpu).unwrap();
        for layer in 0..2 {
            cache.write(layer, at, &k, &k).unwrap();
        }
    }

    /// A layer capped at 6 slots beside an uncapped one, through the block engine's moves:
    /// appends, eviction of the middle (sinks 0..2 kept), and a checkpoint round trip.
    #[test]
    fn a_capped_layer_keeps_the_most_recent_slots_through_appends_and_eviction() {
        let mut cache = KvCache::new(2, 1, 2, 0, DType::F32, &Device::Cpu)
            .unwrap()
            .with_layer_caps(&[None, Some(6)])
            .unwrap();
        cache.ensure_capacity(12, 12).unwrap();
        assert_eq!(cache.layer_bytes(), [2 * 12 * 2 * 4, 2 * 6 * 2 * 4]);
        write_numbered(&mut cache, 0, 4);
        write_numbered(&mut cache, 4, 4); // 8 slots: the capped layer drops 0 and 1
        assert_eq!(cache.start(1), 2);
        assert_eq!(stored_slots(&cache, 1, 8), [2., 3., 4., 5., 6., 7.]);
        assert_eq!(
            stored_slots(&cache, 0, 8),
            (0..8).map(|i| i as f32).collect::<Vec<_>>()
        );
        // Eviction: keep sinks 0..2 and the 3 most recent (5, 6, 7) in slots 2..5.
        cache.move_slots(5, 2, 3).unwrap();
        assert_eq!(stored_slots(&cache, 0, 5), [0., 1., 5., 6., 7.]);
        assert_eq!(
            cache.start(1),
            2,
            "the evicted 2..5 are gone, 5..8 now slots 2..5"
        );
        assert_eq!(stored_slots(&cache, 1, 5), [5., 6., 7.]);
        write_numbered(&mut cache, 5, 4); // slots 5..9: the capped layer holds 3..9
        assert_eq!(cache.start(1), 3);
        assert_eq!(stored_slots(&cache, 1, 9), [6., 7., 5., 6., 7., 8.]);
        // The next eviction: slots 6..9 to 2..5; the capped layer forgets 3..6.
        cache.move_slots(6, 2, 3).unwrap();
        assert_eq!(cache.start(1), 2);
        assert_eq!(stored_slots(&cache, 1, 5), [6., 7., 8.]);
        assert_eq!(stored_slots(&cache, 0, 5), [0., 1., 6., 7., 8.]);
        let mut bytes = Vec::new();
        cache.write_safetensors(5, &mut bytes).unwrap();
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
        let back = KvCache::from_safetensors(tensors, [2, 1, 5, 2], &cache.starts(), DType::F32)
            .unwrap()
            .with_layer_caps(&[None, Some(6)])
            .unwrap();
        assert_eq!(back.starts(), [0, 2]);
        assert_eq!(stored_slots(&back, 1, 5), stored_slots(&cache, 1, 5));
        assert_eq!(stored_slots(&back, 0, 5), stored_slots(&cache, 0, 5));
    }
}
