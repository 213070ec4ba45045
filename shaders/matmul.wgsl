// Tiled matrix multiply C[m, n] (=|+=) act(alpha · A[m, k] @ B[k, n] + bias[n]), row-major, with a
// two-level batch (workgroup z = outer · inner + inner index) so that one launch covers every
// expert of every routing group. 16×16 tiles of A and B are staged in workgroup memory.
// flags: 1 bias, 2 GELU (tanh), 4 tanh, 8 accumulate into C.

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
        let at = c0 + row * p.n + col;
        if ((p.flags & 8u) != 0u) {
            c[at] = c[at] + v;
        } else {
            c[at] = v;
        }
    }
}
