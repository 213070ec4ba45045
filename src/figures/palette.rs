//! Expert colours. The default is Paul Tol's "muted" scheme (distinguishable under the common
//! colour-vision deficiencies, 9 colours); Okabe–Ito is offered as an alternative. Beyond the
//! base colours, lighter and darker variants of the same hues follow, so 32 experts stay distinct
//! by hue and lightness together.

use serde::{Deserialize, Serialize};

/// An sRGB colour.
pub type Rgb = [u8; 3];

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Palette {
    #[default]
    TolMuted,
    OkabeIto,
}

const TOL_MUTED: [Rgb; 9] = [
    [0x88, 0xCC, 0xEE], // cyan
    [0xCC, 0x66, 0x77], // rose
    [0xDD, 0xCC, 0x77], // sand
    [0x11, 0x77, 0x33], // green
    [0x33, 0x22, 0x88], // indigo
    [0xAA, 0x44, 0x99], // purple
    [0x44, 0xAA, 0x99], // teal
    [0x99, 0x99, 0x33], // olive
    [0x88, 0x22, 0x55], // wine
];

const OKABE_ITO: [Rgb; 8] = [
    [0xE6, 0x9F, 0x00], // orange
    [0x56, 0xB4, 0xE9], // sky blue
    [0x00, 0x9E, 0x73], // bluish green
    [0xF0, 0xE4, 0x42], // yellow
    [0x00, 0x72, 0xB2], // blue
    [0xD5, 0x5E, 0x00], // vermillion
    [0xCC, 0x79, 0xA7], // reddish purple
    [0x55, 0x55, 0x55], // dark grey (Okabe–Ito's black, lightened to show on dark images)
];

/// Colour marking dropped / unselected tokens (not used for any expert).
pub const DROPPED: Rgb = [0xE0, 0x10, 0x10];

impl Palette {
    pub const ALL: [Palette; 2] = [Palette::TolMuted, Palette::OkabeIto];

    pub fn name(self) -> &'static str {
        match self {
            Palette::TolMuted => "Tol muted (colour-blind safe)",
            Palette::OkabeIto => "Okabe–Ito (colour-blind safe)",
        }
    }

    fn base(self) -> &'static [Rgb] {
        match self {
            Palette::TolMuted => &TOL_MUTED,
            Palette::OkabeIto => &OKABE_ITO,
        }
    }

    /// Colour of expert `j`.
    pub fn expert(self, j: usize) -> Rgb {
        let base = self.base();
        let c = base[j % base.len()];
        match (j / base.len()) % 4 {
            0 => c,
            1 => mix(c, [255, 255, 255], 0.45),
            2 => mix(c, [0, 0, 0], 0.4),
            _ => mix(c, [255, 255, 255], 0.75),
        }
    }
}

fn mix(a: Rgb, b: Rgb, t: f32) -> Rgb {
    [0, 1, 2].map(|i| (a[i] as f32 * (1.0 - t) + b[i] as f32 * t).round() as u8)
}

/// A sequential colour map for weights in `[0, 1]` (white → dark blue), for heatmaps.
pub fn sequential(v: f32) -> Rgb {
    let v = v.clamp(0.0, 1.0);
    // Piecewise-linear through a few stops of a perceptually ordered blue ramp.
    const STOPS: [Rgb; 5] = [
        [0xFF, 0xFF, 0xFF],
        [0xC6, 0xDB, 0xEF],
        [0x6B, 0xAE, 0xD6],
        [0x21, 0x71, 0xB5],
        [0x08, 0x30, 0x6B],
    ];
    let x = v * (STOPS.len() - 1) as f32;
    let i = (x.floor() as usize).min(STOPS.len() - 2);
    mix(STOPS[i], STOPS[i + 1], x - i as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thirty_two_experts_get_distinct_colours() {
        for p in Palette::ALL {
            let cols: Vec<Rgb> = (0..32).map(|j| p.expert(j)).collect();
            for i in 0..32 {
                for j in 0..i {
                    assert_ne!(cols[i], cols[j], "{p:?}: experts {i} and {j}");
                }
                assert_ne!(cols[i], DROPPED);
            }
        }
    }

    #[test]
    fn sequential_is_monotone_in_lightness() {
        let l = |c: Rgb| c.iter().map(|&v| v as u32).sum::<u32>();
        let mut prev = u32::MAX;
        for k in 0..=20 {
            let now = l(sequential(k as f32 / 20.0));
            assert!(now <= prev);
            prev = now;
        }
    }
}
