//! A gzip bomb given as Fashion-MNIST images (2.5 GB decompressed) is refused within the
//! documented 512 MB IDX limit of memory: refused from the size its header declares, or, when the
//! header declares little, read no further than that. Alone in its test binary so
//! `RUSAGE_CHILDREN` sees only these runs.

use std::io::Write;
use std::path::Path;
use std::process::Command;

fn max_rss_children_kb() -> i64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the provided struct.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) };
    u.ru_maxrss
}

/// `dir/t10k-images-idx3-ubyte.gz` declaring `n` 28×28 images followed by 2.5 GB of zeros, and a
/// matching labels file.
fn bomb(dir: &Path, n: u32) {
    std::fs::create_dir_all(dir).unwrap();
    let f = std::fs::File::create(dir.join("t10k-images-idx3-ubyte.gz")).unwrap();
    let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::best());
    gz.write_all(&[0, 0, 8, 3]).unwrap();
    for d in [n, 28, 28] {
        gz.write_all(&d.to_be_bytes()).unwrap();
    }
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..2500 {
        gz.write_all(&zeros).unwrap();
    }
    gz.finish().unwrap();
    routerscope::train::data::write_idx(
        &dir.join("t10k-labels-idx1-ubyte"),
        &[n as usize],
        &vec![0u8; n as usize],
    )
    .unwrap();
}

#[test]
fn a_gzip_bomb_of_images_stays_within_the_idx_limit() {
    let dir = tempfile::tempdir().unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets/models/fashion-mnist-softmax-tc.safetensors");
    // As the header says: 3,200,000 images, 2.5 GB.
    let honest = dir.path().join("honest");
    bomb(&honest, 3_200_000);
    // A header that declares 10,000 images (7.8 MB) before 2.5 GB of zeros.
    let liar = dir.path().join("liar");
    bomb(&liar, 10_000);
    assert!(
        std::fs::metadata(liar.join("t10k-images-idx3-ubyte.gz"))
            .unwrap()
            .len()
            < 20 << 20
    );
    for (data, needle) in [
        (
            &honest,
            "as its header declares) is beyond the IDX limit of 512 MB",
        ),
        (&liar, "need 7840000 data bytes but the file has 7840001"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_routerscope"))
            .args(["eval", "--device", "cpu", "--model"])
            .arg(&model)
            .arg("--data")
            .arg(data)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(needle), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let peak = max_rss_children_kb();
    eprintln!("peak RSS of the two runs: {peak} kB");
    assert!(peak < 512 * 1024, "peak RSS {peak} kB");
}
