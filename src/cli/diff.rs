//! `routerscope diff A B`: two routings of the same images (two traces, two snapshots of a run,
//! two implementations or precisions) compared token by token.

use std::path::PathBuf;

use anyhow::Context;
use routerscope::files::StagedDir;
use routerscope::trace::TraceFile;
use routerscope::trace::diff::diff_traces;

#[derive(clap::Args, Debug)]
pub struct DiffArgs {
    /// The first routing trace (or a run's snapshot).
    a: PathBuf,
    /// The second, of the same images.
    b: PathBuf,
    /// Draw the disagreement maps of at most this many images (the first ones; the summary
    /// covers all).
    #[arg(long, default_value_t = 64)]
    max_images: usize,
    /// Width in pixels of the PNG maps.
    #[arg(long, default_value_t = 1200)]
    png_width: u32,
    /// Output folder: `diff.json` and per image `diff_image_NNNNN.svg`/`.png`.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: &DiffArgs) -> anyhow::Result<()> {
    routerscope::analysis::report::check_output_dir(
        &args.out,
        routerscope::routing::ArgStyle::Cli,
    )?;
    let a = TraceFile::open(&args.a)?;
    let b = TraceFile::open(&args.b)?;
    let d = diff_traces(&a, &b).map_err(anyhow::Error::msg)?;
    let staged = StagedDir::new(&args.out)
        .with_context(|| format!("--out {}: cannot write there", args.out.display()))?;
    let json = serde_json::to_string_pretty(&d)?;
    routerscope::tensor_io::write_atomic(&staged.path().join("diff.json"), json.as_bytes())?;
    let first = &a.meta().images[0];
    for i in 0..d.images.min(args.max_images) {
        let pixels = a.image(i).ok().map(|im| im.to_rgb8());
        let svg = routerscope::figures::diff::disagreement_figure(
            &d,
            i,
            pixels.as_ref(),
            first.grid,
            first.cls_token,
            &a.image_name(i),
        );
        let stem = format!("diff_image_{i:05}");
        routerscope::tensor_io::write_atomic(
            &staged.path().join(format!("{stem}.svg")),
            svg.as_bytes(),
        )?;
        let png = routerscope::figures::raster::svg_to_png(&svg, args.png_width)
            .map_err(|e| anyhow::anyhow!("{stem}.png: {e}"))?;
        routerscope::tensor_io::write_atomic(&staged.path().join(format!("{stem}.png")), &png)?;
    }
    let files = staged.commit()?;
    println!(
        "{} vs {}: {} images of {} tokens",
        args.a.display(),
        args.b.display(),
        d.images,
        d.tokens_per_image
    );
    for blk in &d.blocks {
        println!(
            "  block {}: top-1 expert differs on {:.2}% of {} tokens, the chosen set on {:.2}%",
            blk.block,
            100.0 * blk.top1_differ_rate,
            blk.tokens,
            100.0 * blk.set_differ_rate
        );
    }
    for (which, blocks) in [("A", &d.only_in_a), ("B", &d.only_in_b)] {
        if !blocks.is_empty() {
            println!("  only in {which}: blocks {blocks:?} (not compared)");
        }
    }
    println!("wrote {} files to {}", files.len(), args.out.display());
    Ok(())
}
