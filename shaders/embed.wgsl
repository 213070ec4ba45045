// Model input and output plumbing.
// `patchify`: images [B, H, W, C] → patch rows [B·gh·gw, ph·pw·C] (ViT's conv-as-matmul order).
// `assemble`: tokens [B, S, d] = (prefix tokens ++ patch embeddings) + position embedding, the
// `prefix` learned tokens (CLS, distillation, registers, in that order) shared by every image.
// `pool`: [B, S, d] → [B, d], token `token` (mode 0: CLS or distillation) or the mean over the
// patch tokens, those after the prefix (mode 1).

struct Params {
    batch: u32, h: u32, w: u32, ch: u32,
    ph: u32, pw: u32, gh: u32, gw: u32,
    s: u32, d: u32, prefix: u32, mode: u32,
    token: u32, _p0: u32, _p1: u32, _p2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> in0: array<f32>;
@group(0) @binding(2) var<storage, read_write> in1: array<f32>;
@group(0) @binding(3) var<storage, read_write> in2: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

fn index(gid: vec3<u32>) -> u32 {
    return gid.x + gid.y * 65535u * 64u;
}

@compute @workgroup_size(64, 1, 1)
fn patchify(@builtin(global_invocation_id) gid: vec3<u32>) {
    let idx = index(gid);
    let pin = p.ph * p.pw * p.ch;
    let np = p.gh * p.gw;
    if (idx >= p.batch * np * pin) {
        return;
    }
    let r = idx % pin;
    let pi = (idx / pin) % np;
    let b = idx / (pin * np);
    let c = r % p.ch;
    let px = (r / p.ch) % p.pw;
    let py = r / (p.ch * p.pw);
    let y = (pi / p.gw) * p.ph + py;
    let x = (pi % p.gw) * p.pw + px;
    out[idx] = in0[((b * p.h + y) * p.w + x) * p.ch + c];
}

// in0: patch embeddings [B·np, d], in1: prefix tokens [prefix, d], in2: position embedding [S, d].
@compute @workgroup_size(64, 1, 1)
fn assemble(@builtin(global_invocation_id) gid: vec3<u32>) {
    let idx = index(gid);
    if (idx >= p.batch * p.s * p.d) {
        return;
    }
    let j = idx % p.d;
    let t = (idx / p.d) % p.s;
    let b = idx / (p.d * p.s);
    let np = p.s - p.prefix;
    var v = 0.0;
    if (t < p.prefix) {
        v = in1[t * p.d + j];
    } else {
        v = in0[(b * np + t - p.prefix) * p.d + j];
    }
    out[idx] = v + in2[t * p.d + j];
}

@compute @workgroup_size(64, 1, 1)
fn pool(@builtin(global_invocation_id) gid: vec3<u32>) {
    let idx = index(gid);
    if (idx >= p.batch * p.d) {
        return;
    }
    let j = idx % p.d;
    let b = idx / p.d;
    if (p.mode == 0u) {
        out[idx] = in0[(b * p.s + p.token) * p.d + j];
    } else {
        var acc = 0.0;
        for (var t = p.prefix; t < p.s; t++) {
            acc += in0[(b * p.s + t) * p.d + j];
        }
        out[idx] = acc / f32(p.s - p.prefix);
    }
}
