//! A restricted reader of the pickles inside PyTorch's `torch.save` archives.
//!
//! A pickle is a program for a small stack machine, and Python's unpickler calls any
//! function a pickle names: loading an untrusted `.pt` file with `torch.load` (without
//! `weights_only=True`) runs whatever code its author put there. This reader runs no
//! code. It interprets the opcodes of protocols 2–5 itself and knows a short list of
//! callables by name — the ones a state dict needs (`collections.OrderedDict`,
//! `torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`, the `torch.*Storage`
//! types, `torch.device`, `torch.Size`, `_codecs.encode`) — which it evaluates as
//! data constructors. A pickle that names anything else is refused at that opcode,
//! with the name in the error, before any later opcode is read; the opcodes that
//! build arbitrary objects (`INST`, `OBJ`, the extension registry) are refused too.
//!
//! Bad input is an error, never a panic: every length is checked against the bytes
//! left, nesting is bounded ([`MAX_DEPTH`]) and so is the number of values a pickle
//! may build ([`MAX_NODES`], memo copies included).

use std::collections::HashMap;
use std::fmt;

/// Deepest nesting of containers accepted (a state dict needs about 4).
pub const MAX_DEPTH: usize = 64;

/// Most values a pickle may build, memo copies included (a WRN-70-16 state dict
/// needs about 20,000).
pub const MAX_NODES: usize = 4_000_000;

/// Why a pickle was not read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PickleError {
    /// The pickle names a callable outside the allowed list: `module.name`.
    Refused(String),
    /// The bytes are not a pickle this reader understands.
    Malformed {
        /// Byte offset of the opcode.
        offset: usize,
        /// What is wrong.
        message: String,
    },
}

impl fmt::Display for PickleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PickleError::Refused(name) => write!(
                f,
                "the pickle calls `{name}`, which is not part of a state dict; refused (this reader never runs code from a file)"
            ),
            PickleError::Malformed { offset, message } => {
                write!(f, "malformed pickle at byte {offset}: {message}")
            }
        }
    }
}

impl std::error::Error for PickleError {}

type Result<T> = std::result::Result<T, PickleError>;

/// The element type of a `torch.*Storage`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageType {
    /// `DoubleStorage`.
    F64,
    /// `FloatStorage`.
    F32,
    /// `HalfStorage`.
    F16,
    /// `BFloat16Storage`.
    BF16,
    /// `LongStorage`.
    I64,
    /// `IntStorage`.
    I32,
    /// `ShortStorage`.
    I16,
    /// `CharStorage`.
    I8,
    /// `ByteStorage`.
    U8,
    /// `BoolStorage`.
    Bool,
}

/// The `torch.*Storage` class of each element type.
const STORAGE_CLASSES: [(&str, StorageType); 10] = [
    ("DoubleStorage", StorageType::F64),
    ("FloatStorage", StorageType::F32),
    ("HalfStorage", StorageType::F16),
    ("BFloat16Storage", StorageType::BF16),
    ("LongStorage", StorageType::I64),
    ("IntStorage", StorageType::I32),
    ("ShortStorage", StorageType::I16),
    ("CharStorage", StorageType::I8),
    ("ByteStorage", StorageType::U8),
    ("BoolStorage", StorageType::Bool),
];

impl StorageType {
    fn from_class(name: &str) -> Option<Self> {
        STORAGE_CLASSES
            .iter()
            .find(|(class, _)| *class == name)
            .map(|(_, t)| *t)
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }
}

/// A tensor as the pickle describes it: which storage holds its values and how to
/// read them. The values themselves are in the archive, beside the pickle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorRef {
    /// The storage's key: the archive entry `data/<key>`.
    pub key: String,
    /// Element type.
    pub dtype: StorageType,
    /// Elements in the storage.
    pub storage_len: usize,
    /// Offset of the first element, in elements.
    pub offset: usize,
    /// Shape.
    pub shape: Vec<usize>,
    /// Strides, in elements.
    pub stride: Vec<usize>,
}

/// The callables this reader evaluates (as data constructors).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Callable {
    /// `collections.OrderedDict`.
    OrderedDict,
    /// `torch._utils._rebuild_tensor_v2`.
    RebuildTensor,
    /// `torch._utils._rebuild_parameter` and `_rebuild_parameter_with_state`.
    RebuildParameter,
    /// A `torch.*Storage` type (named in persistent ids, never called).
    Storage(StorageType),
    /// `torch.device`.
    Device,
    /// `torch.Size`.
    Size,
    /// `_codecs.encode` (how protocol 2 writes `bytes`).
    Encode,
}

impl Callable {
    fn resolve(module: &str, name: &str) -> Option<Self> {
        Some(match (module, name) {
            ("collections", "OrderedDict") => Self::OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2") => Self::RebuildTensor,
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                Self::RebuildParameter
            }
            ("torch", "device") => Self::Device,
            ("torch", "Size") => Self::Size,
            ("_codecs", "encode") => Self::Encode,
            ("torch", storage) => Self::Storage(StorageType::from_class(storage)?),
            _ => return None,
        })
    }
}

/// A value a pickle built.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `None`.
    None,
    /// A boolean.
    Bool(bool),
    /// An integer (at most 64 bits).
    Int(i64),
    /// A float.
    Float(f64),
    /// A string.
    Str(String),
    /// Bytes.
    Bytes(Vec<u8>),
    /// A tuple.
    Tuple(Vec<Value>),
    /// A list.
    List(Vec<Value>),
    /// A dict (or `OrderedDict`), in insertion order.
    Dict(Vec<(Value, Value)>),
    /// A tensor.
    Tensor(TensorRef),
    /// A storage named by a persistent id: (type, key, elements).
    Storage(StorageType, String, usize),
    /// A device, by name.
    Device(String),
    /// One of the known callables, not yet called.
    Callable(Callable),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Tensor(_) => "tensor",
            Value::Storage(..) => "storage",
            Value::Device(_) => "device",
            Value::Callable(_) => "callable",
        }
    }
}

/// A stack entry: a value with its nesting depth and size in values, or a mark.
#[derive(Clone, Debug)]
enum Item {
    Value {
        value: Value,
        depth: usize,
        nodes: usize,
    },
    Mark,
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being run, for errors.
    at: usize,
    stack: Vec<Item>,
    memo: HashMap<u64, Item>,
    nodes: usize,
}

/// Reads the pickle `data` (the `data.pkl` of a `torch.save` archive) into a
/// [`Value`], refusing any callable outside the allowed list.
pub fn read(data: &[u8]) -> Result<Value> {
    let mut m = Machine {
        data,
        pos: 0,
        at: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
        nodes: 0,
    };
    m.run()
}

impl<'a> Machine<'a> {
    fn err<T>(&self, message: impl Into<String>) -> Result<T> {
        Err(PickleError::Malformed {
            offset: self.at,
            message: message.into(),
        })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let data: &'a [u8] = self.data;
        match self.pos.checked_add(n).filter(|&end| end <= data.len()) {
            Some(end) => {
                let s = &data[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => self.err(format!(
                "needs {n} more bytes, {} left",
                data.len() - self.pos
            )),
        }
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn le<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            return self.err("a name without its newline");
        };
        let s = std::str::from_utf8(&rest[..end]).map_err(|_| PickleError::Malformed {
            offset: self.at,
            message: "a name that is not UTF-8".into(),
        })?;
        self.pos += end + 1;
        Ok(s.to_string())
    }

    fn string(&mut self, len: u64) -> Result<String> {
        let len = usize::try_from(len).or_else(|_| self.err("string too long"))?;
        let bytes = self.take(len)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_string()),
            Err(_) => self.err("a string that is not UTF-8"),
        }
    }

    fn bytes(&mut self, len: u64) -> Result<Vec<u8>> {
        let len = usize::try_from(len).or_else(|_| self.err("bytes too long"))?;
        Ok(self.take(len)?.to_vec())
    }

    /// Pushes a value built from children of the given depth and size.
    fn push_built(&mut self, value: Value, child_depth: usize, child_nodes: usize) -> Result<()> {
        let depth = child_depth + 1;
        if depth > MAX_DEPTH {
            return self.err(format!("nesting deeper than {MAX_DEPTH}"));
        }
        let nodes = child_nodes + 1;
        self.count(1)?;
        self.stack.push(Item::Value {
            value,
            depth,
            nodes,
        });
        Ok(())
    }

    fn push(&mut self, value: Value) -> Result<()> {
        self.push_built(value, 0, 0)
    }

    fn count(&mut self, n: usize) -> Result<()> {
        self.nodes = self.nodes.saturating_add(n);
        if self.nodes > MAX_NODES {
            return self.err(format!("builds more than {MAX_NODES} values"));
        }
        Ok(())
    }

    fn pop_item(&mut self) -> Result<Item> {
        match self.stack.pop() {
            Some(item) => Ok(item),
            None => self.err("pops an empty stack"),
        }
    }

    /// Pops a value with its depth and size.
    fn pop(&mut self) -> Result<(Value, usize, usize)> {
        match self.pop_item()? {
            Item::Value {
                value,
                depth,
                nodes,
            } => Ok((value, depth, nodes)),
            Item::Mark => self.err("finds a mark where a value belongs"),
        }
    }

    /// Pops everything down to the last mark: values in order, max depth, total size.
    fn pop_to_mark(&mut self) -> Result<(Vec<Value>, usize, usize)> {
        let Some(mark) = self.stack.iter().rposition(|i| matches!(i, Item::Mark)) else {
            return self.err("no mark to pop to");
        };
        let (mut values, mut depth, mut nodes) = (Vec::new(), 0, 0);
        for item in self.stack.drain(mark + 1..) {
            if let Item::Value {
                value,
                depth: d,
                nodes: n,
            } = item
            {
                values.push(value);
                depth = depth.max(d);
                nodes += n;
            }
        }
        self.stack.pop();
        Ok((values, depth, nodes))
    }

    fn top_mut(&mut self) -> Result<(&mut Value, &mut usize, &mut usize)> {
        match self.stack.last_mut() {
            Some(Item::Value {
                value,
                depth,
                nodes,
            }) => Ok((value, depth, nodes)),
            _ => Err(PickleError::Malformed {
                offset: self.at,
                message: "no value on the stack to add to".into(),
            }),
        }
    }

    /// Adds `items` to the list (APPEND/APPENDS) or dict (SETITEM/SETITEMS) on top.
    fn extend_top(&mut self, items: Vec<Value>, depth: usize, nodes: usize) -> Result<()> {
        let at = self.at;
        let (top, top_depth, top_nodes) = self.top_mut()?;
        match top {
            Value::List(list) => list.extend(items),
            Value::Dict(dict) => {
                if !items.len().is_multiple_of(2) {
                    return Err(PickleError::Malformed {
                        offset: at,
                        message: "a dict item without its value".into(),
                    });
                }
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    dict.push((k, v));
                }
            }
            other => {
                return Err(PickleError::Malformed {
                    offset: at,
                    message: format!("adds items to a {}", other.kind()),
                })
            }
        }
        *top_depth = (*top_depth).max(depth + 1);
        *top_nodes += nodes;
        if *top_depth > MAX_DEPTH {
            return self.err(format!("nesting deeper than {MAX_DEPTH}"));
        }
        Ok(())
    }

    fn memo_put(&mut self, key: u64) -> Result<()> {
        match self.stack.last() {
            Some(item @ Item::Value { nodes, .. }) => {
                let (item, nodes) = (item.clone(), *nodes);
                // The copy counts like any value built, so that memoizing a large
                // value over and over cannot exhaust memory.
                self.count(nodes)?;
                self.memo.insert(key, item);
                Ok(())
            }
            _ => self.err("memoizes a mark or an empty stack"),
        }
    }

    fn memo_get(&mut self, key: u64) -> Result<()> {
        let Some(item) = self.memo.get(&key).cloned() else {
            return self.err(format!("memo entry {key} missing"));
        };
        if let Item::Value { nodes, .. } = &item {
            self.count(*nodes)?;
        }
        self.stack.push(item);
        Ok(())
    }

    fn global(&mut self, module: &str, name: &str) -> Result<()> {
        match Callable::resolve(module, name) {
            Some(c) => self.push(Value::Callable(c)),
            None => Err(PickleError::Refused(format!("{module}.{name}"))),
        }
    }

    fn run(&mut self) -> Result<Value> {
        loop {
            self.at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return self.err(format!("unknown protocol {proto}"));
                    }
                }
                0x95 => {
                    self.le::<8>()?; // FRAME: a length hint.
                }
                b'c' => {
                    let (module, name) = (self.line()?, self.line()?);
                    self.global(&module, &name)?;
                }
                0x93 => {
                    let (name, _, _) = self.pop()?;
                    let (module, _, _) = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        return self.err("STACK_GLOBAL without two strings");
                    };
                    self.global(&module, &name)?;
                }
                b'q' => {
                    let k = self.u8()?;
                    self.memo_put(u64::from(k))?;
                }
                b'r' => {
                    let k = u32::from_le_bytes(self.le()?);
                    self.memo_put(u64::from(k))?;
                }
                0x94 => {
                    let k = self.memo.len() as u64;
                    self.memo_put(k)?;
                }
                b'h' => {
                    let k = self.u8()?;
                    self.memo_get(u64::from(k))?;
                }
                b'j' => {
                    let k = u32::from_le_bytes(self.le()?);
                    self.memo_get(u64::from(k))?;
                }
                b'(' => self.stack.push(Item::Mark),
                b')' => self.push(Value::Tuple(Vec::new()))?,
                b't' => {
                    let (v, d, n) = self.pop_to_mark()?;
                    self.push_built(Value::Tuple(v), d, n)?;
                }
                0x85..=0x87 => {
                    let k = usize::from(op - 0x84);
                    let (mut v, mut d, mut n) = (Vec::with_capacity(k), 0, 0);
                    for _ in 0..k {
                        let (x, xd, xn) = self.pop()?;
                        v.push(x);
                        d = d.max(xd);
                        n += xn;
                    }
                    v.reverse();
                    self.push_built(Value::Tuple(v), d, n)?;
                }
                b'}' => self.push(Value::Dict(Vec::new()))?,
                b'd' => {
                    let (v, d, n) = self.pop_to_mark()?;
                    self.push(Value::Dict(Vec::new()))?;
                    self.extend_top(v, d, n)?;
                }
                b's' => {
                    let (v, vd, vn) = self.pop()?;
                    let (k, kd, kn) = self.pop()?;
                    self.extend_top(vec![k, v], kd.max(vd), kn + vn)?;
                }
                b'u' | b'e' => {
                    let (v, d, n) = self.pop_to_mark()?;
                    self.extend_top(v, d, n)?;
                }
                b']' => self.push(Value::List(Vec::new()))?,
                b'l' => {
                    let (v, d, n) = self.pop_to_mark()?;
                    self.push_built(Value::List(v), d, n)?;
                }
                b'a' => {
                    let (v, d, n) = self.pop()?;
                    self.extend_top(vec![v], d, n)?;
                }
                b'X' => {
                    let len = u32::from_le_bytes(self.le()?);
                    let s = self.string(u64::from(len))?;
                    self.push(Value::Str(s))?;
                }
                0x8c => {
                    let len = self.u8()?;
                    let s = self.string(u64::from(len))?;
                    self.push(Value::Str(s))?;
                }
                0x8d => {
                    let len = u64::from_le_bytes(self.le()?);
                    let s = self.string(len)?;
                    self.push(Value::Str(s))?;
                }
                b'B' => {
                    let len = u32::from_le_bytes(self.le()?);
                    let b = self.bytes(u64::from(len))?;
                    self.push(Value::Bytes(b))?;
                }
                b'C' => {
                    let len = self.u8()?;
                    let b = self.bytes(u64::from(len))?;
                    self.push(Value::Bytes(b))?;
                }
                0x8e => {
                    let len = u64::from_le_bytes(self.le()?);
                    let b = self.bytes(len)?;
                    self.push(Value::Bytes(b))?;
                }
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
                0x8a => {
                    let n = usize::from(self.u8()?);
                    if n > 8 {
                        return self.err(format!("an integer of {n} bytes"));
                    }
                    let bytes = self.take(n)?;
                    let mut buf = if bytes.last().is_some_and(|b| b & 0x80 != 0) {
                        [0xffu8; 8]
                    } else {
                        [0u8; 8]
                    };
                    buf[..n].copy_from_slice(bytes);
                    self.push(Value::Int(i64::from_le_bytes(buf)))?;
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.le()?);
                    self.push(Value::Float(v))?;
                }
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'N' => self.push(Value::None)?,
                b'Q' => {
                    let (pid, _, _) = self.pop()?;
                    let storage = self.persistent(pid)?;
                    self.push(storage)?;
                }
                b'R' => {
                    let (args, ad, an) = self.pop()?;
                    let (callable, _, _) = self.pop()?;
                    let value = self.call(callable, args)?;
                    self.push_built(value, ad, an)?;
                }
                0x81 => {
                    let (_args, ad, an) = self.pop()?;
                    let (class, _, _) = self.pop()?;
                    match class {
                        Value::Callable(Callable::OrderedDict) => {
                            self.push_built(Value::Dict(Vec::new()), ad, an)?
                        }
                        other => return self.err(format!("NEWOBJ of a {}", other.kind())),
                    }
                }
                b'b' => {
                    // BUILD sets attributes (an OrderedDict's `_metadata`, a
                    // parameter's state): they carry no weights and are dropped.
                    let _state = self.pop()?;
                    let at = self.at;
                    let (top, _, _) = self.top_mut()?;
                    if !matches!(top, Value::Dict(_) | Value::Tensor(_)) {
                        return Err(PickleError::Malformed {
                            offset: at,
                            message: format!("BUILD on a {}", top.kind()),
                        });
                    }
                }
                b'0' => {
                    self.pop_item()?;
                }
                b'1' => {
                    self.pop_to_mark()?;
                }
                b'2' => match self.stack.last().cloned() {
                    Some(item @ Item::Value { .. }) => {
                        if let Item::Value { nodes, .. } = &item {
                            self.count(*nodes)?;
                        }
                        self.stack.push(item);
                    }
                    _ => return self.err("DUP of a mark or an empty stack"),
                },
                b'.' => {
                    let (value, _, _) = self.pop()?;
                    return Ok(value);
                }
                b'i' | b'o' | 0x82..=0x84 => {
                    return self.err(format!(
                        "opcode 0x{op:02x} builds arbitrary objects; refused"
                    ))
                }
                other => return self.err(format!("unsupported opcode 0x{other:02x}")),
            }
        }
    }

    /// A persistent id `('storage', StorageType, key, location, numel)`.
    fn persistent(&self, pid: Value) -> Result<Value> {
        let Value::Tuple(parts) = pid else {
            return self.err("a persistent id that is not a tuple");
        };
        match parts.as_slice() {
            [Value::Str(tag), Value::Callable(Callable::Storage(t)), Value::Str(key), _, Value::Int(n)]
                if tag == "storage" && *n >= 0 =>
            {
                Ok(Value::Storage(*t, key.clone(), *n as usize))
            }
            _ => self.err("a persistent id that is not ('storage', type, key, location, size)"),
        }
    }

    fn call(&self, callable: Value, args: Value) -> Result<Value> {
        let Value::Callable(c) = callable else {
            return self.err(format!("calls a {}", callable.kind()));
        };
        let Value::Tuple(args) = args else {
            return self.err("call arguments that are not a tuple");
        };
        match c {
            Callable::OrderedDict => match args.as_slice() {
                [] => Ok(Value::Dict(Vec::new())),
                _ => self.err("OrderedDict with arguments"),
            },
            Callable::RebuildTensor => self.rebuild_tensor(args),
            Callable::RebuildParameter => match args.into_iter().next() {
                Some(t @ Value::Tensor(_)) => Ok(t),
                _ => self.err("_rebuild_parameter without a tensor"),
            },
            Callable::Device => match args.into_iter().next() {
                Some(Value::Str(d)) => Ok(Value::Device(d)),
                _ => self.err("torch.device without a name"),
            },
            Callable::Size => match args.into_iter().next() {
                Some(t @ Value::Tuple(_)) => Ok(t),
                _ => self.err("torch.Size without a tuple"),
            },
            Callable::Encode => match args.as_slice() {
                [Value::Str(s), Value::Str(enc)] if enc == "latin1" => {
                    let bytes: Option<Vec<u8>> =
                        s.chars().map(|c| u8::try_from(u32::from(c)).ok()).collect();
                    match bytes {
                        Some(b) => Ok(Value::Bytes(b)),
                        None => self.err("latin1 text outside latin1"),
                    }
                }
                _ => self.err("_codecs.encode other than (str, 'latin1')"),
            },
            Callable::Storage(_) => self.err("calls a storage type"),
        }
    }

    /// `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, …)`.
    fn rebuild_tensor(&self, args: Vec<Value>) -> Result<Value> {
        let dims = |v: &Value| -> Option<Vec<usize>> {
            match v {
                Value::Tuple(xs) => xs
                    .iter()
                    .map(|x| match x {
                        Value::Int(i) => usize::try_from(*i).ok(),
                        _ => None,
                    })
                    .collect(),
                _ => None,
            }
        };
        match args.as_slice() {
            [Value::Storage(dtype, key, len), Value::Int(offset), size, stride, ..] => {
                let (Some(shape), Some(stride), Ok(offset)) =
                    (dims(size), dims(stride), usize::try_from(*offset))
                else {
                    return self.err("tensor size, stride or offset are not non-negative integers");
                };
                if shape.len() != stride.len() {
                    return self.err("tensor size and stride of different ranks");
                }
                Ok(Value::Tensor(TensorRef {
                    key: key.clone(),
                    dtype: *dtype,
                    storage_len: *len,
                    offset,
                    shape,
                    stride,
                }))
            }
            _ => self.err("_rebuild_tensor_v2 without (storage, offset, size, stride)"),
        }
    }
}
