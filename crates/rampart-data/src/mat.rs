//! A reader for MATLAB level-5 MAT-files (what `save` writes with `-v6` and `-v7`,
//! MATLAB's default), enough for numeric arrays such as SVHN's `X` and `y`.
//!
//! The format, as documented by MathWorks in "MAT-File Format" (level 5):
//!
//! - A 128-byte header: 116 bytes of text (`MATLAB 5.0 MAT-file, …`), 8 bytes of
//!   subsystem data offset, a 2-byte version (`0x0100`) and a 2-byte endianness
//!   indicator: the characters `MI` written as one 16-bit value, so a little-endian
//!   file holds the bytes `IM` and a big-endian one `MI`. Every number after the header
//!   is in that byte order.
//! - Then data elements, each an 8-byte tag (u32 data type, u32 byte count) followed by
//!   the data, padded to a multiple of 8 bytes. A *small* element packs the tag and up
//!   to 4 bytes of data into 8 bytes: when the upper 16 bits of the first u32 are not
//!   zero, they are the byte count and the lower 16 bits the type.
//! - A variable is a `miMATRIX` (14) element whose data are sub-elements: array flags
//!   (`miUINT32`, 8 bytes: the class in the low byte of the first u32, bit `0x0800`
//!   complex), dimensions (`miINT32`, at least two), the name (`miINT8`), then the real
//!   part, stored with any numeric data type whatever the class (MATLAB saves a
//!   `double` holding small integers as `miUINT8`, for instance), and, when complex,
//!   the imaginary part.
//! - `miCOMPRESSED` (15) holds one data element compressed with zlib; it is not padded.
//!
//! Arrays are column-major: element (i₁, i₂, …) of dimensions (d₁, d₂, …) is at
//! i₁ + d₁·(i₂ + d₂·(…)). MATLAB drops trailing singleton dimensions when saving.
//!
//! Every length is checked against the bytes actually present before anything is
//! sliced, and a compressed element may not claim more than deflate can produce from
//! its size, so a corrupt length field gives an error rather than a panic or a huge
//! allocation. Cells, structs, sparse and character arrays are skipped when not asked
//! for, refused when asked for.

use std::io::Read;
use std::ops::Range;
use std::path::Path;

use flate2::read::ZlibDecoder;

use crate::error::{DataError, Result};

/// The format name used in errors.
pub(crate) const FORMAT: &str = "MAT v5";

const HEADER_LEN: usize = 128;
const MI_INT8: u32 = 1;
const MI_UINT8: u32 = 2;
const MI_INT16: u32 = 3;
const MI_UINT16: u32 = 4;
const MI_INT32: u32 = 5;
const MI_UINT32: u32 = 6;
const MI_SINGLE: u32 = 7;
const MI_DOUBLE: u32 = 9;
const MI_INT64: u32 = 12;
const MI_UINT64: u32 = 13;
const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;
const MI_UTF8: u32 = 16;

/// Deflate cannot expand data by more than about 1032:1.
const MAX_INFLATE_RATIO: u64 = 1032;

/// Byte order of a MAT-file, from its endianness indicator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Endian {
    /// Header bytes 126–127 are `IM`.
    Little,
    /// Header bytes 126–127 are `MI`.
    Big,
}

impl Endian {
    fn u16(self, b: [u8; 2]) -> u16 {
        match self {
            Self::Little => u16::from_le_bytes(b),
            Self::Big => u16::from_be_bytes(b),
        }
    }

    fn u32(self, b: [u8; 4]) -> u32 {
        match self {
            Self::Little => u32::from_le_bytes(b),
            Self::Big => u32::from_be_bytes(b),
        }
    }

    /// Reads the u32 at `at`; the caller has checked that 4 bytes are there.
    fn u32_at(self, bytes: &[u8], at: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&bytes[at..at + 4]);
        self.u32(b)
    }
}

/// The bytes of an array's real part: inside the file, or inside a decompressed element.
enum Data<'a> {
    Borrowed(&'a [u8]),
    Owned { buf: Vec<u8>, range: Range<usize> },
}

/// A numeric variable read from a MAT-file.
pub(crate) struct MatArray<'a> {
    /// The variable's name.
    pub name: String,
    /// The MATLAB class, e.g. `"uint8"` or `"double"`.
    pub class: &'static str,
    /// Dimensions, as saved (at least two).
    pub dims: Vec<usize>,
    /// Storage type of the real part (a `mi*` code).
    data_type: u32,
    endian: Endian,
    data: Data<'a>,
}

impl MatArray<'_> {
    fn bytes(&self) -> &[u8] {
        match &self.data {
            Data::Borrowed(b) => b,
            Data::Owned { buf, range } => buf.get(range.clone()).unwrap_or_default(),
        }
    }

    /// The elements as bytes when stored as `miUINT8`, without copying.
    pub fn as_u8(&self) -> Option<&[u8]> {
        (self.data_type == MI_UINT8).then(|| self.bytes())
    }

    /// Element `i` (column-major) as f64; `None` past the end.
    pub fn value(&self, i: usize) -> Option<f64> {
        let size = type_size(self.data_type)?;
        let b = self.bytes().get(i * size..(i + 1) * size)?;
        let e = self.endian;
        let arr8 = |b: &[u8]| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            if e == Endian::Big {
                a.reverse();
            }
            a
        };
        Some(match self.data_type {
            MI_INT8 => f64::from(b[0] as i8),
            MI_UINT8 => f64::from(b[0]),
            MI_INT16 => f64::from(e.u16([b[0], b[1]]) as i16),
            MI_UINT16 => f64::from(e.u16([b[0], b[1]])),
            MI_INT32 => f64::from(e.u32([b[0], b[1], b[2], b[3]]) as i32),
            MI_UINT32 => f64::from(e.u32([b[0], b[1], b[2], b[3]])),
            MI_SINGLE => f64::from(f32::from_bits(e.u32([b[0], b[1], b[2], b[3]]))),
            MI_DOUBLE => f64::from_le_bytes(arr8(b)),
            MI_INT64 => i64::from_le_bytes(arr8(b)) as f64,
            MI_UINT64 => u64::from_le_bytes(arr8(b)) as f64,
            _ => return None,
        })
    }
}

/// The variables of a MAT-file that were asked for, and the names of all of them.
pub(crate) struct MatContents<'a> {
    /// The numeric variables asked for, in file order.
    pub arrays: Vec<MatArray<'a>>,
    /// The name of every variable in the file, in file order.
    pub names: Vec<String>,
}

impl<'a> MatContents<'a> {
    /// Removes and returns the variable `name`, if it was read.
    pub fn take(&mut self, name: &str) -> Option<MatArray<'a>> {
        let i = self.arrays.iter().position(|a| a.name == name)?;
        Some(self.arrays.remove(i))
    }
}

/// Bytes per element of a numeric data type.
fn type_size(data_type: u32) -> Option<usize> {
    match data_type {
        MI_INT8 | MI_UINT8 => Some(1),
        MI_INT16 | MI_UINT16 => Some(2),
        MI_INT32 | MI_UINT32 | MI_SINGLE => Some(4),
        MI_DOUBLE | MI_INT64 | MI_UINT64 => Some(8),
        _ => None,
    }
}

/// MATLAB's name of an array class code, or `None` for codes the format does not define.
fn class_name(class: u8) -> Option<&'static str> {
    Some(match class {
        1 => "cell",
        2 => "struct",
        3 => "object",
        4 => "char",
        5 => "sparse",
        6 => "double",
        7 => "single",
        8 => "int8",
        9 => "uint8",
        10 => "int16",
        11 => "uint16",
        12 => "int32",
        13 => "uint32",
        14 => "int64",
        15 => "uint64",
        16 => "function",
        17 => "opaque",
        _ => return None,
    })
}

/// Errors about one file; `context` says where in it (which element, which variable).
struct Ctx<'p> {
    file: &'p Path,
    context: String,
}

impl Ctx<'_> {
    fn malformed(&self, problem: impl std::fmt::Display) -> DataError {
        DataError::Malformed {
            file: self.file.to_path_buf(),
            format: FORMAT,
            problem: format!("{}{problem}", self.context),
        }
    }

    fn truncated(&self, what: impl std::fmt::Display, needed: u64, available: usize) -> DataError {
        DataError::Truncated {
            file: self.file.to_path_buf(),
            format: FORMAT,
            what: format!("{}{what}", self.context),
            needed,
            available: available as u64,
        }
    }
}

/// One data element: its type, where its data lie in the buffer, and where the next begins.
struct Element {
    data_type: u32,
    data: Range<usize>,
    next: usize,
}

/// Reads the element at `pos` of `buf` (small or normal format). `next` skips the
/// padding that follows normal elements to a multiple of 8 bytes (missing padding at the
/// very end of the buffer is tolerated); an unpadded `miCOMPRESSED` element ends at
/// `data.end` instead.
fn read_element(buf: &[u8], pos: usize, e: Endian, ctx: &Ctx) -> Result<Element> {
    let available = buf.len().saturating_sub(pos);
    if available < 8 {
        return Err(ctx.truncated(
            format_args!("the data element tag at byte {pos}"),
            8,
            available,
        ));
    }
    let first = e.u32_at(buf, pos);
    if first >> 16 != 0 {
        let n = (first >> 16) as usize;
        if n > 4 {
            return Err(ctx.malformed(format_args!(
                "small data element at byte {pos} claims {n} bytes; at most 4 fit"
            )));
        }
        return Ok(Element {
            data_type: first & 0xffff,
            data: pos + 4..pos + 4 + n,
            next: pos + 8,
        });
    }
    let n = e.u32_at(buf, pos + 4) as usize;
    let start = pos + 8;
    if n > buf.len() - start {
        return Err(ctx.truncated(
            format_args!("the data element at byte {pos} (type {first})"),
            n as u64,
            buf.len() - start,
        ));
    }
    let end = start + n;
    Ok(Element {
        data_type: first,
        data: start..end,
        next: end.next_multiple_of(8).min(buf.len()),
    })
}

/// Parses the file `bytes` and returns the numeric variables named in `wanted` (first
/// occurrence of each) and the names of all variables; `file` names it in errors.
pub(crate) fn read_mat<'a>(
    bytes: &'a [u8],
    file: &Path,
    wanted: &[&str],
) -> Result<MatContents<'a>> {
    let mut ctx = Ctx {
        file,
        context: String::new(),
    };
    let endian = read_header(bytes, &ctx)?;
    let mut contents = MatContents {
        arrays: Vec::new(),
        names: Vec::new(),
    };
    let mut pos = HEADER_LEN;
    while pos < bytes.len() {
        ctx.context.clear();
        let el = read_element(bytes, pos, endian, &ctx)?;
        match el.data_type {
            MI_MATRIX => {
                ctx.context = format!("variable at byte {pos}: ");
                let matrix = &bytes[el.data.clone()];
                if let Some(parsed) = parse_matrix(matrix, endian, &mut ctx, wanted)? {
                    let ParsedMatrix { array, real } = parsed;
                    contents.names.push(array.name.clone());
                    if let Some(mut array) = array.into_wanted(&contents, wanted) {
                        let start = el.data.start;
                        array.data = Data::Borrowed(&bytes[start + real.start..start + real.end]);
                        contents.arrays.push(array);
                    }
                }
            }
            MI_COMPRESSED => {
                ctx.context = format!("compressed element at byte {pos}: ");
                let inflated = inflate(&bytes[el.data.clone()], endian, &ctx)?;
                if let Some(inner) = inflated {
                    read_inflated(inner, endian, &mut ctx, wanted, &mut contents)?;
                }
                // Compressed elements are not padded.
                pos = el.data.end;
                continue;
            }
            // Other top-level elements carry nothing a reader of arrays needs.
            _ => {}
        }
        pos = el.next;
    }
    Ok(contents)
}

/// Checks the 128-byte header and returns the byte order.
fn read_header(bytes: &[u8], ctx: &Ctx) -> Result<Endian> {
    if bytes.starts_with(b"MATLAB 7.3") || bytes.get(512..520) == Some(b"\x89HDF\r\n\x1a\n") {
        return Err(ctx.malformed(
            "this is a MATLAB v7.3 (HDF5) MAT-file; only level-5 MAT-files (MATLAB's default, \
             `save -v7`) are read: save it again with `-v7`, or use the official SVHN files",
        ));
    }
    let Some(header) = bytes.get(..HEADER_LEN) else {
        return Err(ctx.truncated("the 128-byte header", HEADER_LEN as u64, bytes.len()));
    };
    let endian = match &header[126..128] {
        b"IM" => Endian::Little,
        b"MI" => Endian::Big,
        other => {
            return Err(ctx.malformed(format_args!(
                "bytes 126-127 are {other:02x?}, not the endianness indicator `IM` or `MI`: \
                 this is not a level-5 MAT-file (a MATLAB v4 file or another format)"
            )))
        }
    };
    let version = endian.u16([header[124], header[125]]);
    if version != 0x0100 {
        return Err(ctx.malformed(format_args!(
            "header version 0x{version:04x}, expected 0x0100 (level 5)"
        )));
    }
    Ok(endian)
}

/// Decompresses a `miCOMPRESSED` element's data: the inner element, tag included, or
/// `None` when it is not a `miMATRIX` (nothing to read then).
fn inflate(compressed: &[u8], e: Endian, ctx: &Ctx) -> Result<Option<Vec<u8>>> {
    let zlib_error =
        |err: std::io::Error| ctx.malformed(format_args!("corrupt zlib stream: {err}"));
    let mut decoder = ZlibDecoder::new(compressed);
    let mut tag = [0u8; 8];
    decoder.read_exact(&mut tag).map_err(zlib_error)?;
    let data_type = e.u32([tag[0], tag[1], tag[2], tag[3]]);
    if data_type != MI_MATRIX {
        return Ok(None);
    }
    let n = u64::from(e.u32([tag[4], tag[5], tag[6], tag[7]]));
    let limit = (compressed.len() as u64).saturating_mul(MAX_INFLATE_RATIO);
    if n > limit {
        return Err(ctx.malformed(format_args!(
            "the compressed variable claims {n} bytes, more than {} compressed bytes can hold",
            compressed.len()
        )));
    }
    let mut out = Vec::with_capacity(8 + (n as usize).min(compressed.len().saturating_mul(4)));
    out.extend_from_slice(&tag);
    let got = decoder.take(n).read_to_end(&mut out).map_err(zlib_error)?;
    if (got as u64) < n {
        return Err(ctx.truncated("the compressed variable", n, got));
    }
    Ok(Some(out))
}

/// Reads the `miMATRIX` element of a decompressed buffer into `contents`.
fn read_inflated<'a>(
    inner: Vec<u8>,
    e: Endian,
    ctx: &mut Ctx,
    wanted: &[&str],
    contents: &mut MatContents<'a>,
) -> Result<()> {
    let el = read_element(&inner, 0, e, ctx)?;
    let Some(parsed) = parse_matrix(&inner[el.data.clone()], e, ctx, wanted)? else {
        return Ok(());
    };
    let ParsedMatrix { array, real } = parsed;
    contents.names.push(array.name.clone());
    if let Some(mut array) = array.into_wanted(contents, wanted) {
        let start = el.data.start;
        array.data = Data::Owned {
            buf: inner,
            range: start + real.start..start + real.end,
        };
        contents.arrays.push(array);
    }
    Ok(())
}

/// A parsed `miMATRIX`: its header, and where its real part lies in the matrix data.
struct ParsedMatrix {
    array: MatArray<'static>,
    real: Range<usize>,
}

impl MatArray<'static> {
    /// `self` when its name is wanted and not yet read, else `None`.
    fn into_wanted<'a>(self, contents: &MatContents<'a>, wanted: &[&str]) -> Option<MatArray<'a>> {
        let is_new = !contents.arrays.iter().any(|a| a.name == self.name);
        (is_new && wanted.contains(&self.name.as_str())).then_some(MatArray {
            name: self.name,
            class: self.class,
            dims: self.dims,
            data_type: self.data_type,
            endian: self.endian,
            data: Data::Borrowed(&[]),
        })
    }
}

/// Parses the sub-elements of a `miMATRIX`. Returns `None` for an empty element or a
/// function handle or opaque object (skipped unnamed); the header alone for an array
/// whose name is not in `wanted`; the header and the place of the real part for a
/// wanted numeric array. A wanted array that is not numeric is an error. `ctx` gains
/// the variable's name once known.
fn parse_matrix(
    m: &[u8],
    e: Endian,
    ctx: &mut Ctx,
    wanted: &[&str],
) -> Result<Option<ParsedMatrix>> {
    if m.is_empty() {
        return Ok(None);
    }
    let flags = read_element(m, 0, e, ctx)?;
    if flags.data_type != MI_UINT32 || flags.data.len() != 8 {
        return Err(ctx.malformed(format_args!(
            "array flags must be 8 bytes of type miUINT32 (6), found {} bytes of type {}",
            flags.data.len(),
            flags.data_type
        )));
    }
    let flag_word = e.u32_at(m, flags.data.start);
    let class_code = (flag_word & 0xff) as u8;
    let complex = flag_word & 0x0800 != 0;
    let Some(class) = class_name(class_code) else {
        return Err(ctx.malformed(format_args!("unknown array class {class_code}")));
    };
    if class_code >= 16 {
        // Function handles and opaque objects (classes 16, 17) lay out their
        // sub-elements differently; they are never data, so they are skipped unnamed.
        return Ok(None);
    }

    let dims_el = read_element(m, flags.next, e, ctx)?;
    // The format says miINT32; some writers use miUINT32, which reads the same here.
    let dims_type_ok = matches!(dims_el.data_type, MI_INT32 | MI_UINT32);
    if !dims_type_ok || dims_el.data.len() % 4 != 0 || dims_el.data.len() < 8 {
        return Err(ctx.malformed(format_args!(
            "dimensions must be at least two miINT32 (5) values, found {} bytes of type {}",
            dims_el.data.len(),
            dims_el.data_type
        )));
    }
    let mut dims = Vec::with_capacity(dims_el.data.len() / 4);
    for at in dims_el.data.clone().step_by(4) {
        let d = e.u32_at(m, at) as i32;
        let Ok(d) = usize::try_from(d) else {
            return Err(ctx.malformed(format_args!("negative dimension {d}")));
        };
        dims.push(d);
    }

    let name_el = read_element(m, dims_el.next, e, ctx)?;
    if !matches!(name_el.data_type, MI_INT8 | MI_UINT8 | MI_UTF8) {
        return Err(ctx.malformed(format_args!(
            "the array name must be of type miINT8 (1), found type {}",
            name_el.data_type
        )));
    }
    let name = String::from_utf8_lossy(&m[name_el.data.clone()]).into_owned();
    ctx.context = format!("variable `{name}`: ");

    let is_wanted = wanted.contains(&name.as_str());
    if !(6..=15).contains(&class_code) {
        if is_wanted {
            return Err(ctx.malformed(format_args!("is a {class} array, not a numeric one")));
        }
        // Not numeric and not asked for: only its name matters.
        return Ok(Some(ParsedMatrix {
            array: header_only(name, class, dims, e),
            real: 0..0,
        }));
    }
    if !is_wanted {
        return Ok(Some(ParsedMatrix {
            array: header_only(name, class, dims, e),
            real: 0..0,
        }));
    }
    if complex {
        return Err(ctx.malformed("is complex; a real array is expected"));
    }
    let real = read_element(m, name_el.next, e, ctx)?;
    let Some(size) = type_size(real.data_type) else {
        return Err(ctx.malformed(format_args!(
            "the real part has data type {}, not a numeric type",
            real.data_type
        )));
    };
    let count = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .and_then(|c| c.checked_mul(size));
    if count != Some(real.data.len()) {
        return Err(ctx.malformed(format_args!(
            "dimensions {dims:?} need {} bytes of {size}-byte elements but the real part holds {}",
            count.map_or_else(|| "more than 2^64".to_string(), |c| c.to_string()),
            real.data.len()
        )));
    }
    Ok(Some(ParsedMatrix {
        array: MatArray {
            name,
            class,
            dims,
            data_type: real.data_type,
            endian: e,
            data: Data::Borrowed(&[]),
        },
        real: real.data,
    }))
}

/// A variable whose data are not read.
fn header_only(
    name: String,
    class: &'static str,
    dims: Vec<usize>,
    endian: Endian,
) -> MatArray<'static> {
    MatArray {
        name,
        class,
        dims,
        data_type: MI_UINT8,
        endian,
        data: Data::Borrowed(&[]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{
        assert_mentions, error_text, mat_v5, MatEndian, MatValues, MatVar, TestResult,
    };

    fn read<'a>(bytes: &'a [u8], wanted: &[&str]) -> Result<MatContents<'a>> {
        read_mat(bytes, Path::new("t.mat"), wanted)
    }

    fn vars() -> Vec<MatVar> {
        vec![
            MatVar::new("__note", 4, vec![1, 2], MatValues::U16(vec![104, 105])),
            // A function handle (class 16) is skipped unnamed, whatever follows its flags.
            MatVar::new("fh", 16, vec![1, 1], MatValues::U8(vec![0])),
            MatVar::new(
                "a",
                6,
                vec![2, 3],
                MatValues::F64(vec![1.5, -2.0, 3.0, 4.0, 5.0, 6.0]),
            ),
            MatVar::new("b", 9, vec![3, 1], MatValues::U8(vec![7, 8, 9])),
            // A double saved with uint8 storage, as MATLAB does for small integers.
            MatVar::new("c", 6, vec![1, 2], MatValues::U8(vec![10, 200])),
            MatVar::new("d", 12, vec![1, 1], MatValues::I32(vec![-5])),
        ]
    }

    #[test]
    fn reads_every_layout_the_same() -> TestResult {
        for endian in [MatEndian::Little, MatEndian::Big] {
            for compressed in [false, true] {
                let bytes = mat_v5(&vars(), endian, compressed)?;
                let mut m = read(&bytes, &["a", "b", "c", "d"])?;
                assert_eq!(m.names, ["__note", "a", "b", "c", "d"]);
                let a = m.take("a").ok_or("no a")?;
                assert_eq!((a.class, a.dims.as_slice()), ("double", &[2, 3][..]));
                assert_eq!(a.value(6), None);
                let values: Vec<f64> = (0..6).filter_map(|i| a.value(i)).collect();
                assert_eq!(
                    values,
                    [1.5, -2.0, 3.0, 4.0, 5.0, 6.0],
                    "{endian:?} {compressed}"
                );
                let b = m.take("b").ok_or("no b")?;
                assert_eq!(b.as_u8(), Some(&[7u8, 8, 9][..]));
                let c = m.take("c").ok_or("no c")?;
                assert_eq!((c.class, c.value(1)), ("double", Some(200.0)));
                let d = m.take("d").ok_or("no d")?;
                assert_eq!(d.value(0), Some(-5.0));
                assert!(m.take("a").is_none());
            }
        }
        Ok(())
    }

    #[test]
    fn refuses_bad_headers_and_wanted_non_numeric_arrays() -> TestResult {
        let bytes = mat_v5(&vars(), MatEndian::Little, false)?;
        let msg = |b: &[u8], wanted: &[&str]| error_text(read(b, wanted).err());
        assert!(msg(&bytes[..100], &[]).contains("128-byte header"));
        let mut v4 = bytes.clone();
        v4[126..128].copy_from_slice(b"XX");
        assert!(msg(&v4, &[]).contains("not a level-5 MAT-file"));
        let mut version = bytes.clone();
        version[124..126].copy_from_slice(&[2, 0]);
        assert!(msg(&version, &[]).contains("version 0x0002"));
        let mut hdf5 = b"MATLAB 7.3 MAT-file".to_vec();
        hdf5.resize(600, 0);
        assert!(msg(&hdf5, &[]).contains("v7.3 (HDF5)"));
        assert_mentions(&msg(&bytes, &["__note"]), &["t.mat", "`__note`", "char"]);
        Ok(())
    }
}
