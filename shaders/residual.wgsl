// The residual add of a branch whose output needs finishing first: x += (a + bias) · scale per
// channel over flat [rows, d] arrays, where the bias (a unit-combine MoE layer's `Moe/bias`,
// once per token: flag 1) and the scale (LayerScale: flag 2) are each optional. The order of
// the operations is the CPU path's (`add_branch` in src/model/vit.rs).

struct Params { len: u32, d: u32, flags: u32, _p: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> a: array<f32>;
@group(0) @binding(2) var<storage, read_write> scale: array<f32>;
@group(0) @binding(3) var<storage, read_write> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> x: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn add_branch(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * 65535u * 64u;
    if (i >= p.len) {
        return;
    }
    let j = i % p.d;
    var v = a[i];
    if ((p.flags & 1u) != 0u) {
        v = v + bias[j];
    }
    if ((p.flags & 2u) != 0u) {
        v = v * scale[j];
    }
    x[i] = x[i] + v;
}
