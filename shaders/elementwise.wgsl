// Elementwise kernels over flat arrays of `len` values (2-D dispatch for long arrays):
// GELU, bf16 rounding (round to nearest even, as the CPU path), and row l2-normalisation
// (vmoe's `normalize`: x · rsqrt(Σx² + eps), one thread per row of width `d`).

struct Params { len: u32, d: u32, eps: f32, _p: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> a: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

fn index(gid: vec3<u32>) -> u32 {
    return gid.x + gid.y * 65535u * 64u;
}

fn gelu_f(x: f32) -> f32 {
    let u2 = 1.595769 * (x + 0.044715 * x * x * x);
    return x / (1.0 + exp(-u2));
}

fn bf16(x: f32) -> f32 {
    let bits = bitcast<u32>(x);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        return x;
    }
    let lsb = (bits >> 16u) & 1u;
    return bitcast<f32>((bits + 0x7fffu + lsb) & 0xffff0000u);
}

@compute @workgroup_size(64, 1, 1)
fn gelu(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = index(gid);
    if (i < p.len) {
        out[i] = gelu_f(a[i]);
    }
}

@compute @workgroup_size(64, 1, 1)
fn round_bf16(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = index(gid);
    if (i < p.len) {
        out[i] = bf16(a[i]);
    }
}

@compute @workgroup_size(64, 1, 1)
fn l2_normalize_rows(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = index(gid);
    if (r * p.d >= p.len) {
        return;
    }
    let base = r * p.d;
    var s = 0.0;
    for (var i = 0u; i < p.d; i++) {
        s += a[base + i] * a[base + i];
    }
    let m = 1.0 / sqrt(s + p.eps);
    for (var i = 0u; i < p.d; i++) {
        out[base + i] = a[base + i] * m;
    }
}
