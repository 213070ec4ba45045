//! Writes a synthetic run of STEPS steps x BLOCKS MoE blocks x EXPERTS experts (random loads,
//! one block collapsing halfway), for the scale numbers of `analyze --run` and the app's
//! Timeline:
//!
//! ```sh
//! cargo run --release --example generate_run -- /tmp/big.rsrun 100000 12 64
//! /usr/bin/time -v target/release/routerscope analyze --run /tmp/big.rsrun --out /tmp/big-report
//! ```

use routerscope::run::{LayerSums, RunSpec, RunWriter};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, out, steps, blocks, experts] = args.as_slice() else {
        anyhow::bail!("usage: generate_run OUT STEPS BLOCKS EXPERTS");
    };
    let (steps, blocks, e): (i64, usize, usize) =
        (steps.parse()?, blocks.parse()?, experts.parse()?);
    let mut w = RunWriter::create(
        std::path::Path::new(out),
        &RunSpec {
            experts: e,
            model_name: "synthetic".into(),
            classes: Vec::new(),
            rank: 0,
            world_size: 1,
        },
    )?;
    let mut state = 0x9e3779b97f4a7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let started = std::time::Instant::now();
    for step in 0..steps {
        w.step(step)?;
        for b in 0..blocks {
            let mut s = LayerSums::new(e);
            let tokens = 4096u64;
            let collapsed = b == blocks / 2 && step > steps / 2;
            let mut left = tokens * 2;
            for j in 0..e {
                let share = if collapsed && j == 0 {
                    left * 3 / 4
                } else {
                    (next() % (2 * tokens * 2 / e as u64 + 1)).min(left)
                };
                s.requests[j] = share;
                s.kept[j] = share.min(tokens * 2 * 5 / 4 / e as u64);
                left -= share;
            }
            s.calls = 1;
            s.tokens = tokens;
            s.dropped = next() % 40;
            s.entropy_sum = tokens as f64 * 0.8;
            s.entropy_tokens = tokens;
            s.z_loss_sum = tokens as f64 * 3.0;
            s.z_loss_tokens = tokens;
            w.add(8 + b, None, &s)?;
        }
    }
    w.close()?;
    println!(
        "wrote {out}: {steps} steps x {blocks} blocks x {e} experts in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
