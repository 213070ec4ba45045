//! `routerscope export` end to end: the SVG is XML with one element per patch and the legend,
//! the CSV has one row per token matching the routing record, PNGs have the requested width,
//! a bad image is skipped with a failing exit status, and memory stays flat over 200 images.

use std::path::{Path, PathBuf};
use std::process::Command;

use routerscope::figures::ImageRouting;
use routerscope::model::{RunOptions, VitMoe, load_image, preset, random_weights, save_checkpoint};
use routerscope::routing::RouterKind;

fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_routerscope")
}

fn model(dir: &Path, kind: RouterKind) -> PathBuf {
    let cfg = preset("fashion-mnist", kind).unwrap();
    let p = dir.join(format!("m-{}.safetensors", kind.cli_name()));
    save_checkpoint(&p, &cfg, &random_weights(&cfg, 4)).unwrap();
    p
}

fn sample(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets/images")
        .join(name)
}

fn only_file(dir: &Path, ext: &str) -> PathBuf {
    let v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .filter(|p| !p.ends_with("summary.json"))
        .collect();
    assert_eq!(v.len(), 1, "{v:?}");
    v[0].clone()
}

#[test]
fn figures_and_data_match_the_routing() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path(), RouterKind::SoftmaxTokenChoice);
    let out = dir.path().join("out");
    let img = sample("fmnist-00-ankle-boot-test0.png");
    let o = Command::new(exe())
        .args([
            "export",
            "--model",
            m.to_str().unwrap(),
            "--k",
            "2",
            "--capacity-factor",
            "0.5",
        ])
        .args([
            "--layer",
            "0",
            "--width",
            "900",
            "--out",
            out.to_str().unwrap(),
        ])
        .arg(&img)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // File names record image, model, router, k and capacity factor.
    let svg_path = only_file(&out, "svg");
    let name = svg_path.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(
        name,
        "fmnist-00-ankle-boot-test0__m-softmax-tc__softmax-tc_k2_cf0.5.svg"
    );

    let svg = std::fs::read_to_string(&svg_path).unwrap();
    let doc = roxmltree::Document::parse(&svg).expect("the SVG is XML");
    let class = |c: &str| {
        doc.descendants()
            .filter(|n| n.attribute("class") == Some(c))
            .count()
    };
    assert_eq!(class("patch"), 49);
    assert_eq!(class("cls-token"), 1);
    assert_eq!(class("legend-swatch"), 8);
    assert_eq!(class("bar"), 8);
    assert!(class("dropped-mark") > 0, "CF 0.5 must drop tokens");
    assert!(
        doc.descendants()
            .any(|n| n.attribute("id") == Some("legend"))
    );

    // The CSV agrees with the routing record computed here.
    let cfg = preset("fashion-mnist", RouterKind::SoftmaxTokenChoice).unwrap();
    let vm = VitMoe::load(&m).unwrap();
    let mut router = cfg.moe.as_ref().unwrap().router.clone();
    router.k = 2;
    router.capacity = routerscope::routing::CapacitySpec::Factor(0.5);
    let opts = RunOptions::from_config(&cfg).with_router(router);
    let fwd = vm
        .forward(&[load_image(&img, &cfg).unwrap()], &opts)
        .unwrap();
    let want = ImageRouting::new(&fwd.records[0].groups[0], 0, cfg.seq_len());
    let csv = std::fs::read_to_string(only_file(&out, "csv")).unwrap();
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert_eq!(rows.len(), 50, "one row per token");
    for (row, t) in rows.iter().zip(&want.tokens) {
        let cols: Vec<&str> = row.split(',').collect();
        assert_eq!(cols[3], t.index.to_string());
        assert_eq!(cols[7], t.dropped.to_string());
        let experts: Vec<String> = t.choices.iter().map(|c| c.expert.to_string()).collect();
        let slots: Vec<String> = t
            .choices
            .iter()
            .map(|c| c.slot.map_or("-".into(), |s| s.to_string()))
            .collect();
        assert_eq!(cols[9], experts.join(";"), "token {}", t.index);
        assert_eq!(cols[10], slots.join(";"), "token {}", t.index);
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(only_file(&out, "json")).unwrap()).unwrap();
    assert_eq!(json["panels"][0]["tokens"].as_array().unwrap().len(), 50);
    assert_eq!(json["panels"][0]["capacity"], want.capacity);

    let png = image::open(only_file(&out, "png")).unwrap();
    assert_eq!(png.width(), 900);
    assert!(out.join("summary.json").is_file());
}

#[test]
fn soft_moe_and_comparison_figures() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path(), RouterKind::SoftMoe);
    let out = dir.path().join("out");
    let o = Command::new(exe())
        .args([
            "export",
            "--model",
            m.to_str().unwrap(),
            "--format",
            "json,svg",
        ])
        .args(["--out", out.to_str().unwrap()])
        .arg(sample("photo-chelsea.png"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(only_file(&out, "json")).unwrap()).unwrap();
    let soft = &json["panels"][0]["soft_moe"];
    assert_eq!(soft["dispatch_slot_by_token"].as_array().unwrap().len(), 64);
    assert_eq!(soft["combine_token_by_slot"].as_array().unwrap().len(), 50);

    let m = model(dir.path(), RouterKind::SoftmaxTokenChoice);
    let out = dir.path().join("cmp");
    let o = Command::new(exe())
        .args(["export", "--model", m.to_str().unwrap(), "--format", "svg"])
        .args([
            "--compare",
            "softmax-tc,sinkhorn-tc,softmax-ec,sinkhorn-ec,sparse-ec",
        ])
        .args(["--out", out.to_str().unwrap()])
        .arg(sample("fmnist-05-sandal-test8.png"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let svg = std::fs::read_to_string(only_file(&out, "svg")).unwrap();
    let doc = roxmltree::Document::parse(&svg).unwrap();
    let panels: Vec<&str> = doc
        .descendants()
        .filter(|n| n.attribute("class") == Some("panel"))
        .filter_map(|n| n.attribute("data-router"))
        .collect();
    assert_eq!(
        panels,
        [
            "softmax-tc",
            "sinkhorn-tc",
            "softmax-ec",
            "sinkhorn-ec",
            "sparse-ec"
        ]
    );
    assert_eq!(
        doc.descendants()
            .filter(|n| n.attribute("class") == Some("patch"))
            .count(),
        5 * 49
    );
}

#[test]
fn bad_images_are_skipped_and_unwritable_outputs_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path(), RouterKind::SoftmaxExpertChoice);
    let bad = dir.path().join("bad.png");
    std::fs::write(&bad, b"not an image").unwrap();
    let out = dir.path().join("out");
    let o = Command::new(exe())
        .args(["export", "--model", m.to_str().unwrap(), "--format", "csv"])
        .args(["--out", out.to_str().unwrap()])
        .arg(&bad)
        .arg(sample("fmnist-01-pullover-test1.png"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("bad.png") && err.contains("1 of 2 images were skipped"),
        "{err}"
    );
    assert!(
        only_file(&out, "csv").is_file(),
        "the good image was still exported"
    );

    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let o = Command::new(exe())
        .args(["export", "--model", m.to_str().unwrap(), "--format", "csv"])
        .args(["--out", file.join("sub").to_str().unwrap()])
        .arg(sample("fmnist-01-pullover-test1.png"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("a-file"));
}

/// Two folders that both hold `same.png` give two sets of files (named by their folder), never
/// one over the other; the summary counts what is on disk. An empty folder is an error.
#[test]
fn inputs_with_one_name_never_overwrite_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path(), RouterKind::SoftmaxTokenChoice);
    for sub in ["a", "b"] {
        std::fs::create_dir(dir.path().join(sub)).unwrap();
        std::fs::copy(
            sample("fmnist-00-ankle-boot-test0.png"),
            dir.path().join(sub).join("same.png"),
        )
        .unwrap();
    }
    let out = dir.path().join("out");
    let run = |inputs: &[&Path]| {
        let mut c = Command::new(exe());
        c.args(["export", "--model", m.to_str().unwrap(), "--device", "cpu"])
            .args(["--format", "json", "--out", out.to_str().unwrap()])
            .args(inputs);
        c.output().unwrap()
    };
    let r = run(&[&dir.path().join("a"), &dir.path().join("b")]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "summary.json")
        .collect();
    names.sort();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(
        names[0].starts_with("a_same") && names[1].starts_with("b_same"),
        "{names:?}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["images_exported"], 2);
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let r = run(&[&empty]);
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("no image files"));
}
