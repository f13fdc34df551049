//! GGUF container reader: header, metadata and tensor index.
//!
//! The header is read with plain buffered reads, never by mapping the whole
//! file: a node that serves layers 20..30 should not fault in the pages of
//! layers 0..20. Tensor bytes are mapped later, per range, with
//! [`GgufFile::map_span`].
//!
//! Every length read from the file is checked against the file's size before
//! anything is allocated, so a corrupt or hostile header gives an error, not
//! an out-of-memory abort.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use crate::ggml::GgmlType;

/// `GGUF` as a little-endian u32.
const GGUF_MAGIC: u32 = 0x4655_4747;
/// The default data alignment when `general.alignment` is absent (GGUF spec).
const DEFAULT_ALIGNMENT: u64 = 32;
/// Tensors per file. The largest public GGUFs (MoE with per-expert tensors)
/// have a few thousand; this bounds the index allocation.
pub const MAX_TENSORS: u64 = 1 << 20;
/// Metadata entries per file; real files have tens to a few hundred.
pub const MAX_METADATA_ENTRIES: u64 = 1 << 16;
/// Dimensions per tensor (ggml's GGML_MAX_DIMS).
pub const MAX_DIMS: u32 = 4;
/// Nesting depth of metadata arrays; GGUF writers never nest more than once.
const MAX_ARRAY_DEPTH: u32 = 4;

/// What went wrong reading a GGUF file. Each variant names the file, so the
/// one line a user sees says which file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file does not start with the GGUF magic.
    #[error("{path}: not a GGUF file (magic bytes {found:02x?})")]
    NotGguf {
        /// The file.
        path: PathBuf,
        /// The first four bytes found.
        found: [u8; 4],
    },
    /// A GGUF version this reader does not understand.
    #[error("{path}: unsupported GGUF version {version} (supported: 2, 3)")]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version in the header.
        version: u32,
    },
    /// The file ends before the header or a tensor's data does.
    #[error("{path}: truncated GGUF file: {what}")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// What was being read when the file ended.
        what: String,
    },
    /// The header is structurally invalid (bad type tag, absurd count, ...).
    #[error("{path}: invalid GGUF header: {what}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is invalid.
        what: String,
    },
    /// A tensor uses a ggml type this build cannot run.
    #[error("{path}: tensor '{tensor}' has unsupported quantization type {type_id} ({name}); shoal runs F32, F16, BF16 (vectors), Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K")]
    UnsupportedType {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The raw ggml type id.
        type_id: u32,
        /// ggml's name for the type, or "unknown".
        name: &'static str,
    },
}

/// A metadata value, as typed in the file.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// u8
    U8(u8),
    /// i8
    I8(i8),
    /// u16
    U16(u16),
    /// i16
    I16(i16),
    /// u32
    U32(u32),
    /// i32
    I32(i32),
    /// u64
    U64(u64),
    /// i64
    I64(i64),
    /// f32
    F32(f32),
    /// f64
    F64(f64),
    /// bool
    Bool(bool),
    /// UTF-8 string (invalid UTF-8 is replaced, as llama.cpp tolerates it)
    String(String),
    /// Homogeneous array
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float (integers convert).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// One entry of the tensor index.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// The tensor's name, e.g. `blk.3.attn_q.weight`.
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the contiguous (innermost) one.
    pub dims: Vec<u64>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the file (not of the data section).
    pub offset: u64,
    /// Size of the data in bytes.
    pub size_bytes: u64,
}

impl TensorInfo {
    /// Where its bytes lie in the file.
    pub fn byte_range(&self) -> std::ops::Range<u64> {
        self.offset..self.offset + self.size_bytes
    }

    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF file: metadata and tensor index, with no tensor data loaded.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    version: u32,
    file_len: u64,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    tensor_index: BTreeMap<String, usize>,
}

impl GgufFile {
    /// Opens and parses the header of a GGUF file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| GgufError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let mut reader = HeaderReader {
            inner: BufReader::with_capacity(1 << 20, file),
            path: &path,
            pos: 0,
            file_len,
        };
        let (version, metadata, raw_tensors) = reader.header()?;
        let header_end = reader.pos;
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => return Err(reader.invalid(format!("general.alignment {v:?}"))),
            },
        };
        let data_start = header_end.div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(raw_tensors.len());
        let mut tensor_index = BTreeMap::new();
        for (name, dims, type_id, rel_offset) in raw_tensors {
            let ggml_type =
                GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnsupportedType {
                    path: path.clone(),
                    tensor: name.clone(),
                    type_id,
                    name: crate::ggml::type_name(type_id),
                })?;
            let info = tensor_info(&path, name, dims, ggml_type, data_start, rel_offset)?;
            let end = info.offset.checked_add(info.size_bytes);
            if end.is_none_or(|end| end > file_len) {
                return Err(GgufError::Truncated {
                    path,
                    what: format!(
                        "tensor '{}' needs {} bytes from offset {} but the file has {file_len}",
                        info.name, info.size_bytes, info.offset
                    ),
                });
            }
            if tensor_index
                .insert(info.name.clone(), tensors.len())
                .is_some()
            {
                return Err(GgufError::Invalid {
                    path,
                    what: format!("duplicate tensor name '{}'", info.name),
                });
            }
            tensors.push(info);
        }
        Ok(GgufFile {
            path,
            version,
            file_len,
            metadata,
            tensors,
            tensor_index,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The file's size in bytes.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// All metadata entries.
    pub fn metadata(&self) -> &BTreeMap<String, Value> {
        &self.metadata
    }

    /// One metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// All tensors, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// One tensor by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// Maps bytes `[start, end)` of the file read-only. The mapping is
    /// widened to page boundaries internally; the returned [`MappedSpan`]
    /// hides that.
    pub fn map_span(&self, start: u64, end: u64) -> Result<MappedSpan, GgufError> {
        assert!(
            start <= end && end <= self.file_len,
            "span outside the file"
        );
        let page = page_size();
        let map_start = start / page * page;
        let file = File::open(&self.path).map_err(|source| GgufError::Io {
            path: self.path.clone(),
            source,
        })?;
        let len = usize::try_from(end - map_start).expect("span fits in memory");
        // SAFETY: the file is opened read-only and shoal never writes model
        // files while serving them; a concurrent writer could change the
        // bytes under us, which is the usual caveat of mmap-based loaders
        // (llama.cpp and candle take the same one).
        let mmap = unsafe {
            memmap2::MmapOptions::new()
                .offset(map_start)
                .len(len)
                .map(&file)
        }
        .map_err(|source| GgufError::Io {
            path: self.path.clone(),
            source,
        })?;
        Ok(MappedSpan {
            mmap,
            file_offset: map_start,
        })
    }
}

/// A read-only mapping of part of a model file.
#[derive(Debug)]
pub struct MappedSpan {
    mmap: memmap2::Mmap,
    file_offset: u64,
}

impl MappedSpan {
    /// The bytes of a tensor, which must lie inside this span.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        let start = usize::try_from(info.offset - self.file_offset).expect("inside span");
        let end = start + usize::try_from(info.size_bytes).expect("inside span");
        &self.mmap[start..end]
    }

    /// All mapped bytes (used to fault the pages in ahead of the first token).
    pub fn as_bytes(&self) -> &[u8] {
        &self.mmap
    }

    /// Whether a tensor lies inside this span.
    pub fn contains(&self, info: &TensorInfo) -> bool {
        info.offset >= self.file_offset
            && info
                .offset
                .checked_add(info.size_bytes)
                .is_some_and(|end| end <= self.file_offset + self.mmap.len() as u64)
    }
}

fn page_size() -> u64 {
    // 64 KiB is a multiple of every page size in use (4 KiB x86, 16 KiB
    // Apple, 64 KiB some arm64 kernels) and of Windows' allocation
    // granularity, so aligning to it is always a valid mmap offset.
    64 * 1024
}

fn tensor_info(
    path: &Path,
    name: String,
    dims: Vec<u64>,
    ggml_type: GgmlType,
    data_start: u64,
    rel_offset: u64,
) -> Result<TensorInfo, GgufError> {
    let invalid = |what: String| GgufError::Invalid {
        path: path.to_path_buf(),
        what,
    };
    let elements = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| invalid(format!("tensor '{name}' dims {dims:?} overflow")))?;
    let block = ggml_type.block_elements();
    if dims.first().copied().unwrap_or(1) % block != 0 {
        return Err(invalid(format!(
            "tensor '{name}': row length {} is not a multiple of the {:?} block size {block}",
            dims[0], ggml_type
        )));
    }
    let size_bytes = elements / block * ggml_type.block_bytes();
    let offset = data_start
        .checked_add(rel_offset)
        .ok_or_else(|| invalid(format!("tensor '{name}' offset overflows")))?;
    Ok(TensorInfo {
        name,
        dims,
        ggml_type,
        offset,
        size_bytes,
    })
}

/// Most items reserved ahead from a count in the file.
const PREALLOC_ITEMS_MAX: usize = 4096;

type RawTensor = (String, Vec<u64>, u32, u64);
/// What the header holds before tensor offsets are resolved: version, metadata, tensors.
type RawHeader = (u32, BTreeMap<String, Value>, Vec<RawTensor>);

/// Sequential reader over the header, tracking the position for errors and
/// bounds-checking every length against the file size.
struct HeaderReader<'a> {
    inner: BufReader<File>,
    path: &'a Path,
    pos: u64,
    file_len: u64,
}

impl HeaderReader<'_> {
    fn header(&mut self) -> Result<RawHeader, GgufError> {
        let mut magic = [0u8; 4];
        self.bytes(&mut magic, "magic")?;
        if u32::from_le_bytes(magic) != GGUF_MAGIC {
            return Err(GgufError::NotGguf {
                path: self.path.to_path_buf(),
                found: magic,
            });
        }
        let version = self.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion {
                path: self.path.to_path_buf(),
                version,
            });
        }
        let n_tensors = self.count("tensor count", Some(MAX_TENSORS))?;
        let n_kv = self.count("metadata count", Some(MAX_METADATA_ENTRIES))?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = self.string("metadata key")?;
            let type_id = self.u32("metadata type")?;
            let value = self.value(type_id, &key, 0)?;
            metadata.insert(key, value);
        }
        let mut tensors = Vec::with_capacity((n_tensors as usize).min(PREALLOC_ITEMS_MAX));
        for _ in 0..n_tensors {
            let name = self.string("tensor name")?;
            let n_dims = self.u32("tensor rank")?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(self.invalid(format!("tensor '{name}' has {n_dims} dimensions")));
            }
            let dims = (0..n_dims)
                .map(|_| self.u64("tensor dims"))
                .collect::<Result<Vec<_>, _>>()?;
            let type_id = self.u32("tensor type")?;
            let offset = self.u64("tensor offset")?;
            tensors.push((name, dims, type_id, offset));
        }
        Ok((version, metadata, tensors))
    }

    fn value(&mut self, type_id: u32, key: &str, depth: u32) -> Result<Value, GgufError> {
        Ok(match type_id {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(self.array::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => Value::Bool(self.array::<1>(key)?[0] != 0),
            8 => Value::String(self.string(key)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.invalid(format!("'{key}': arrays nested too deep")));
                }
                let item_type = self.u32(key)?;
                let n = self.count(key, None)?;
                // The count is bounded by the bytes left, but an item in
                // memory is larger than its one byte in the file: grow as
                // items arrive instead of trusting the count up front.
                let mut items = Vec::with_capacity((n as usize).min(PREALLOC_ITEMS_MAX));
                for _ in 0..n {
                    items.push(self.value(item_type, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            other => return Err(self.invalid(format!("'{key}' has unknown value type {other}"))),
        })
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.count(what, None)?;
        let mut buf = vec![0u8; len as usize];
        self.bytes(&mut buf, what)?;
        Ok(String::from_utf8(buf).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into()))
    }

    /// A count bounded by `max`, or, with `None`, by the bytes left in the
    /// file (every item takes at least one byte, so more is a lie).
    fn count(&mut self, what: &str, max: Option<u64>) -> Result<u64, GgufError> {
        let n = self.u64(what)?;
        match max {
            Some(max) if n > max => {
                Err(self.invalid(format!("{what} {n} exceeds the limit {max}")))
            }
            None if n > self.file_len - self.pos => Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: format!("{what}: length {n} runs past the end of the file"),
            }),
            _ => Ok(n),
        }
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let mut buf = [0u8; N];
        self.bytes(&mut buf, what)?;
        Ok(buf)
    }

    fn bytes(&mut self, buf: &mut [u8], what: &str) -> Result<(), GgufError> {
        match self.inner.read_exact(buf) {
            Ok(()) => {
                self.pos += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: format!("file ends at byte {} while reading {what}", self.file_len),
            }),
            Err(source) => Err(GgufError::Io {
                path: self.path.to_path_buf(),
                source,
            }),
        }
    }

    fn invalid(&self, what: String) -> GgufError {
        GgufError::Invalid {
            path: self.path.to_path_buf(),
            what,
        }
    }
}
