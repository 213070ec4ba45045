// LayerNorm over rows of width d as Flax computes it: one pass, var = max(0, E[x²] − E[x]²),
// y = (x − mean)·rsqrt(var + eps)·scale + bias. One workgroup per row.

struct Params { rows: u32, d: u32, eps: f32, _p: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> scale: array<f32>;
@group(0) @binding(3) var<storage, read_write> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

const WG: u32 = 64u;
var<workgroup> s1: array<f32, 64>;
var<workgroup> s2: array<f32, 64>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = wg.x + wg.y * 65535u;
    if (row >= p.rows) {
        return;
    }
    let base = row * p.d;
    var a = 0.0;
    var b = 0.0;
    for (var i = lid.x; i < p.d; i += WG) {
        let v = x[base + i];
        a += v;
        b += v * v;
    }
    s1[lid.x] = a;
    s2[lid.x] = b;
    workgroupBarrier();
    for (var off = WG / 2u; off > 0u; off = off / 2u) {
        if (lid.x < off) {
            s1[lid.x] += s1[lid.x + off];
            s2[lid.x] += s2[lid.x + off];
        }
        workgroupBarrier();
    }
    let inv_d = 1.0 / f32(p.d);
    let mean = s1[0] * inv_d;
    let var_ = max(s2[0] * inv_d - mean * mean, 0.0);
    let inv = 1.0 / sqrt(var_ + p.eps);
    for (var i = lid.x; i < p.d; i += WG) {
        y[base + i] = (x[base + i] - mean) * inv * scale[i] + bias[i];
    }
}
