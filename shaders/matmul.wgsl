// Tiled matrix multiply C[m, n] (=|+=) act(alpha · A[m, k] @ B[k, n] + bias[n]), row-major, with a
// two-level batch (workgroup z = outer · inner + inner index) so that one launch covers every
// expert of every routing group. 16×16 tiles of A and B are staged in workgroup memory.
// flags: 1 bias, 2 GELU (tanh), 4 tanh, 8 accumulate into C, 16 GELU (erf).
// `main` is the tiled kernel for GPUs; `rowwise` (a 4×4 block per invocation, no workgroup
// memory or barriers) is for software adapters, where every barrier is a fibre switch per invocation
// and the tiled kernel runs ~100x slower than a plain loop the compiler can vectorise.

struct Params {
    m: u32, n: u32, k: u32, inner: u32,
    a_so: u32, a_si: u32, b_so: u32, b_si: u32,
    c_so: u32, c_si: u32, bias_so: u32, bias_si: u32,
    flags: u32, alpha: f32, _p0: u32, _p1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> a: array<f32>;
@group(0) @binding(2) var<storage, read_write> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> c: array<f32>;

const TILE: u32 = 16u;
var<workgroup> tile_a: array<array<f32, 16>, 16>;
var<workgroup> tile_b: array<array<f32, 16>, 16>;

// tanh-approximation GELU as x·σ(2u), the CPU kernel's form (src/model/kernels.rs).
fn gelu(x: f32) -> f32 {
    let u2 = 1.595769 * (x + 0.044715 * x * x * x);
    return x / (1.0 + exp(-u2));
}

// erf by Abramowitz & Stegun 7.1.26, the CPU kernel's form and constants (`erf` in
// src/model/kernels.rs): 1 − (a₁t + … + a₅t⁵)·e^(−z²), t = 1/(1 + p|z|), |error| ≤ 1.5e-7.
fn erf(z: f32) -> f32 {
    let a = abs(z);
    let t = 1.0 / (1.0 + 0.3275911 * a);
    let poly = ((((1.0614054 * t - 1.453152) * t + 1.4214137) * t - 0.28449674) * t + 0.2548296) * t;
    let y = 1.0 - poly * exp(-a * a);
    return select(y, -y, z < 0.0);
}

// Exact GELU 0.5·x·(1 + erf(x/√2)) (PyTorch's default, DINOv2).
fn gelu_erf(x: f32) -> f32 {
    return 0.5 * x * (1.0 + erf(x * 0.70710677));
}

fn epilogue(acc: f32, outer: u32, inner: u32, at: u32, col: u32) {
    var v = acc * p.alpha;
    if ((p.flags & 1u) != 0u) {
        v += bias[outer * p.bias_so + inner * p.bias_si + col];
    }
    if ((p.flags & 2u) != 0u) {
        v = gelu(v);
    }
    if ((p.flags & 4u) != 0u) {
        v = tanh(v);
    }
    if ((p.flags & 16u) != 0u) {
        v = gelu_erf(v);
    }
    if ((p.flags & 8u) != 0u) {
        c[at] = c[at] + v;
    } else {
        c[at] = v;
    }
}

@compute @workgroup_size(64, 1, 1)
fn rowwise(@builtin(global_invocation_id) gid: vec3<u32>) {
    // A 4×4 block of C per invocation: 8 loads feed 16 multiply-adds. Edge rows and columns are
    // clamped for loading (computed twice) and not stored.
    let outer = gid.z / p.inner;
    let inner = gid.z % p.inner;
    let row0 = gid.y * 4u;
    let col0 = gid.x * 4u;
    if (col0 >= p.n || row0 >= p.m) {
        return;
    }
    let a0 = outer * p.a_so + inner * p.a_si;
    let b0 = outer * p.b_so + inner * p.b_si;
    let r = vec4<u32>(row0, min(row0 + 1u, p.m - 1u), min(row0 + 2u, p.m - 1u), min(row0 + 3u, p.m - 1u)) * p.k + a0;
    let cl = vec4<u32>(col0, min(col0 + 1u, p.n - 1u), min(col0 + 2u, p.n - 1u), min(col0 + 3u, p.n - 1u)) + b0;
    var acc0 = vec4<f32>();
    var acc1 = vec4<f32>();
    var acc2 = vec4<f32>();
    var acc3 = vec4<f32>();
    for (var t = 0u; t < p.k; t++) {
        let bt = t * p.n;
        let bv = vec4<f32>(b[cl.x + bt], b[cl.y + bt], b[cl.z + bt], b[cl.w + bt]);
        acc0 += a[r.x + t] * bv;
        acc1 += a[r.y + t] * bv;
        acc2 += a[r.z + t] * bv;
        acc3 += a[r.w + t] * bv;
    }
    let c0 = outer * p.c_so + inner * p.c_si;
    var rows = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
    for (var i = 0u; i < 4u; i++) {
        let row = row0 + i;
        if (row < p.m) {
            for (var j = 0u; j < 4u; j++) {
                let col = col0 + j;
                if (col < p.n) {
                    epilogue(rows[i][j], outer, inner, c0 + row * p.n + col, col);
                }
            }
        }
    }
}

@compute @workgroup_size(16, 16, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let outer = wg.z / p.inner;
    let inner = wg.z % p.inner;
    let a0 = outer * p.a_so + inner * p.a_si;
    let b0 = outer * p.b_so + inner * p.b_si;
    let c0 = outer * p.c_so + inner * p.c_si;
    let row = wg.y * TILE + lid.y;
    let col = wg.x * TILE + lid.x;
    var acc = 0.0;
    for (var t = 0u; t < p.k; t += TILE) {
        let ak = t + lid.x;
        var av = 0.0;
        if (row < p.m && ak < p.k) {
            av = a[a0 + row * p.k + ak];
        }
        tile_a[lid.y][lid.x] = av;
        let bk = t + lid.y;
        var bv = 0.0;
        if (bk < p.k && col < p.n) {
            bv = b[b0 + bk * p.n + col];
        }
        tile_b[lid.y][lid.x] = bv;
        workgroupBarrier();
        for (var i = 0u; i < TILE; i++) {
            acc += tile_a[lid.y][i] * tile_b[i][lid.x];
        }
        workgroupBarrier();
    }
    if (row < p.m && col < p.n) {
        epilogue(acc, outer, inner, c0 + row * p.n + col, col);
    }
}
