//! Per-layer key/value storage. Keys are stored BEFORE the rotary embedding, so a strategy can
//! give every cached key a new position at every step (spec section 2, "pos shift").

use candle_core::{DType, Device, Result, Tensor};

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

    /// Grows to at least `needed` slots (doubling, so a dense run copies O(n) in total).
    pub fn ensure_capacity(&mut self, needed: usize) -> Result<()> {
        if needed <= self.capacity {
            return Ok(());
        }
        let new_cap = needed.max(2 * self.capacity);
        for (k, v) in self.layers.iter_mut() {
            for t in [k, v] {
                let (h, _, d) = t.dims3()?;
                let grown = Tensor::zeros((h, new_cap, d), t.dtype(), t.device())?;
                grown.slice_set(&*t, 1, 0)?;
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

impl KvCache {
    /// Every layer's keys and values by name (`k.N`, `v.N`), for checkpoints.
    pub fn named_tensors(&self) -> std::collections::HashMap<String, Tensor> {
        let mut out = std::collections::HashMap::new();
        for (i, (k, v)) in self.layers.iter().enumerate() {
            out.insert(format!("k.{i}"), k.clone());
            out.insert(format!("v.{i}"), v.clone());
        }
        out
    }

    /// The inverse of [`KvCache::named_tensors`].
    pub fn from_named_tensors(
        mut named: std::collections::HashMap<String, Tensor>,
        n_layer: usize,
    ) -> Result<Self> {
        let mut take = |name: String| {
            named
                .remove(&name)
                .ok_or_else(|| candle_core::Error::Msg(format!("checkpoint has no tensor {name}")))
        };
        let layers: Vec<(Tensor, Tensor)> = (0..n_layer)
            .map(|i| Ok((take(format!("k.{i}"))?, take(format!("v.{i}"))?)))
            .collect::<Result<_>>()?;
        let capacity = layers.first().map_or(Ok(0), |(k, _)| k.dim(1))?;
        Ok(KvCache { layers, capacity })
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
