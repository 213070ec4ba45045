//! The wgpu device the GPU backend computes on: eframe's own device in the app (one device for
//! drawing and compute), or a headless one in the CLI and tests. Compiles every kernel once.

use std::sync::Arc;

use super::error::GpuError;
use super::kernels::Kernels;

/// Limits the kernels need beyond WebGPU's defaults-free minimum.
const NEED_STORAGE_BUFFERS: u32 = 7;
const NEED_INVOCATIONS: u32 = 256;
const NEED_WORKGROUP_BYTES: u32 = 4096 + 256;

/// A device, its queue and the compiled kernels. Cheap to clone (all handles are shared).
#[derive(Clone)]
pub struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub kernels: Arc<Kernels>,
    /// Use the shared-memory tiled matmul (hardware GPUs) rather than the barrier-free one
    /// (software adapters, where barriers are expensive).
    pub tiled_matmul: bool,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext")
            .field("adapter", &self.info.name)
            .field("backend", &self.info.backend)
            .finish()
    }
}

/// The device descriptor the app and the headless path both use: the adapter's own limits, so
/// that compute works even where the defaults would forbid it (wgpu's GL backend asks for WebGL2
/// limits, which allow no compute workgroups at all).
pub fn device_descriptor(adapter: &wgpu::Adapter) -> wgpu::DeviceDescriptor<'static> {
    wgpu::DeviceDescriptor {
        label: Some("routerscope"),
        required_limits: adapter.limits(),
        ..Default::default()
    }
}

impl GpuContext {
    /// A headless device on the best adapter (`WGPU_BACKEND`, `WGPU_ADAPTER_NAME` and
    /// `WGPU_POWER_PREF` are honoured).
    pub fn headless() -> Result<Self, GpuError> {
        Self::headless_if(|_| true)?
            .ok_or_else(|| GpuError::NoAdapter("the adapter was not accepted".into()))
    }

    /// As [`headless`](Self::headless), but only on an adapter `accept` takes (`Ok(None)`
    /// otherwise, before any device is created).
    pub fn headless_if(
        accept: impl Fn(&wgpu::AdapterInfo) -> bool,
    ) -> Result<Option<Self>, GpuError> {
        pollster::block_on(async {
            let instance = wgpu::Instance::new(
                wgpu::InstanceDescriptor::new_without_display_handle_from_env(),
            );
            let adapter = instance
                .request_adapter(&wgpu::RequestAdapterOptions {
                    power_preference: wgpu::PowerPreference::from_env()
                        .unwrap_or(wgpu::PowerPreference::HighPerformance),
                    force_fallback_adapter: false,
                    compatible_surface: None,
                    apply_limit_buckets: false,
                })
                .await
                .map_err(|e| GpuError::NoAdapter(e.to_string()))?;
            let info = adapter.get_info();
            if !accept(&info) {
                return Ok(None);
            }
            check_adapter(&adapter, &info)?;
            let (device, queue) = adapter
                .request_device(&device_descriptor(&adapter))
                .await
                .map_err(|e| {
                    GpuError::Device(format!("{} ({:?}): {e}", info.name, info.backend))
                })?;
            // Our own device: errors outside a run's error scopes and a device loss are
            // reported, never a panic (wgpu's default handler panics); the run then fails and
            // the backend falls back to the CPU.
            device.on_uncaptured_error(std::sync::Arc::new(|e: wgpu::Error| {
                eprintln!("routerscope: GPU error: {e}");
            }));
            device.set_device_lost_callback(|reason, msg| {
                eprintln!("routerscope: GPU device lost ({reason:?}): {msg}");
            });
            Self::new(device, queue, info).map(Some)
        })
    }

    /// A headless device whose limits `adjust` lowers (tests of what a smaller GPU refuses).
    #[cfg(test)]
    pub(crate) fn headless_with_limits(
        adjust: impl Fn(&mut wgpu::Limits),
    ) -> Result<Self, GpuError> {
        pollster::block_on(async {
            let instance = wgpu::Instance::new(
                wgpu::InstanceDescriptor::new_without_display_handle_from_env(),
            );
            let adapter = instance
                .request_adapter(&wgpu::RequestAdapterOptions::default())
                .await
                .map_err(|e| GpuError::NoAdapter(e.to_string()))?;
            let mut desc = device_descriptor(&adapter);
            adjust(&mut desc.required_limits);
            let (device, queue) = adapter
                .request_device(&desc)
                .await
                .map_err(|e| GpuError::Device(e.to_string()))?;
            Self::new(device, queue, adapter.get_info())
        })
    }

    /// Shares a device someone else created (eframe's), after checking its limits.
    pub fn shared(
        adapter: &wgpu::Adapter,
        device: wgpu::Device,
        queue: wgpu::Queue,
    ) -> Result<Self, GpuError> {
        let info = adapter.get_info();
        check_compute(adapter, &info)?;
        // The device's limits, not the adapter's: its creator may have asked for less.
        check_limits(&device.limits(), &info)?;
        Self::new(device, queue, info)
    }

    fn new(
        device: wgpu::Device,
        queue: wgpu::Queue,
        info: wgpu::AdapterInfo,
    ) -> Result<Self, GpuError> {
        let kernels = Kernels::new(&device)?;
        Ok(Self {
            tiled_matmul: info.device_type != wgpu::DeviceType::Cpu,
            device,
            queue,
            info,
            kernels: Arc::new(kernels),
        })
    }

    /// "llvmpipe (LLVM 15.0.6, 256 bits), Vulkan": what the app shows as its device.
    pub fn describe(&self) -> String {
        format!("{}, {:?}", self.info.name, self.info.backend)
    }

    /// Whether the adapter is a software rasteriser (lavapipe, llvmpipe, WARP).
    pub fn is_software(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }
}

fn check_adapter(adapter: &wgpu::Adapter, info: &wgpu::AdapterInfo) -> Result<(), GpuError> {
    check_compute(adapter, info)?;
    check_limits(&adapter.limits(), info)
}

fn check_compute(adapter: &wgpu::Adapter, info: &wgpu::AdapterInfo) -> Result<(), GpuError> {
    let flags = adapter.get_downlevel_capabilities().flags;
    if !flags.contains(wgpu::DownlevelFlags::COMPUTE_SHADERS) {
        return Err(GpuError::Unsupported {
            adapter: info.name.clone(),
            why: "no compute shaders".into(),
        });
    }
    Ok(())
}

fn check_limits(l: &wgpu::Limits, info: &wgpu::AdapterInfo) -> Result<(), GpuError> {
    let short = |what: &str, have: u32, need: u32| {
        Err(GpuError::Unsupported {
            adapter: info.name.clone(),
            why: format!("{what} is {have}, the kernels need {need}"),
        })
    };
    if l.max_storage_buffers_per_shader_stage < NEED_STORAGE_BUFFERS {
        return short(
            "max_storage_buffers_per_shader_stage",
            l.max_storage_buffers_per_shader_stage,
            NEED_STORAGE_BUFFERS,
        );
    }
    if l.max_compute_invocations_per_workgroup < NEED_INVOCATIONS
        || l.max_compute_workgroup_size_x < NEED_INVOCATIONS
    {
        return short(
            "max_compute_invocations_per_workgroup",
            l.max_compute_invocations_per_workgroup
                .min(l.max_compute_workgroup_size_x),
            NEED_INVOCATIONS,
        );
    }
    if l.max_compute_workgroup_storage_size < NEED_WORKGROUP_BYTES {
        return short(
            "max_compute_workgroup_storage_size",
            l.max_compute_workgroup_storage_size,
            NEED_WORKGROUP_BYTES,
        );
    }
    Ok(())
}
