//! CPU kernels for the expert MLPs, which dominate an MoE model's time: every expert processes
//! only its few slots, and candle's batched matmul synchronises its thread pool once per expert.
//! Here the experts run in parallel (one single-threaded `gemm` per expert and layer), with the
//! bias and GELU fused into one pass over the hidden activations.

use rayon::prelude::*;

use super::config::Gelu;

/// GELU, tanh approximation, written as `x·σ(2u)` (identical to `0.5·x·(1 + tanh u)`) so it costs
/// one `exp` instead of a `tanh`.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    const TWO_SQRT_2_OVER_PI: f32 = 1.595_769;
    let u2 = TWO_SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
    x / (1.0 + (-u2).exp())
}

/// GELU, exact form `0.5·x·(1 + erf(x/√2))` (PyTorch's default, DINOv2's MLPs), with erf as
/// PyTorch's vectorised CPU kernels compute it: Abramowitz & Stegun 7.1.26,
/// `1 − (a₁t + … + a₅t⁵)·e^(−z²)`, `t = 1/(1 + p|z|)`, |error| ≤ 1.5e-7 (6e-7 in f32
/// arithmetic, measured against libm). Branch-free, so the
/// compiler vectorises the loop over a row (libm's `erff` is a scalar call per element).
#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// erf by Abramowitz & Stegun 7.1.26 (see [`gelu_erf`]).
#[inline(always)]
pub fn erf(z: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_7,
        -1.453_152,
        1.061_405_4,
    ];
    let a = z.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = ((((A[4] * t + A[3]) * t + A[2]) * t + A[1]) * t + A[0]) * t;
    let y = 1.0 - poly * exp_fast(-a * a);
    y.copysign(z)
}

/// `e^x` for `x ≤ 0` down to where it underflows, within 2 ulp: `x = n·ln 2 + r`, a degree-6
/// polynomial for `e^r` on `|r| ≤ ln 2 / 2`, and `2^n` built in the exponent bits. Branch-free
/// and call-free (`n` is rounded with the 1.5·2²³ trick, not `round()`), so loops vectorise.
#[inline(always)]
pub fn exp_fast(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 0.0);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.666_666_6e-1
                    + r * (4.166_662e-2 + r * (8.333_452e-3 + r * 1.388_86e-3)))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Runs `$body` compiled for AVX-512 or AVX2+FMA when the CPU has them (the crate itself targets
/// baseline x86-64, SSE2). Element-wise code gives the same results at every width: Rust never
/// fuses a multiply and an add on its own.
macro_rules! simd_dispatch {
    ($name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        pub fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn wide($($arg: $ty),*) { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) { body($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F (checked just above).
                    return unsafe { wide($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has AVX2 and FMA (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

simd_dispatch!(bias_gelu_rows(h: &mut [f32], bias: &[f32], act: Gelu) {
    let m = bias.len().max(1);
    for row in h.chunks_exact_mut(m) {
        match act {
            Gelu::Tanh => row.iter_mut().zip(bias).for_each(|(v, &b)| *v = gelu(*v + b)),
            Gelu::Erf => row.iter_mut().zip(bias).for_each(|(v, &b)| *v = gelu_erf(*v + b)),
        }
    }
});

simd_dispatch!(softmax_rows_fast(x: &mut [f32], cols: usize) {
    // Attention weights: max-subtracted, `exp_fast` (within 2 ulp of `exp`).
    for row in x.chunks_exact_mut(cols.max(1)) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for v in row.iter_mut() {
            *v = (*v - max).exp();
        }
        let sum = crate::routing::ops::sum(row);
        for v in row.iter_mut() {
            *v /= sum;
        }
    }
});

impl Gelu {
    /// The activation as a function.
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Gelu::Tanh => gelu(x),
            Gelu::Erf => gelu_erf(x),
        }
    }
}

/// Below this many multiply-adds a layer runs on the calling thread: handing work to the other
/// threads costs more than it saves (a Fashion-MNIST-sized model runs fastest single-threaded).
pub const PARALLEL_MIN_MACS: usize = 1 << 21;

/// A matrix in a slice: element `(r, c)` at `r·rs + c·cs`.
#[derive(Clone, Copy, Debug)]
pub struct Strided {
    pub rs: usize,
    pub cs: usize,
}

impl Strided {
    /// Row-major with `cols` columns.
    pub const fn rows(cols: usize) -> Self {
        Self { rs: cols, cs: 1 }
    }

    /// The transpose of a row-major matrix with `cols` columns.
    pub const fn transposed(cols: usize) -> Self {
        Self { rs: 1, cs: cols }
    }
}

/// `dst[m, n] = a[m, k] @ b[k, n]` for matrices laid out as `Strided` says (the slices start at
/// each matrix's first element), on `threads` threads (1: this thread only).
#[allow(clippy::too_many_arguments)]
pub fn gemm_strided(
    dst: &mut [f32],
    dl: Strided,
    a: &[f32],
    al: Strided,
    b: &[f32],
    bl: Strided,
    [m, k, n]: [usize; 3],
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    let end = |l: Strided, r: usize, c: usize| (r - 1) * l.rs + (c - 1) * l.cs + 1;
    assert!(
        dst.len() >= end(dl, m, n)
            && (k == 0 || (a.len() >= end(al, m, k) && b.len() >= end(bl, k, n))),
        "gemm operands smaller than their shapes"
    );
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the assertion above keeps every addressed element inside its slice, and `dst` is a
    // unique borrow, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dl.cs as isize,
            dl.rs as isize,
            false,
            a.as_ptr(),
            al.cs as isize,
            al.rs as isize,
            b.as_ptr(),
            bl.cs as isize,
            bl.rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `dst[rows, n] = a[rows, k] @ b[k, n]` (all row-major), single-threaded or with `threads`.
fn matmul(dst: &mut [f32], a: &[f32], b: &[f32], rows: usize, k: usize, n: usize, threads: usize) {
    debug_assert!(dst.len() >= rows * n && a.len() >= rows * k && b.len() >= k * n);
    if rows == 0 || n == 0 {
        return;
    }
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the slices hold at least rows·n, rows·k and k·n elements (checked above in debug
    // builds, guaranteed by the callers' shapes), the strides describe those row-major layouts,
    // and `dst` does not alias the inputs.
    unsafe {
        gemm::gemm(
            rows,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Stacked MLP weights: `w0` `[e, d, m]`, `b0` `[e, m]`, `w1` `[e, m, d]`, `b1` `[e, d]`.
#[derive(Clone, Debug, PartialEq)]
pub struct StackedMlp {
    pub num: usize,
    pub dim: usize,
    pub hidden: usize,
    pub w0: Vec<f32>,
    pub b0: Vec<f32>,
    pub w1: Vec<f32>,
    pub b1: Vec<f32>,
    pub act: Gelu,
}

impl StackedMlp {
    /// Applies MLP `j` to the `rows` vectors of `x[j]`, for every `j` at once:
    /// `x` is `[num, rows, d]`, the result too.
    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let (d, m) = (self.dim, self.hidden);
        let mut out = vec![0.0f32; self.num * rows * d];
        if rows == 0 {
            return out;
        }
        let small = self.num * rows * d * m < PARALLEL_MIN_MACS;
        let threads = if small {
            1
        } else {
            rayon::current_num_threads()
        };
        // One MLP (a dense block): let gemm split the work; several: one expert per task.
        let inner = if self.num == 1 { threads } else { 1 };
        let run = |(j, out_j): (usize, &mut [f32])| {
            let mut h = vec![0.0f32; rows * m];
            matmul(
                &mut h,
                &x[j * rows * d..],
                &self.w0[j * d * m..],
                rows,
                d,
                m,
                inner,
            );
            bias_gelu_rows(&mut h, &self.b0[j * m..(j + 1) * m], self.act);
            matmul(out_j, &h, &self.w1[j * m * d..], rows, m, d, inner);
            let b1 = &self.b1[j * d..(j + 1) * d];
            for row in out_j.chunks_exact_mut(d) {
                for (v, &b) in row.iter_mut().zip(b1) {
                    *v += b;
                }
            }
        };
        if self.num == 1 {
            run((0, &mut out[..]));
        } else if small {
            out.chunks_mut(rows * d).enumerate().for_each(run);
        } else {
            out.par_chunks_mut(rows * d).enumerate().for_each(run);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::gelu_tanh;

    #[test]
    fn gelu_matches_the_tanh_form() {
        for i in -400..400 {
            let x = i as f32 * 0.05;
            let (a, b) = (gelu(x), gelu_tanh(x));
            assert!((a - b).abs() <= 2e-6 * (1.0 + b.abs()), "x {x}: {a} vs {b}");
        }
        assert_eq!(gelu(-1000.0), -0.0);
        assert_eq!(gelu(1000.0), 1000.0);
    }

    /// The exact GELU against values of `0.5·x·(1 + erf(x/√2))` computed in double precision.
    #[test]
    fn exact_gelu_matches_the_erf_form() {
        for (x, want) in [
            (-3.0f32, -0.004_049_694_1f64),
            (-1.0, -0.158_655_253_9),
            (0.5, 0.345_731_230_6),
            (1.0, 0.841_344_746_1),
            (2.5, 2.484_475_836_7),
        ] {
            let got = gelu_erf(x) as f64;
            assert!((got - want).abs() < 1e-6, "x {x}: {got} vs {want}");
        }
        assert_eq!(Gelu::Erf.apply(0.0), 0.0);
        // The two forms differ where the tanh approximation is least exact.
        assert!((gelu_erf(-1.5) - gelu(-1.5)).abs() > 1e-5);
    }

    /// The A&S erf against libm's (correctly rounded to about 1 ulp) over the range GELU sees.
    #[test]
    fn fast_erf_is_within_its_bound() {
        let mut worst = 0.0f32;
        for i in -60_000..=60_000 {
            let z = i as f32 * 1e-4;
            worst = worst.max((erf(z) - libm::erff(z)).abs());
        }
        assert!(worst <= 6.0e-7, "max |erf - erff| = {worst}");
        assert!(erf(0.0).abs() < 1e-7);
        assert_eq!(erf(-10.0), -1.0);
        assert_eq!(erf(10.0), 1.0);
        for x in [-80.0f32, -20.0, -3.0, -0.5, 0.0] {
            let (a, b) = (exp_fast(x), x.exp());
            assert!((a - b).abs() <= 2.5e-7 * b, "exp({x}): {a} vs {b}");
        }
    }

    #[test]
    fn stacked_mlp_matches_a_naive_loop() {
        let (e, rows, d, m) = (3, 5, 4, 6);
        let val = |i: usize| ((i * 7919 % 23) as f32 - 11.0) / 10.0;
        let mlp = StackedMlp {
            num: e,
            dim: d,
            hidden: m,
            w0: (0..e * d * m).map(val).collect(),
            b0: (0..e * m).map(|i| val(i + 3)).collect(),
            w1: (0..e * m * d).map(|i| val(i + 5)).collect(),
            b1: (0..e * d).map(|i| val(i + 7)).collect(),
            act: Gelu::Tanh,
        };
        let x: Vec<f32> = (0..e * rows * d).map(|i| val(i + 11)).collect();
        let got = mlp.forward(&x, rows);
        for j in 0..e {
            for r in 0..rows {
                let xr = &x[(j * rows + r) * d..][..d];
                let h: Vec<f32> = (0..m)
                    .map(|c| {
                        gelu_tanh(
                            mlp.b0[j * m + c]
                                + (0..d)
                                    .map(|k| xr[k] * mlp.w0[j * d * m + k * m + c])
                                    .sum::<f32>(),
                        )
                    })
                    .collect();
                for c in 0..d {
                    let want = mlp.b1[j * d + c]
                        + (0..m)
                            .map(|k| h[k] * mlp.w1[j * m * d + k * d + c])
                            .sum::<f32>();
                    let g = got[(j * rows + r) * d + c];
                    assert!(
                        (g - want).abs() < 1e-4,
                        "expert {j} row {r} col {c}: {g} vs {want}"
                    );
                }
            }
        }
    }
}
