//! Images in: anything the `image` crate decodes (PNG, JPEG, GIF first frame, BMP, WebP, TIFF;
//! grey, RGB, RGBA, 16-bit), EXIF orientation applied, resized (stretched) to the model's size,
//! converted to its channels and normalised. Decoding is bounded so a hostile or gigantic file is
//! an error, not an exhausted machine.

use std::io::{BufRead, Cursor, Read, Seek, SeekFrom};
use std::path::Path;

use image::imageops::FilterType;
use image::{DynamicImage, ImageDecoder, ImageReader, Limits};

use super::ModelError;
use super::config::ModelConfig;

/// Extensions read as images (the viewer's open dialog, calibration and dataset folders).
pub const IMAGE_EXTENSIONS: [&str; 8] = ["png", "jpg", "jpeg", "gif", "bmp", "webp", "tif", "tiff"];

/// The image files under a folder, searched recursively, and how many other files it holds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ImageListing {
    /// Sorted by path.
    pub files: Vec<std::path::PathBuf>,
    pub other_files: usize,
    /// Entries passed over (a FIFO, socket or device, a broken or looping symbolic link, a folder
    /// reached a second time, an unreadable subfolder), each counted; the first
    /// [`MAX_LISTED_SKIPPED`] are kept with the reason, in the order met.
    pub skipped: Vec<(std::path::PathBuf, String)>,
    pub skipped_count: usize,
}

/// At most this many skipped entries are kept with their reason (all are counted).
pub const MAX_LISTED_SKIPPED: usize = 100;

impl ImageListing {
    fn skip(&mut self, path: &Path, why: String) {
        self.skipped_count += 1;
        if self.skipped.len() < MAX_LISTED_SKIPPED {
            self.skipped.push((path.to_path_buf(), why));
        }
    }
}

/// Lists the images (by [`IMAGE_EXTENSIONS`], any case) under `dir` recursively; more than `max`
/// images is an error (checked while listing). Errors name the folder.
///
/// Symbolic links are followed, but every folder is entered once (by its canonical path), so a
/// link back to an ancestor ends the descent instead of looping. Only regular files are listed:
/// a FIFO would block the reader forever, so special files are skipped even with an image name.
pub fn list_images(dir: &Path, max: usize) -> Result<ImageListing, String> {
    let mut out = ImageListing::default();
    let root = std::fs::canonicalize(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut seen = std::collections::HashSet::from([root]);
    let mut stack = vec![dir.to_path_buf()];
    let mut first = true;
    while let Some(d) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if first => return Err(format!("{}: {e}", d.display())),
            Err(e) => {
                out.skip(&d, format!("folder not readable: {e}"));
                continue;
            }
        };
        first = false;
        let mut entries: Vec<std::fs::DirEntry> = entries
            .filter_map(|e| match e {
                Ok(e) => Some(e),
                Err(e) => {
                    out.skip(&d, format!("folder entry not readable: {e}"));
                    None
                }
            })
            .collect();
        // Sorted, so that which way into a folder reached twice is used does not depend on the
        // file system's order.
        entries.sort_by_key(|e| std::cmp::Reverse(e.file_name()));
        for entry in entries {
            let p = entry.path();
            let Ok(t) = entry.file_type() else {
                out.skip(&p, "file type not readable".into());
                continue;
            };
            let link = t.is_symlink();
            let t = if link {
                match std::fs::metadata(&p) {
                    Ok(m) => m.file_type(),
                    Err(e) => {
                        out.skip(&p, format!("broken or looping symbolic link: {e}"));
                        continue;
                    }
                }
            } else {
                t
            };
            if t.is_dir() {
                match std::fs::canonicalize(&p) {
                    Ok(c) if seen.contains(&c) => out.skip(
                        &p,
                        if link {
                            format!(
                                "symbolic link to {}, a folder already searched (a loop or a \
                                 second way in)",
                                c.display()
                            )
                        } else {
                            "folder already searched through a symbolic link".to_string()
                        },
                    ),
                    Ok(c) => {
                        seen.insert(c);
                        stack.push(p);
                    }
                    Err(e) => out.skip(&p, format!("folder path not resolvable: {e}")),
                }
            } else if t.is_file() {
                let ext = p
                    .extension()
                    .and_then(|e| e.to_str())
                    .map(str::to_lowercase);
                if !ext.is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str())) {
                    out.other_files += 1;
                } else if out.files.len() >= max {
                    return Err(format!("{}: more than {max} images", dir.display()));
                } else {
                    out.files.push(p);
                }
            } else {
                out.skip(
                    &p,
                    "not a regular file (a FIFO, socket or device), not opened".into(),
                );
            }
        }
    }
    out.files.sort();
    Ok(out)
}

/// Largest accepted width or height, in pixels.
pub const MAX_IMAGE_SIDE: u32 = 16_384;
/// Largest decoder allocation, in bytes.
pub const MAX_DECODE_BYTES: u64 = 512 * 1024 * 1024;

fn limits() -> Limits {
    let mut l = Limits::default();
    l.max_image_width = Some(MAX_IMAGE_SIDE);
    l.max_image_height = Some(MAX_IMAGE_SIDE);
    l.max_alloc = Some(MAX_DECODE_BYTES);
    l
}

/// Decodes an image file with limits and EXIF orientation.
pub fn decode_image(path: &Path) -> Result<DynamicImage, ModelError> {
    let err = |e: &dyn std::fmt::Display| ModelError::Image(format!("{}: {e}", path.display()));
    let file = crate::files::open_regular(path).map_err(|e| err(&e))?;
    let mut reader = ImageReader::new(std::io::BufReader::new(file));
    // The format from the extension, as `ImageReader::open` guesses it (the contents decide
    // when it says nothing).
    if let Ok(format) = image::ImageFormat::from_path(path) {
        reader.set_format(format);
    }
    decode_reader(reader).map_err(|e| err(&e))
}

/// Decodes in-memory image bytes with limits and EXIF orientation (`what` names them in errors).
pub fn decode_image_bytes(bytes: &[u8], what: &str) -> Result<DynamicImage, ModelError> {
    decode_reader(ImageReader::new(Cursor::new(bytes)))
        .map_err(|e| ModelError::Image(format!("{what}: {e}")))
}

fn decode_reader<R: BufRead + Seek>(
    reader: ImageReader<R>,
) -> Result<DynamicImage, image::ImageError> {
    let mut reader = reader.with_guessed_format()?;
    if reader.format() == Some(image::ImageFormat::Jpeg) {
        // The JPEG decoder fills a cut-off file with grey and succeeds; a complete file ends
        // with the end-of-image marker.
        let mut inner = reader.into_inner();
        if !jpeg_is_complete(&mut inner)? {
            return Err(image::ImageError::IoError(std::io::Error::other(
                "truncated JPEG: the file does not end with the end-of-image marker (FFD9)",
            )));
        }
        reader = ImageReader::with_format(inner, image::ImageFormat::Jpeg);
    }
    reader.limits(limits());
    let mut decoder = reader.into_decoder()?;
    // The decoded image itself must fit the budget (the decoder's own limit covers only its
    // working buffers).
    let bytes = decoder.total_bytes();
    if bytes > MAX_DECODE_BYTES {
        let (w, h) = decoder.dimensions();
        return Err(image::ImageError::IoError(std::io::Error::other(format!(
            "{w}x{h} {:?} decodes to {} MB, beyond the {} MB decode limit",
            decoder.color_type(),
            bytes >> 20,
            MAX_DECODE_BYTES >> 20
        ))));
    }
    let orientation = decoder.orientation()?;
    let mut img = DynamicImage::from_decoder(decoder)?;
    img.apply_orientation(orientation);
    Ok(img)
}

/// Whether the JPEG stream ends (trailing zero padding aside) with FFD9; the position is kept.
fn jpeg_is_complete<R: Read + Seek>(r: &mut R) -> std::io::Result<bool> {
    let pos = r.stream_position()?;
    let end = r.seek(SeekFrom::End(0))?;
    let n = (end - pos).min(4096);
    r.seek(SeekFrom::Start(end - n))?;
    let mut tail = vec![0u8; n as usize];
    r.read_exact(&mut tail)?;
    r.seek(SeekFrom::Start(pos))?;
    while tail.last() == Some(&0) {
        tail.pop();
    }
    Ok(tail.ends_with(&[0xFF, 0xD9]))
}

/// Model input `[H, W, C]` (row-major, channels last) from a decoded image: resized to the model's
/// size, grey or RGB as the model wants (alpha dropped), pixels in `[0, 1]`, then normalised.
pub fn preprocess(img: &DynamicImage, cfg: &ModelConfig) -> Result<Vec<f32>, ModelError> {
    let [h, w] = cfg.image_size;
    let resized = if img.width() as usize == w && img.height() as usize == h {
        img.clone()
    } else {
        img.resize_exact(w as u32, h as u32, FilterType::Triangle)
    };
    let pixels: Vec<f32> = match cfg.channels {
        1 => resized.to_luma32f().into_raw(),
        3 => resized.to_rgb32f().into_raw(),
        c => {
            return Err(ModelError::Config(format!(
                "images can feed models with 1 or 3 channels, not {c}"
            )));
        }
    };
    let c = cfg.channels;
    let n = &cfg.normalization;
    Ok(pixels
        .iter()
        .enumerate()
        .map(|(i, &v)| (v.clamp(0.0, 1.0) - n.mean[i % c]) / n.std[i % c])
        .collect())
}

/// Decodes and preprocesses an image file.
pub fn load_image(path: &Path, cfg: &ModelConfig) -> Result<Vec<f32>, ModelError> {
    preprocess(&decode_image(path)?, cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::tiny_config;
    use crate::routing::RouterKind;
    use image::{ImageBuffer, ImageFormat, Luma, LumaA, Rgb, Rgba};

    fn encode(img: DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    fn cfg(channels: usize) -> ModelConfig {
        let mut c = tiny_config(RouterKind::SoftmaxTokenChoice);
        c.channels = channels;
        c.normalization.mean = vec![0.0; channels];
        c.normalization.std = vec![1.0; channels];
        c
    }

    #[test]
    fn every_format_and_pixel_type_decodes() {
        let rgb = DynamicImage::ImageRgb8(ImageBuffer::from_fn(12, 8, |x, y| {
            Rgb([x as u8 * 20, y as u8 * 30, 200])
        }));
        let grey16 =
            DynamicImage::ImageLuma16(ImageBuffer::from_fn(12, 8, |x, _| Luma([x as u16 * 5000])));
        let rgba =
            DynamicImage::ImageRgba8(ImageBuffer::from_fn(12, 8, |_, _| Rgba([255, 0, 0, 10])));
        let grey_alpha =
            DynamicImage::ImageLumaA8(ImageBuffer::from_fn(12, 8, |_, _| LumaA([128, 255])));
        let cases = [
            (rgb.clone(), ImageFormat::Png),
            (rgb.clone(), ImageFormat::Jpeg),
            (rgb.clone(), ImageFormat::Bmp),
            (rgb.clone(), ImageFormat::Gif),
            (rgb.clone(), ImageFormat::WebP),
            (rgb.clone(), ImageFormat::Tiff),
            (grey16.clone(), ImageFormat::Png),
            (grey16, ImageFormat::Tiff),
            (rgba, ImageFormat::Png),
            (grey_alpha, ImageFormat::Png),
        ];
        for (img, format) in cases {
            let bytes = encode(img, format);
            let decoded =
                decode_image_bytes(&bytes, "test").unwrap_or_else(|e| panic!("{format:?}: {e}"));
            assert_eq!((decoded.width(), decoded.height()), (12, 8), "{format:?}");
            for channels in [1, 3] {
                let px = preprocess(&decoded, &cfg(channels)).unwrap();
                assert_eq!(px.len(), 8 * 12 * channels);
                assert!(px.iter().all(|v| (0.0..=1.0).contains(v)));
            }
        }
    }

    #[test]
    fn resizing_grey_to_rgb_and_normalisation() {
        let grey = DynamicImage::ImageLuma8(ImageBuffer::from_fn(24, 16, |_, _| Luma([255])));
        let mut c = cfg(3);
        c.normalization.mean = vec![0.5; 3];
        c.normalization.std = vec![0.5; 3];
        let px = preprocess(&grey, &c).unwrap();
        assert_eq!(px.len(), 8 * 12 * 3);
        assert!(
            px.iter().all(|v| (v - 1.0).abs() < 1e-6),
            "white maps to +1 with mean 0.5, std 0.5"
        );
    }

    /// A JPEG with an EXIF APP1 segment saying "rotate 90° clockwise" (orientation 6).
    #[test]
    fn exif_orientation_is_applied() {
        let img = DynamicImage::ImageRgb8(ImageBuffer::from_fn(6, 2, |x, _| {
            Rgb([if x == 0 { 255 } else { 0 }, 0, 0])
        }));
        let jpeg = encode(img, ImageFormat::Jpeg);
        let tiff: Vec<u8> = [
            &b"II*\0"[..],
            &8u32.to_le_bytes(),
            &1u16.to_le_bytes(),
            &0x0112u16.to_le_bytes(),
            &3u16.to_le_bytes(),
            &1u32.to_le_bytes(),
            &6u16.to_le_bytes(),
            &[0, 0],
            &0u32.to_le_bytes(),
        ]
        .concat();
        let mut app1 = vec![0xFF, 0xE1];
        app1.extend(((2 + 6 + tiff.len()) as u16).to_be_bytes());
        app1.extend(b"Exif\0\0");
        app1.extend(&tiff);
        let mut with_exif = jpeg[..2].to_vec();
        with_exif.extend(&app1);
        with_exif.extend(&jpeg[2..]);
        let plain = decode_image_bytes(&jpeg, "plain").unwrap();
        assert_eq!((plain.width(), plain.height()), (6, 2));
        let rotated = decode_image_bytes(&with_exif, "exif").unwrap();
        assert_eq!((rotated.width(), rotated.height()), (2, 6));
        // The red left column is now the top row.
        let top = rotated.to_rgb8().get_pixel(0, 0).0;
        assert!(top[0] > 200, "{top:?}");
    }

    /// A PNG whose header declares `w × h` RGBA8 pixels (and no pixel data).
    fn png_header(w: u32, h: u32) -> Vec<u8> {
        fn crc(bytes: &[u8]) -> u32 {
            let mut c = 0xffff_ffffu32;
            for &b in bytes {
                c ^= u32::from(b);
                for _ in 0..8 {
                    c = if c & 1 == 1 {
                        0xedb8_8320 ^ (c >> 1)
                    } else {
                        c >> 1
                    };
                }
            }
            !c
        }
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut chunk = |kind: &[u8], data: &[u8]| {
            out.extend((data.len() as u32).to_be_bytes());
            let body: Vec<u8> = kind.iter().chain(data).copied().collect();
            out.extend(&body);
            out.extend(crc(&body).to_be_bytes());
        };
        let mut ihdr = Vec::new();
        ihdr.extend(w.to_be_bytes());
        ihdr.extend(h.to_be_bytes());
        ihdr.extend([8, 6, 0, 0, 0]);
        chunk(b"IHDR", &ihdr);
        // An empty zlib stream: the header is all the decoder reads before its size is known.
        chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
        chunk(b"IEND", &[]);
        out
    }

    /// The 512 MB promise holds for the decoded image itself: a 16384 × 16384 RGBA8 PNG (1 GB
    /// decoded) is refused from its header, naming the size and the limit.
    #[test]
    fn images_beyond_the_decode_budget_are_refused_before_decoding() {
        let e = decode_image_bytes(&png_header(16_384, 16_384), "big.png")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("16384x16384") && e.contains("1024 MB") && e.contains("512 MB"),
            "{e}"
        );
    }

    /// A JPEG cut off in its entropy-coded data is an error, not half a grey image; the whole
    /// file (with or without trailing zero padding) decodes.
    #[test]
    fn truncated_jpegs_are_errors() {
        let photo = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/images/photo-rocket.jpg");
        let bytes = std::fs::read(&photo).unwrap();
        assert!(decode_image_bytes(&bytes, "whole.jpg").is_ok());
        let mut padded = bytes.clone();
        padded.extend([0u8; 16]);
        assert!(decode_image_bytes(&padded, "padded.jpg").is_ok());
        let e = decode_image_bytes(&bytes[..bytes.len() / 2], "half.jpg")
            .unwrap_err()
            .to_string();
        assert!(e.contains("half.jpg: truncated JPEG"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let cut = dir.path().join("cut.jpg");
        std::fs::write(&cut, &bytes[..bytes.len() - 300]).unwrap();
        let e = decode_image(&cut).unwrap_err().to_string();
        assert!(e.contains("cut.jpg: truncated JPEG"), "{e}");
    }

    /// A directory or a FIFO is not an image: a clear error, at once (a FIFO would block).
    #[test]
    fn only_regular_files_are_opened() {
        let dir = tempfile::tempdir().unwrap();
        let e = decode_image(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("is not a regular file (it is a directory)"),
            "{e}"
        );
        let fifo = dir.path().join("pipe.png");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates the node.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = decode_image(&fifo).unwrap_err().to_string();
        assert!(e.contains("is not a regular file (it is a FIFO"), "{e}");
        let e = crate::tensor_io::TensorFile::open(&fifo)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("pipe.png") && e.contains("not a regular file"),
            "{e}"
        );
    }

    #[test]
    fn gigantic_and_broken_files_are_errors() {
        // A BMP header claiming 100000 x 100000 pixels.
        let mut bmp = Vec::new();
        bmp.extend(b"BM");
        bmp.extend(&(54u32 + 12).to_le_bytes());
        bmp.extend(&[0, 0, 0, 0]);
        bmp.extend(&54u32.to_le_bytes());
        bmp.extend(&40u32.to_le_bytes());
        bmp.extend(&100_000i32.to_le_bytes());
        bmp.extend(&100_000i32.to_le_bytes());
        bmp.extend(&1u16.to_le_bytes());
        bmp.extend(&24u16.to_le_bytes());
        bmp.extend(&[0u8; 24]);
        bmp.extend(&[0u8; 12]);
        let e = decode_image_bytes(&bmp, "huge.bmp")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("huge.bmp: "), "{e}");
        assert!(e.to_lowercase().contains("limit"), "{e}");
        let e = decode_image_bytes(b"GIF89a\x01", "cut.gif")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("cut.gif: "), "{e}");
        let e = decode_image_bytes(b"hello world", "text.png")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("text.png: "), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let e = decode_image(&dir.path().join("absent.png"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("absent.png"), "{e}");
    }
}
