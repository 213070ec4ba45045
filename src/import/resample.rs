//! Resampling a position-embedding table `[h, w, d]` to a new patch grid the way the source
//! framework does, so an imported model run at another input size gives the framework's
//! numbers: PyTorch's `interpolate(mode="bicubic", align_corners=False)`, plain (Hugging Face's
//! ViT, DeiT, DINOv2) or with `antialias=True` (timm's `resample_abs_pos_embed`, Hugging Face's
//! DINOv2 with registers). Both are separable: rows, then columns.

/// Which of PyTorch's bicubic resamplers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resample {
    /// Cubic convolution (`a = -0.75`), four taps, edge indices clamped.
    Bicubic,
    /// PyTorch's antialiased bicubic (PIL's filter, `a = -0.5`): the kernel widens by the
    /// downscale factor, taps outside the input are dropped and the weights renormalised. It
    /// differs from [`Resample::Bicubic`] when upscaling too.
    BicubicAntialias,
}

/// The taps (input index, weight) of every output index, `input` to `output` samples.
fn taps(kind: Resample, input: usize, output: usize) -> Vec<Vec<(usize, f32)>> {
    let scale = input as f64 / output as f64;
    match kind {
        Resample::Bicubic => {
            const A: f64 = -0.75;
            let cubic = |x: f64| {
                let x = x.abs();
                if x <= 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
                } else {
                    0.0
                }
            };
            (0..output)
                .map(|o| {
                    let x = (o as f64 + 0.5) * scale - 0.5;
                    let x0 = x.floor();
                    let t = x - x0;
                    (0..4)
                        .map(|k| {
                            let i = (x0 as i64 - 1 + k).clamp(0, input as i64 - 1) as usize;
                            (i, cubic(t - (k as f64 - 1.0)) as f32)
                        })
                        .collect()
                })
                .collect()
        }
        Resample::BicubicAntialias => {
            // PyTorch's `_compute_indices_weights_aa` with PIL's bicubic filter.
            const A: f64 = -0.5;
            let filter = |x: f64| {
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            };
            let (support, invscale) = match scale >= 1.0 {
                true => (2.0 * scale, 1.0 / scale),
                false => (2.0, 1.0),
            };
            (0..output)
                .map(|o| {
                    let center = scale * (o as f64 + 0.5);
                    let lo = ((center - support + 0.5) as i64).max(0) as usize;
                    let hi = ((center + support + 0.5) as i64).min(input as i64) as usize;
                    let w: Vec<f64> = (lo..hi)
                        .map(|j| filter((j as f64 - center + 0.5) * invscale))
                        .collect();
                    let total: f64 = w.iter().sum();
                    (lo..hi)
                        .zip(w)
                        .map(|(j, v)| {
                            (
                                j,
                                if total != 0.0 {
                                    (v / total) as f32
                                } else {
                                    0.0
                                },
                            )
                        })
                        .collect()
                })
                .collect()
        }
    }
}

/// `src` `[h, w, d]` resampled to `[oh, ow, d]`.
pub fn resample(
    kind: Resample,
    src: &[f32],
    [h, w]: [usize; 2],
    [oh, ow]: [usize; 2],
    d: usize,
) -> Vec<f32> {
    let (rows, cols) = (taps(kind, h, oh), taps(kind, w, ow));
    let mut tmp = vec![0.0f32; oh * w * d];
    for (o, row) in rows.iter().enumerate() {
        for x in 0..w {
            let dst = &mut tmp[(o * w + x) * d..][..d];
            for &(i, wt) in row {
                let s = &src[(i * w + x) * d..][..d];
                dst.iter_mut().zip(s).for_each(|(a, &b)| *a += wt * b);
            }
        }
    }
    let mut out = vec![0.0f32; oh * ow * d];
    for y in 0..oh {
        for (o, col) in cols.iter().enumerate() {
            let dst = &mut out[(y * ow + o) * d..][..d];
            for &(i, wt) in col {
                let s = &tmp[(y * w + i) * d..][..d];
                dst.iter_mut().zip(s).for_each(|(a, &b)| *a += wt * b);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_size_is_the_identity_for_both_kinds() {
        let src: Vec<f32> = (0..4 * 3 * 2).map(|v| v as f32 * 0.37).collect();
        for kind in [Resample::Bicubic, Resample::BicubicAntialias] {
            let out = resample(kind, &src, [4, 3], [4, 3], 2);
            let diff = out
                .iter()
                .zip(&src)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(diff < 1e-5, "{kind:?}: {diff}");
        }
    }

    #[test]
    fn constants_stay_constant_and_the_kinds_differ_on_a_ramp() {
        let ones = vec![1.0f32; 5 * 5];
        for kind in [Resample::Bicubic, Resample::BicubicAntialias] {
            for size in [[3, 3], [9, 7]] {
                let out = resample(kind, &ones, [5, 5], size, 1);
                assert!(
                    out.iter().all(|v| (v - 1.0).abs() < 1e-5),
                    "{kind:?} {size:?}"
                );
            }
        }
        let ramp: Vec<f32> = (0..6 * 6).map(|i| ((i / 6) * (i / 6)) as f32).collect();
        let a = resample(Resample::Bicubic, &ramp, [6, 6], [10, 10], 1);
        let b = resample(Resample::BicubicAntialias, &ramp, [6, 6], [10, 10], 1);
        assert!(a.iter().zip(&b).any(|(x, y)| (x - y).abs() > 1e-3));
    }
}
