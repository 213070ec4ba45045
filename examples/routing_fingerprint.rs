//! Writes every routing decision of the shipped models to stdout, one line per (model, router,
//! image, MoE layer): the token in each expert slot and the predicted class. Comparing two runs
//! (`diff`) shows whether a change in the numerics (kernels, summation order) changed a decision.
//!
//! ```sh
//! cargo run --release --example routing_fingerprint > before.txt
//! ```
//!
//! Inputs: the Fashion-MNIST models on the committed 1,000-image test slice and the sample
//! images; the photo model on the sample photos under each sparse router (k = 2, CF 1.25, as the
//! app offers them) and Soft MoE is not applicable (no `mu`).

use routerscope::catalog;
use routerscope::model::{RunOptions, VitMoe, load_checkpoint, load_image};
use routerscope::routing::{CapacitySpec, RouterConfig, RouterKind};
use routerscope::train::{Dataset, Split};

fn main() -> anyhow::Result<()> {
    // SAFETY: first statement of main, no other thread exists yet.
    unsafe { routerscope::runtime::pin_thread_count() };
    let slice = Dataset::load(&catalog::fashion_mnist_slice(), Split::Test)?;
    let samples = catalog::sample_images();
    for kind in catalog::TRAINED_ROUTERS {
        let (path, _) = catalog::model_for(kind).map_err(anyhow::Error::msg)?;
        let (cfg, w) = load_checkpoint(&path)?;
        let model = VitMoe::new(cfg.clone(), w)?;
        let opts = RunOptions::from_config(&cfg);
        let mut inputs: Vec<(String, Vec<f32>)> = (0..slice.len())
            .map(|i| {
                (
                    format!("t10k[{i}]"),
                    slice.normalized(i, 0.5, 0.5).collect(),
                )
            })
            .collect();
        for p in samples
            .iter()
            .filter(|p| p.to_string_lossy().contains("fmnist"))
        {
            inputs.push((p.display().to_string(), load_image(p, &cfg)?));
        }
        for chunk in inputs.chunks(250) {
            let px: Vec<Vec<f32>> = chunk.iter().map(|(_, x)| x.clone()).collect();
            let out = model.forward(&px, &opts)?;
            print(&cfg.name, kind.cli_name(), chunk, &out);
        }
    }
    let (cfg, w) = load_checkpoint(&catalog::photo_model())?;
    let model = VitMoe::new(cfg.clone(), w)?;
    let photos: Vec<(String, Vec<f32>)> = samples
        .iter()
        .filter(|p| p.to_string_lossy().contains("photo-"))
        .map(|p| Ok((p.display().to_string(), load_image(p, &cfg)?)))
        .collect::<anyhow::Result<_>>()?;
    let px: Vec<Vec<f32>> = photos.iter().map(|(_, x)| x.clone()).collect();
    for kind in RouterKind::ALL
        .into_iter()
        .filter(|k| *k != RouterKind::SoftMoe && *k != RouterKind::SparseTokenChoice)
    {
        let router = RouterConfig {
            k: 2,
            capacity: CapacitySpec::Factor(1.25),
            ..RouterConfig::new(kind)
        };
        let opts = RunOptions::from_config(&cfg).with_router(router);
        let out = model.forward(&px, &opts)?;
        print(&cfg.name, kind.cli_name(), &photos, &out);
    }
    Ok(())
}

fn print(
    model: &str,
    router: &str,
    inputs: &[(String, Vec<f32>)],
    out: &routerscope::model::ForwardOutput,
) {
    for (i, (name, _)) in inputs.iter().enumerate() {
        let class = out.probs[i]
            .iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |b, (c, &p)| if p > b.1 { (c, p) } else { b },
            )
            .0;
        for rec in &out.records {
            let g = &rec.groups[i];
            let slots: Vec<String> = match g.routing.sparse() {
                Some(sp) => sp
                    .slot_token
                    .iter()
                    .map(|t| t.map_or("-".into(), |t| t.to_string()))
                    .collect(),
                None => g
                    .probs
                    .chunks_exact(g.routing.num_experts)
                    .map(|row| {
                        let j = row
                            .iter()
                            .enumerate()
                            .fold(
                                (0, f32::NEG_INFINITY),
                                |b, (j, &p)| if p > b.1 { (j, p) } else { b },
                            )
                            .0;
                        j.to_string()
                    })
                    .collect(),
            };
            println!(
                "{model} {router} {name} block{} class{class} {}",
                rec.block,
                slots.join(",")
            );
        }
    }
}
