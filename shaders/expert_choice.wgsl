// Expert Choice selection (spec §2.0): every expert takes the c highest-scoring tokens of its
// column in its group, ties to the lower token index; slot s holds the token of rank s. One thread
// per (group, token, expert) counts the tokens that beat it under that total order.

struct Params { n: u32, e: u32, c: u32, groups: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> scores: array<f32>;
@group(0) @binding(2) var<storage, read_write> slot_token: array<i32>;
@group(0) @binding(3) var<storage, read_write> table: array<i32>;

@compute @workgroup_size(64, 1, 1)
fn select_tokens(@builtin(global_invocation_id) gid: vec3<u32>) {
    let idx = gid.x + gid.y * 65535u * 64u;
    if (idx >= p.groups * p.n * p.e) {
        return;
    }
    let j = idx % p.e;
    let t = idx / p.e;
    let g = t / p.n;
    let i = t % p.n;
    let v = scores[t * p.e + j];
    var rank = 0u;
    for (var q = 0u; q < p.n && rank < p.c; q++) {
        let w = scores[(g * p.n + q) * p.e + j];
        if (w > v || (w == v && q < i)) {
            rank++;
        }
    }
    if (rank < p.c) {
        slot_token[(g * p.e + j) * p.c + rank] = i32(i);
        table[idx] = i32(j * p.c + rank);
    } else {
        table[idx] = -1;
    }
}
