// Softmax as jax.nn.softmax: exp(x − max) / Σ exp(x − max).
// `rows`: over the last axis of [rows, cols], one workgroup per row.
// `columns_t`: Soft MoE dispatch, over the n tokens of each group for every slot; writes the
// transposed [groups, cols, n] so that slot inputs are one matmul (dispatchᵀ @ X).

struct Params { rows: u32, cols: u32, n: u32, groups: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

const WG: u32 = 64u;
var<workgroup> red: array<f32, 64>;

@compute @workgroup_size(64, 1, 1)
fn rows(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = wg.x + wg.y * 65535u;
    if (row >= p.rows) {
        return;
    }
    let base = row * p.cols;
    var m = -3.4028235e38;
    for (var i = lid.x; i < p.cols; i += WG) {
        m = max(m, x[base + i]);
    }
    red[lid.x] = m;
    workgroupBarrier();
    for (var off = WG / 2u; off > 0u; off = off / 2u) {
        if (lid.x < off) {
            red[lid.x] = max(red[lid.x], red[lid.x + off]);
        }
        workgroupBarrier();
    }
    let mx = red[0];
    workgroupBarrier();
    var s = 0.0;
    for (var i = lid.x; i < p.cols; i += WG) {
        s += exp(x[base + i] - mx);
    }
    red[lid.x] = s;
    workgroupBarrier();
    for (var off = WG / 2u; off > 0u; off = off / 2u) {
        if (lid.x < off) {
            red[lid.x] += red[lid.x + off];
        }
        workgroupBarrier();
    }
    let total = red[0];
    for (var i = lid.x; i < p.cols; i += WG) {
        y[base + i] = exp(x[base + i] - mx) / total;
    }
}

@compute @workgroup_size(64, 1, 1)
fn columns_t(@builtin(global_invocation_id) gid: vec3<u32>) {
    let idx = gid.x;
    if (idx >= p.cols * p.groups) {
        return;
    }
    let g = idx / p.cols;
    let col = idx % p.cols;
    let base = g * p.n * p.cols + col;
    var m = -3.4028235e38;
    for (var i = 0u; i < p.n; i++) {
        m = max(m, x[base + i * p.cols]);
    }
    var s = 0.0;
    for (var i = 0u; i < p.n; i++) {
        s += exp(x[base + i * p.cols] - m);
    }
    let out = (g * p.cols + col) * p.n;
    for (var i = 0u; i < p.n; i++) {
        y[out + i] = exp(x[base + i * p.cols] - m) / s;
    }
}
