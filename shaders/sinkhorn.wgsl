// Sinkhorn plan of each group's [n, e] logits (spec §2.0, ott-jax kernel mode, ε = 1): row
// marginals 1, column marginals b = n/e, K = exp(Z − shift), each iteration updates v then u.
// Spec §5.8: the shift is the global maximum when it exceeds 80 (exp would overflow), which leaves
// the plan unchanged. A zero or non-finite denominator sets status[g] = 1; the host then computes
// that group's plan in the log domain on the CPU. One workgroup per group.

struct Params { n: u32, e: u32, iterations: u32, b: f32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> plan: array<f32>;
@group(0) @binding(3) var<storage, read_write> u: array<f32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;
@group(0) @binding(5) var<storage, read_write> status: array<u32>;

const WG: u32 = 256u;
var<workgroup> red: array<f32, 256>;
var<workgroup> failed: atomic<u32>;

fn bad(x: f32) -> bool {
    return x == 0.0 || (bitcast<u32>(x) & 0x7f800000u) == 0x7f800000u;
}

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let g = wg.x;
    let ne = p.n * p.e;
    let base = g * ne;
    if (lid.x == 0u) {
        atomicStore(&failed, 0u);
    }
    var m = -3.4028235e38;
    for (var i = lid.x; i < ne; i += WG) {
        m = max(m, logits[base + i]);
    }
    red[lid.x] = m;
    workgroupBarrier();
    for (var off = WG / 2u; off > 0u; off = off / 2u) {
        if (lid.x < off) {
            red[lid.x] = max(red[lid.x], red[lid.x + off]);
        }
        workgroupBarrier();
    }
    var shift = 0.0;
    if (red[0] > 80.0) {
        shift = red[0];
    }
    for (var i = lid.x; i < ne; i += WG) {
        plan[base + i] = exp(logits[base + i] - shift);
    }
    for (var i = lid.x; i < p.n; i += WG) {
        u[g * p.n + i] = 1.0;
    }
    for (var j = lid.x; j < p.e; j += WG) {
        v[g * p.e + j] = 1.0;
    }
    storageBarrier();
    workgroupBarrier();
    for (var it = 0u; it < p.iterations; it++) {
        for (var j = lid.x; j < p.e; j += WG) {
            var col = 0.0;
            for (var i = 0u; i < p.n; i++) {
                col += plan[base + i * p.e + j] * u[g * p.n + i];
            }
            if (bad(col)) {
                atomicStore(&failed, 1u);
            }
            v[g * p.e + j] = p.b / col;
        }
        storageBarrier();
        workgroupBarrier();
        for (var i = lid.x; i < p.n; i += WG) {
            var s = 0.0;
            for (var j = 0u; j < p.e; j++) {
                s += plan[base + i * p.e + j] * v[g * p.e + j];
            }
            if (bad(s)) {
                atomicStore(&failed, 1u);
            }
            u[g * p.n + i] = 1.0 / s;
        }
        storageBarrier();
        workgroupBarrier();
    }
    for (var idx = lid.x; idx < ne; idx += WG) {
        let i = idx / p.e;
        let j = idx % p.e;
        let val = u[g * p.n + i] * plan[base + idx] * v[g * p.e + j];
        if ((bitcast<u32>(val) & 0x7f800000u) == 0x7f800000u) {
            atomicStore(&failed, 1u);
        }
        plan[base + idx] = val;
    }
    workgroupBarrier();
    if (lid.x == 0u) {
        status[g] = atomicLoad(&failed);
    }
}
