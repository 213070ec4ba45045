//! PNG rendering of the SVG figures at a chosen width (resvg; text in the Ubuntu font that egui
//! ships, so output does not depend on the fonts installed).

use std::sync::{Arc, OnceLock};

/// Why a figure could not be rasterised.
#[derive(Debug, thiserror::Error)]
pub enum RasterError {
    #[error("the figure is not valid SVG: {0}")]
    Svg(String),
    #[error("cannot allocate a {0}x{1} image")]
    Size(u32, u32),
    #[error(
        "a {0}x{1} PNG is beyond the raster limit ({MAX_RASTER_SIDE} px a side, \
         {MAX_RASTER_MB} MB of pixels); ask for a smaller width"
    )]
    TooLarge(u32, u32),
    #[error("PNG encoding failed: {0}")]
    Png(String),
}

fn options() -> &'static resvg::usvg::Options<'static> {
    static OPTIONS: OnceLock<resvg::usvg::Options<'static>> = OnceLock::new();
    OPTIONS.get_or_init(|| {
        let mut db = resvg::usvg::fontdb::Database::new();
        db.load_font_data(epaint_default_fonts::UBUNTU_LIGHT.to_vec());
        db.set_sans_serif_family("Ubuntu");
        resvg::usvg::Options {
            fontdb: Arc::new(db),
            font_family: "Ubuntu".into(),
            ..Default::default()
        }
    })
}

/// The largest PNG side, in pixels.
pub const MAX_RASTER_SIDE: u32 = 16_384;
/// The largest PNG raster, in MB of RGBA pixels.
pub const MAX_RASTER_MB: u64 = 512;

/// Renders `svg` to PNG bytes `width` pixels wide (height from the aspect ratio); sizes beyond
/// [`MAX_RASTER_SIDE`] or [`MAX_RASTER_MB`] are refused before allocating.
pub fn svg_to_png(svg: &str, width: u32) -> Result<Vec<u8>, RasterError> {
    let tree =
        resvg::usvg::Tree::from_str(svg, options()).map_err(|e| RasterError::Svg(e.to_string()))?;
    let size = tree.size();
    let scale = width as f32 / size.width();
    let height = (f64::from(size.height()) * f64::from(scale))
        .round()
        .clamp(1.0, f64::from(u32::MAX)) as u32;
    let bytes = u64::from(width) * u64::from(height) * 4;
    if width > MAX_RASTER_SIDE || height > MAX_RASTER_SIDE || bytes > MAX_RASTER_MB << 20 {
        return Err(RasterError::TooLarge(width, height));
    }
    let mut pixmap =
        resvg::tiny_skia::Pixmap::new(width, height).ok_or(RasterError::Size(width, height))?;
    resvg::render(
        &tree,
        resvg::tiny_skia::Transform::from_scale(scale, scale),
        &mut pixmap.as_mut(),
    );
    pixmap
        .encode_png()
        .map_err(|e| RasterError::Png(e.to_string()))
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    /// A width that would need a 33 GB raster is refused before allocating; a normal one renders.
    #[test]
    fn rasters_beyond_the_limit_are_refused() {
        let svg = r#"<svg xmlns="http://www.w3.org/2000/svg" width="40" height="30"><rect width="40" height="30" fill="red"/></svg>"#;
        let e = svg_to_png(svg, 100_000).unwrap_err().to_string();
        assert!(
            e.contains("100000x75000") && e.contains("raster limit"),
            "{e}"
        );
        let e = svg_to_png(svg, 16_000).unwrap_err().to_string();
        assert!(e.contains("512 MB"), "{e}");
        assert!(!svg_to_png(svg, 400).unwrap().is_empty());
    }
}
