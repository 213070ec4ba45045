// Moving tokens into expert slots and back for the sparse routers (Soft MoE uses matmuls).
// Slot buffers are [groups, e, c, d]. `gather`: slot (g, j, s) ← token slot_token[g, j·c + s]
// (zero when the slot is empty). `combine`: token t += Σ_j gate[t, j] · out[g, table[t, j]] over
// the experts that hold it. With bf16 != 0 both round through bfloat16, like vmoe's bf16
// dispatch. `combine` flags: 1 every gate is 1 (unit combine: the experts are parts of one dense
// MLP), 2 write the sum instead of adding it to `dst` (a branch that LayerScale or `Moe/bias`
// finishes before the residual add).

struct Params { n: u32, e: u32, c: u32, d: u32, groups: u32, bf16: u32, flags: u32, _p1: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> index: array<i32>;
@group(0) @binding(3) var<storage, read_write> gates: array<f32>;
@group(0) @binding(4) var<storage, read_write> dst: array<f32>;

fn round(x: f32) -> f32 {
    if (p.bf16 == 0u) {
        return x;
    }
    let bits = bitcast<u32>(x);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        return x;
    }
    let lsb = (bits >> 16u) & 1u;
    return bitcast<f32>((bits + 0x7fffu + lsb) & 0xffff0000u);
}

fn flat(gid: vec3<u32>) -> u32 {
    return gid.x + gid.y * 65535u * 64u;
}

@compute @workgroup_size(64, 1, 1)
fn gather(@builtin(global_invocation_id) gid: vec3<u32>) {
    let idx = flat(gid);
    if (idx >= p.groups * p.e * p.c * p.d) {
        return;
    }
    let k = idx % p.d;
    let slot = idx / p.d;
    let g = slot / (p.e * p.c);
    let t = index[slot];
    var val = 0.0;
    if (t >= 0) {
        val = round(src[(g * p.n + u32(t)) * p.d + k]);
    }
    dst[idx] = val;
}

@compute @workgroup_size(64, 1, 1)
fn combine(@builtin(global_invocation_id) gid: vec3<u32>) {
    let idx = flat(gid);
    if (idx >= p.groups * p.n * p.d) {
        return;
    }
    let k = idx % p.d;
    let t = idx / p.d;
    let g = t / p.n;
    var acc = 0.0;
    for (var j = 0u; j < p.e; j++) {
        let s = index[t * p.e + j];
        if (s >= 0) {
            var gate = gates[t * p.e + j];
            if ((p.flags & 1u) != 0u) {
                gate = 1.0;
            }
            acc += gate * round(src[((g * p.e * p.c) + u32(s)) * p.d + k]);
        }
    }
    if ((p.flags & 2u) != 0u) {
        dst[idx] = acc;
    } else {
        dst[idx] = dst[idx] + acc;
    }
}
