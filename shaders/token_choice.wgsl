// Token Choice slotting (spec §2.0) for every routing group at once (groups of n tokens).
// `topk`: each token's k best experts on the score matrix, ties to the lower expert index
// (jax.lax.top_k). `order`: the priority order, token index or, with Batch Priority Routing,
// a stable descending order of the top-1 scores. `slots`: each expert accepts requests in
// (rank, priority) order until its c slots are full: one thread per (group, expert) walks the
// requests sequentially, which is exactly the reference's cumulative-sum position.
// `table[token, expert]` is the slot (j·c + s) the token reaches there, or −1.

struct Params { n: u32, e: u32, k: u32, c: u32, groups: u32, bpr: u32, _p0: u32, _p1: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> scores: array<f32>;
@group(0) @binding(2) var<storage, read_write> chosen: array<u32>;
@group(0) @binding(3) var<storage, read_write> order: array<u32>;
@group(0) @binding(4) var<storage, read_write> choice_slot: array<i32>;
@group(0) @binding(5) var<storage, read_write> slot_token: array<i32>;
@group(0) @binding(6) var<storage, read_write> table: array<i32>;
@group(0) @binding(7) var<storage, read_write> requests: array<u32>;

@compute @workgroup_size(64, 1, 1)
fn topk(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = gid.x;
    if (t >= p.n * p.groups) {
        return;
    }
    let row = t * p.e;
    for (var r = 0u; r < p.k; r++) {
        var best = 0xffffffffu;
        var best_v = 0.0;
        for (var j = 0u; j < p.e; j++) {
            var taken = false;
            for (var q = 0u; q < r; q++) {
                if (chosen[t * p.k + q] == j) {
                    taken = true;
                }
            }
            let v = scores[row + j];
            if (!taken && (best == 0xffffffffu || v > best_v)) {
                best = j;
                best_v = v;
            }
        }
        chosen[t * p.k + r] = best;
    }
    for (var j = 0u; j < p.e; j++) {
        table[row + j] = -1;
    }
}

@compute @workgroup_size(64, 1, 1)
fn order_tokens(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = gid.x;
    if (t >= p.n * p.groups) {
        return;
    }
    let g = t / p.n;
    let i = t % p.n;
    var rank = i;
    if (p.bpr != 0u) {
        let si = scores[t * p.e + chosen[t * p.k]];
        rank = 0u;
        for (var q = 0u; q < p.n; q++) {
            let u = g * p.n + q;
            let sq = scores[u * p.e + chosen[u * p.k]];
            if (sq > si || (sq == si && q < i)) {
                rank++;
            }
        }
    }
    order[g * p.n + rank] = i;
}

@compute @workgroup_size(64, 1, 1)
fn slots(@builtin(global_invocation_id) gid: vec3<u32>) {
    let idx = gid.x;
    if (idx >= p.e * p.groups) {
        return;
    }
    let g = idx / p.e;
    let j = idx % p.e;
    var count = 0u;
    for (var r = 0u; r < p.k; r++) {
        for (var q = 0u; q < p.n; q++) {
            let i = order[g * p.n + q];
            let t = g * p.n + i;
            if (chosen[t * p.k + r] == j) {
                if (count < p.c) {
                    choice_slot[t * p.k + r] = i32(count);
                    slot_token[(g * p.e + j) * p.c + count] = i32(i);
                    table[t * p.e + j] = i32(j * p.c + count);
                } else {
                    choice_slot[t * p.k + r] = -1;
                }
                count++;
            }
        }
    }
    for (var s = count; s < p.c; s++) {
        slot_token[(g * p.e + j) * p.c + s] = -1;
    }
    requests[idx] = count;
}
