//! vmoe-format checkpoints built here (several shards, arrays split into chunks and pieces, a
//! scalar leaf): exact round trips, preset detection, conversion, and every corruption the reader
//! must name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use routerscope::import::load_vmoe;
use routerscope::import::vmoe_format::{read_arrays, read_index, write_checkpoint};
use routerscope::model::{
    Classifier, ModelConfig, ModelWeights, MoeConfig, Normalization, RunOptions, VitMoe,
    expected_tensors, match_vmoe_preset, random_weights, vmoe_presets,
};
use routerscope::routing::{CapacitySpec, RouterConfig, RouterKind};
use routerscope::tensor_io::F32Tensor;

fn tiny() -> ModelConfig {
    let mut router = RouterConfig::new(RouterKind::SoftMoe);
    router.capacity = CapacitySpec::Slots(2);
    ModelConfig {
        name: "tiny-soft".into(),
        image_size: [8, 8],
        channels: 3,
        patch_size: [4, 4],
        hidden_size: 16,
        num_layers: 2,
        num_heads: 2,
        mlp_dim: 24,
        classifier: Classifier::Token,
        representation_size: None,
        num_classes: 3,
        gelu: Default::default(),
        layer_scale: false,
        class_names: Vec::new(),
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
            layers: vec![1],
            num_experts: 4,
            router,
            group_images: 1,
            bfloat16_dispatch: false,
            combine: Default::default(),
            expert_mlp_dim: None,
        }),
    }
}

fn with_params(w: &ModelWeights) -> BTreeMap<String, F32Tensor> {
    w.iter()
        .map(|(k, v)| (format!("params/{k}"), v.clone()))
        .collect()
}

/// Writes the tiny model as vmoe: 3 shards, chunks of ≤ 50 values, pieces of ≤ 7 values.
fn write_tiny(dir: &Path, name: &str, chunk: usize) -> (PathBuf, ModelWeights) {
    let w = random_weights(&tiny(), 5);
    let prefix = dir.join(name);
    write_checkpoint(&prefix, &with_params(&w), 3, chunk, 7).unwrap();
    (prefix, w)
}

fn shard(prefix: &Path, i: usize) -> PathBuf {
    PathBuf::from(format!("{}.data-{i:05}-of-00003", prefix.display()))
}

#[test]
fn round_trip_is_exact_across_shards_chunks_and_pieces() {
    let dir = tempfile::tempdir().unwrap();
    let (prefix, w) = write_tiny(dir.path(), "ckpt", 50);
    let index = read_index(&prefix).unwrap();
    assert_eq!(index.shard_count, 3);
    let mlp = index
        .leaves
        .iter()
        .find(|l| l.name == "params/Encoder/encoderblock_0/Mlp/Dense_0/kernel")
        .unwrap();
    assert_eq!(mlp.chunks.len(), 8, "[16, 24] in chunks of 2 rows");
    assert_eq!(
        mlp.chunks
            .iter()
            .map(|c| c.shard)
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        3
    );
    let scale = index
        .leaves
        .iter()
        .find(|l| l.name.ends_with("Router/scale"))
        .unwrap();
    assert!(scale.shape.is_empty(), "a scalar leaf");
    // Leaf order is depth-first over sorted keys.
    let names: Vec<&str> = index.leaves.iter().map(|l| l.name.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort_by(|a, b| a.split('/').cmp(b.split('/')));
    assert_eq!(names, sorted);

    let mut calls = 0;
    let arrays = read_arrays(&index, &mut |done, total| {
        calls += 1;
        assert!(done <= total);
    })
    .unwrap();
    assert!(calls > 10);
    assert_eq!(arrays, with_params(&w));
    // The same checkpoint through the model loader (an explicit configuration, not a preset).
    let (cfg, loaded) = load_vmoe(
        &prefix.with_extension("index"),
        Some(tiny()),
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(loaded, w);
    let model = VitMoe::new(cfg.clone(), loaded).unwrap();
    let reference = VitMoe::new(cfg.clone(), w).unwrap();
    let img = vec![vec![0.25f32; 8 * 8 * 3]];
    let opts = RunOptions::from_config(&cfg);
    assert_eq!(
        model.forward(&img, &opts).unwrap().probs,
        reference.forward(&img, &opts).unwrap().probs
    );
}

fn read_err(prefix: &Path) -> String {
    match read_index(prefix) {
        Err(e) => e.to_string(),
        Ok(index) => read_arrays(&index, &mut |_, _| {})
            .expect_err("reading should fail")
            .to_string(),
    }
}

#[test]
fn corruptions_are_named() {
    let dir = tempfile::tempdir().unwrap();

    // A truncated shard.
    let (prefix, _) = write_tiny(dir.path(), "cut", 50);
    let bytes = std::fs::read(shard(&prefix, 1)).unwrap();
    std::fs::write(shard(&prefix, 1), &bytes[..bytes.len() - 100]).unwrap();
    let e = read_err(&prefix);
    assert!(
        e.contains("cut.data-00001-of-00003") && e.contains("truncated"),
        "{e}"
    );

    // A missing shard.
    let (prefix, _) = write_tiny(dir.path(), "missing", 50);
    std::fs::remove_file(shard(&prefix, 2)).unwrap();
    let e = read_err(&prefix);
    assert!(
        e.contains("missing.data-00002-of-00003") && e.contains("missing or unreadable shard"),
        "{e}"
    );

    // A piece with the wrong extension type (1 = ndarray becomes 2 = complex).
    let (prefix, _) = write_tiny(dir.path(), "ext", 50);
    let mut bytes = std::fs::read(shard(&prefix, 0)).unwrap();
    // Pieces are written as ext(type 1) holding [shape, "float32", bin]: type byte, then 0x93 0x91.
    let at = bytes
        .windows(3)
        .position(|w| w == [0x01, 0x93, 0x91])
        .unwrap();
    bytes[at] = 0x02;
    std::fs::write(shard(&prefix, 0), &bytes).unwrap();
    let e = read_err(&prefix);
    assert!(e.contains("extension type 2, expected 1 (ndarray)"), "{e}");

    // An index that disagrees with the data: chunks of another size.
    let (a, _) = write_tiny(dir.path(), "a", 50);
    let (b, _) = write_tiny(dir.path(), "b", 30);
    std::fs::copy(a.with_extension("index"), b.with_extension("index")).unwrap();
    let e = read_err(&b);
    assert!(e.contains("which the index does not list"), "{e}");

    // An index whose shape disagrees with the data.
    let mut w = random_weights(&tiny(), 5);
    w.get_mut("head/bias").unwrap().shape = vec![2];
    w.get_mut("head/bias").unwrap().data.truncate(2);
    let c = dir.path().join("c");
    write_checkpoint(&c, &with_params(&w), 3, 50, 7).unwrap();
    std::fs::copy(a.with_extension("index"), c.with_extension("index")).unwrap();
    let e = read_err(&c);
    assert!(e.contains("head/bias"), "{e}");

    // Not an index at all, and a missing index.
    std::fs::write(dir.path().join("junk.index"), b"\xc1\xc1").unwrap();
    assert!(read_err(&dir.path().join("junk")).contains("junk.index"));
    assert!(read_err(&dir.path().join("nothing")).contains("nothing.index"));
}

#[test]
fn released_presets_are_recognised_by_shape() {
    for cfg in vmoe_presets() {
        let shapes: BTreeMap<String, Vec<usize>> = expected_tensors(&cfg)
            .into_iter()
            .filter(|s| s.required)
            .map(|s| (s.name, s.shape.iter().map(|d| d.unwrap_or(1)).collect()))
            .collect();
        assert_eq!(match_vmoe_preset(&shapes).unwrap().name, cfg.name);
        let mut other = shapes.clone();
        other.insert("head/bias".into(), vec![7]);
        assert!(match_vmoe_preset(&other).is_none());
    }
    let names = routerscope::model::imagenet1k_classes();
    assert_eq!(names.len(), 1000);
    assert_eq!(
        (names[0].as_str(), names[999].as_str()),
        ("tench", "toilet tissue")
    );
    let in1k = vmoe_presets()
        .into_iter()
        .find(|c| c.num_classes == 1000)
        .unwrap();
    assert_eq!(in1k.class_name(1), "goldfish");
    let tiny_shapes: BTreeMap<String, Vec<usize>> = expected_tensors(&tiny())
        .into_iter()
        .map(|s| (s.name, vec![1]))
        .collect();
    assert!(match_vmoe_preset(&tiny_shapes).is_none());
}

#[test]
fn convert_and_predict_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let (prefix, _) = write_tiny(dir.path(), "ckpt", 50);
    let config = dir.path().join("tiny.json");
    std::fs::write(&config, tiny().to_json()).unwrap();
    let out = dir.path().join("tiny.safetensors");
    let exe = env!("CARGO_BIN_EXE_routerscope");
    let run = |args: &[&str]| Command::new(exe).args(args).output().unwrap();
    let o = run(&[
        "convert",
        "--from-vmoe",
        prefix.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let image = dir.path().join("img.png");
    image::DynamicImage::new_rgb8(8, 8).save(&image).unwrap();
    let o = run(&[
        "predict",
        "--model",
        out.to_str().unwrap(),
        "--json",
        image.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Without a configuration the tiny model matches no released preset: a clear error.
    let index = prefix.with_extension("index");
    let o = run(&[
        "predict",
        "--model",
        index.to_str().unwrap(),
        image.to_str().unwrap(),
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("no released V-MoE preset matches"),
        "{e}"
    );
    // A configuration that disagrees with the tensors names the tensor.
    let mut wrong = tiny();
    wrong.num_classes = 4;
    std::fs::write(&config, wrong.to_json()).unwrap();
    let o = run(&[
        "convert",
        "--from-vmoe",
        prefix.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("tensor `head/bias` has shape [3], expected [4]"),
        "{e}"
    );
}

/// Reads `PREFIX.index`, lets `f` change its msgpack tree, writes it back.
fn rewrite_index(prefix: &Path, f: impl FnOnce(&mut rmpv::Value)) {
    let path = prefix.with_extension("index");
    let bytes = std::fs::read(&path).unwrap();
    let mut v = rmpv::decode::read_value(&mut &bytes[..]).unwrap();
    f(&mut v);
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &v).unwrap();
    std::fs::write(&path, out).unwrap();
}

fn field<'a>(v: &'a mut rmpv::Value, key: &str) -> &'a mut rmpv::Value {
    let rmpv::Value::Map(entries) = v else {
        panic!("not a map")
    };
    &mut entries
        .iter_mut()
        .find(|(k, _)| k.as_str() == Some(key))
        .unwrap()
        .1
}

/// The first index leaf (depth first) with at least two chunks, as its decoded info array.
fn edit_first_chunked_leaf(v: &mut rmpv::Value, f: &mut dyn FnMut(&mut Vec<rmpv::Value>)) -> bool {
    match v {
        rmpv::Value::Map(entries) => entries
            .iter_mut()
            .any(|(_, c)| edit_first_chunked_leaf(c, f)),
        rmpv::Value::Ext(8, payload) => {
            let mut info = rmpv::decode::read_value(&mut &payload[..]).unwrap();
            let rmpv::Value::Array(parts) = &mut info else {
                return false;
            };
            let rmpv::Value::Array(regions) = &parts[1] else {
                return false;
            };
            if regions.len() < 2 {
                return false;
            }
            f(parts);
            let mut out = Vec::new();
            rmpv::encode::write_value(&mut out, &info).unwrap();
            *payload = out;
            true
        }
        _ => false,
    }
}

/// The reader proves exact coverage from the index (overlapping chunks, or chunks that leave
/// part of an array unwritten, are errors naming the array), bounds the shard count before it
/// touches the file system, and checks the declared data against the shards' sizes.
#[test]
fn hostile_indexes_are_refused_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    let (prefix, _) = write_tiny(dir.path(), "overlap", 50);
    rewrite_index(&prefix, |v| {
        let tree = field(v, "index");
        assert!(edit_first_chunked_leaf(tree, &mut |parts| {
            let rmpv::Value::Array(regions) = &mut parts[1] else {
                unreachable!()
            };
            regions[1] = regions[0].clone();
        }));
    });
    let e = read_err(&prefix);
    assert!(e.contains("overlap"), "{e}");

    let (prefix, _) = write_tiny(dir.path(), "shards", 50);
    rewrite_index(&prefix, |v| {
        *field(v, "shard_count") = rmpv::Value::from(1u64 << 40)
    });
    let e = read_err(&prefix);
    assert!(
        e.contains("`shard_count` 1099511627776 is outside 1..=65536"),
        "{e}"
    );

    // Shards cut to a byte: the index declares more data than the shards hold.
    let (prefix, _) = write_tiny(dir.path(), "small", 50);
    for i in 0..3 {
        std::fs::write(shard(&prefix, i), b"\x80").unwrap();
    }
    let e = read_err(&prefix);
    assert!(
        e.contains("small.data-00000-of-00003: the shard holds 0% of its declared bytes"),
        "{e}"
    );

    // One shard cut to 40%: that shard is named, with how much of it is there.
    let (prefix, _) = write_tiny(dir.path(), "part", 50);
    let bytes = std::fs::read(shard(&prefix, 1)).unwrap();
    std::fs::write(shard(&prefix, 1), &bytes[..bytes.len() * 2 / 5]).unwrap();
    let e = read_err(&prefix);
    assert!(
        e.contains("part.data-00001-of-00003: the shard holds ")
            && e.contains("% of its declared bytes"),
        "{e}"
    );
    assert!(!e.contains("00000") && !e.contains("00002"), "{e}");
}
