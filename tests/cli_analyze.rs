//! End-to-end runs of `routerscope analyze`: counts that agree with per-image `predict`, the
//! Fashion-MNIST IDX input against `eval`, Soft MoE's slot table, interruption, and bad input.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use image::{DynamicImage, ImageBuffer, Rgb};
use routerscope::model::{
    Classifier, ModelConfig, MoeConfig, Normalization, random_weights, save_checkpoint,
};
use routerscope::routing::{CapacitySpec, RouterConfig, RouterKind};
use serde_json::Value;

fn config(router: RouterKind) -> ModelConfig {
    ModelConfig {
        name: "tiny".into(),
        image_size: [16, 16],
        channels: 3,
        patch_size: [4, 4],
        hidden_size: 32,
        num_layers: 4,
        num_heads: 4,
        mlp_dim: 64,
        classifier: Classifier::Token,
        representation_size: None,
        num_classes: 3,
        gelu: Default::default(),
        layer_scale: false,
        class_names: vec!["a".into(), "b".into(), "c".into()],
        normalization: Normalization {
            mean: vec![0.5; 3],
            std: vec![0.5; 3],
        },
        layer_norm_eps: routerscope::model::DEFAULT_LAYER_NORM_EPS,
        cls_token: None,
        distillation_token: false,
        register_tokens: 0,
        fc_norm: false,
        moe: Some(MoeConfig {
            layers: vec![1, 3],
            num_experts: 4,
            router: RouterConfig {
                capacity: if router == RouterKind::SoftMoe {
                    CapacitySpec::Slots(2)
                } else {
                    RouterConfig::new(router).capacity
                },
                ..RouterConfig::new(router)
            },
            group_images: 1,
            bfloat16_dispatch: false,
            combine: Default::default(),
            expert_mlp_dim: None,
        }),
    }
}

fn model(dir: &Path, router: RouterKind) -> PathBuf {
    let cfg = config(router);
    let p = dir.join(format!("{}.safetensors", router.cli_name()));
    save_checkpoint(&p, &cfg, &random_weights(&cfg, 7)).unwrap();
    p
}

fn picture(path: &Path, seed: u32) {
    let img = ImageBuffer::from_fn(40 + seed, 30, |x, y| {
        Rgb([
            (x * 6 + seed * 37) as u8,
            (y * 8 + seed * 11) as u8,
            ((x * y + seed) % 251) as u8,
        ])
    });
    DynamicImage::ImageRgb8(img).save(path).unwrap();
}

/// Two classes of three images, one unlabelled image, a broken PNG and a text file.
fn mixed_folder(dir: &Path) -> (PathBuf, Vec<PathBuf>) {
    let root = dir.join("data");
    let mut readable = Vec::new();
    for (c, class) in ["cats", "dogs"].iter().enumerate() {
        std::fs::create_dir_all(root.join(class).join("deeper")).unwrap();
        for i in 0..3 {
            let p = if i == 2 {
                root.join(class).join("deeper").join(format!("{i}.png"))
            } else {
                root.join(class).join(format!("{i}.png"))
            };
            picture(&p, (c * 3 + i) as u32);
            readable.push(p);
        }
    }
    let loose = root.join("loose.png");
    picture(&loose, 9);
    readable.push(loose);
    std::fs::write(root.join("cats/broken.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    std::fs::write(root.join("notes.txt"), b"not an image").unwrap();
    readable.sort();
    (root, readable)
}

fn routerscope(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_routerscope"))
        .args(args)
        .output()
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn matrix(v: &Value) -> Vec<Vec<f64>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect()
}

#[test]
fn counts_agree_with_per_image_predict() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path(), RouterKind::SoftmaxTokenChoice);
    let (data, images) = mixed_folder(dir.path());
    for k in ["1", "2"] {
        let out_dir = dir.path().join(format!("out-k{k}"));
        let err = ok(&routerscope(&[
            "analyze",
            "--model",
            s(&m),
            "--data",
            s(&data),
            "--k",
            k,
            "--capacity-factor",
            "0.75",
            "--device",
            "cpu",
            "--out",
            s(&out_dir),
        ]));
        assert!(err.contains("cats/broken.png"), "{err}");
        assert!(err.contains("1 files are not images"), "{err}");
        let a = read_json(&out_dir.join("analysis.json"));
        assert_eq!(a["images"], 7);
        assert_eq!(a["unreadable_count"], 1);
        assert_eq!(a["partial"], false);
        let classes: Vec<&str> = a["classes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert_eq!(classes, ["cats", "dogs", "(unlabelled)"]);

        let mut args = vec!["predict", "--model", s(&m), "--json", "--k", k];
        args.extend(["--capacity-factor", "0.75", "--device", "cpu"]);
        args.extend(images.iter().map(|p| s(p)));
        let p = routerscope(&args);
        ok(&p);
        let pred: Value = serde_json::from_slice(&p.stdout).unwrap();
        let layers = a["runs"][0]["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 2);
        for (l, layer) in layers.iter().enumerate() {
            let per_class = matrix(&layer["tokens_per_class_expert"]);
            let mut want = [0.0f64; 4];
            let mut dropped = 0;
            for img in pred["images"].as_array().unwrap() {
                let pl = &img["layers"][l];
                for (j, t) in pl["tokens_per_expert"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .enumerate()
                {
                    want[j] += t.as_f64().unwrap();
                }
                dropped += pl["dropped_tokens"].as_array().unwrap().len();
            }
            for j in 0..4 {
                let col: f64 = per_class.iter().map(|r| r[j]).sum();
                assert_eq!(col, want[j], "k={k} layer {l} expert {j}");
            }
            let dropped_here: u64 = layer["dropped_per_class"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .sum();
            assert_eq!(dropped_here as usize, dropped);
            let kept: f64 = per_class.iter().flatten().sum();
            if k == "1" {
                assert_eq!(
                    kept as usize + dropped,
                    7 * 17,
                    "kept + dropped = images × tokens"
                );
            }
            // The loads per image agree with the counts, the histogram with the tokens.
            let mean: f64 = layer["load_per_expert"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x["mean"].as_f64().unwrap())
                .sum();
            assert!((mean * 7.0 - kept).abs() < 1e-9);
            let hist: u64 = layer["experts_per_token_histogram"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .sum();
            assert_eq!(hist, 7 * 17);
            let positions = matrix(&layer["tokens_per_position_expert"]);
            assert_eq!(positions.len(), 17);
            assert_eq!(positions.iter().flatten().sum::<f64>(), kept);
            // The atlas holds the strongest patches, never the CLS token, best first.
            for ex in layer["atlas"].as_array().unwrap() {
                let scores: Vec<f64> = ex["patches"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| {
                        assert!(p["token"].as_u64().unwrap() >= 1);
                        p["score"].as_f64().unwrap()
                    })
                    .collect();
                assert!(scores.windows(2).all(|w| w[0] >= w[1]));
            }
        }
        for f in [
            "class_expert.csv",
            "position_expert.csv",
            "drops_by_class.csv",
            "drops_by_position.csv",
            "expert_load.csv",
            "experts_per_token.csv",
            "router_entropy.csv",
            "atlas.csv",
            "summary.csv",
            "class_expert_block1.png",
            "class_expert_block3.svg",
            "positions_block1.svg",
            "drops_block1.png",
            "load_block3.png",
            "atlas_block1.png",
            "atlas_block3.svg",
        ] {
            assert!(out_dir.join(f).is_file(), "k={k}: {f} missing");
        }
        let svg = std::fs::read_to_string(out_dir.join("class_expert_block1.svg")).unwrap();
        let doc = roxmltree::Document::parse(&svg).unwrap();
        let cells = doc
            .descendants()
            .filter(|n| n.attribute("class") == Some("cell"))
            .count();
        assert_eq!(cells, 3 * 4);
        assert!(svg.contains(">cats<") && svg.contains(">(unlabelled)<"));
    }
}

#[test]
fn compare_runs_every_router_and_soft_moe_reports_its_slots() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = mixed_folder(dir.path());
    let m = model(dir.path(), RouterKind::SoftmaxTokenChoice);
    let out_dir = dir.path().join("cmp");
    ok(&routerscope(&[
        "analyze",
        "--model",
        s(&m),
        "--data",
        s(&data),
        "--compare",
        "sinkhorn-tc,softmax-ec,sparse-ec",
        "--atlas-size",
        "3",
        "--device",
        "cpu",
        "--out",
        s(&out_dir),
    ]));
    let a = read_json(&out_dir.join("analysis.json"));
    let routers: Vec<&str> = a["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["settings"]["router"].as_str().unwrap())
        .collect();
    assert_eq!(
        routers,
        ["softmax-tc", "sinkhorn-tc", "softmax-ec", "sparse-ec"]
    );
    for run in a["runs"].as_array().unwrap() {
        for layer in run["layers"].as_array().unwrap() {
            for ex in layer["atlas"].as_array().unwrap() {
                assert!(ex["patches"].as_array().unwrap().len() <= 3);
            }
        }
    }
    let summary = std::fs::read_to_string(out_dir.join("summary.csv")).unwrap();
    assert_eq!(summary.lines().count(), 1 + 4 * 2);
    assert!(out_dir.join("summary.png").is_file());
    assert!(out_dir.join("atlas_block1_sparse-ec_cf_1.png").is_file());
    let svg = std::fs::read_to_string(out_dir.join("load_block1.svg")).unwrap();
    assert_eq!(svg.matches(r#"class="box""#).count(), 4 * 4);

    // Soft MoE: every token reaches every expert; each slot's dispatch sums to 1 per group.
    let soft = model(dir.path(), RouterKind::SoftMoe);
    let out_dir = dir.path().join("soft");
    ok(&routerscope(&[
        "analyze",
        "--model",
        s(&soft),
        "--data",
        s(&data),
        "--group-images",
        "2",
        "--device",
        "cpu",
        "--out",
        s(&out_dir),
    ]));
    let a = read_json(&out_dir.join("analysis.json"));
    assert_eq!(a["images"], 6);
    assert_eq!(a["left_out"], 1);
    let layer = &a["runs"][0]["layers"][0];
    assert_eq!(layer["dropped_token_rate"], 0.0);
    let slots = matrix(&layer["soft_slot_dispatch_per_position"]);
    assert!(!slots.is_empty());
    for row in &slots {
        assert_eq!(row.len(), 17);
        assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-4);
    }
    let mass: f64 = matrix(&layer["tokens_per_class_expert"])
        .iter()
        .flatten()
        .sum();
    assert!((mass - 6.0 * 17.0).abs() < 1e-3, "combine mass {mass}");
    assert!(out_dir.join("soft_slots.csv").is_file());
}

/// On the Fashion-MNIST IDX files (the committed slice of 1,000 test images), every built-in
/// model's drop rates and class × expert usage equal `eval`'s exactly.
#[test]
fn idx_data_matches_eval_for_every_built_in_model() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::fixture_dir();
    for name in common::MODELS.iter().filter(|n| **n != "dense") {
        let m = common::model_path(name);
        let out_dir = dir.path().join(name);
        ok(&routerscope(&[
            "analyze",
            "--model",
            s(&m),
            "--data",
            s(&data),
            "--device",
            "cpu",
            "--atlas-size",
            "4",
            "--out",
            s(&out_dir),
        ]));
        let e = routerscope(&[
            "eval",
            "--model",
            s(&m),
            "--data",
            s(&data),
            "--json",
            "--device",
            "cpu",
        ]);
        ok(&e);
        let e: Value = serde_json::from_slice(&e.stdout).unwrap();
        let a = read_json(&out_dir.join("analysis.json"));
        assert_eq!(a["images"], e["images"], "{name}");
        let layers = a["runs"][0]["layers"].as_array().unwrap();
        for (la, le) in layers.iter().zip(e["layers"].as_array().unwrap()) {
            assert_eq!(la["block"], le["block"]);
            assert_eq!(la["dropped_token_rate"], le["dropped_token_rate"], "{name}");
            assert_eq!(la["class_expert_usage"], le["class_expert_usage"], "{name}");
        }
    }
    // The dense baseline has nothing to analyse.
    let out = routerscope(&[
        "analyze",
        "--model",
        s(&common::model_path("dense")),
        "--data",
        s(&data),
        "--out",
        s(&dir.path().join("dense")),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no MoE layers"));
}

#[test]
fn bad_input_gets_clear_errors_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path(), RouterKind::SoftmaxTokenChoice);
    let fails = |args: &[&str], needle: &str| {
        let out = routerscope(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{args:?}: {err}");
        assert!(
            errors[0].contains(needle),
            "{args:?}: `{needle}` not in {err}"
        );
    };
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(empty.join("sub")).unwrap();
    std::fs::write(empty.join("sub/readme.md"), b"x").unwrap();
    let out = dir.path().join("out");
    fails(
        &[
            "analyze",
            "--model",
            s(&m),
            "--data",
            s(&empty),
            "--device",
            "cpu",
            "--out",
            s(&out),
        ],
        "no images found",
    );
    let broken = dir.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    for i in 0..3 {
        std::fs::write(broken.join(format!("{i}.jpg")), b"\xff\xd8\xff\xe0 cut").unwrap();
    }
    fails(
        &[
            "analyze",
            "--model",
            s(&m),
            "--data",
            s(&broken),
            "--device",
            "cpu",
            "--out",
            s(&out),
        ],
        "none of the 3 images could be read",
    );
    fails(
        &[
            "analyze",
            "--device",
            "cpu",
            "--model",
            s(&m),
            "--data",
            s(&dir.path().join("missing")),
            "--out",
            s(&out),
        ],
        "missing",
    );
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let (data, _) = mixed_folder(dir.path());
    fails(
        &[
            "analyze",
            "--device",
            "cpu",
            "--model",
            s(&m),
            "--data",
            s(&data),
            "--out",
            s(&file),
        ],
        "exists and is not a folder",
    );
    fails(
        &[
            "analyze",
            "--device",
            "cpu",
            "--model",
            s(&m),
            "--data",
            s(&data),
            "--out",
            s(&file.join("sub")),
        ],
        "cannot write there",
    );
    fails(
        &[
            "analyze",
            "--model",
            s(&m),
            "--data",
            s(&data),
            "--atlas-size",
            "100000",
            "--device",
            "cpu",
            "--out",
            s(&out),
        ],
        "beyond the limit",
    );
    fails(
        &[
            "analyze",
            "--device",
            "cpu",
            "--model",
            s(&m),
            "--data",
            s(&data),
            "--router",
            "softmax-ec",
            "--k",
            "2",
            "--out",
            s(&out),
        ],
        "--k does not apply",
    );
    assert!(!out.join("analysis.json").exists());
}

/// Ctrl-C (SIGINT) during a long run: the files are written, marked partial, exit code 130, and
/// no temporary file stays behind.
#[cfg(unix)]
#[test]
fn an_interrupted_run_writes_a_partial_analysis() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path(), RouterKind::SinkhornTokenChoice);
    let data = dir.path().join("many");
    std::fs::create_dir_all(&data).unwrap();
    // Large enough to take a while to decode, linked many times to be quick to make.
    let first = data.join("0000.png");
    let img = ImageBuffer::from_fn(384, 384, |x, y| {
        Rgb([(x % 256) as u8, (y % 256) as u8, ((x ^ y) % 256) as u8])
    });
    DynamicImage::ImageRgb8(img).save(&first).unwrap();
    for i in 1..3000 {
        std::fs::hard_link(&first, data.join(format!("{i:04}.png"))).unwrap();
    }
    let out_dir = dir.path().join("out");
    let child = Command::new(env!("CARGO_BIN_EXE_routerscope"))
        .args([
            "analyze",
            "--model",
            s(&m),
            "--data",
            s(&data),
            "--device",
            "cpu",
            "--out",
            s(&out_dir),
        ])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("marked partial"), "{err}");
    let a = read_json(&out_dir.join("analysis.json"));
    assert_eq!(a["partial"], true);
    let n = a["images"].as_u64().unwrap();
    assert!(n > 0 && n < 3000, "{n}");
    assert!(
        std::fs::read_to_string(out_dir.join("class_expert_block1.svg"))
            .unwrap()
            .contains("(partial)")
    );
    for f in std::fs::read_dir(&out_dir).unwrap() {
        let name = f.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with('.'), "left behind: {name}");
    }
}

/// What people read is written for people, what programs read keeps its precision: a capacity
/// factor of `1.2500000000000002` shows as `cf=1.25` in the summary, the CSV and the figure
/// titles (the JSON keeps the exact number), and titles name the data folder, not its path.
/// Fashion-MNIST IDX data under a model without ten class names gets Fashion-MNIST's names.
#[test]
fn titles_and_labels_read_like_text_and_idx_data_keeps_its_class_names() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path(), RouterKind::SoftmaxTokenChoice);
    let (data, _) = mixed_folder(dir.path());
    let out_dir = dir.path().join("out");
    let run = routerscope(&[
        "analyze",
        "--model",
        s(&m),
        "--data",
        s(&data),
        "--capacity-factor",
        "1.2500000000000002",
        "--device",
        "cpu",
        "--out",
        s(&out_dir),
    ]);
    ok(&run);
    let said = String::from_utf8_lossy(&run.stdout);
    assert!(
        said.contains("cf=1.25") && !said.contains("1.2500000000000002"),
        "{said}"
    );
    let a = read_json(&out_dir.join("analysis.json"));
    assert_eq!(
        a["runs"][0]["settings"]["capacity_factor"],
        1.2500000000000002
    );
    assert_eq!(a["data"], s(&data));
    let summary = std::fs::read_to_string(out_dir.join("summary.csv")).unwrap();
    assert!(
        summary.contains("cf=1.25") && !summary.contains("00000"),
        "{summary}"
    );
    let svg = std::fs::read_to_string(out_dir.join("class_expert_block3.svg")).unwrap();
    assert!(svg.contains("images of data"), "the folder's name");
    assert!(
        !svg.contains(dir.path().to_str().unwrap()),
        "no temporary path in the title"
    );
    assert!(svg.contains("cf=1.25") && !svg.contains("1.2500000000000002"));

    let idx_out = dir.path().join("idx");
    ok(&routerscope(&[
        "analyze",
        "--model",
        s(&m),
        "--data",
        s(&common::fixture_dir()),
        "--limit",
        "20",
        "--device",
        "cpu",
        "--out",
        s(&idx_out),
    ]));
    let a = read_json(&idx_out.join("analysis.json"));
    let classes: Vec<&str> = (a["classes"].as_array().unwrap().iter())
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(classes, routerscope::model::FASHION_MNIST_CLASSES);
    let csv = std::fs::read_to_string(idx_out.join("class_expert.csv")).unwrap();
    assert!(
        csv.contains("Ankle boot") || csv.contains("ankle boot"),
        "{csv}"
    );
}

/// A compared router the checkpoint cannot run (Soft MoE on a sparse checkpoint, a sparse router
/// on a Soft MoE one) is left out with a note; the others run.
#[test]
fn compared_routers_the_checkpoint_cannot_run_are_skipped_with_a_note() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = mixed_folder(dir.path());
    // The shipped checkpoints hold only their own router's parameters.
    for (own, compare, skipped, kept) in [
        ("softmax-tc", "soft,softmax-ec", "soft", "softmax-ec"),
        ("soft", "softmax-ec", "softmax-ec", "soft"),
    ] {
        let m = common::model_path(own);
        let out_dir = dir.path().join(format!("cmp-{own}"));
        let err = ok(&routerscope(&[
            "analyze",
            "--model",
            s(&m),
            "--data",
            s(&data),
            "--compare",
            compare,
            "--device",
            "cpu",
            "--out",
            s(&out_dir),
        ]));
        assert!(
            err.contains(&format!("note: {skipped}")) && err.contains("left out of the comparison"),
            "{err}"
        );
        let a = read_json(&out_dir.join("analysis.json"));
        let routers: Vec<&str> = (a["runs"].as_array().unwrap().iter())
            .map(|r| r["settings"]["router"].as_str().unwrap())
            .collect();
        assert!(
            routers.contains(&kept) && !routers.contains(&skipped),
            "{routers:?}"
        );
        assert_eq!(a["skipped"][0]["settings"]["router"], skipped);
        assert!(
            a["skipped"][0]["reason"]
                .as_str()
                .unwrap()
                .contains("checkpoint")
        );
    }
    // The main router itself must run.
    let m = common::model_path("softmax-tc");
    let out = routerscope(&[
        "analyze",
        "--model",
        s(&m),
        "--data",
        s(&data),
        "--router",
        "soft",
        "--device",
        "cpu",
        "--out",
        s(&dir.path().join("main-soft")),
    ]);
    assert_eq!(out.status.code(), Some(1));
}

/// A valid 16384 × 16384 RGBA PNG (1 GiB decoded, a few MB on disk), streamed so that the test
/// never holds the pixels.
fn huge_png(path: &Path) {
    use std::io::Write;
    let side = 16384u32;
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    let row = vec![0u8; 1 + 4 * side as usize];
    for _ in 0..side {
        z.write_all(&row).unwrap();
    }
    let idat = z.finish().unwrap();
    let chunk = |out: &mut Vec<u8>, kind: &[u8], data: &[u8]| {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&crc.sum().to_be_bytes());
    };
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&side.to_be_bytes());
    ihdr.extend_from_slice(&side.to_be_bytes());
    ihdr.extend_from_slice(&[8, 6, 0, 0, 0]);
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(&mut png, b"IDAT", &idat);
    chunk(&mut png, b"IEND", &[]);
    std::fs::write(path, png).unwrap();
}

/// A data folder with a symbolic link back to its root, a broken link, a FIFO named like an
/// image and a 16384 × 16384 PNG: the link loop, the broken link and the FIFO are passed over and
/// counted, the giant is refused before it is decoded and counted as unreadable, a link to an
/// image is followed, and the run completes on the rest.
#[test]
fn hostile_folder_entries_are_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let model = model(dir.path(), RouterKind::SoftmaxTokenChoice);
    let root = dir.path().join("data");
    std::fs::create_dir_all(root.join("cats")).unwrap();
    std::fs::create_dir_all(root.join("dogs")).unwrap();
    for i in 0..3 {
        picture(&root.join(format!("cats/{i}.png")), i);
    }
    std::os::unix::fs::symlink(root.join("cats/0.png"), root.join("dogs/linked.png")).unwrap();
    std::os::unix::fs::symlink(&root, root.join("cats/loop")).unwrap();
    std::os::unix::fs::symlink(root.join("nowhere.png"), root.join("dogs/broken.png")).unwrap();
    let fifo = root.join("dogs/pipe.png");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let t = std::time::Instant::now();
    huge_png(&root.join("dogs/huge.png"));
    eprintln!(
        "huge.png: {} bytes, written in {:.1} s",
        std::fs::metadata(root.join("dogs/huge.png")).unwrap().len(),
        t.elapsed().as_secs_f64()
    );
    let out_dir = dir.path().join("out");
    let out = routerscope(&[
        "analyze",
        "--model",
        s(&model),
        "--data",
        s(&root),
        "--out",
        s(&out_dir),
    ]);
    let stderr = ok(&out);
    let a = read_json(&out_dir.join("analysis.json"));
    assert_eq!(a["images"], 4, "{stderr}");
    assert_eq!(a["unreadable_count"], 1);
    let huge = &a["unreadable"][0];
    assert_eq!(huge["image"], "dogs/huge.png");
    let why = huge["error"].as_str().unwrap();
    assert!(why.contains("16384x16384"), "{why}");
    assert!(why.contains("decode limit"), "{why}");
    assert_eq!(a["passed_over_count"], 3, "{a}");
    let passed: Vec<(String, String)> = a["passed_over"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            (
                u["image"].as_str().unwrap().to_string(),
                u["error"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let reason = |name: &str| {
        passed
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, w)| w.clone())
            .unwrap_or_else(|| panic!("{name} not passed over: {passed:?}"))
    };
    assert!(reason("cats/loop").contains("already searched"));
    assert!(reason("dogs/broken.png").contains("broken or looping symbolic link"));
    assert!(reason("dogs/pipe.png").contains("FIFO"));
    assert!(stderr.contains("passed over dogs/pipe.png"), "{stderr}");
    assert!(stderr.contains("skipped dogs/huge.png"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("4 images analysed (1 unreadable, 3 passed over"),
        "{stdout}"
    );
    assert_eq!(a["classes"], serde_json::json!(["cats", "dogs"]));
}

/// The atlas of every expert: at most `--atlas-per-image` tiles of one image, no tile repeating
/// a kept one (each skipped near-duplicate is listed with the kept tile it matches), and the
/// best patch of each expert always kept.
#[test]
fn atlas_rows_cap_each_image_and_skip_near_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let m = common::model_path("softmax-tc");
    let data = common::fixture_dir();
    let run = |cap: &str| {
        let out_dir = dir.path().join(format!("cap{cap}"));
        ok(&routerscope(&[
            "analyze",
            "--model",
            s(&m),
            "--data",
            s(&data),
            "--limit",
            "300",
            "--device",
            "cpu",
            "--atlas-per-image",
            cap,
            "--out",
            s(&out_dir),
        ]));
        read_json(&out_dir.join("analysis.json"))
    };
    let rows = |a: &Value| -> Vec<Value> {
        a["runs"][0]["layers"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|l| l["atlas"].as_array().unwrap().clone())
            .collect()
    };
    let names = |row: &Value| -> Vec<(String, u64)> {
        row["patches"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                (
                    t["name"].as_str().unwrap().to_string(),
                    t["token"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let most_of_one_image = |row: &Value| {
        let n = names(row);
        n.iter()
            .map(|(i, _)| n.iter().filter(|(j, _)| j == i).count())
            .max()
            .unwrap_or(0)
    };
    let uncapped = run("0");
    let capped = run("2");
    let single = run("1");
    assert_eq!(capped["atlas_per_image"], 2);
    let mut skipped = 0;
    for ((u, c), one) in rows(&uncapped).iter().zip(rows(&capped)).zip(rows(&single)) {
        assert!(most_of_one_image(&c) <= 2, "{c}");
        assert!(most_of_one_image(&one) <= 1, "{one}");
        assert_eq!(names(u).first(), names(&c).first());
        assert_eq!(
            c["patches"].as_array().unwrap().len(),
            16,
            "a row is filled from the pool"
        );
        let kept = names(&c);
        for k in c["skipped"].as_array().unwrap() {
            skipped += 1;
            let like = (
                k["like_name"].as_str().unwrap().to_string(),
                k["like_token"].as_u64().unwrap(),
            );
            assert!(kept.contains(&like), "{k} matches no kept tile");
            assert!(k["difference"].as_f64().unwrap() <= 2.0);
            assert!(k["score"].as_f64().unwrap() <= kept_score(&c, &like));
        }
    }
    assert!(skipped > 0, "the slice's black backgrounds repeat");
    assert!(
        rows(&uncapped).iter().any(|r| most_of_one_image(r) > 2),
        "without a cap some expert's best patches crowd into one image"
    );
}

fn kept_score(row: &Value, like: &(String, u64)) -> f64 {
    row["patches"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == like.0.as_str() && t["token"] == like.1)
        .map(|t| t["score"].as_f64().unwrap())
        .unwrap()
}
