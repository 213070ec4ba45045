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

/// Renders `svg` to PNG bytes `width` pixels wide (height from the aspect ratio).
pub fn svg_to_png(svg: &str, width: u32) -> Result<Vec<u8>, RasterError> {
    let tree =
        resvg::usvg::Tree::from_str(svg, options()).map_err(|e| RasterError::Svg(e.to_string()))?;
    let size = tree.size();
    let scale = width as f32 / size.width();
    let height = (size.height() * scale).round().max(1.0) as u32;
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
