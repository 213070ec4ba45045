// Multi-head self-attention core: softmax(q·kᵀ / √hd) @ v for one query token, one head, one
// image per workgroup. `qkv` is [B·S, 3·H·hd] (the query, key and value projections side by side),
// `out` is [B·S, H·hd]. Scores for up to MAX_S keys stay in workgroup memory.

struct Params { s: u32, heads: u32, hd: u32, scale: f32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> qkv: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

const WG: u32 = 64u;
// 12 KiB of the 16 KiB of workgroup memory every adapter offers: DINOv2 at 518 px (1370 tokens).
const MAX_S: u32 = 3072u;
var<workgroup> scores: array<f32, 3072>;
var<workgroup> red: array<f32, 64>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = wg.x;
    let h = wg.y;
    let b = wg.z;
    let dm = p.heads * p.hd;
    let row = 3u * dm;
    let q0 = (b * p.s + i) * row + h * p.hd;
    for (var t = lid.x; t < p.s; t += WG) {
        let k0 = (b * p.s + t) * row + dm + h * p.hd;
        var acc = 0.0;
        for (var j = 0u; j < p.hd; j++) {
            acc += qkv[q0 + j] * qkv[k0 + j];
        }
        scores[t] = acc * p.scale;
    }
    workgroupBarrier();
    var m = -3.4028235e38;
    for (var t = lid.x; t < p.s; t += WG) {
        m = max(m, scores[t]);
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
    for (var t = lid.x; t < p.s; t += WG) {
        let e = exp(scores[t] - mx);
        scores[t] = e;
        s += e;
    }
    red[lid.x] = s;
    workgroupBarrier();
    for (var off = WG / 2u; off > 0u; off = off / 2u) {
        if (lid.x < off) {
            red[lid.x] += red[lid.x + off];
        }
        workgroupBarrier();
    }
    let inv = 1.0 / red[0];
    let o0 = (b * p.s + i) * dm + h * p.hd;
    for (var j = lid.x; j < p.hd; j += WG) {
        var acc = 0.0;
        for (var t = 0u; t < p.s; t++) {
            acc += scores[t] * qkv[(b * p.s + t) * row + 2u * dm + h * p.hd + j];
        }
        out[o0 + j] = acc * inv;
    }
}
