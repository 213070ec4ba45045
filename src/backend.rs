//! Which device runs the model: the GPU backend (`crate::gpu`) or candle on the CPU, behind one
//! type that the app and the CLI use. A GPU that is missing, refuses a device, or fails or is lost
//! mid-run hands over to the CPU with a notice; routing records look the same from either.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Mutex;

use crate::gpu::{GpuContext, GpuError, GpuVitMoe};
use crate::import::load_any;
use crate::model::{
    BlockObserver, Forward, ForwardOutput, ModelConfig, ModelError, ModelWeights, RunOptions,
    VitMoe,
};

/// The user's device choice (`--device`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DeviceChoice {
    /// A hardware GPU when there is one, else the CPU (a software adapter such as lavapipe is
    /// slower than candle on the same cores).
    #[default]
    Auto,
    /// The GPU, software adapters included; the CPU only as a fallback.
    Gpu,
    Cpu,
}

impl DeviceChoice {
    pub const ALL: [DeviceChoice; 3] = [Self::Auto, Self::Gpu, Self::Cpu];

    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Gpu => "gpu",
            Self::Cpu => "cpu",
        }
    }

    /// The name shown in the app.
    pub fn label(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Gpu => "GPU",
            Self::Cpu => "CPU",
        }
    }

    /// Whether this choice runs on `ctx` (Auto skips software adapters).
    pub fn uses(self, ctx: &GpuContext) -> bool {
        match self {
            Self::Auto => !ctx.is_software(),
            Self::Gpu => true,
            Self::Cpu => false,
        }
    }

    /// The device for this choice in the CLI: a headless GPU device, or `None` for the CPU, with
    /// a notice saying why when `gpu` was asked for and none works. `auto` looks at the adapter
    /// first and creates no device on a software one.
    pub fn headless(self) -> (Option<GpuContext>, Option<String>) {
        match self {
            Self::Cpu => (None, None),
            Self::Auto => match GpuContext::headless_if(|i| i.device_type != wgpu::DeviceType::Cpu)
            {
                Ok(ctx) => (ctx, None),
                Err(_) => (None, None),
            },
            Self::Gpu => match GpuContext::headless() {
                Ok(ctx) => (Some(ctx), None),
                Err(e) => (None, Some(format!("{e}; running on the CPU instead"))),
            },
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| format!("unknown device `{s}` (expected auto, gpu or cpu)"))
    }
}

impl Forward for Engine {
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn check_options(&self, opts: &RunOptions, batch: usize) -> Result<(), ModelError> {
        Engine::check_options(self, opts, batch)
    }
    fn forward(&self, images: &[Vec<f32>], opts: &RunOptions) -> Result<ForwardOutput, ModelError> {
        Engine::forward(self, images, opts)
    }
    fn rerun(&self, prev: &ForwardOutput, opts: &RunOptions) -> Result<ForwardOutput, ModelError> {
        Engine::rerun(self, prev, opts)
    }
    fn forward_observed(
        &self,
        images: &[Vec<f32>],
        opts: &RunOptions,
        observe: BlockObserver<'_>,
    ) -> Result<ForwardOutput, ModelError> {
        Engine::forward_observed(self, images, opts, observe)
    }
    fn rerun_observed(
        &self,
        prev: &ForwardOutput,
        opts: &RunOptions,
        observe: BlockObserver<'_>,
    ) -> Result<ForwardOutput, ModelError> {
        Engine::rerun_observed(self, prev, opts, observe)
    }
}

/// A model on the CPU, and on a GPU when one is given; runs on the GPU while it works.
pub struct Engine {
    pub config: ModelConfig,
    cpu: VitMoe,
    gpu: Mutex<Option<GpuVitMoe>>,
    notice: Mutex<Option<String>>,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("device", &self.device())
            .finish()
    }
}

impl Engine {
    /// Builds the CPU model and, with `gpu`, uploads it there too (an upload failure leaves the
    /// CPU model and a notice).
    pub fn new(
        config: ModelConfig,
        weights: ModelWeights,
        gpu: Option<&GpuContext>,
    ) -> Result<Self, ModelError> {
        let (gpu_model, notice) = match gpu {
            None => (None, None),
            Some(ctx) => match GpuVitMoe::new(ctx, &config, &weights) {
                Ok(m) => (Some(m), None),
                Err(e) => (
                    None,
                    Some(format!(
                        "GPU unavailable for this model ({e}); running on the CPU"
                    )),
                ),
            },
        };
        let cpu = VitMoe::new(config.clone(), weights)?;
        Ok(Self {
            config,
            cpu,
            gpu: Mutex::new(gpu_model),
            notice: Mutex::new(notice),
        })
    }

    /// Loads a checkpoint of either format (see `import::load_any`).
    pub fn load(path: &Path, gpu: Option<&GpuContext>) -> Result<Self, ModelError> {
        let (cfg, weights) = load_any(path)?;
        Self::new(cfg, weights, gpu)
    }

    /// The CPU reference model.
    pub fn cpu(&self) -> &VitMoe {
        &self.cpu
    }

    /// Whether runs go to the GPU (until it fails).
    pub fn on_gpu(&self) -> bool {
        self.gpu.lock().map(|g| g.is_some()).unwrap_or(false)
    }

    /// "GPU: NVIDIA H200, Vulkan" or "CPU (candle, 2 threads)".
    pub fn device(&self) -> String {
        match self.gpu.lock().ok().as_deref() {
            Some(Some(m)) => format!("GPU: {}", m.context().describe()),
            _ => format!("CPU (candle, {} threads)", rayon::current_num_threads()),
        }
    }

    /// Why the GPU is not (or no longer) used, once.
    pub fn take_notice(&self) -> Option<String> {
        self.notice.lock().ok().and_then(|mut n| n.take())
    }

    pub fn check_options(&self, opts: &RunOptions, batch: usize) -> Result<(), ModelError> {
        self.cpu.check_options(opts, batch)
    }

    pub fn forward(
        &self,
        images: &[Vec<f32>],
        opts: &RunOptions,
    ) -> Result<ForwardOutput, ModelError> {
        self.with_fallback(
            |gpu| gpu.forward(images, opts),
            || self.cpu.forward(images, opts),
        )
    }

    /// [`forward`](Self::forward) telling `observe` after each block; on the CPU it stops between
    /// blocks when `observe` says so (a GPU run is submitted whole and only reports its end).
    pub fn forward_observed(
        &self,
        images: &[Vec<f32>],
        opts: &RunOptions,
        observe: BlockObserver<'_>,
    ) -> Result<ForwardOutput, ModelError> {
        let mut observe = Some(observe);
        self.with_fallback(
            |gpu| gpu.forward(images, opts),
            || match observe.take() {
                Some(o) => self.cpu.forward_observed(images, opts, o),
                None => self.cpu.forward(images, opts),
            },
        )
    }

    /// [`rerun`](Self::rerun) with an observer, as [`forward_observed`](Self::forward_observed).
    pub fn rerun_observed(
        &self,
        prev: &ForwardOutput,
        opts: &RunOptions,
        observe: BlockObserver<'_>,
    ) -> Result<ForwardOutput, ModelError> {
        let mut observe = Some(observe);
        self.with_fallback(
            |gpu| gpu.rerun(prev, opts),
            || match observe.take() {
                Some(o) => self.cpu.rerun_observed(prev, opts, o),
                None => self.cpu.rerun(prev, opts),
            },
        )
    }

    /// A what-if from `prev` (a full run where `prev` came from the other backend).
    pub fn rerun(
        &self,
        prev: &ForwardOutput,
        opts: &RunOptions,
    ) -> Result<ForwardOutput, ModelError> {
        self.with_fallback(|gpu| gpu.rerun(prev, opts), || self.cpu.rerun(prev, opts))
    }

    /// Runs on the GPU if there is one; a GPU failure (not a bad input) drops the GPU model,
    /// leaves a notice and runs on the CPU.
    fn with_fallback(
        &self,
        on_gpu: impl FnOnce(&GpuVitMoe) -> Result<ForwardOutput, GpuError>,
        on_cpu: impl FnOnce() -> Result<ForwardOutput, ModelError>,
    ) -> Result<ForwardOutput, ModelError> {
        let mut guard = match self.gpu.lock() {
            Ok(g) => g,
            Err(_) => return on_cpu(),
        };
        let Some(gpu) = guard.as_ref() else {
            drop(guard);
            return on_cpu();
        };
        match on_gpu(gpu) {
            Ok(out) => Ok(out),
            Err(GpuError::Input(e)) => Err(e),
            Err(e) => {
                *guard = None;
                drop(guard);
                self.fail_over(&e);
                on_cpu()
            }
        }
    }

    fn fail_over(&self, e: &GpuError) {
        if let Ok(mut n) = self.notice.lock() {
            *n = Some(format!("GPU failed ({e}); switched to the CPU"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::tests::test_gpu;
    use crate::model::random_weights;
    use crate::model::tests::tiny_config;
    use crate::routing::RouterKind;

    #[test]
    fn device_choice_parses_and_auto_skips_software_adapters() {
        assert_eq!("gpu".parse::<DeviceChoice>(), Ok(DeviceChoice::Gpu));
        assert!(
            "tpu"
                .parse::<DeviceChoice>()
                .unwrap_err()
                .contains("auto, gpu or cpu")
        );
        let Some(ctx) = test_gpu() else { return };
        assert!(DeviceChoice::Gpu.uses(ctx));
        assert!(!DeviceChoice::Cpu.uses(ctx));
        assert_eq!(DeviceChoice::Auto.uses(ctx), !ctx.is_software());
    }

    #[test]
    fn an_engine_without_a_gpu_runs_on_the_cpu() {
        let cfg = tiny_config(RouterKind::SoftmaxTokenChoice);
        let engine = Engine::new(cfg.clone(), random_weights(&cfg, 1), None).unwrap();
        assert!(!engine.on_gpu());
        assert!(engine.device().starts_with("CPU"));
        let px = vec![0.1f32; 8 * 12 * 3];
        let out = engine
            .forward(&[px], &RunOptions::from_config(&cfg))
            .unwrap();
        assert!(out.on_cpu());
    }

    /// A checkpoint the GPU cannot hold (here a tensor beyond the device's per-buffer binding
    /// limit) stays on the CPU with a notice naming the tensor.
    #[test]
    fn a_model_the_gpu_cannot_hold_runs_on_the_cpu_with_a_notice() {
        if test_gpu().is_none() {
            return;
        }
        let small = GpuContext::headless_with_limits(|l| l.max_storage_buffer_binding_size = 4096)
            .expect("a device with a 4 KiB binding limit");
        let cfg = tiny_config(RouterKind::SoftmaxTokenChoice);
        let engine = Engine::new(cfg.clone(), random_weights(&cfg, 3), Some(&small)).unwrap();
        assert!(!engine.on_gpu());
        let notice = engine.take_notice().unwrap();
        assert!(
            notice.contains("Moe/Mlp/Dense_0/kernel") || notice.contains("kernel"),
            "{notice}"
        );
        assert!(notice.contains("4096 bytes per buffer"), "{notice}");
        let px = vec![0.2f32; 8 * 12 * 3];
        assert!(
            engine
                .forward(&[px], &RunOptions::from_config(&cfg))
                .is_ok()
        );
    }

    /// A DINOv2-like model (LayerScale, exact GELU, unit combine, narrow experts, registers, no
    /// head) runs on the GPU with no notice; one beyond what the attention kernel holds (more
    /// tokens than `gpu::MAX_TOKENS`) stays on the CPU with a notice that says why.
    #[test]
    fn models_run_on_the_gpu_unless_they_exceed_its_limits() {
        let Some(ctx) = test_gpu() else { return };
        let mut cfg = tiny_config(RouterKind::SoftmaxTokenChoice);
        cfg.layer_scale = true;
        cfg.gelu = crate::model::Gelu::Erf;
        cfg.register_tokens = 2;
        cfg.num_classes = 0;
        cfg.class_names.clear();
        if let Some(m) = cfg.moe.as_mut() {
            m.combine = crate::model::Combine::Unit;
            m.expert_mlp_dim = Some(6);
        }
        let engine = Engine::new(cfg.clone(), random_weights(&cfg, 5), Some(ctx)).unwrap();
        assert!(engine.on_gpu(), "{:?}", engine.take_notice());
        assert_eq!(engine.take_notice(), None);
        let out = engine
            .forward(&[vec![0.1; 8 * 12 * 3]], &RunOptions::from_config(&cfg))
            .unwrap();
        assert!(crate::gpu::computed_on_gpu(&out));

        let mut big = tiny_config(RouterKind::SoftmaxTokenChoice);
        big.image_size = [56, 56];
        big.patch_size = [1, 1];
        assert!(big.seq_len() > crate::gpu::MAX_TOKENS);
        let engine = Engine::new(big.clone(), random_weights(&big, 5), Some(ctx)).unwrap();
        assert!(!engine.on_gpu());
        let notice = engine.take_notice().unwrap();
        assert!(
            notice.contains("3137 tokens") && notice.contains("CPU"),
            "{notice}"
        );
    }

    /// A GPU failure mid-run (here: the device's buffers destroyed under the model) falls back to
    /// the CPU with a notice, and later runs stay on the CPU; what-ifs from a GPU output work.
    #[test]
    fn a_failing_gpu_falls_back_to_the_cpu_with_a_notice() {
        let Some(ctx) = test_gpu() else { return };
        let cfg = tiny_config(RouterKind::SoftmaxExpertChoice);
        let w = random_weights(&cfg, 2);
        let engine = Engine::new(cfg.clone(), w, Some(ctx)).unwrap();
        assert!(engine.on_gpu() && engine.device().starts_with("GPU"));
        let px = vec![0.3f32; 8 * 12 * 3];
        let opts = RunOptions::from_config(&cfg);
        let first = engine.forward(std::slice::from_ref(&px), &opts).unwrap();
        assert!(crate::gpu::computed_on_gpu(&first));
        engine
            .gpu
            .lock()
            .unwrap()
            .as_ref()
            .unwrap()
            .poison_for_test();
        let second = engine.forward(&[px], &opts).unwrap();
        assert!(second.on_cpu());
        assert!(!engine.on_gpu());
        let notice = engine.take_notice().unwrap();
        assert!(notice.contains("switched to the CPU"), "{notice}");
        let cpu = engine.cpu().forward(&first.inputs, &opts).unwrap();
        assert_eq!(second.probs, cpu.probs);
        // A what-if from the GPU output now runs on the CPU from the same images.
        let what_if = engine
            .rerun(
                &first,
                &opts.clone().with_router(crate::routing::RouterConfig::new(
                    RouterKind::SoftmaxTokenChoice,
                )),
            )
            .unwrap();
        assert!(what_if.on_cpu());
    }
}
