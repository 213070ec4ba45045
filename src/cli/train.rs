//! `routerscope train`: train one Fashion-MNIST ViT-MoE (or the dense baseline) and write its
//! checkpoint, training state and model card.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use routerscope::model::{VitMoe, load_checkpoint, preset};
use routerscope::routing::RouterKind;
use routerscope::train::eval::evaluate;
use routerscope::train::{DEFAULT_DATA_DIR, Dataset, Split, TrainOptions, Trainer};

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Router to train with, or `dense` for the baseline without MoE layers.
    #[arg(long)]
    router: String,
    /// Directory with the Fashion-MNIST IDX files.
    #[arg(long, default_value = DEFAULT_DATA_DIR)]
    data: PathBuf,
    #[arg(long, default_value_t = TrainOptions::default().epochs)]
    epochs: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = TrainOptions::default().batch_size)]
    batch_size: usize,
    /// Peak learning rate (after warm-up; cosine decay to 0).
    #[arg(long, default_value_t = TrainOptions::default().peak_lr)]
    lr: f64,
    /// Train on the first N training images only.
    #[arg(long)]
    limit: Option<usize>,
    /// Continue the run saved at --out (its `.train-state.safetensors`).
    #[arg(long)]
    resume: bool,
    /// Skip the test-set evaluation and the model card at the end.
    #[arg(long)]
    no_eval: bool,
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: &TrainArgs) -> anyhow::Result<()> {
    let kind = match args.router.as_str() {
        "dense" => None,
        name => Some(name.parse::<RouterKind>().map_err(anyhow::Error::msg)?),
    };
    let mut train = Dataset::load(&args.data, Split::Train)?;
    if let Some(n) = args.limit {
        train = train.take(n);
    }
    let steps = train.len() / args.batch_size.max(1);
    let mut trainer = if args.resume {
        let t = Trainer::resume(&args.out, steps)?;
        if t.state.router != args.router {
            anyhow::bail!(
                "{} was trained with router {}, not {}",
                args.out.display(),
                t.state.router,
                args.router
            );
        }
        eprintln!(
            "resuming {} after epoch {} (step {})",
            args.out.display(),
            t.state.epochs_done,
            t.state.step
        );
        t
    } else {
        let mut cfg = preset(
            "fashion-mnist",
            kind.unwrap_or(RouterKind::SoftmaxTokenChoice),
        )
        .context("the fashion-mnist preset")?;
        match kind {
            None => {
                cfg.moe = None;
                cfg.name = "fashion-mnist-dense".into();
            }
            Some(RouterKind::SoftmaxTokenChoice) => {
                // The V-MoE paper configs' auxiliary loss weights (λ = 0.01 split in two).
                if let Some(m) = &mut cfg.moe {
                    m.router.loss_weights.importance = 0.005;
                    m.router.loss_weights.load = 0.005;
                }
            }
            Some(_) => {}
        }
        let opts = TrainOptions {
            epochs: args.epochs,
            batch_size: args.batch_size,
            seed: args.seed,
            peak_lr: args.lr,
            ..TrainOptions::default()
        };
        Trainer::new(cfg, opts, steps)?
    };
    trainer.run(&train, &args.out, |r| {
        eprintln!(
            "epoch {}: loss {:.4}, train accuracy {:.2}%, {:.0} images/s, dropped tokens {:.2}%",
            r.epoch,
            r.loss,
            100.0 * r.accuracy,
            r.images_per_second,
            100.0 * r.dropped_token_rate
        );
        true
    })?;
    let state = trainer.state.clone();
    eprintln!(
        "trained {} epochs ({} steps) in {:.0} s; wrote {}",
        state.epochs_done,
        state.step,
        state.seconds,
        args.out.display()
    );
    if args.no_eval {
        return Ok(());
    }
    let test = Dataset::load(&args.data, Split::Test)?;
    let (cfg, weights) = load_checkpoint(&args.out)?;
    let model = VitMoe::new(cfg.clone(), weights)?;
    let report = evaluate(&model, &test, 500)?;
    println!(
        "test accuracy {:.2}% on {} images",
        100.0 * report.accuracy,
        report.images
    );
    let mut card = String::new();
    let file = args
        .out
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    writeln!(card, "# {}\n", cfg.name)?;
    writeln!(
        card,
        "Fashion-MNIST ViT-MoE trained by `routerscope train` (router: `{}`).\n",
        state.router
    )?;
    writeln!(
        card,
        "- command: `routerscope train --router {} --epochs {} --seed {} --batch-size {} --lr {} --out {file}`",
        state.router,
        state.options.epochs,
        state.options.seed,
        state.options.batch_size,
        state.options.peak_lr
    )?;
    writeln!(
        card,
        "- training: {} epochs, {} steps of {} images, AdamW (weight decay {}, {} warm-up steps, cosine decay), {:.0} s on {} CPU thread(s) ({:.0} images/s)",
        state.epochs_done,
        state.step,
        state.options.batch_size,
        state.options.weight_decay,
        state.options.warmup_steps,
        state.seconds,
        rayon::current_num_threads(),
        (state.step * state.options.batch_size) as f64 / state.seconds.max(1e-9)
    )?;
    writeln!(
        card,
        "- test accuracy: **{:.2}%** on the {} Fashion-MNIST test images",
        100.0 * report.accuracy,
        report.images
    )?;
    for l in &report.layers {
        writeln!(
            card,
            "- block {} ({}): capacity {} per expert, dropped tokens {:.2}%, experts per token {:.2}",
            l.block,
            l.router,
            l.capacity,
            100.0 * l.dropped_token_rate,
            l.experts_per_token
        )?;
    }
    writeln!(
        card,
        "\n## Configuration\n\n```json\n{}\n```",
        cfg.to_json()
    )?;
    let card_path = args.out.with_extension("md");
    routerscope::tensor_io::write_atomic(&card_path, card.as_bytes())?;
    eprintln!("wrote {}", card_path.display());
    Ok(())
}
