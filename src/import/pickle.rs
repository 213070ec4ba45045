//! A pickle reader for PyTorch checkpoints that never runs pickled code. It understands the
//! binary opcodes of protocols 2 to 5 and builds plain values (numbers, strings, tuples, lists,
//! dicts); the only callables it knows are the few PyTorch uses to rebuild a state dict
//! (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2` and its parameter variants,
//! the storage classes, `_codecs.encode`), which it interprets itself. Any other global (a
//! model class, `os.system`, `builtins.eval`) is refused by name when the pickle refers to it,
//! before anything could be called.
//!
//! Hostile input is bounded: the pickle's size, the stack and the memo are limited, strings are
//! checked against the bytes left before they are allocated, values are shared (`Rc`) so a
//! memo reference never copies, and deeply nested containers are taken apart iteratively.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// A pickle (`data.pkl`) of at most this many bytes: a state dict's is tens of kilobytes.
pub const MAX_PICKLE_BYTES: usize = 64 << 20;
/// The most values on the stack and in the memo.
const MAX_STACK: usize = 1 << 20;
const MAX_MEMO: usize = 1 << 20;
/// The most dimensions of a tensor.
const MAX_DIMS: usize = 16;
/// The most elements of one tensor (2^36, as the other readers).
pub const MAX_TENSOR_ELEMENTS: usize = 1 << 36;

/// The element types of PyTorch's storages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageDtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl StorageDtype {
    pub fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }

    fn of_storage_class(name: &str) -> Option<Self> {
        Some(match name {
            "DoubleStorage" => Self::F64,
            "FloatStorage" => Self::F32,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" | "UntypedStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            _ => return None,
        })
    }
}

/// A storage a tensor views: the archive's `data/{key}` record of `numel` elements.
#[derive(Debug, PartialEq)]
pub struct StorageRef {
    pub key: String,
    pub dtype: StorageDtype,
    pub numel: usize,
}

/// A tensor: a strided view of a storage, checked to lie inside it.
#[derive(Debug, PartialEq)]
pub struct TensorRef {
    pub storage: Rc<StorageRef>,
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

impl TensorRef {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the elements are the row-major run `offset..offset + numel`.
    pub fn is_contiguous(&self) -> bool {
        let mut want = 1;
        for (&d, &s) in self.shape.iter().zip(&self.stride).rev() {
            if d != 1 && s != want {
                return false;
            }
            want *= d;
        }
        true
    }
}

/// The globals a PyTorch state dict refers to; nothing else is ever named by a value.
#[derive(Clone, Debug, PartialEq)]
pub enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildParameter,
    RebuildFromType,
    StorageClass(StorageDtype),
    TensorClass,
    CodecsEncode,
}

impl Global {
    fn allowed(module: &str, name: &str) -> Option<Self> {
        Some(match (module, name) {
            ("collections", "OrderedDict") => Self::OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => Self::RebuildTensor,
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                Self::RebuildParameter
            }
            ("torch._tensor", "_rebuild_from_type_v2") => Self::RebuildFromType,
            ("torch" | "torch._tensor", "Tensor") | ("torch.nn.parameter", "Parameter") => {
                Self::TensorClass
            }
            ("torch" | "torch.storage", class) => {
                Self::StorageClass(StorageDtype::of_storage_class(class)?)
            }
            ("_codecs", "encode") => Self::CodecsEncode,
            _ => return None,
        })
    }
}

/// The items of a tuple, list or dict (a dict's keys and values alternate). Dropped
/// iteratively, so that a pickle nesting lists a million deep cannot overflow the stack.
#[derive(Debug, Default)]
pub struct Items(RefCell<Vec<Value>>);

impl Drop for Items {
    fn drop(&mut self) {
        let mut work = std::mem::take(self.0.get_mut());
        while let Some(v) = work.pop() {
            if let Value::Tuple(rc) | Value::List(rc) | Value::Dict(rc) = v
                && let Some(mut items) = Rc::into_inner(rc)
            {
                work.append(items.0.get_mut());
            }
        }
    }
}

/// A value the pickle built.
#[derive(Clone, Debug)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<Items>),
    List(Rc<Items>),
    Dict(Rc<Items>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
    /// The stack marker of MARK (never part of a finished value).
    Mark,
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "a bool",
            Value::Int(_) => "an int",
            Value::Float(_) => "a float",
            Value::Str(_) => "a string",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "a tuple",
            Value::List(_) => "a list",
            Value::Dict(_) => "a dict",
            Value::Global(_) => "a class or function",
            Value::Storage(_) => "a storage",
            Value::Tensor(_) => "a tensor",
            Value::Mark => "a mark",
        }
    }

    fn items(&self) -> Option<std::cell::Ref<'_, Vec<Value>>> {
        match self {
            Value::Tuple(i) | Value::List(i) | Value::Dict(i) => Some(i.0.borrow()),
            _ => None,
        }
    }

    /// A dict's `(key, value)` pairs.
    pub fn dict_pairs(&self) -> Option<Vec<(Value, Value)>> {
        match self {
            Value::Dict(i) => {
                let items = i.0.borrow();
                Some(
                    items
                        .chunks_exact(2)
                        .map(|p| (p[0].clone(), p[1].clone()))
                        .collect(),
                )
            }
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    fn as_usize(&self, what: &str) -> Result<usize, String> {
        match self {
            Value::Int(i) if *i >= 0 => Ok(*i as usize),
            other => Err(format!(
                "{what} is {}, expected a non-negative int",
                describe(other)
            )),
        }
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::Int(i) => format!("{i}"),
        Value::Str(s) => format!("`{}`", s.chars().take(40).collect::<String>()),
        other => other.kind().to_string(),
    }
}

fn new_items(v: Vec<Value>) -> Rc<Items> {
    Rc::new(Items(RefCell::new(v)))
}

/// Reads the pickle `bytes` into its value, refusing anything but plain data and tensors.
pub fn unpickle(bytes: &[u8]) -> Result<Value, String> {
    if bytes.len() > MAX_PICKLE_BYTES {
        return Err(format!(
            "a pickle of {} bytes is beyond the limit of {MAX_PICKLE_BYTES}",
            bytes.len()
        ));
    }
    Machine {
        bytes,
        at: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
    }
    .run()
}

struct Machine<'a> {
    bytes: &'a [u8],
    at: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
}

impl Machine<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                format!(
                    "the pickle ends early: {n} bytes wanted at byte {} of {}",
                    self.at,
                    self.bytes.len()
                )
            })?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn le<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// A length read from the pickle, checked against the bytes left before it sizes anything.
    fn len(&mut self, width: usize) -> Result<usize, String> {
        let n = match width {
            1 => u64::from(self.u8()?),
            4 => u64::from(u32::from_le_bytes(self.le()?)),
            _ => u64::from_le_bytes(self.le()?),
        };
        let left = (self.bytes.len() - self.at) as u64;
        if n > left {
            return Err(format!(
                "a length of {n} bytes at byte {} runs past the pickle's end ({left} bytes left)",
                self.at
            ));
        }
        Ok(n as usize)
    }

    fn line(&mut self) -> Result<String, String> {
        let rest = &self.bytes[self.at..];
        let end = rest
            .iter()
            .take(512)
            .position(|&b| b == b'\n')
            .ok_or_else(|| format!("a name at byte {} is not a line", self.at))?;
        let s = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.at += end + 1;
        Ok(s)
    }

    fn push(&mut self, v: Value) -> Result<(), String> {
        if self.stack.len() >= MAX_STACK {
            return Err(format!("the pickle's stack passes {MAX_STACK} values"));
        }
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> Result<Value, String> {
        match self.stack.pop() {
            Some(Value::Mark) => Err("a value was expected, the pickle has a mark".into()),
            Some(v) => Ok(v),
            None => Err(format!("the pickle's stack is empty at byte {}", self.at)),
        }
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let at = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or_else(|| format!("no mark on the pickle's stack at byte {}", self.at))?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    fn top(&self) -> Result<&Value, String> {
        self.stack
            .last()
            .ok_or_else(|| format!("the pickle's stack is empty at byte {}", self.at))
    }

    fn memo_put(&mut self, key: u32) -> Result<(), String> {
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&key) {
            return Err(format!("the pickle's memo passes {MAX_MEMO} values"));
        }
        let v = self.top()?.clone();
        if matches!(v, Value::Mark) {
            return Err("the pickle memoizes a mark".into());
        }
        self.memo.insert(key, v);
        Ok(())
    }

    fn memo_get(&mut self, key: u32) -> Result<(), String> {
        let v =
            self.memo.get(&key).cloned().ok_or_else(|| {
                format!("the pickle refers to memo entry {key}, which it never set")
            })?;
        self.push(v)
    }

    /// Adds `values` to the list on top of the stack (APPEND, APPENDS, and sets' ADDITEMS).
    fn extend_top(&mut self, values: Vec<Value>) -> Result<(), String> {
        match self.top()? {
            Value::List(items) => {
                items.0.borrow_mut().extend(values);
                Ok(())
            }
            other => Err(format!("the pickle appends to {}", other.kind())),
        }
    }

    /// Adds `pairs` (key, value, key, value, ...) to the dict on top of the stack.
    fn set_items(&mut self, pairs: Vec<Value>) -> Result<(), String> {
        if !pairs.len().is_multiple_of(2) {
            return Err("the pickle sets a key without a value".into());
        }
        match self.top()? {
            Value::Dict(items) => {
                let mut items = items.0.borrow_mut();
                for pair in pairs.chunks_exact(2) {
                    // A key set again replaces its value, as in a Python dict.
                    let key = pair[0].as_str();
                    let existing = key
                        .and_then(|k| items.chunks_exact(2).position(|p| p[0].as_str() == Some(k)));
                    match existing {
                        Some(i) if items.len() < 4096 => items[2 * i + 1] = pair[1].clone(),
                        _ => items.extend_from_slice(pair),
                    }
                }
                Ok(())
            }
            other => Err(format!("the pickle sets items of {}", other.kind())),
        }
    }

    fn global(&mut self, module: &str, name: &str) -> Result<(), String> {
        match Global::allowed(module, name) {
            Some(g) => self.push(Value::Global(g)),
            None => Err(refused(module, name)),
        }
    }

    fn run(mut self) -> Result<Value, String> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if !(2..=5).contains(&proto) {
                        return Err(format!("pickle protocol {proto} (2 to 5 are read)"));
                    }
                }
                // FRAME: a length hint only.
                0x95 => {
                    self.le::<8>()?;
                }
                b'.' => {
                    let v = self.pop()?;
                    return Ok(v);
                }
                b'(' => self.push(Value::Mark)?,
                b'0' => {
                    self.stack
                        .pop()
                        .ok_or("the pickle pops an empty stack".to_string())?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v)?;
                }
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'J' => {
                    let v = i32::from_le_bytes(self.le()?);
                    self.push(Value::Int(i64::from(v)))?;
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(i64::from(v)))?;
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.le()?);
                    self.push(Value::Int(i64::from(v)))?;
                }
                0x8a | 0x8b => {
                    let n = self.len(if op == 0x8a { 1 } else { 4 })?;
                    if n > 8 {
                        return Err(format!("an integer of {n} bytes (at most 8 are read)"));
                    }
                    let b = self.take(n)?;
                    let mut v: i64 = 0;
                    for (i, &x) in b.iter().enumerate() {
                        v |= i64::from(x) << (8 * i);
                    }
                    // Two's complement of n bytes: sign-extend.
                    if (1..8).contains(&n) && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.push(Value::Int(v))?;
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.le()?);
                    self.push(Value::Float(v))?;
                }
                b'X' | 0x8c | 0x8d => {
                    let width = match op {
                        b'X' => 4,
                        0x8c => 1,
                        _ => 8,
                    };
                    let n = self.len(width)?;
                    let s = std::str::from_utf8(self.take(n)?)
                        .map_err(|e| format!("a string that is not UTF-8 ({e})"))?;
                    let s: Rc<str> = Rc::from(s);
                    self.push(Value::Str(s))?;
                }
                b'B' | b'C' | 0x8e | 0x96 | b'T' | b'U' => {
                    let width = match op {
                        b'C' | b'U' => 1,
                        b'B' | b'T' => 4,
                        _ => 8,
                    };
                    let n = self.len(width)?;
                    let b: Rc<[u8]> = Rc::from(self.take(n)?);
                    self.push(Value::Bytes(b))?;
                }
                b')' => self.push(Value::Tuple(new_items(Vec::new())))?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(new_items(items)))?;
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    if self.stack.len() < n {
                        return Err("the pickle builds a tuple from too few values".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    if items.iter().any(|v| matches!(v, Value::Mark)) {
                        return Err("the pickle puts a mark in a tuple".into());
                    }
                    self.push(Value::Tuple(new_items(items)))?;
                }
                b']' | 0x8f => self.push(Value::List(new_items(Vec::new())))?,
                b'l' | 0x91 => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(new_items(items)))?;
                }
                b'a' => {
                    let v = self.pop()?;
                    self.extend_top(vec![v])?;
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark()?;
                    self.extend_top(items)?;
                }
                b'}' => self.push(Value::Dict(new_items(Vec::new())))?,
                b'd' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Dict(new_items(Vec::new())))?;
                    self.set_items(items)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(&module, &name)?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module.as_str(), name.as_str()) {
                        (Some(m), Some(n)) => {
                            let (m, n) = (m.to_string(), n.to_string());
                            self.global(&m, &n)?;
                        }
                        _ => return Err("STACK_GLOBAL without a module and a name".into()),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = call(&callable, &args)?;
                    self.push(v)?;
                }
                0x81 => {
                    let args = self.pop()?;
                    let class = self.pop()?;
                    match class {
                        Value::Global(Global::OrderedDict) => {
                            let v = call(&class, &args)?;
                            self.push(v)?;
                        }
                        other => {
                            return Err(format!(
                                "the pickle creates an object of {} (only tensors, storages and \
                                 plain containers are read)",
                                other.kind()
                            ));
                        }
                    }
                }
                0x92 => return Err("the pickle creates an object with NEWOBJ_EX: refused".into()),
                b'b' => {
                    let _state = self.pop()?;
                    match self.top()? {
                        // An OrderedDict's attributes (a state dict's `_metadata`) and a
                        // tensor's Python attributes carry no weights.
                        Value::Dict(_) | Value::Tensor(_) => {}
                        other => {
                            return Err(format!(
                                "the pickle sets the state of {} (only a dict's or a tensor's)",
                                other.kind()
                            ));
                        }
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = persistent(&pid)?;
                    self.push(v)?;
                }
                b'q' => {
                    let k = self.u8()?;
                    self.memo_put(u32::from(k))?;
                }
                b'r' => {
                    let k = u32::from_le_bytes(self.le()?);
                    self.memo_put(k)?;
                }
                0x94 => {
                    let k = u32::try_from(self.memo.len()).unwrap_or(u32::MAX);
                    self.memo_put(k)?;
                }
                b'h' => {
                    let k = self.u8()?;
                    self.memo_get(u32::from(k))?;
                }
                b'j' => {
                    let k = u32::from_le_bytes(self.le()?);
                    self.memo_get(k)?;
                }
                b'i' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    return Err(refused(&module, &name));
                }
                b'o' => {
                    return Err(
                        "the pickle creates an object (OBJ): refused, only tensors, storages and \
                         plain containers are read"
                            .into(),
                    );
                }
                0x82..=0x84 => {
                    return Err("the pickle names an object from the copyreg extension \
                                registry: refused"
                        .into());
                }
                0x97 | 0x98 => {
                    return Err("the pickle uses out-of-band buffers (protocol 5): not read".into());
                }
                b'I' | b'L' | b'S' | b'V' | b'F' | b'g' | b'p' | b'P' => {
                    return Err(format!(
                        "opcode `{}` of the text protocol 0 at byte {}: PyTorch writes protocol \
                         2; re-save with torch.save",
                        op as char,
                        self.at - 1
                    ));
                }
                other => {
                    return Err(format!(
                        "unknown pickle opcode 0x{other:02x} at byte {}",
                        self.at - 1
                    ));
                }
            }
        }
    }
}

fn refused(module: &str, name: &str) -> String {
    let hint = if module.starts_with("__torch__") {
        " (a TorchScript module: save its state_dict() instead)"
    } else if module.starts_with("torch") {
        " (not a part of a state dict this reader knows)"
    } else {
        " (save the model's state_dict() alone: torch.save(model.state_dict(), path))"
    };
    format!(
        "the pickle refers to `{module}.{name}`, which is not a tensor, storage or plain \
         container: refused, never run{hint}"
    )
}

fn tuple_items(args: &Value, what: &str) -> Result<Vec<Value>, String> {
    match args {
        Value::Tuple(_) => Ok(args.items().map(|i| i.clone()).unwrap_or_default()),
        other => Err(format!("{what} takes a tuple, got {}", other.kind())),
    }
}

/// The dims of a `torch.Size` or stride tuple.
fn dims(v: &Value, what: &str) -> Result<Vec<usize>, String> {
    let items = match v {
        Value::Tuple(_) | Value::List(_) => v.items().map(|i| i.clone()).unwrap_or_default(),
        other => return Err(format!("{what} is {}, expected a tuple", other.kind())),
    };
    if items.len() > MAX_DIMS {
        return Err(format!(
            "{what} has {} dimensions (at most {MAX_DIMS})",
            items.len()
        ));
    }
    items.iter().map(|d| d.as_usize(what)).collect()
}

/// Calls one of the allowed globals, interpreted here.
fn call(callable: &Value, args: &Value) -> Result<Value, String> {
    let g = match callable {
        Value::Global(g) => g,
        other => return Err(format!("the pickle calls {}", other.kind())),
    };
    let args = tuple_items(args, "a call")?;
    match g {
        Global::OrderedDict => {
            let dict = Value::Dict(new_items(Vec::new()));
            if let Some(pairs) = args.first() {
                let items = pairs
                    .items()
                    .ok_or("OrderedDict() takes a list of pairs".to_string())?;
                let mut flat = Vec::new();
                for p in items.iter() {
                    let pair = p
                        .items()
                        .filter(|i| i.len() == 2)
                        .ok_or("OrderedDict() takes (key, value) pairs".to_string())?;
                    flat.extend(pair.iter().cloned());
                }
                if let Value::Dict(i) = &dict {
                    i.0.borrow_mut().extend(flat);
                }
            }
            Ok(dict)
        }
        Global::RebuildTensor => rebuild_tensor(&args),
        Global::RebuildParameter => match args.first() {
            Some(t @ Value::Tensor(_)) => Ok(t.clone()),
            _ => Err("_rebuild_parameter takes a tensor".into()),
        },
        Global::RebuildFromType => {
            // (func, type, args, state): a tensor subclass rebuilt by `func`.
            match (args.first(), args.get(1), args.get(2)) {
                (
                    Some(func @ Value::Global(Global::RebuildTensor)),
                    Some(Value::Global(Global::TensorClass)),
                    Some(inner),
                ) => call(func, inner),
                _ => Err("_rebuild_from_type_v2 with another type than a tensor: refused".into()),
            }
        }
        Global::CodecsEncode => match (args.first(), args.get(1)) {
            (Some(Value::Str(s)), Some(Value::Str(enc)))
                if enc.as_ref() == "latin1" || enc.as_ref() == "latin-1" =>
            {
                let bytes: Option<Vec<u8>> =
                    s.chars().map(|c| u8::try_from(u32::from(c)).ok()).collect();
                bytes
                    .map(|b| Value::Bytes(Rc::from(b)))
                    .ok_or_else(|| "_codecs.encode of a character beyond latin-1".to_string())
            }
            _ => Err("_codecs.encode takes a string and `latin1`".into()),
        },
        Global::StorageClass(_) | Global::TensorClass => {
            Err("the pickle calls a tensor or storage class: refused".into())
        }
    }
}

/// `_rebuild_tensor_v2(storage, offset, size, stride, ...)`: a view checked to lie inside its
/// storage (checked arithmetic throughout).
fn rebuild_tensor(args: &[Value]) -> Result<Value, String> {
    let (Some(Value::Storage(storage)), Some(offset), Some(size), Some(stride)) =
        (args.first(), args.get(1), args.get(2), args.get(3))
    else {
        return Err("_rebuild_tensor_v2 takes (storage, offset, size, stride, ...)".into());
    };
    let offset = offset.as_usize("a tensor's storage offset")?;
    let shape = dims(size, "a tensor's size")?;
    let stride = dims(stride, "a tensor's stride")?;
    if shape.len() != stride.len() {
        return Err(format!(
            "a tensor of size {shape:?} has stride {stride:?} (another length)"
        ));
    }
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= MAX_TENSOR_ELEMENTS)
        .ok_or_else(|| {
            format!("a tensor of size {shape:?} is beyond {MAX_TENSOR_ELEMENTS} elements")
        })?;
    if numel > 0 {
        let last = shape.iter().zip(&stride).try_fold(offset, |a, (&d, &s)| {
            (d - 1).checked_mul(s).and_then(|x| a.checked_add(x))
        });
        if last.is_none_or(|l| l >= storage.numel) {
            return Err(format!(
                "a tensor of size {shape:?}, stride {stride:?} at offset {offset} reaches past its \
                 storage `{}` of {} elements",
                storage.key, storage.numel
            ));
        }
    }
    Ok(Value::Tensor(Rc::new(TensorRef {
        storage: storage.clone(),
        offset,
        shape,
        stride,
    })))
}

/// A persistent id: PyTorch's `('storage', class, key, location, numel)`.
fn persistent(pid: &Value) -> Result<Value, String> {
    let items = tuple_items(pid, "a persistent id")?;
    match items.as_slice() {
        [
            Value::Str(tag),
            Value::Global(Global::StorageClass(dtype)),
            Value::Str(key),
            Value::Str(_location),
            numel,
        ] if tag.as_ref() == "storage" => {
            let numel = numel.as_usize("a storage's size")?;
            if key.is_empty()
                || key.len() > 64
                || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(format!(
                    "a storage key `{}` is not a plain record name",
                    key.chars().take(40).collect::<String>()
                ));
            }
            Ok(Value::Storage(Rc::new(StorageRef {
                key: key.to_string(),
                dtype: *dtype,
                numel,
            })))
        }
        _ => Err("a persistent id that is not a PyTorch storage: refused".into()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A pickle of `{"w": tensor}` as torch.save (protocol 2) writes it, for a float storage of
    /// 6 elements viewed as [2, 3].
    pub(crate) fn state_dict_pickle(size: &[u8], stride: &[u8], numel: u8) -> Vec<u8> {
        let mut p = vec![0x80, 2];
        p.extend(b"ccollections\nOrderedDict\nq\x00)Rq\x01X\x01\x00\x00\x00wq\x02");
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\nq\x03(");
        p.extend(b"(X\x07\x00\x00\x00storageq\x04ctorch\nFloatStorage\nq\x05");
        p.extend(b"X\x01\x00\x00\x000q\x06X\x03\x00\x00\x00cpuq\x07K");
        p.push(numel);
        p.extend(b"tq\x08QK\x00");
        p.extend(size);
        p.extend(stride);
        p.extend(b"\x89ccollections\nOrderedDict\nq\x09)Rq\x0atq\x0bRq\x0cs}q\x0db.");
        p
    }

    #[test]
    fn a_state_dict_pickle_reads_as_its_tensors() {
        let p = state_dict_pickle(b"K\x02K\x03\x86", b"K\x03K\x01\x86", 6);
        let v = unpickle(&p).unwrap();
        let pairs = v.dict_pairs().unwrap();
        assert_eq!(pairs.len(), 1);
        assert_eq!(pairs[0].0.as_str(), Some("w"));
        let Value::Tensor(t) = &pairs[0].1 else {
            panic!("not a tensor: {:?}", pairs[0].1)
        };
        assert_eq!(
            (t.shape.as_slice(), t.stride.as_slice()),
            (&[2, 3][..], &[3, 1][..])
        );
        assert!(t.is_contiguous());
        assert_eq!(t.storage.dtype, StorageDtype::F32);
        // A view past its storage's end is refused.
        let p = state_dict_pickle(b"K\x02K\x03\x86", b"K\x03K\x01\x86", 5);
        assert!(
            unpickle(&p)
                .unwrap_err()
                .contains("reaches past its storage")
        );
    }

    #[test]
    fn code_is_refused_by_name_and_never_run() {
        // pickle.dumps of os.system("touch pwned"), protocol 2.
        let p = b"\x80\x02cposix\nsystem\nq\x00X\x0b\x00\x00\x00touch pwnedq\x01\x85q\x02Rq\x03.";
        let e = unpickle(p).unwrap_err();
        assert!(e.contains("`posix.system`") && e.contains("refused"), "{e}");
        // Protocol 4's STACK_GLOBAL of builtins.eval.
        let p = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93\x8c\x011\x85R.";
        assert!(unpickle(p).unwrap_err().contains("`builtins.eval`"));
        // A model class.
        let p = b"\x80\x02c__main__\nNet\nq\x00)\x81q\x01.";
        assert!(unpickle(p).unwrap_err().contains("`__main__.Net`"));
    }

    #[test]
    fn hostile_pickles_are_errors_within_bounds() {
        // A string claiming 4 GB.
        let e = unpickle(b"\x80\x02X\xff\xff\xff\xff").unwrap_err();
        assert!(e.contains("runs past the pickle's end"), "{e}");
        // A list nested a million deep, built with MARK ... LIST, is dropped without recursion.
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b'(', 1_000_000));
        p.extend(std::iter::repeat_n(b'l', 1_000_000));
        p.push(b'.');
        assert!(matches!(unpickle(&p), Ok(Value::List(_))));
        // Memo references share, never copy: 2^20 references to one big string.
        let mut p = vec![0x80, 2, b'X'];
        p.extend((1u32 << 20).to_le_bytes());
        p.extend(vec![b'a'; 1 << 20]);
        p.extend(b"q\x00(");
        for _ in 0..100_000 {
            p.extend(b"h\x00");
        }
        p.extend(b"l.");
        assert!(unpickle(&p).is_ok());
        // Truncated, empty, unknown opcodes, a mark in the wrong place.
        for bad in [
            &b""[..],
            b"\x80",
            b"\x80\x02",
            b"\x80\x02\xff",
            b"\x80\x02(.",
            b"\x80\x09N.",
        ] {
            assert!(unpickle(bad).is_err(), "{bad:?}");
        }
    }
}
