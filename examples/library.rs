//! The library without the app (the README's example): route a logit matrix, then run a
//! checkpoint on an image under a what-if router. `cargo run --example library -- CKPT IMAGE`.

use routerscope::model::{RunOptions, VitMoe, load_image};
use routerscope::routing::{Mode, RouterConfig, RouterKind, route_logits};

fn main() -> anyhow::Result<()> {
    // 4 tokens, 2 experts: under Softmax Expert Choice each expert picks its c best tokens
    // (c = 4·1/2 = 2, padded to vmoe's default multiple of 4, so 4).
    let logits = [2.0, 0.1, 1.5, 0.3, -0.2, 1.0, 0.4, 0.9];
    let cfg = RouterConfig::new(RouterKind::SoftmaxExpertChoice);
    let routing = route_logits(&logits, 4, 2, &cfg, Mode::Deterministic)?;
    println!("tokens per expert: {:?}", routing.stats().tokens_per_expert);

    let mut args = std::env::args().skip(1);
    let (Some(ckpt), Some(image)) = (args.next(), args.next()) else {
        return Ok(());
    };
    let model = VitMoe::load(ckpt.as_ref())?;
    let pixels = load_image(image.as_ref(), &model.config)?;
    let opts = RunOptions::from_config(&model.config)
        .with_router(RouterConfig::new(RouterKind::SinkhornTokenChoice));
    let out = model.forward(&[pixels], &opts)?;
    for layer in &out.records {
        let stats = layer.groups[0].routing.stats();
        println!(
            "block {}: {} dropped",
            layer.block,
            stats.dropped_tokens.len()
        );
    }
    let (class, p) = (out.probs[0].iter().enumerate())
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap_or((0, &0.0));
    println!("{} ({p:.3})", model.config.class_name(class));
    Ok(())
}
