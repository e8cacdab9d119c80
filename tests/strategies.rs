//! Exactness of the token engine on tiny random Llamas: strategies that must agree do, and
//! `sink:S+W`, `window:W`, `--no-pos-shift`, `--sink-text` and `recompute:W` match a slow,
//! independent f64 oracle that builds each token's visible keys and positions straight from the
//! spec's rules, in every position scheme (full, partial RoPE, ALiBi, layer windows).

use std::collections::HashMap;

mod common;

use candle_core::Device;
use indicatif::ProgressBar;
use streamppl::engine::{EngineKind, run_strategy};
use streamppl::model::attention::PositionScheme;
use streamppl::model::random::{random_llama, random_weights};
use streamppl::model::rope::{PairLayout, Rope, RopeScaling};
use streamppl::model::{Config, Model};
use streamppl::strategy::Strategy;
use streamppl::stream::TokenStream;

const VOCAB: usize = 61;

fn cfg() -> Config {
    Config::tiny(VOCAB) // 4 query heads over 2 KV heads: GQA
}

/// How keys and queries get positions in a test model: the Llama block with each scheme of
/// spec section 3b in turn (the families' own blocks are checked against transformers in
/// tests/hf_families.rs; here the question is how each scheme follows the strategies).
#[derive(Clone, Copy, Debug)]
enum Scheme {
    /// Interleaved RoPE on every channel (the GGUF Llama).
    Rope,
    /// RoPE on the first 4 of each head's 8 channels (GPT-NeoX's `rotary_pct` 0.5).
    PartialRope,
    /// ALiBi with MPT's slopes, no rotation.
    Alibi,
    /// RoPE, and every layer sees only keys fewer than 5 fed tokens back (Mistral).
    LayerWindow,
}

const SCHEMES: [Scheme; 4] = [
    Scheme::Rope,
    Scheme::PartialRope,
    Scheme::Alibi,
    Scheme::LayerWindow,
];
const ROTARY_DIM: usize = 4;
const LAYER_WINDOW: usize = 5;

impl Scheme {
    fn model(self) -> Model {
        let cfg = Config {
            layer_windows: match self {
                Scheme::LayerWindow => vec![Some(LAYER_WINDOW); cfg().n_layer],
                _ => Vec::new(),
            },
            ..cfg()
        };
        let model = random_llama(&cfg, 7, &Device::Cpu).unwrap();
        match self {
            Scheme::Rope | Scheme::LayerWindow => model,
            Scheme::PartialRope => model.with_positions(PositionScheme::Rope(Rope::new(
                ROTARY_DIM,
                cfg.rope_theta,
                &RopeScaling::None,
                PairLayout::Interleaved,
            ))),
            Scheme::Alibi => model.with_positions(PositionScheme::mpt_alibi(cfg.n_head, 8.0)),
        }
    }
}

fn nlls(strategy: &str, pos_shift: bool, stream: &TokenStream) -> Vec<f32> {
    nlls_with(Scheme::Rope, strategy, pos_shift, stream)
}

fn nlls_with(scheme: Scheme, strategy: &str, pos_shift: bool, stream: &TokenStream) -> Vec<f32> {
    let model = scheme.model();
    let s: Strategy = strategy.parse().unwrap();
    let log = run_strategy(
        &model,
        s,
        pos_shift,
        EngineKind::Token,
        stream,
        &ProgressBar::hidden(),
        None,
    )
    .unwrap();
    assert_eq!(
        log.len() as u64,
        stream.scored_count(),
        "{strategy}: every target scored once"
    );
    log.records.iter().map(|r| r.nll).collect()
}

fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let max = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(max <= tol, "{what}: max |delta NLL| = {max} > {tol}");
}

#[test]
fn short_streams_give_identical_nlls_for_sink_window_dense() {
    // 3 books, 24 fed tokens < S+W = 4+28.
    let stream = TokenStream::new(&common::books(&[9, 6, 12], VOCAB, 1), &[], None);
    let dense = nlls("dense", true, &stream);
    assert_close(
        &nlls("sink:4+28", true, &stream),
        &dense,
        1e-6,
        "sink vs dense",
    );
    assert_close(
        &nlls("window:32", true, &stream),
        &dense,
        1e-6,
        "window vs dense",
    );
    assert_close(
        &nlls("sink:4+28", false, &stream),
        &dense,
        1e-6,
        "no-pos-shift vs dense",
    );
}

#[test]
fn recompute_with_a_window_as_long_as_the_stream_is_dense() {
    let stream = TokenStream::new(&common::books(&[20, 15], VOCAB, 2), &[], None);
    let dense = nlls("dense", true, &stream);
    assert_close(
        &nlls("recompute:40", true, &stream),
        &dense,
        1e-5,
        "recompute:40 vs dense",
    );
}

#[test]
fn recompute_stride_one_is_recompute() {
    let stream = TokenStream::new(&common::books(&[30, 12], VOCAB, 3), &[], None);
    let exact = nlls("recompute:8", true, &stream);
    assert_close(
        &nlls("recompute:8/1", true, &stream),
        &exact,
        0.0,
        "recompute:8/1",
    );
    // A stride > 1 scores every token too, but from shorter contexts: it must differ.
    let strided = nlls("recompute:8/4", true, &stream);
    assert!(
        strided
            .iter()
            .zip(&exact)
            .any(|(a, b)| (a - b).abs() > 1e-4)
    );
}

#[test]
fn recompute_matches_the_oracle_window() {
    for scheme in SCHEMES {
        check_recompute_against_oracle(scheme);
    }
}

fn check_recompute_against_oracle(scheme: Scheme) {
    // recompute:W: token t sees fed tokens t-W..=t, all recomputed at positions 0..=W.
    let stream = TokenStream::new(&common::books(&[25, 10], VOCAB, 4), &[], None);
    let w = 6;
    let got = nlls_with(scheme, &format!("recompute:{w}"), true, &stream);
    let oracle = Oracle::new(scheme);
    let want: Vec<f32> = (0..stream.len())
        .map(|t| {
            let first = t.saturating_sub(w);
            let fed = &stream.fed[first..=t];
            // Fresh dense pass over the window; score the last token.
            let nll = oracle.stream(fed, &|i| (0..=i).map(|j| (j, j as u64)).collect(), &|i| {
                i as u64
            });
            let target = stream.targets[t].unwrap().token;
            oracle.nll(&nll[fed.len() - 1], target) as f32
        })
        .collect();
    assert_close(
        &got,
        &want,
        1e-4,
        &format!("{scheme:?} recompute vs oracle"),
    );
}

/// The spec's eviction rule: fed token t sees all of 0..=t while t <= S+W, then
/// {0..S-1} U {t-W..=t}. With pos shift, keys sit at their rank in cache order and the query
/// after them; without, everything keeps its stream index.
fn spec_visible(s: usize, w: usize, pos_shift: bool) -> impl Fn(usize) -> Vec<(usize, u64)> {
    move |t| {
        let keys: Vec<usize> = if t <= s + w {
            (0..=t).collect()
        } else {
            (0..s).chain(t - w..=t).collect()
        };
        keys.iter()
            .enumerate()
            .map(|(rank, &j)| (j, if pos_shift { rank as u64 } else { j as u64 }))
            .collect()
    }
}

fn check_sink_against_oracle(s: usize, w: usize, pos_shift: bool, prefix: &[u32]) {
    for scheme in SCHEMES {
        check_scheme_against_oracle(scheme, s, w, pos_shift, prefix);
    }
}

fn check_scheme_against_oracle(
    scheme: Scheme,
    s: usize,
    w: usize,
    pos_shift: bool,
    prefix: &[u32],
) {
    // Four books: the cache is carried across each boundary, and a 1-token book adds nothing.
    let stream = TokenStream::new(&common::books(&[17, 1, 13, 21], VOCAB, 5), prefix, None);
    let spec = if s == 0 {
        format!("window:{w}")
    } else {
        format!("sink:{s}+{w}")
    };
    let got = nlls_with(scheme, &spec, pos_shift, &stream);
    let oracle = Oracle::new(scheme);
    let visible = spec_visible(s, w, pos_shift);
    let q_pos = |t: usize| visible(t).last().unwrap().1;
    let hidden = oracle.stream(&stream.fed, &visible, &q_pos);
    let want: Vec<f32> = stream
        .targets
        .iter()
        .zip(&hidden)
        .filter_map(|(target, h)| target.map(|tg| oracle.nll(h, tg.token) as f32))
        .collect();
    assert_close(
        &got,
        &want,
        1e-4,
        &format!("{scheme:?} {spec} pos_shift={pos_shift} vs oracle"),
    );
}

#[test]
fn sink_matches_the_spec_oracle_across_book_boundaries() {
    for (s, w) in [(4, 8), (1, 5), (0, 7), (2, 1)] {
        check_sink_against_oracle(s, w, true, &[]);
    }
}

#[test]
fn no_pos_shift_matches_the_spec_oracle() {
    check_sink_against_oracle(4, 8, false, &[]);
}

#[test]
fn sink_text_prefix_matches_the_spec_oracle() {
    check_sink_against_oracle(3, 6, true, &[5, 5, 5]);
}

#[test]
fn no_pos_shift_differs_once_eviction_starts() {
    let (s, w) = (2, 6);
    let stream = TokenStream::new(&common::books(&[40], VOCAB, 6), &[], None);
    let shift = nlls("sink:2+6", true, &stream);
    let fixed = nlls("sink:2+6", false, &stream);
    // Fed token t evicts from t = S+W+1 on; before that the two are the same computation.
    let start = s + w + 1;
    assert_close(&shift[..start], &fixed[..start], 1e-6, "before eviction");
    assert!(
        shift[start..]
            .iter()
            .zip(&fixed[start..])
            .all(|(a, b)| (a - b).abs() > 1e-6)
    );
}

/// A naive f64 Llama over plain vectors, written from the architecture and spec section 3b,
/// not from the engine, in each position scheme.
struct Oracle {
    cfg: Config,
    scheme: Scheme,
    w: HashMap<String, Vec<f64>>,
}

type Visible<'a> = dyn Fn(usize) -> Vec<(usize, u64)> + 'a;

impl Oracle {
    fn new(scheme: Scheme) -> Self {
        let w = random_weights(&cfg(), 7)
            .into_iter()
            .map(|(name, _, data)| (name, data.into_iter().map(f64::from).collect()))
            .collect();
        Oracle {
            cfg: cfg(),
            scheme,
            w,
        }
    }

    /// MPT's ALiBi slope of `head` of 4 heads (alibi_bias_max 8): 2^-(8 (head + 1) / 4).
    fn alibi_slope(&self, head: usize) -> f64 {
        assert_eq!(self.cfg.n_head, 4);
        2f64.powi(-2 * (head as i32 + 1))
    }

    fn get(&self, name: &str) -> &[f64] {
        &self.w[name]
    }

    /// y = W x for W stored (rows, x.len()).
    fn matvec(&self, name: &str, x: &[f64]) -> Vec<f64> {
        self.get(name)
            .chunks(x.len())
            .map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum())
            .collect()
    }

    fn rms_norm(&self, x: &[f64], name: &str) -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let r = 1.0 / (ms + self.cfg.rms_eps).sqrt();
        x.iter()
            .zip(self.get(name))
            .map(|(v, g)| v * r * g)
            .collect()
    }

    /// Interleaved RoPE: pairs (2i, 2i+1) of the first r channels rotate by
    /// pos * theta^(-2i/r), r = all of them or ROTARY_DIM; ALiBi rotates nothing.
    fn rope(&self, x: &[f64], pos: u64) -> Vec<f64> {
        let rotary = match self.scheme {
            Scheme::Rope | Scheme::LayerWindow => x.len(),
            Scheme::PartialRope => ROTARY_DIM,
            Scheme::Alibi => 0,
        };
        let mut out = x.to_vec();
        for i in 0..rotary / 2 {
            let a = pos as f64 * self.cfg.rope_theta.powf(-((2 * i) as f64) / rotary as f64);
            let (c, s) = (a.cos(), a.sin());
            out[2 * i] = x[2 * i] * c - x[2 * i + 1] * s;
            out[2 * i + 1] = x[2 * i] * s + x[2 * i + 1] * c;
        }
        out
    }

    /// Feeds `fed` in order. `visible(t)` lists (token, key position) of every key token t
    /// attends to (itself included); `q_pos(t)` is its query position. Returns final hidden states.
    fn stream(
        &self,
        fed: &[u32],
        visible: &Visible,
        q_pos: &dyn Fn(usize) -> u64,
    ) -> Vec<Vec<f64>> {
        let c = &self.cfg;
        let (d, hd, group) = (c.hidden_size, c.head_dim(), c.n_head / c.n_kv_head);
        // Per layer, per token: pre-RoPE key and value (a token's own, fixed once it is fed).
        let mut keys = vec![Vec::<Vec<f64>>::new(); c.n_layer];
        let mut values = vec![Vec::<Vec<f64>>::new(); c.n_layer];
        let mut out = Vec::new();
        for (t, &tok) in fed.iter().enumerate() {
            let mut x =
                self.get("token_embd.weight")[tok as usize * d..(tok as usize + 1) * d].to_vec();
            let mut vis = visible(t);
            if let Scheme::LayerWindow = self.scheme {
                // The layer's own window, in fed tokens, sinks included (spec section 3b).
                vis.retain(|&(j, _)| t - j < LAYER_WINDOW);
            }
            for l in 0..c.n_layer {
                let p = format!("blk.{l}");
                let h = self.rms_norm(&x, &format!("{p}.attn_norm.weight"));
                let q = self.matvec(&format!("{p}.attn_q.weight"), &h);
                keys[l].push(self.matvec(&format!("{p}.attn_k.weight"), &h));
                values[l].push(self.matvec(&format!("{p}.attn_v.weight"), &h));
                let mut attn = vec![0f64; c.n_head * hd];
                for head in 0..c.n_head {
                    let kv = head / group;
                    let qh = self.rope(&q[head * hd..(head + 1) * hd], q_pos(t));
                    let scores: Vec<f64> = vis
                        .iter()
                        .map(|&(j, pos)| {
                            let k = self.rope(&keys[l][j][kv * hd..(kv + 1) * hd], pos);
                            let score = qh.iter().zip(&k).map(|(a, b)| a * b).sum::<f64>()
                                / (hd as f64).sqrt();
                            match self.scheme {
                                // -slope x distance, both positions as the strategy gives them.
                                Scheme::Alibi => {
                                    score - self.alibi_slope(head) * (q_pos(t) as f64 - pos as f64)
                                }
                                _ => score,
                            }
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                    for (&(j, _), s) in vis.iter().zip(&scores) {
                        let p = (s - m).exp() / z;
                        for i in 0..hd {
                            attn[head * hd + i] += p * values[l][j][kv * hd + i];
                        }
                    }
                }
                let o = self.matvec(&format!("{p}.attn_output.weight"), &attn);
                x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
                let h = self.rms_norm(&x, &format!("{p}.ffn_norm.weight"));
                let g = self.matvec(&format!("{p}.ffn_gate.weight"), &h);
                let u = self.matvec(&format!("{p}.ffn_up.weight"), &h);
                let act: Vec<f64> = g
                    .iter()
                    .zip(&u)
                    .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                    .collect();
                let dn = self.matvec(&format!("{p}.ffn_down.weight"), &act);
                x.iter_mut().zip(&dn).for_each(|(a, b)| *a += b);
            }
            out.push(self.rms_norm(&x, "output_norm.weight"));
        }
        out
    }

    fn nll(&self, hidden: &[f64], target: u32) -> f64 {
        let logits = self.matvec("token_embd.weight", hidden);
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + logits.iter().map(|l| (l - m).exp()).sum::<f64>().ln();
        lse - logits[target as usize]
    }
}

#[test]
fn an_interrupted_run_resumes_from_its_checkpoint_to_the_same_numbers() {
    use std::time::Duration;
    use streamppl::checkpoint::Checkpointer;
    let model = random_llama(&cfg(), 7, &Device::Cpu).unwrap();
    let stream = TokenStream::new(&common::books(&[30, 25], VOCAB, 8), &[], None);
    for spec in ["sink:2+5", "dense", "recompute:6/3"] {
        let s: Strategy = spec.parse().unwrap();
        let whole = run_strategy(
            &model,
            s,
            true,
            EngineKind::Token,
            &stream,
            &ProgressBar::hidden(),
            None,
        )
        .unwrap();
        let dir = std::env::temp_dir().join(format!(
            "streamppl-ckpt-{}-{}",
            std::process::id(),
            spec.replace(['/', ':'], "_")
        ));
        let _ = std::fs::remove_dir_all(&dir);
        // A crash right after the checkpoint at fed token 48 is a run over the first 48 tokens
        // (the recompute engine checkpoints between batches: 16 windows of stride 3 here).
        let cut = TokenStream {
            fed: stream.fed[..48].to_vec(),
            targets: stream.targets[..48].to_vec(),
        };
        let mut ckpt = Checkpointer::new(&dir, "same run".into(), Duration::ZERO);
        run_strategy(
            &model,
            s,
            true,
            EngineKind::Token,
            &cut,
            &ProgressBar::hidden(),
            Some(&mut ckpt),
        )
        .unwrap();
        let mut ckpt = Checkpointer::new(&dir, "same run".into(), Duration::from_secs(3600));
        let resumed = run_strategy(
            &model,
            s,
            true,
            EngineKind::Token,
            &stream,
            &ProgressBar::hidden(),
            Some(&mut ckpt),
        )
        .unwrap();
        assert_eq!(resumed, whole, "{spec}: resumed run differs");
        // A checkpoint of another configuration is ignored, not resumed.
        let mut other = Checkpointer::new(&dir, "other run".into(), Duration::from_secs(3600));
        let fresh = run_strategy(
            &model,
            s,
            true,
            EngineKind::Token,
            &stream,
            &ProgressBar::hidden(),
            Some(&mut other),
        )
        .unwrap();
        assert_eq!(fresh, whole);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn score_every_samples_exact_recompute_nlls() {
    let stream = TokenStream::new(&common::books(&[30, 12], VOCAB, 9), &[], None);
    let exact = nlls("recompute:8", true, &stream);
    // k = 1 is the exact run itself.
    assert_close(
        &nlls("recompute:8", true, &stream.clone().sample_every(1)),
        &exact,
        0.0,
        "every 1",
    );
    // k = 5 scores positions 0, 5, 10, ... with exactly the exact run's numbers.
    let sampled = nlls("recompute:8", true, &stream.clone().sample_every(5));
    let want: Vec<f32> = exact.iter().step_by(5).copied().collect();
    assert_close(&sampled, &want, 0.0, "every 5");
}

#[test]
fn batched_recompute_windows_equal_one_window_at_a_time() {
    use streamppl::engine::recompute;
    let model = random_llama(&cfg(), 7, &Device::Cpu).unwrap();
    // Two books after a 3-token sink-text prefix (unscored fed tokens), and a 1/4 sample.
    let stream = TokenStream::new(&common::books(&[30, 25], VOCAB, 10), &[5, 5, 5], None);
    let sampled = stream.clone().sample_every(4);
    for (w, s) in [(8, 1), (6, 3), (60, 1)] {
        for stream in [&stream, &sampled] {
            let run = |batch| {
                recompute::run(&model, w, s, batch, stream, &ProgressBar::hidden(), None).unwrap()
            };
            let one = run(1);
            assert_eq!(one.len() as u64, stream.scored_count());
            for batch in [2, 5, 16] {
                let batched = run(batch);
                let positions = |l: &streamppl::nll_log::NllLog| {
                    l.records.iter().map(|r| r.position).collect::<Vec<_>>()
                };
                assert_eq!(
                    positions(&batched),
                    positions(&one),
                    "W={w} s={s} batch={batch}"
                );
                let nll = |l: &streamppl::nll_log::NllLog| {
                    l.records.iter().map(|r| r.nll).collect::<Vec<_>>()
                };
                // Matmuls of other row counts may sum in another order: float noise only
                // (the tolerance of the block-vs-token tests).
                assert_close(
                    &nll(&batched),
                    &nll(&one),
                    1e-5,
                    &format!("recompute:{w}/{s}, {batch} windows per batch"),
                );
            }
        }
    }
}
