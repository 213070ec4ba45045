//! Launchers for the WGSL kernels in `shaders/`: one compiled pipeline per entry point, a bind
//! group per launch (binding 0 the parameters, then storage buffers in the shader's order), and
//! helpers to create, fill and read back storage buffers.

use std::collections::HashMap;

use wgpu::util::DeviceExt;

use super::error::GpuError;

/// Every kernel entry point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    Matmul,
    MatmulRowwise,
    LayerNorm,
    SoftmaxRows,
    SoftmaxColumnsT,
    Gelu,
    RoundBf16,
    L2NormalizeRows,
    Attention,
    Patchify,
    Assemble,
    Pool,
    TopK,
    OrderTokens,
    TokenChoiceSlots,
    ExpertChoiceSelect,
    Sinkhorn,
    Gather,
    Combine,
    AddBranch,
}

/// A shader module: its source and how many storage buffers it binds after the parameters.
struct Module {
    name: &'static str,
    source: &'static str,
    storage: usize,
}

const MODULES: [Module; 11] = [
    Module {
        name: "matmul",
        source: include_str!("../../shaders/matmul.wgsl"),
        storage: 4,
    },
    Module {
        name: "layernorm",
        source: include_str!("../../shaders/layernorm.wgsl"),
        storage: 4,
    },
    Module {
        name: "softmax",
        source: include_str!("../../shaders/softmax.wgsl"),
        storage: 2,
    },
    Module {
        name: "elementwise",
        source: include_str!("../../shaders/elementwise.wgsl"),
        storage: 2,
    },
    Module {
        name: "attention",
        source: include_str!("../../shaders/attention.wgsl"),
        storage: 2,
    },
    Module {
        name: "embed",
        source: include_str!("../../shaders/embed.wgsl"),
        storage: 4,
    },
    Module {
        name: "token_choice",
        source: include_str!("../../shaders/token_choice.wgsl"),
        storage: 7,
    },
    Module {
        name: "expert_choice",
        source: include_str!("../../shaders/expert_choice.wgsl"),
        storage: 3,
    },
    Module {
        name: "sinkhorn",
        source: include_str!("../../shaders/sinkhorn.wgsl"),
        storage: 5,
    },
    Module {
        name: "moe_dispatch",
        source: include_str!("../../shaders/moe_dispatch.wgsl"),
        storage: 4,
    },
    Module {
        name: "residual",
        source: include_str!("../../shaders/residual.wgsl"),
        storage: 4,
    },
];

/// (kernel, module index, entry point)
const ENTRIES: [(Kernel, usize, &str); 20] = [
    (Kernel::Matmul, 0, "main"),
    (Kernel::MatmulRowwise, 0, "rowwise"),
    (Kernel::LayerNorm, 1, "main"),
    (Kernel::SoftmaxRows, 2, "rows"),
    (Kernel::SoftmaxColumnsT, 2, "columns_t"),
    (Kernel::Gelu, 3, "gelu"),
    (Kernel::RoundBf16, 3, "round_bf16"),
    (Kernel::L2NormalizeRows, 3, "l2_normalize_rows"),
    (Kernel::Attention, 4, "main"),
    (Kernel::Patchify, 5, "patchify"),
    (Kernel::Assemble, 5, "assemble"),
    (Kernel::Pool, 5, "pool"),
    (Kernel::TopK, 6, "topk"),
    (Kernel::OrderTokens, 6, "order_tokens"),
    (Kernel::TokenChoiceSlots, 6, "slots"),
    (Kernel::ExpertChoiceSelect, 7, "select_tokens"),
    (Kernel::Sinkhorn, 8, "main"),
    (Kernel::Gather, 9, "gather"),
    (Kernel::Combine, 9, "combine"),
    (Kernel::AddBranch, 10, "add_branch"),
];

/// Workgroup width of the flat (one thread per element) kernels.
pub const FLAT_WG: u32 = 64;
/// Most workgroups along one dispatch dimension.
const MAX_GROUPS: u32 = 65535;

/// Compiled pipelines and their bind group layouts.
pub struct Kernels {
    layouts: Vec<wgpu::BindGroupLayout>,
    pipelines: HashMap<Kernel, (wgpu::ComputePipeline, usize)>,
    /// Bound where a kernel does not use one of its module's buffers.
    pub(crate) dummy: wgpu::Buffer,
}

impl Kernels {
    /// Compiles every kernel.
    pub fn new(device: &wgpu::Device) -> Result<Self, GpuError> {
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let mut layouts = Vec::new();
        let mut pipeline_layouts = Vec::new();
        let mut shaders = Vec::new();
        for m in &MODULES {
            let mut entries = vec![wgpu::BindGroupLayoutEntry {
                binding: 0,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            }];
            for b in 0..m.storage {
                entries.push(wgpu::BindGroupLayoutEntry {
                    binding: b as u32 + 1,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Storage { read_only: false },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                });
            }
            let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some(m.name),
                entries: &entries,
            });
            pipeline_layouts.push(
                device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                    label: Some(m.name),
                    bind_group_layouts: &[Some(&layout)],
                    immediate_size: 0,
                }),
            );
            layouts.push(layout);
            shaders.push(device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(m.name),
                source: wgpu::ShaderSource::Wgsl(m.source.into()),
            }));
        }
        let mut pipelines = HashMap::new();
        for (kernel, module, entry) in ENTRIES {
            let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: Some(&pipeline_layouts[module]),
                module: &shaders[module],
                entry_point: Some(entry),
                compilation_options: Default::default(),
                cache: None,
            });
            pipelines.insert(kernel, (pipeline, module));
        }
        let dummy = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("unused binding"),
            size: 16,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(GpuError::Command(format!("compiling the kernels: {e}")));
        }
        Ok(Self {
            layouts,
            pipelines,
            dummy,
        })
    }

    /// Records one launch of `kernel` with `params` (in a uniform buffer of its own) over
    /// `groups` workgroups; `buffers` fill the module's storage bindings in order, unused ones get
    /// a dummy. Runs use [`launch_with`](Self::launch_with) and a [`ParamArena`] instead.
    pub fn launch(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        kernel: Kernel,
        params: &[u32],
        buffers: &[&wgpu::Buffer],
        groups: [u32; 3],
    ) {
        let uniform = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("params"),
            contents: bytemuck::cast_slice(&padded_params(params)),
            usage: wgpu::BufferUsages::UNIFORM,
        });
        self.launch_with(
            device,
            encoder,
            kernel,
            uniform.as_entire_binding(),
            buffers,
            groups,
        );
    }

    /// As [`launch`](Self::launch), with the parameters already in a uniform buffer.
    pub fn launch_with(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        kernel: Kernel,
        params: wgpu::BindingResource<'_>,
        buffers: &[&wgpu::Buffer],
        groups: [u32; 3],
    ) {
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: None,
            timestamp_writes: None,
        });
        self.dispatch_in(device, &mut pass, kernel, params, buffers, groups);
    }

    /// As [`launch_with`](Self::launch_with), into an open compute pass (one pass holds many
    /// dispatches; wgpu orders each dispatch's storage accesses after the previous ones).
    pub fn dispatch_in(
        &self,
        device: &wgpu::Device,
        pass: &mut wgpu::ComputePass<'_>,
        kernel: Kernel,
        params: wgpu::BindingResource<'_>,
        buffers: &[&wgpu::Buffer],
        groups: [u32; 3],
    ) {
        let (pipeline, module) = &self.pipelines[&kernel];
        let storage = MODULES[*module].storage;
        debug_assert!(buffers.len() <= storage, "{kernel:?}: too many buffers");
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: params,
        }];
        for b in 0..storage {
            entries.push(wgpu::BindGroupEntry {
                binding: b as u32 + 1,
                resource: buffers
                    .get(b)
                    .copied()
                    .unwrap_or(&self.dummy)
                    .as_entire_binding(),
            });
        }
        let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &self.layouts[*module],
            entries: &entries,
        });
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
    }
}

/// Parameters padded to the 16-byte multiple a uniform struct occupies.
fn padded_params(params: &[u32]) -> Vec<u32> {
    let mut words = params.to_vec();
    words.resize(params.len().div_ceil(4).max(1) * 4, 0);
    words
}

/// Largest parameter block of any kernel (`matmul.wgsl`'s 16 words).
const PARAM_BYTES: u64 = 64;
/// Launches per arena buffer.
const ARENA_SLOTS: u64 = 256;

/// The kernel parameters of a run's launches in a few uniform buffers instead of one buffer per
/// launch: each launch's block sits at an offset aligned to the device's uniform offset alignment,
/// and the blocks reach the GPU with one `write_buffer` per buffer before the run is submitted.
pub struct ParamArena {
    stride: u64,
    full: Vec<(wgpu::Buffer, Vec<u8>)>,
    current: Option<(wgpu::Buffer, Vec<u8>)>,
}

impl ParamArena {
    pub fn new(device: &wgpu::Device) -> Self {
        let align = u64::from(device.limits().min_uniform_buffer_offset_alignment).max(16);
        Self {
            stride: PARAM_BYTES.div_ceil(align) * align,
            full: Vec::new(),
            current: None,
        }
    }

    /// Places `params` and gives the binding to launch with.
    pub fn push(&mut self, device: &wgpu::Device, params: &[u32]) -> wgpu::BindingResource<'_> {
        let stride = self.stride;
        let capacity = (stride * ARENA_SLOTS) as usize;
        if self
            .current
            .as_ref()
            .is_some_and(|(_, bytes)| bytes.len() + stride as usize > capacity)
            && let Some(full) = self.current.take()
        {
            self.full.push(full);
        }
        let (buffer, bytes) = self.current.get_or_insert_with(|| {
            let buffer = device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("params"),
                size: capacity as u64,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            (buffer, Vec::with_capacity(capacity))
        });
        let offset = bytes.len() as u64;
        let words = padded_params(params);
        bytes.extend_from_slice(bytemuck::cast_slice(&words));
        bytes.resize(offset as usize + stride as usize, 0);
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer,
            offset,
            size: wgpu::BufferSize::new(PARAM_BYTES),
        })
    }

    /// Queues the parameter uploads; they land before the next submission's commands run.
    pub fn flush(&mut self, queue: &wgpu::Queue) {
        for (buffer, bytes) in self.full.iter_mut().chain(self.current.iter_mut()) {
            if !bytes.is_empty() {
                queue.write_buffer(buffer, 0, bytes);
                bytes.clear();
            }
        }
        self.full.clear();
        self.current = None;
    }
}

/// Workgroups for a flat kernel over `len` elements (index = x + y·65535·64).
pub fn flat_groups(len: usize) -> [u32; 3] {
    let wgs = (len as u32).div_ceil(FLAT_WG).max(1);
    if wgs <= MAX_GROUPS {
        [wgs, 1, 1]
    } else {
        [MAX_GROUPS, wgs.div_ceil(MAX_GROUPS), 1]
    }
}

/// Workgroups for a one-workgroup-per-row kernel (row = x + y·65535).
pub fn row_groups(rows: usize) -> [u32; 3] {
    let rows = (rows as u32).max(1);
    if rows <= MAX_GROUPS {
        [rows, 1, 1]
    } else {
        [MAX_GROUPS, rows.div_ceil(MAX_GROUPS), 1]
    }
}

/// A storage buffer of `len` 4-byte values (at least one), usable as copy source and target.
pub fn storage(device: &wgpu::Device, label: &str, len: usize) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: (len.max(4) * 4) as u64,
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
}

/// A storage buffer holding `data`.
pub fn upload<T: bytemuck::Pod>(device: &wgpu::Device, label: &str, data: &[T]) -> wgpu::Buffer {
    let bytes: &[u8] = bytemuck::cast_slice(data);
    let mut padded;
    let contents = if bytes.len() < 16 {
        padded = bytes.to_vec();
        padded.resize(16, 0);
        &padded[..]
    } else {
        bytes
    };
    device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(label),
        contents,
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST,
    })
}

/// Reads `len` 4-byte words from each `(buffer, len)` in one submission; the words can be
/// reinterpreted as f32, u32 or i32 by the caller.
pub fn read_words(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    mut encoder: wgpu::CommandEncoder,
    reads: &[(&wgpu::Buffer, usize)],
) -> Result<Vec<Vec<u32>>, GpuError> {
    let total: usize = reads.iter().map(|(_, n)| n).sum();
    let staging = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("readback"),
        size: (total.max(1) * 4) as u64,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut offset = 0u64;
    for (buf, n) in reads {
        if *n > 0 {
            encoder.copy_buffer_to_buffer(buf, 0, &staging, offset, (*n * 4) as u64);
        }
        offset += (*n * 4) as u64;
    }
    queue.submit([encoder.finish()]);
    let slice = staging.slice(..);
    let (tx, rx) = std::sync::mpsc::channel();
    slice.map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    device
        .poll(wgpu::PollType::wait_indefinitely())
        .map_err(|e| GpuError::Lost(e.to_string()))?;
    rx.recv()
        .map_err(|_| GpuError::Lost("the readback never completed".into()))?
        .map_err(|e| GpuError::Lost(format!("mapping the readback buffer: {e}")))?;
    let data = slice
        .get_mapped_range()
        .map_err(|e| GpuError::Lost(format!("reading the readback buffer: {e:?}")))?;
    let words: &[u32] = bytemuck::cast_slice(&data);
    let mut out = Vec::with_capacity(reads.len());
    let mut at = 0;
    for (_, n) in reads {
        out.push(words[at..at + n].to_vec());
        at += n;
    }
    drop(data);
    staging.unmap();
    Ok(out)
}

/// Words read back as f32.
pub fn as_f32(words: Vec<u32>) -> Vec<f32> {
    words.into_iter().map(f32::from_bits).collect()
}

/// Words read back as i32.
pub fn as_i32(words: Vec<u32>) -> Vec<i32> {
    words.into_iter().map(|w| w as i32).collect()
}

/// The parameters of one matmul launch (see `shaders/matmul.wgsl`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Matmul {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// Batch = outer × inner; offsets are `outer·*_so + inner·*_si` (elements).
    pub outer: usize,
    pub inner: usize,
    pub a_so: usize,
    pub a_si: usize,
    pub b_so: usize,
    pub b_si: usize,
    pub c_so: usize,
    pub c_si: usize,
    pub bias_so: usize,
    pub bias_si: usize,
    pub bias: bool,
    pub act: Activation,
    pub accumulate: bool,
    pub alpha: f32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Activation {
    #[default]
    None,
    /// vmoe's tanh-approximation GELU.
    Gelu,
    /// The exact (erf) GELU.
    GeluErf,
    Tanh,
}

impl From<crate::model::Gelu> for Activation {
    fn from(g: crate::model::Gelu) -> Self {
        match g {
            crate::model::Gelu::Tanh => Self::Gelu,
            crate::model::Gelu::Erf => Self::GeluErf,
        }
    }
}

impl Matmul {
    /// A single `[m, k] @ [k, n]`.
    pub fn plain(m: usize, k: usize, n: usize) -> Self {
        Self {
            m,
            n,
            k,
            outer: 1,
            inner: 1,
            alpha: 1.0,
            ..Default::default()
        }
    }

    pub fn with_bias(mut self) -> Self {
        self.bias = true;
        self
    }

    pub fn act(mut self, act: Activation) -> Self {
        self.act = act;
        self
    }

    pub fn accumulate(mut self) -> Self {
        self.accumulate = true;
        self
    }

    /// The kernel, its parameters and workgroup counts for this launch
    /// (`c (+)= act(alpha · a @ b + bias)`): the tiled kernel, or with `tiled == false` the
    /// barrier-free one (a 4×4 block per invocation) while the rows fit one dispatch dimension.
    pub fn params(&self, tiled: bool) -> (Kernel, [u32; 16], [u32; 3]) {
        let flags = u32::from(self.bias)
            | match self.act {
                Activation::None => 0,
                Activation::Gelu => 2,
                Activation::Tanh => 4,
                Activation::GeluErf => 16,
            }
            | if self.accumulate { 8 } else { 0 };
        let u = |v: usize| v as u32;
        let params = [
            u(self.m),
            u(self.n),
            u(self.k),
            u(self.inner.max(1)),
            u(self.a_so),
            u(self.a_si),
            u(self.b_so),
            u(self.b_si),
            u(self.c_so),
            u(self.c_si),
            u(self.bias_so),
            u(self.bias_si),
            flags,
            self.alpha.to_bits(),
            0,
            0,
        ];
        let batch = (self.outer.max(1) * self.inner.max(1)) as u32;
        if tiled || self.m.div_ceil(4) > MAX_GROUPS as usize {
            (
                Kernel::Matmul,
                params,
                [u(self.n).div_ceil(16), u(self.m).div_ceil(16), batch],
            )
        } else {
            (
                Kernel::MatmulRowwise,
                params,
                [
                    u(self.n).div_ceil(4 * FLAT_WG),
                    u(self.m).div_ceil(4).max(1),
                    batch,
                ],
            )
        }
    }
}
