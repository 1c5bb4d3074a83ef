//! The decode plan of one writer schema: compiled once when the schema is added to the store,
//! then run on every record straight from the borrowed record bytes.
//!
//! Compiling walks the writer schema and decides, for each field, what to do with it: a field
//! whose name the event contract knows gets a typed [`Reader`] that fills its slot; any other
//! field gets a skip routine (a node of `DecodePlan::nodes`) that walks over its value, whatever
//! its type (nested and recursive records, arrays, maps, unions, fixed, enums). Reading then
//! needs no `Value`, no serde and no allocation: strings are checked as UTF-8 and handed out as
//! slices of the record, enum symbols as slices of the plan.
//!
//! The plan keeps the resolution rules of the serde reader it replaced (apache-avro 0.22's
//! direct deserializer into a tolerant field map): a known field may be null, string, enum,
//! int, long, float or double, or a union of those, and anything else under a known name is
//! invalid Avro; every value, skipped or not, is checked as that reader checked it (varints of
//! at most ten bytes, ints within 32 bits, booleans 0 or 1, UTF-8 strings, enum and union
//! indexes in range). Two things differ on purpose: unknown fields holding an enum or a record
//! are skipped like any other (that reader could not ignore either and refused every such
//! record), and values nested deeper than [`MAX_DEPTH`] are an error instead of a stack
//! overflow.
//!
//! Nothing here panics on any input: every length and count is checked against the bytes left
//! before it is used, so a record cannot make the decoder allocate or loop beyond its own size.

use std::collections::HashMap;
use std::fmt;

use apache_avro::schema::{DecimalSchema, InnerDecimalSchema, Name, NamesRef, ResolvedSchema, UuidSchema};
use apache_avro::Schema;

use super::{field_index, Slot, Slots, FIELD_COUNT, HEADER_LEN};
use crate::codec::DecodeError;

/// How deep records, arrays and maps may nest inside a record. Far beyond any sane
/// event, and shallow enough that a hostile recursive value cannot exhaust the stack.
pub(super) const MAX_DEPTH: u32 = 128;

/// The apache-avro attribute of a single-field record that wraps a union variant; its serde
/// reader reads a record field of such a type as the inner field.
const UNION_OF_RECORDS: &str = "org.apache.avro.rust.union_of_records";

/// The writer schema of one id, compiled for reading.
#[derive(Debug)]
pub(super) struct DecodePlan {
    root: Root,
    /// Skip routines of the values the event does not read; named records are compiled once,
    /// so recursive types refer back to their own node.
    nodes: Vec<Skip>,
    /// Per node: true when its values always encode to no bytes at all (null, `fixed` of size
    /// 0, records of only such fields), so that arrays of them are skipped without a loop.
    empty: Vec<bool>,
}

/// What the top level of a writer schema decodes as.
#[derive(Debug)]
enum Root {
    /// The usual case: a record, field by field.
    Record(Box<[Step]>),
    /// A map read as a record whose keys are field names (the serde reader took maps too).
    Map { value: Reader, skip: usize },
    /// A union of records or maps, chosen per record by its index.
    Union(Box<[Root]>),
    /// A schema that cannot carry an event; every record of it is refused.
    Refuse(&'static str),
}

/// One writer field, in writer order.
#[derive(Debug)]
struct Step {
    /// The writer's field name, for error messages.
    name: Box<str>,
    action: Action,
}

#[derive(Debug)]
enum Action {
    /// A field of the event contract: read it into `slot`.
    Read { slot: usize, reader: Reader },
    /// A field the event does not know: walk over it.
    Skip(usize),
}

/// A typed reader of a known field.
#[derive(Debug)]
enum Reader {
    /// A field of one type.
    Plain(Plain),
    /// `["null", T]` or `[T, "null"]`, the optional fields of every contract schema: kept
    /// apart so they read with one dispatch less. `null` is the index of the null branch.
    Nullable { null: usize, value: Plain },
    /// Any other union: the index picks the variant's reader (a union never holds a union, so
    /// one level is all there is, and reading needs no recursion).
    Union(Box<[Plain]>),
}

/// A reader of one non-union type.
#[derive(Debug)]
enum Plain {
    Null,
    Text,
    /// An enum: the index picks one of the writer's symbols.
    Symbols(Box<[Box<str>]>),
    Int,
    Long,
    Float,
    Double,
    /// A type no event field can hold (boolean, bytes, fixed, array, map, record).
    Refuse(&'static str),
}

/// A skip routine of a value the event does not read.
#[derive(Debug)]
enum Skip {
    Null,
    Boolean,
    Int,
    Long,
    Fixed(usize),
    Bytes,
    String,
    Enum(usize),
    Array(usize),
    Map(usize),
    Union(Box<[usize]>),
    Record(Box<[usize]>),
}

impl DecodePlan {
    /// Compiles `schema` (which must already have parsed) into a plan; the error is the reason
    /// the schema cannot be used, e.g. a reference to an unknown name.
    pub(super) fn compile(schema: &Schema) -> Result<Self, String> {
        let resolved = ResolvedSchema::try_from(schema).map_err(|error| error.to_string())?;
        let mut compiler = Compiler {
            names: resolved.get_names(),
            nodes: Vec::new(),
            records: HashMap::new(),
        };
        let root = compiler.root(schema)?;
        let nodes = compiler.nodes;
        let mut empty = vec![None; nodes.len()];
        for node in 0..nodes.len() {
            encodes_to_nothing(&nodes, node, &mut empty);
        }
        Ok(DecodePlan {
            root,
            nodes,
            empty: empty.into_iter().map(|known| known == Some(true)).collect(),
        })
    }

    /// Reads the Avro body of one record (the bytes after the frame header) into `slots`
    /// (all null to start with; filled in place rather than returned, to save a copy).
    /// Bytes left over after the record are an error, like a record cut short.
    pub(super) fn read<'a>(&'a self, body: &'a [u8], slots: &mut Slots<'a>) -> Result<(), DecodeError> {
        let mut cursor = Cursor { bytes: body };
        self.read_root(&self.root, &mut cursor, slots, body)?;
        if !cursor.bytes.is_empty() {
            return Err(DecodeError::Avro(format!(
                "{} bytes after the record",
                cursor.bytes.len()
            )));
        }
        Ok(())
    }

    fn read_root<'a>(
        &'a self,
        root: &'a Root,
        cursor: &mut Cursor<'a>,
        slots: &mut Slots<'a>,
        body: &[u8],
    ) -> Result<(), DecodeError> {
        match root {
            Root::Record(steps) => {
                for step in steps.iter() {
                    let result = match &step.action {
                        Action::Read { slot, reader } => reader.read(cursor).map(|value| set(slots, *slot, value)),
                        Action::Skip(node) => self.skip(*node, cursor, 0),
                    };
                    result.map_err(|malformed| located(malformed, &step.name, body, cursor))?;
                }
                Ok(())
            }
            Root::Map { value, skip } => self
                .read_map_root(value, *skip, cursor, slots)
                .map_err(|malformed| located(malformed, "(top-level map)", body, cursor)),
            Root::Union(variants) => {
                let variant = cursor
                    .index(variants.len())
                    .map_err(|malformed| located(malformed, "(top-level union)", body, cursor))?;
                // The index is checked against the variants above.
                match variants.get(variant) {
                    Some(root) => self.read_root(root, cursor, slots, body),
                    None => Err(DecodeError::Avro("union index out of range".into())),
                }
            }
            Root::Refuse(why) => Err(DecodeError::Avro((*why).into())),
        }
    }

    /// A top-level map: each key is matched against the contract's field names, and a later
    /// duplicate key wins, as it did in the serde reader.
    fn read_map_root<'a>(
        &'a self,
        value: &'a Reader,
        skip: usize,
        cursor: &mut Cursor<'a>,
        slots: &mut Slots<'a>,
    ) -> Result<(), Malformed> {
        cursor.blocks(true, |cursor| {
            match field_index(cursor.string()?) {
                Some(slot) => set(slots, slot, value.read(cursor)?),
                None => self.skip(skip, cursor, 0)?,
            }
            Ok(())
        })
    }

    /// Walks over one value of node `node`, checking it as the serde reader did.
    fn skip(&self, node: usize, cursor: &mut Cursor<'_>, depth: u32) -> Result<(), Malformed> {
        let Some(skip) = self.nodes.get(node) else {
            debug_assert!(false, "node {node} is not in the plan");
            return Err(Malformed::Plan);
        };
        match skip {
            Skip::Null => Ok(()),
            Skip::Boolean => match cursor.take(1)? {
                [0 | 1] => Ok(()),
                other => Err(Malformed::Boolean(other.first().copied().unwrap_or_default())),
            },
            Skip::Int => cursor.int().map(drop),
            Skip::Long => cursor.long().map(drop),
            Skip::Fixed(size) => cursor.take(*size).map(drop),
            Skip::Bytes => cursor.bytes().map(drop),
            Skip::String => cursor.string().map(drop),
            Skip::Enum(symbols) => cursor.index_of(*symbols, Malformed::EnumIndex).map(drop),
            Skip::Array(item) => {
                let depth = deeper(depth)?;
                let sized = !self.empty.get(*item).copied().unwrap_or(false);
                cursor.blocks(sized, |cursor| self.skip(*item, cursor, depth))
            }
            Skip::Map(value) => {
                let depth = deeper(depth)?;
                cursor.blocks(true, |cursor| {
                    cursor.string()?;
                    self.skip(*value, cursor, depth)
                })
            }
            Skip::Union(variants) => {
                // Not a level of its own: a union cannot hold a union, so any cycle of types
                // passes through a record, array or map, which count.
                let variant = cursor.index(variants.len())?;
                match variants.get(variant) {
                    Some(variant) => self.skip(*variant, cursor, depth),
                    None => Err(Malformed::Plan),
                }
            }
            Skip::Record(fields) => {
                let depth = deeper(depth)?;
                fields.iter().try_for_each(|field| self.skip(*field, cursor, depth))
            }
        }
    }
}

fn set<'a>(slots: &mut Slots<'a>, slot: usize, value: Slot<'a>) {
    debug_assert!(slot < FIELD_COUNT);
    if let Some(target) = slots.0.get_mut(slot) {
        *target = value;
    }
}

fn deeper(depth: u32) -> Result<u32, Malformed> {
    if depth >= MAX_DEPTH {
        Err(Malformed::TooDeep)
    } else {
        Ok(depth + 1)
    }
}

/// Fills `known[node]`: true when every value of `node` encodes to zero bytes. A cycle can only
/// pass through records here (unions, arrays and maps take bytes), and a record that contains
/// itself has no finite value, so a node met again while in progress counts as not empty.
fn encodes_to_nothing(nodes: &[Skip], node: usize, known: &mut [Option<bool>]) -> bool {
    match known.get(node) {
        Some(Some(empty)) => return *empty,
        Some(None) => {}
        None => return false,
    }
    if let Some(slot) = known.get_mut(node) {
        *slot = Some(false);
    }
    let empty = match nodes.get(node) {
        Some(Skip::Null) => true,
        Some(Skip::Fixed(size)) => *size == 0,
        Some(Skip::Record(fields)) => fields.iter().all(|field| encodes_to_nothing(nodes, *field, known)),
        _ => false,
    };
    if let Some(slot) = known.get_mut(node) {
        *slot = Some(empty);
    }
    empty
}

impl Reader {
    /// Reads one value of a known field.
    #[inline(always)]
    fn read<'a>(&'a self, cursor: &mut Cursor<'a>) -> Result<Slot<'a>, Malformed> {
        match self {
            Reader::Plain(plain) => plain.read(cursor),
            Reader::Nullable { null, value } => {
                if cursor.index(2)? == *null {
                    Ok(Slot::Null)
                } else {
                    value.read(cursor)
                }
            }
            Reader::Union(variants) => {
                let index = cursor.index(variants.len())?;
                match variants.get(index) {
                    Some(variant) => variant.read(cursor),
                    None => Err(Malformed::Plan),
                }
            }
        }
    }
}

impl Plain {
    #[inline(always)]
    fn read<'a>(&'a self, cursor: &mut Cursor<'a>) -> Result<Slot<'a>, Malformed> {
        Ok(match self {
            Plain::Null => Slot::Null,
            Plain::Text => Slot::Text(cursor.string()?),
            Plain::Symbols(symbols) => {
                let index = cursor.index_of(symbols.len(), Malformed::EnumIndex)?;
                Slot::Text(symbols.get(index).map_or("", |symbol| symbol))
            }
            Plain::Int => Slot::Long(i64::from(cursor.int()?)),
            Plain::Long => Slot::Long(cursor.long()?),
            Plain::Float => Slot::Double(f64::from(f32::from_le_bytes(cursor.array()?))),
            Plain::Double => Slot::Double(f64::from_le_bytes(cursor.array()?)),
            Plain::Refuse(kind) => return Err(Malformed::NotAScalar(kind)),
        })
    }
}

/// Builds a plan from a writer schema and the names it defines.
struct Compiler<'s> {
    names: &'s NamesRef<'s>,
    nodes: Vec<Skip>,
    /// The node of each named record already compiled (or being compiled: recursion).
    records: HashMap<&'s Name, usize>,
}

impl<'s> Compiler<'s> {
    /// The named schema a reference stands for.
    fn resolve(&self, schema: &'s Schema) -> Result<&'s Schema, String> {
        match schema {
            Schema::Ref { name } => self
                .names
                .get(name)
                .copied()
                .ok_or_else(|| format!("unknown type name {name:?}")),
            other => Ok(other),
        }
    }

    fn root(&mut self, schema: &'s Schema) -> Result<Root, String> {
        Ok(match self.resolve(schema)? {
            Schema::Record(record) => Root::Record(
                record
                    .fields
                    .iter()
                    .map(|field| {
                        let action = match field_index(&field.name) {
                            Some(slot) => Action::Read {
                                slot,
                                reader: self.field_reader(&field.schema)?,
                            },
                            None => Action::Skip(self.skip(&field.schema)?),
                        };
                        Ok(Step {
                            name: field.name.as_str().into(),
                            action,
                        })
                    })
                    .collect::<Result<_, String>>()?,
            ),
            Schema::Map(map) => Root::Map {
                value: self.reader(&map.types)?,
                skip: self.skip(&map.types)?,
            },
            Schema::Union(union) => Root::Union(
                union
                    .variants()
                    .iter()
                    .map(|variant| self.root(variant))
                    .collect::<Result<_, String>>()?,
            ),
            _ => Root::Refuse("the writer schema is not a record"),
        })
    }

    /// The reader of a known record field: like [`Self::reader`], except that apache-avro's
    /// wrapper record of a union variant stands for its only field.
    fn field_reader(&mut self, schema: &'s Schema) -> Result<Reader, String> {
        if let Schema::Record(record) = self.resolve(schema)? {
            if let [only] = record.fields.as_slice() {
                if record.attributes.get(UNION_OF_RECORDS) == Some(&serde_json::Value::Bool(true)) {
                    return self.reader(&only.schema);
                }
            }
        }
        self.reader(schema)
    }

    fn reader(&mut self, schema: &'s Schema) -> Result<Reader, String> {
        Ok(match self.resolve(schema)? {
            Schema::Union(union) => {
                let variants = union
                    .variants()
                    .iter()
                    .map(|variant| self.plain(variant))
                    .collect::<Result<Vec<_>, String>>()?;
                match <[Plain; 2]>::try_from(variants) {
                    Ok([Plain::Null, value]) if !matches!(value, Plain::Null) => Reader::Nullable { null: 0, value },
                    Ok([value, Plain::Null]) if !matches!(value, Plain::Null) => Reader::Nullable { null: 1, value },
                    Ok(pair) => Reader::Union(Box::new(pair)),
                    Err(variants) => Reader::Union(variants.into()),
                }
            }
            other => Reader::Plain(self.plain(other)?),
        })
    }

    fn plain(&mut self, schema: &'s Schema) -> Result<Plain, String> {
        Ok(match self.resolve(schema)? {
            Schema::Null => Plain::Null,
            Schema::String | Schema::Uuid(UuidSchema::String) => Plain::Text,
            Schema::Enum(enumeration) => Plain::Symbols(
                enumeration
                    .symbols
                    .iter()
                    .map(|symbol| symbol.as_str().into())
                    .collect(),
            ),
            Schema::Int | Schema::Date | Schema::TimeMillis => Plain::Int,
            Schema::Long
            | Schema::TimeMicros
            | Schema::TimestampMillis
            | Schema::TimestampMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos => Plain::Long,
            Schema::Float => Plain::Float,
            Schema::Double => Plain::Double,
            Schema::Boolean => Plain::Refuse("boolean"),
            Schema::Bytes
            | Schema::Fixed(_)
            | Schema::Decimal(_)
            | Schema::BigDecimal
            | Schema::Uuid(_)
            | Schema::Duration(_) => Plain::Refuse("bytes"),
            Schema::Array(_) => Plain::Refuse("array"),
            Schema::Map(_) => Plain::Refuse("map"),
            Schema::Record(_) => Plain::Refuse("record"),
            Schema::Union(_) => return Err("a union directly inside a union".into()),
            Schema::Ref { name } => return Err(format!("unresolved type name {name:?}")),
        })
    }

    /// The node that skips a value of `schema`.
    fn skip(&mut self, schema: &'s Schema) -> Result<usize, String> {
        let schema = self.resolve(schema)?;
        if let Schema::Record(record) = schema {
            if let Some(node) = self.records.get(&record.name) {
                return Ok(*node);
            }
            // Registered before its fields, so a field that refers back to it finds it.
            let node = self.push(Skip::Record(Box::default()));
            self.records.insert(&record.name, node);
            let fields = record
                .fields
                .iter()
                .map(|field| self.skip(&field.schema))
                .collect::<Result<_, String>>()?;
            if let Some(slot) = self.nodes.get_mut(node) {
                *slot = Skip::Record(fields);
            }
            return Ok(node);
        }
        let skip = match schema {
            Schema::Null => Skip::Null,
            Schema::Boolean => Skip::Boolean,
            Schema::Int | Schema::Date | Schema::TimeMillis => Skip::Int,
            Schema::Long
            | Schema::TimeMicros
            | Schema::TimestampMillis
            | Schema::TimestampMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos => Skip::Long,
            Schema::Float => Skip::Fixed(4),
            Schema::Double => Skip::Fixed(8),
            Schema::Bytes
            | Schema::BigDecimal
            | Schema::Decimal(DecimalSchema {
                inner: InnerDecimalSchema::Bytes,
                ..
            })
            | Schema::Uuid(UuidSchema::Bytes) => Skip::Bytes,
            Schema::Fixed(fixed)
            | Schema::Decimal(DecimalSchema {
                inner: InnerDecimalSchema::Fixed(fixed),
                ..
            })
            | Schema::Uuid(UuidSchema::Fixed(fixed))
            | Schema::Duration(fixed) => Skip::Fixed(fixed.size),
            Schema::String | Schema::Uuid(UuidSchema::String) => Skip::String,
            Schema::Enum(enumeration) => Skip::Enum(enumeration.symbols.len()),
            Schema::Array(array) => Skip::Array(self.skip(&array.items)?),
            Schema::Map(map) => Skip::Map(self.skip(&map.types)?),
            Schema::Union(union) => Skip::Union(
                union
                    .variants()
                    .iter()
                    .map(|variant| self.skip(variant))
                    .collect::<Result<_, String>>()?,
            ),
            Schema::Record(_) | Schema::Ref { .. } => return Err("unresolved record".into()),
        };
        Ok(self.push(skip))
    }

    fn push(&mut self, skip: Skip) -> usize {
        self.nodes.push(skip);
        self.nodes.len() - 1
    }
}

/// What is wrong with a record's bytes. Small and `Copy`, so the happy path carries no
/// `String`; the message is built only when a record is refused.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Malformed {
    /// The record ends before a value does.
    Truncated { wanted: u64, left: usize },
    /// A varint runs over ten bytes.
    VarintTooLong,
    /// An `int` (or a union or enum index) outside 32 bits.
    IntOutOfRange(i64),
    /// A negative length of bytes or a string.
    NegativeLength(i64),
    /// A string that is not UTF-8.
    InvalidUtf8,
    /// A boolean byte other than 0 or 1.
    Boolean(u8),
    /// A union index outside the union (index, variants).
    UnionIndex(i64, usize),
    /// An enum index outside the symbols (index, symbols).
    EnumIndex(i64, usize),
    /// Values nested deeper than [`MAX_DEPTH`].
    TooDeep,
    /// A known field whose writer type no event field can hold.
    NotAScalar(&'static str),
    /// A plan that does not fit its own schema (a bug, never the input's fault).
    Plan,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Malformed::Truncated { wanted, left } => {
                write!(f, "needs {wanted} more bytes, the record has {left} left")
            }
            Malformed::VarintTooLong => f.write_str("varint longer than 10 bytes"),
            Malformed::IntOutOfRange(value) => write!(f, "{value} does not fit an int"),
            Malformed::NegativeLength(length) => write!(f, "negative length {length}"),
            Malformed::InvalidUtf8 => f.write_str("string is not UTF-8"),
            Malformed::Boolean(byte) => write!(f, "{byte} is not a boolean"),
            Malformed::UnionIndex(index, variants) => {
                write!(f, "union index {index} of a union of {variants}")
            }
            Malformed::EnumIndex(index, symbols) => {
                write!(f, "enum index {index} of an enum of {symbols} symbols")
            }
            Malformed::TooDeep => write!(f, "values nested deeper than {MAX_DEPTH}"),
            Malformed::NotAScalar(kind) => write!(f, "a {kind} cannot hold an event field"),
            Malformed::Plan => f.write_str("internal error: the decode plan does not fit its schema"),
        }
    }
}

/// The error of a record refused in field `field`, with the offset in the framed record.
#[cold]
fn located(malformed: Malformed, field: &str, body: &[u8], cursor: &Cursor<'_>) -> DecodeError {
    let offset = HEADER_LEN + body.len().saturating_sub(cursor.bytes.len());
    DecodeError::Avro(format!("field `{field}` (byte {offset}): {malformed}"))
}

/// The unread rest of a record's body.
struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// The next `len` bytes.
    #[inline(always)]
    fn take(&mut self, len: usize) -> Result<&'a [u8], Malformed> {
        if len > self.bytes.len() {
            return Err(Malformed::Truncated {
                wanted: len as u64,
                left: self.bytes.len(),
            });
        }
        let (taken, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Ok(taken)
    }

    #[inline]
    fn array<const N: usize>(&mut self) -> Result<[u8; N], Malformed> {
        let mut array = [0; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    /// An unsigned LEB128 varint of at most ten bytes. Most varints in a record (lengths,
    /// union and enum indexes) are one byte, so that case is kept apart and inlined.
    #[inline(always)]
    fn varint(&mut self) -> Result<u64, Malformed> {
        match self.bytes.split_first() {
            Some((&first, rest)) if first < 0x80 => {
                self.bytes = rest;
                Ok(u64::from(first))
            }
            _ => self.long_varint(),
        }
    }

    /// A varint of more than one byte; like apache-avro, the bits of a tenth byte beyond 64 are
    /// dropped rather than refused.
    #[inline(never)]
    fn long_varint(&mut self) -> Result<u64, Malformed> {
        let mut value = 0_u64;
        for (index, byte) in self.bytes.iter().take(10).enumerate() {
            value |= u64::from(byte & 0x7f) << (7 * index);
            if byte & 0x80 == 0 {
                self.bytes = self.bytes.get(index + 1..).unwrap_or_default();
                return Ok(value);
            }
        }
        if self.bytes.len() >= 10 {
            Err(Malformed::VarintTooLong)
        } else {
            Err(Malformed::Truncated {
                wanted: self.bytes.len() as u64 + 1,
                left: self.bytes.len(),
            })
        }
    }

    /// A zigzag-encoded `long`.
    #[inline(always)]
    fn long(&mut self) -> Result<i64, Malformed> {
        let zigzag = self.varint()?;
        Ok((zigzag >> 1) as i64 ^ -((zigzag & 1) as i64))
    }

    /// A zigzag-encoded `int`.
    #[inline(always)]
    fn int(&mut self) -> Result<i32, Malformed> {
        let long = self.long()?;
        i32::try_from(long).map_err(|_| Malformed::IntOutOfRange(long))
    }

    /// A union index below `variants`.
    #[inline(always)]
    fn index(&mut self, variants: usize) -> Result<usize, Malformed> {
        self.index_of(variants, Malformed::UnionIndex)
    }

    /// An index (an `int`) below `count`, else the error `out_of_range` makes.
    #[inline(always)]
    fn index_of(&mut self, count: usize, out_of_range: fn(i64, usize) -> Malformed) -> Result<usize, Malformed> {
        let index = match self.small() {
            Some(index) => i64::from(index),
            None => i64::from(self.int()?),
        };
        match usize::try_from(index) {
            Ok(index) if index < count => Ok(index),
            _ => Err(out_of_range(index, count)),
        }
    }

    /// A one-byte `int` or `long` from 0 to 63 (most indexes and lengths), else nothing read.
    #[inline(always)]
    fn small(&mut self) -> Option<u8> {
        match self.bytes.split_first() {
            Some((&first, rest)) if first < 0x80 && first & 1 == 0 => {
                self.bytes = rest;
                Some(first >> 1)
            }
            _ => None,
        }
    }

    /// Length-prefixed bytes, the length checked against the bytes left before anything else.
    #[inline(always)]
    fn bytes(&mut self) -> Result<&'a [u8], Malformed> {
        let length = match self.small() {
            Some(length) => usize::from(length),
            None => {
                let length = self.long()?;
                usize::try_from(length).map_err(|_| Malformed::NegativeLength(length))?
            }
        };
        self.take(length)
    }

    /// A length-prefixed UTF-8 string.
    #[inline(always)]
    fn string(&mut self) -> Result<&'a str, Malformed> {
        std::str::from_utf8(self.bytes()?).map_err(|_| Malformed::InvalidUtf8)
    }

    /// The item count of the next block of an array or map (0 ends it). A negative count is
    /// followed by the block's size in bytes, which is read and not trusted.
    #[inline]
    fn block_count(&mut self) -> Result<u64, Malformed> {
        let count = self.long()?;
        if count < 0 {
            self.long()?;
        }
        Ok(count.unsigned_abs())
    }

    /// Walks the blocks of an array or map to the end, calling `item` for each item (or map
    /// entry). Every item takes at least one byte (an entry, its key's length) unless `sized`
    /// is false (items that encode to nothing): then counts are not checked against the bytes
    /// left and nothing is read.
    #[inline(always)]
    fn blocks(
        &mut self,
        sized: bool,
        mut item: impl FnMut(&mut Self) -> Result<(), Malformed>,
    ) -> Result<(), Malformed> {
        loop {
            let count = self.block_count()?;
            if count == 0 {
                return Ok(());
            }
            if !sized {
                continue;
            }
            self.check_count(count)?;
            for _ in 0..count {
                item(self)?;
            }
        }
    }

    /// Refuses a block of `count` items that cannot fit in the bytes left when every item takes
    /// at least one byte, so a lying count costs nothing.
    #[inline]
    fn check_count(&self, count: u64) -> Result<(), Malformed> {
        if count > self.bytes.len() as u64 {
            Err(Malformed::Truncated {
                wanted: count,
                left: self.bytes.len(),
            })
        } else {
            Ok(())
        }
    }
}
