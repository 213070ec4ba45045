//! `routerscope eval`: test accuracy and routing statistics of a checkpoint on Fashion-MNIST.

use std::path::PathBuf;

use routerscope::backend::DeviceChoice;
use routerscope::train::eval::evaluate;
use routerscope::train::{DEFAULT_DATA_DIR, Dataset, Split};

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    #[arg(long)]
    model: PathBuf,
    /// Directory with the Fashion-MNIST IDX files.
    #[arg(long, default_value = DEFAULT_DATA_DIR)]
    data: PathBuf,
    /// Evaluate the first N test images only.
    #[arg(long)]
    limit: Option<usize>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Where the model runs: auto (a hardware GPU if there is one, else the CPU), gpu (any
    /// adapter, software ones included; the CPU if none works) or cpu.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
}

pub fn run(args: &EvalArgs) -> anyhow::Result<()> {
    let mut test = Dataset::load(&args.data, Split::Test)?;
    if let Some(n) = args.limit {
        test = test.take(n);
    }
    let model = super::load_engine(&args.model, args.device)?;
    let r = evaluate(&model, &test, 500)?;
    super::report_notice(&model);
    eprintln!("device: {}", model.device());
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "{}: test accuracy {:.2}% on {} images ({:.1} s)",
        r.model,
        100.0 * r.accuracy,
        r.images,
        r.seconds
    );
    for (name, acc) in r.class_names.iter().zip(&r.per_class_accuracy) {
        println!("  {name:<12} {:6.2}%", 100.0 * acc);
    }
    for l in &r.layers {
        println!(
            "block {} ({}, capacity {}): dropped tokens {:.2}%, experts per token {:.3}",
            l.block,
            l.router,
            l.capacity,
            100.0 * l.dropped_token_rate,
            l.experts_per_token
        );
        let load: Vec<String> = l
            .load_per_expert
            .iter()
            .map(|v| format!("{v:.1}"))
            .collect();
        println!("  tokens per expert per image: {}", load.join(" "));
        let hist: Vec<String> = l
            .experts_per_token_histogram
            .iter()
            .enumerate()
            .filter(|(_, f)| **f > 0.0)
            .map(|(t, f)| format!("{t}: {:.1}%", 100.0 * f))
            .collect();
        println!("  experts per token: {}", hist.join(", "));
        println!("  class × expert usage (% of the class's assignments):");
        for (name, row) in r.class_names.iter().zip(&l.class_expert_usage) {
            let cells: Vec<String> = row.iter().map(|v| format!("{:5.1}", 100.0 * v)).collect();
            println!("    {name:<12} {}", cells.join(" "));
        }
    }
    Ok(())
}
