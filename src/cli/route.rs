//! `routerscope route`: one router on one group read from safetensors.
//!
//! Input: `logits` f32 `[n, e]` (sparse routers) or `x` `[n, d]`, `mu` `[d, e, p]`, `scale` `[]`
//! (Soft MoE). Output: `dispatch` and `combine` f32 `[n, e, c]` (plus the ranked `scores` `[n, e]`
//! for sparse routers), with the capacity and routing summary in the metadata.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use rand::SeedableRng;
use routerscope::routing::{
    ArgStyle, CapacityRounding, Mode, RouteOptions, RouterKind, RoutingResult, SoftRouterParams,
    check_dense_size, route_logits, route_soft,
};
use routerscope::tensor_io::{OutTensor, TensorFile, write_f32_safetensors};

#[derive(clap::Args, Debug)]
pub struct RouteArgs {
    /// Router: softmax-tc, sinkhorn-tc, softmax-ec, sinkhorn-ec, sparse-ec, sparse-tc or soft.
    #[arg(long)]
    router: RouterKind,
    /// Input safetensors (`logits` [n, e]; Soft MoE: `x` [n, d], `mu` [d, e, p], `scale` []).
    #[arg(long)]
    input: PathBuf,
    /// Output safetensors (`dispatch`, `combine` [n, e, c]); written atomically.
    #[arg(long)]
    output: PathBuf,
    /// Experts per token (Token Choice routers) [default: 1].
    #[arg(long)]
    k: Option<usize>,
    /// Capacity factor [default: 1.0; Soft MoE: the slots of `mu`].
    #[arg(long)]
    capacity_factor: Option<f64>,
    /// Pad the capacity up to a multiple of M, 0 for none (sparse routers) [default: 4].
    #[arg(long)]
    capacity_multiple_of: Option<usize>,
    /// How N·CF/e becomes an integer: ceil or round (half to even) (sparse routers) [default: ceil].
    #[arg(long)]
    capacity_rounding: Option<CapacityRounding>,
    /// Batch Priority Routing: highest top-1 score first (Token Choice routers).
    #[arg(long)]
    batch_priority: bool,
    /// Solver `maxiter` (Sinkhorn runs 10·floor(T/10); sparsity-constrained: Adam steps) [default: 20].
    #[arg(long)]
    iterations: Option<usize>,
    /// Adam learning rate of the sparsity-constrained solver [default: 0.01].
    #[arg(long)]
    adam_lr: Option<f32>,
    /// Slots per expert (Soft MoE); must match `mu` [default: the slots of `mu`].
    #[arg(long)]
    num_slots: Option<usize>,
    /// Route in training mode: router noise (and the load loss) drawn from this seed.
    #[arg(long)]
    train_seed: Option<u64>,
}

impl RouteArgs {
    fn options(&self) -> RouteOptions {
        RouteOptions {
            k: self.k,
            capacity_factor: self.capacity_factor,
            capacity_multiple_of: self.capacity_multiple_of,
            capacity_rounding: self.capacity_rounding,
            batch_priority: self.batch_priority,
            iterations: self.iterations,
            adam_lr: self.adam_lr,
            num_slots: self.num_slots,
        }
    }
}

pub fn run(args: &RouteArgs) -> anyhow::Result<()> {
    // Options that do not apply are refused before any file is read.
    let mut cfg = args.options().config(args.router, ArgStyle::Cli, None)?;
    let input = TensorFile::open(&args.input)?;
    let mut rng = args.train_seed.map(rand_chacha::ChaCha8Rng::seed_from_u64);
    let mode = match rng.as_mut() {
        Some(r) => Mode::Train(r),
        None => Mode::Deterministic,
    };
    let in_name = args.input.display();
    let result = if args.router == RouterKind::SoftMoe {
        let x = input.f32("x", "f32 [n, d]")?;
        let mu = input.f32("mu", "f32 [d, e, p]")?;
        let scale = input.f32("scale", "f32 scalar []")?;
        let &[n, d] = x.shape.as_slice() else {
            return Err(input.shape_error("x", &x.shape, "[n, d]").into());
        };
        let &[md, e, p] = mu.shape.as_slice() else {
            return Err(input.shape_error("mu", &mu.shape, "[d, e, p]").into());
        };
        if md != d {
            return Err(input
                .shape_error("mu", &mu.shape, format!("[{d}, e, p] (d from x)"))
                .into());
        }
        if scale.data.len() != 1 || scale.shape.len() > 1 {
            return Err(input
                .shape_error("scale", &scale.shape, "[] (a scalar)")
                .into());
        }
        cfg = args.options().config(args.router, ArgStyle::Cli, Some(p))?;
        let params = SoftRouterParams {
            mu: &mu.data,
            dim: d,
            num_experts: e,
            num_slots: p,
            scale: scale.data[0],
        };
        route_soft(&x.data, n, &params, &cfg, mode).with_context(|| format!("{in_name}"))?
    } else {
        let logits = input.f32("logits", "f32 [n, e]")?;
        let &[n, e] = logits.shape.as_slice() else {
            return Err(input.shape_error("logits", &logits.shape, "[n, e]").into());
        };
        // The dense outputs' size is known before routing: refuse at once, not after a long
        // solve (10^6 tokens under a sparsity-constrained router).
        if let Ok((c, _)) = cfg.capacity_for(n, e) {
            check_dense_size(&[n, e, c], "`route`")?;
        }
        route_logits(&logits.data, n, e, &cfg, mode).with_context(|| format!("{in_name}"))?
    };
    write_output(args, &result)?;
    print_summary(args, &result);
    Ok(())
}

fn write_output(args: &RouteArgs, r: &RoutingResult) -> anyhow::Result<()> {
    let shape = vec![r.num_tokens, r.num_experts, r.capacity];
    check_dense_size(&shape, "`route`")?;
    let dispatch = r.dispatch_dense();
    let combine = r.combine_dense();
    let mut tensors = vec![
        OutTensor {
            name: "dispatch",
            shape: shape.clone(),
            data: &dispatch,
        },
        OutTensor {
            name: "combine",
            shape,
            data: &combine,
        },
    ];
    if let Some(s) = r.sparse() {
        tensors.push(OutTensor {
            name: "scores",
            shape: vec![r.num_tokens, r.num_experts],
            data: &s.scores,
        });
    }
    let stats = r.stats();
    let mut meta = HashMap::from([
        ("router".to_string(), r.router.cli_name().to_string()),
        ("capacity".to_string(), r.capacity.to_string()),
        ("num_tokens".to_string(), r.num_tokens.to_string()),
        ("num_experts".to_string(), r.num_experts.to_string()),
        ("k".to_string(), r.k.to_string()),
        (
            "actual_capacity_factor".to_string(),
            stats.actual_capacity_factor.to_string(),
        ),
        (
            "dropped_tokens".to_string(),
            stats.dropped_tokens.len().to_string(),
        ),
    ]);
    if let Some(s) = r.solver {
        meta.insert("solver_iterations".into(), s.iterations.to_string());
    }
    write_f32_safetensors(&args.output, &tensors, meta)?;
    Ok(())
}

fn print_summary(args: &RouteArgs, r: &RoutingResult) {
    let st = r.stats();
    println!(
        "{}: {} tokens, {} experts, capacity {} (actual factor {:.3}), {} tokens dropped -> {}",
        r.router.display_name(),
        r.num_tokens,
        r.num_experts,
        r.capacity,
        st.actual_capacity_factor,
        st.dropped_tokens.len(),
        args.output.display()
    );
    // Small groups: show who went where, the way the spec's worked examples are written.
    if r.num_tokens > 64 || r.num_experts > 64 {
        return;
    }
    match (r.sparse(), r.soft()) {
        (Some(s), _) => {
            for (j, slots) in s.slot_token.chunks(r.capacity).enumerate() {
                let tokens: Vec<String> = slots
                    .iter()
                    .map(|t| t.map_or("-".to_string(), |t| format!("t{t}")))
                    .collect();
                println!("  expert {j}: [{}]", tokens.join(", "));
            }
            if !st.dropped_tokens.is_empty() {
                let dropped: Vec<String> =
                    st.dropped_tokens.iter().map(|t| format!("t{t}")).collect();
                println!("  dropped: {}", dropped.join(", "));
            }
        }
        (_, Some(soft)) => {
            let ep = r.num_slots();
            for i in 0..r.num_tokens {
                let row = &soft.combine[i * ep..(i + 1) * ep];
                let (top, w) = row.iter().enumerate().fold((0, f32::MIN), |acc, (k, &v)| {
                    if v > acc.1 { (k, v) } else { acc }
                });
                println!(
                    "  token {i}: top slot e{}s{} (combine weight {w:.3})",
                    top / r.capacity,
                    top % r.capacity
                );
            }
        }
        _ => {}
    }
}
