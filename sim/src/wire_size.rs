//! Exact CBOR sizes without encoding: a serde `Serializer` that adds up the bytes `ciborium` 0.2 would write.
//!
//! The simulator counts the wire bytes of every message. Encoding each one (even into a counting sink) spent most
//! of a run in ciborium's header and float-narrowing code; this walks the same serde calls and only sums lengths.
//! It mirrors `ciborium::ser` rule for rule (shortest integer headers, floats narrowed to f16/f32 when lossless,
//! structs as maps keyed by field name, enums as one-entry maps). The rare cases it does not mirror (ciborium's
//! tag wrapper, NaN payloads) fall back to a real encode, so the result is always exact.

use serde::Serialize;
use serde::ser;
use std::fmt;
use std::sync::{Arc, Weak};

/// The exact length of `ciborium::into_writer(value, ..)`'s output.
pub fn cbor_len<T: Serialize + ?Sized>(value: &T) -> usize {
    cbor_len_with_fields(value, 0, &[]).0
}

/// The exact CBOR length of `value`, and how many of those bytes are the values of the struct fields called one of
/// `names` in structs nested `depth` deep (1: `value` itself). One walk sizes a message and a part of it.
pub fn cbor_len_with_fields<T: Serialize + ?Sized>(value: &T, depth: u32, names: &[&str]) -> (usize, usize) {
    let counter = || SizeCounter::new(depth, names, &[]);
    let mut size = counter();
    match value.serialize(&mut size) {
        Ok(()) => (size.total, size.tracked),
        Err(Fallback) => {
            let total = encoded_len(value);
            // Only a NaN or a CBOR tag inside a tracked field makes its own walk fail too; then it counts as zero.
            let mut size = counter();
            let _ = value.serialize(&mut size);
            (total, size.tracked)
        }
    }
}

/// A part inside a value whose encoded length is known already: the walk counts the length instead of walking it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presized {
    /// A struct of this name (a shared part sized before).
    Struct(&'static str, usize),
    /// A sequence (numbers sized in bulk: [`u32_seq_len`], [`f32_seq_len`]).
    Seq(usize),
}

/// The exact CBOR length of `value` and of its tracked fields (as in [`cbor_len_with_fields`]), where the parts
/// listed in `presized` are counted, not walked: the walk takes the list in order, each entry for the next struct
/// of that name or the next sequence it meets. The caller lists the parts in the order the value serializes them,
/// and vouches for the lengths; debug builds should compare with [`encoded_len`].
pub fn cbor_len_presized<T: Serialize + ?Sized>(
    value: &T,
    depth: u32,
    names: &[&str],
    presized: &[Presized],
) -> (usize, usize) {
    let mut size = SizeCounter::new(depth, names, presized);
    match value.serialize(&mut size) {
        Ok(()) => {
            debug_assert_eq!(size.next_presized, presized.len(), "every presized part is met");
            (size.total, size.tracked)
        }
        // The parts given are sized already; a fallback inside the rest is sized the long way.
        Err(Fallback) => cbor_len_with_fields(value, depth, names),
    }
}

/// Lengths of values shared behind `Arc`s (sent by many messages), remembered per allocation: a direct-mapped
/// table of weak pointers. A weak pointer keeps its allocation from being freed, so an `Arc` at a remembered
/// address is the value that was sized, never a new one in reused memory; and nothing can change a value behind an
/// `Arc` while a weak pointer to it exists.
pub struct ArcLengths<T> {
    slots: Vec<Option<(Weak<T>, usize)>>,
    shift: u32,
}

impl<T> ArcLengths<T> {
    /// A table of `2^bits` slots.
    pub fn new(bits: u32) -> Self {
        Self { slots: (0..1usize << bits).map(|_| None).collect(), shift: usize::BITS - bits }
    }

    /// The remembered length of `value`, or `len(value)` remembered now (evicting whatever shared its slot).
    pub fn get_or_size(&mut self, value: &Arc<T>, len: impl FnOnce(&T) -> usize) -> usize {
        let address = Arc::as_ptr(value) as usize;
        // Fibonacci hashing: allocations are aligned, so the low bits alone would crowd a few slots.
        let slot = &mut self.slots[address.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift];
        match slot {
            Some((weak, len)) if std::ptr::eq(weak.as_ptr(), Arc::as_ptr(value)) => *len,
            _ => {
                let n = len(value);
                *slot = Some((Arc::downgrade(value), n));
                n
            }
        }
    }
}

/// The length by a real encode into a counting sink (the reference `cbor_len` must agree with).
pub fn encoded_len<T: Serialize + ?Sized>(value: &T) -> usize {
    struct ByteCounter(usize);
    impl std::io::Write for ByteCounter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = ByteCounter(0);
    // A value whose `Serialize` fails cannot be sent at all; it counts as nothing.
    match ciborium::into_writer(value, &mut counter) {
        Ok(()) => counter.0,
        Err(_) => 0,
    }
}

/// Bytes of a CBOR item header carrying `value` (an integer, a length or a tag): an unsigned integer's whole length.
pub(crate) fn header_len(value: u64) -> usize {
    match value {
        0..=23 => 1,
        24..=0xff => 2,
        0x100..=0xffff => 3,
        0x1_0000..=0xffff_ffff => 5,
        _ => 9,
    }
}

fn text_len(len: usize) -> usize {
    header_len(len as u64) + len
}

/// ciborium writes a float as the shortest of f16, f32 and f64 that gives back the same bits.
fn float_len(v: f64) -> Option<usize> {
    if v.is_nan() {
        return None; // whether a NaN narrows depends on its payload bits; leave it to the real encoder
    }
    if f64::from(v as f32).to_bits() != v.to_bits() {
        return Some(9);
    }
    Some(if exact_in_f16(v) { 3 } else { 5 })
}

/// Whether a (non-NaN) f32 has an exact IEEE half-precision representation (as [`exact_in_f16`], on f32 bits).
fn f32_exact_in_f16(v: f32) -> bool {
    let bits = v.to_bits();
    // f16 keeps at most 10 of f32's 23 fraction bits: any of the low 13 set rules it out (most values, at once).
    if bits & 0x1fff != 0 {
        return false;
    }
    if v == 0.0 || v.is_infinite() {
        return true;
    }
    let exponent = ((bits >> 23) & 0xff) as i32 - 127;
    let mantissa = bits & ((1 << 23) - 1);
    if !(-24..=15).contains(&exponent) {
        return false;
    }
    let kept = if exponent >= -14 { 10 } else { 24 + exponent } as u32;
    mantissa & ((1u32 << (23 - kept)) - 1) == 0
}

/// Whether a (non-NaN) f64 has an exact IEEE half-precision representation.
fn exact_in_f16(v: f64) -> bool {
    let bits = v.to_bits();
    // f16 keeps at most 10 of f64's 52 fraction bits: any of the low 42 set rules it out.
    if bits & ((1 << 42) - 1) != 0 {
        return false;
    }
    if v == 0.0 || v.is_infinite() {
        return true;
    }
    let exponent = ((bits >> 52) & 0x7ff) as i32 - 1023;
    let mantissa = bits & ((1 << 52) - 1);
    if !(-24..=15).contains(&exponent) {
        return false;
    }
    // f16 keeps 10 fraction bits for normals (exponent >= -14); subnormals lose one per step below that.
    let kept = if exponent >= -14 { 10 } else { 24 + exponent } as u32;
    mantissa & ((1u64 << (52 - kept)) - 1) == 0
}

/// The exact length of a sequence of `u32`s: an array header, then each number's header. Branch-free, so that
/// the compiler vectorizes it (a capacity grid carries hundreds).
pub fn u32_seq_len(values: &[u32]) -> usize {
    // Counted in u32 lanes (twice as many per vector as usize): at 5 bytes a number at most, that overflows only
    // past 858 million numbers, far beyond any message.
    let items: u32 =
        values.iter().map(|&v| 1 + u32::from(v > 23) + u32::from(v > 0xff) + 2 * u32::from(v > 0xffff)).sum();
    header_len(values.len() as u64) + items as usize
}

/// The exact length of a sequence of `f32`s (`None` when one is a NaN, which [`cbor_len`] leaves to the real
/// encoder). Each is written as f16 when that is exact, else as f32 ([`f32_exact_in_f16`]). The common cases are
/// told apart without branches, so that the compiler vectorizes the loop; values in f16's subnormal range (below
/// 2^-14 in magnitude, rare in grids) take the scalar rule.
pub fn f32_seq_len(values: &[f32]) -> Option<usize> {
    // Counted in u32 lanes, as above. The bits are taken as signed: as unsigned, the loop took a fifth more
    // instructions (callgrind, bench_10k).
    let (mut nan, mut subnormal_range, mut wide) = (false, false, 0u32);
    for &v in values {
        let bits = v.to_bits() as i32;
        let magnitude = bits & 0x7fff_ffff;
        let biased = magnitude >> 23;
        nan |= magnitude > 0x7f80_0000;
        subnormal_range |= (biased > 127 - 25) & (biased < 127 - 14);
        // Zero and infinity have no mantissa bits at all, so the low ones' test covers them too.
        let normal_range = (biased > 127 - 15) & (biased < 127 + 16);
        let exact = (bits & 0x1fff == 0) & (normal_range | (magnitude == 0) | (magnitude == 0x7f80_0000));
        wide += u32::from(!exact);
    }
    if nan {
        return None;
    }
    if subnormal_range {
        wide = values.iter().filter(|v| !f32_exact_in_f16(**v)).count() as u32;
    }
    Some(header_len(values.len() as u64) + 3 * values.len() + 2 * wide as usize)
}

/// Running byte total, and the part of it that is tracked fields.
struct SizeCounter<'n> {
    total: usize,
    /// How many structs the walk is inside.
    depth: u32,
    tracked_depth: u32,
    tracked_names: &'n [&'n str],
    tracked: usize,
    /// Structs to count, not walk, in the order they are met (see [`cbor_len_presized`]).
    presized: &'n [Presized],
    next_presized: usize,
    /// The depth of the presized struct being passed over (0: none): its fields are not walked.
    skipping: u32,
    /// A presized sequence is being passed over: its elements are not walked.
    skipping_elements: bool,
}

/// This value needs the real encoder to size it.
#[derive(Debug)]
struct Fallback;

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("value needs a real CBOR encode to be sized")
    }
}

impl std::error::Error for Fallback {}

impl ser::Error for Fallback {
    fn custom<T: fmt::Display>(_msg: T) -> Self {
        Fallback
    }
}

/// ciborium's marker names for its `Captured`/tagged values.
const TAG_NAME: &str = "@@TAG@@";
const UNTAGGED: &str = "@@UNTAGGED@@";

impl<'n> SizeCounter<'n> {
    fn new(depth: u32, names: &'n [&'n str], presized: &'n [Presized]) -> Self {
        Self {
            total: 0,
            depth: 0,
            tracked_depth: depth,
            tracked_names: names,
            tracked: 0,
            presized,
            next_presized: 0,
            skipping: 0,
            skipping_elements: false,
        }
    }

    fn add(&mut self, n: usize) {
        self.total += n;
    }

    fn field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Result<(), Fallback> {
        if self.skipping != 0 {
            return Ok(()); // inside a presized struct: counted whole
        }
        self.add(text_len(key.len()));
        if self.depth == self.tracked_depth && self.tracked_names.contains(&key) {
            let before = self.total;
            value.serialize(&mut *self)?;
            self.tracked += self.total - before;
            Ok(())
        } else {
            value.serialize(&mut *self)
        }
    }

    /// Big integers: ciborium writes a tag, then the big-endian bytes without leading zeros.
    fn add_bignum(&mut self, raw: u128) {
        let len = 16 - (raw.leading_zeros() / 8) as usize;
        self.add(1 + text_len(len));
    }

    /// Definite length: one header. Indefinite: a start byte now and a break byte at the end.
    fn add_collection(&mut self, len: Option<usize>) {
        self.add(len.map_or(2, |n| header_len(n as u64)));
    }
}

impl<'a, 'n> ser::Serializer for &'a mut SizeCounter<'n> {
    type Ok = ();
    type Error = Fallback;
    type SerializeSeq = &'a mut SizeCounter<'n>;
    type SerializeTuple = &'a mut SizeCounter<'n>;
    type SerializeTupleStruct = &'a mut SizeCounter<'n>;
    type SerializeTupleVariant = &'a mut SizeCounter<'n>;
    type SerializeMap = &'a mut SizeCounter<'n>;
    type SerializeStruct = &'a mut SizeCounter<'n>;
    type SerializeStructVariant = &'a mut SizeCounter<'n>;

    fn serialize_bool(self, _v: bool) -> Result<(), Fallback> {
        self.add(1);
        Ok(())
    }
    fn serialize_i8(self, v: i8) -> Result<(), Fallback> {
        self.serialize_i64(v.into())
    }
    fn serialize_i16(self, v: i16) -> Result<(), Fallback> {
        self.serialize_i64(v.into())
    }
    fn serialize_i32(self, v: i32) -> Result<(), Fallback> {
        self.serialize_i64(v.into())
    }
    fn serialize_i64(self, v: i64) -> Result<(), Fallback> {
        // Negative n is written as -1 - n, i.e. all bits inverted.
        self.add(header_len(if v < 0 { !(v as u64) } else { v as u64 }));
        Ok(())
    }
    fn serialize_i128(self, v: i128) -> Result<(), Fallback> {
        let raw = if v < 0 { !(v as u128) } else { v as u128 };
        match u64::try_from(raw) {
            Ok(small) => self.add(header_len(small)),
            Err(_) => self.add_bignum(raw),
        }
        Ok(())
    }
    fn serialize_u8(self, v: u8) -> Result<(), Fallback> {
        self.serialize_u64(v.into())
    }
    fn serialize_u16(self, v: u16) -> Result<(), Fallback> {
        self.serialize_u64(v.into())
    }
    fn serialize_u32(self, v: u32) -> Result<(), Fallback> {
        self.serialize_u64(v.into())
    }
    fn serialize_u64(self, v: u64) -> Result<(), Fallback> {
        self.add(header_len(v));
        Ok(())
    }
    fn serialize_u128(self, v: u128) -> Result<(), Fallback> {
        match u64::try_from(v) {
            Ok(small) => self.add(header_len(small)),
            Err(_) => self.add_bignum(v),
        }
        Ok(())
    }
    fn serialize_f32(self, v: f32) -> Result<(), Fallback> {
        // A widened f32 always narrows back to f32; only f16 is in question (NaN: see `float_len`).
        if v.is_nan() {
            return Err(Fallback);
        }
        self.add(if f32_exact_in_f16(v) { 3 } else { 5 });
        Ok(())
    }
    fn serialize_f64(self, v: f64) -> Result<(), Fallback> {
        self.add(float_len(v).ok_or(Fallback)?);
        Ok(())
    }
    fn serialize_char(self, v: char) -> Result<(), Fallback> {
        self.add(text_len(v.len_utf8()));
        Ok(())
    }
    fn serialize_str(self, v: &str) -> Result<(), Fallback> {
        self.add(text_len(v.len()));
        Ok(())
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<(), Fallback> {
        self.add(text_len(v.len()));
        Ok(())
    }
    fn serialize_none(self) -> Result<(), Fallback> {
        self.add(1);
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), Fallback> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), Fallback> {
        self.serialize_none()
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), Fallback> {
        self.serialize_none()
    }
    fn serialize_unit_variant(self, _name: &'static str, _index: u32, variant: &'static str) -> Result<(), Fallback> {
        self.serialize_str(variant)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _name: &'static str, value: &T) -> Result<(), Fallback> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), Fallback> {
        if name != TAG_NAME || variant != UNTAGGED {
            self.add(1 + text_len(variant.len()));
        }
        value.serialize(self)
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<Self, Fallback> {
        if let Some(&Presized::Seq(n)) = self.presized.get(self.next_presized) {
            self.next_presized += 1;
            self.add(n);
            self.skipping_elements = true;
            return Ok(self);
        }
        self.add_collection(len);
        Ok(self)
    }
    fn serialize_tuple(self, len: usize) -> Result<Self, Fallback> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(self, _name: &'static str, len: usize) -> Result<Self, Fallback> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(
        self,
        name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self, Fallback> {
        if name == TAG_NAME {
            return Err(Fallback); // a CBOR tag; its header size depends on the tag value
        }
        self.add(1 + text_len(variant.len()) + header_len(len as u64));
        Ok(self)
    }
    fn serialize_map(self, len: Option<usize>) -> Result<Self, Fallback> {
        self.add_collection(len);
        Ok(self)
    }
    fn serialize_struct(self, name: &'static str, len: usize) -> Result<Self, Fallback> {
        self.depth += 1;
        if let Some(&Presized::Struct(presized, n)) = self.presized.get(self.next_presized)
            && presized == name
        {
            self.next_presized += 1;
            self.add(n);
            self.skipping = self.depth;
            return Ok(self);
        }
        self.add(header_len(len as u64));
        Ok(self)
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self, Fallback> {
        self.add(1 + text_len(variant.len()) + header_len(len as u64));
        self.depth += 1;
        Ok(self)
    }
    fn is_human_readable(&self) -> bool {
        false
    }
}

impl ser::SerializeSeq for &mut SizeCounter<'_> {
    type Ok = ();
    type Error = Fallback;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Fallback> {
        if self.skipping_elements {
            return Ok(()); // a presized sequence: counted whole (nothing nested in it is met)
        }
        value.serialize(&mut **self)
    }
    fn end(self) -> Result<(), Fallback> {
        self.skipping_elements = false;
        Ok(()) // an indefinite length's break byte was counted up front
    }
}

impl ser::SerializeTuple for &mut SizeCounter<'_> {
    type Ok = ();
    type Error = Fallback;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Fallback> {
        value.serialize(&mut **self)
    }
    fn end(self) -> Result<(), Fallback> {
        Ok(())
    }
}

impl ser::SerializeTupleStruct for &mut SizeCounter<'_> {
    type Ok = ();
    type Error = Fallback;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Fallback> {
        value.serialize(&mut **self)
    }
    fn end(self) -> Result<(), Fallback> {
        Ok(())
    }
}

impl ser::SerializeTupleVariant for &mut SizeCounter<'_> {
    type Ok = ();
    type Error = Fallback;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Fallback> {
        value.serialize(&mut **self)
    }
    fn end(self) -> Result<(), Fallback> {
        Ok(())
    }
}

impl ser::SerializeMap for &mut SizeCounter<'_> {
    type Ok = ();
    type Error = Fallback;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), Fallback> {
        key.serialize(&mut **self)
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Fallback> {
        value.serialize(&mut **self)
    }
    fn end(self) -> Result<(), Fallback> {
        Ok(())
    }
}

impl ser::SerializeStruct for &mut SizeCounter<'_> {
    type Ok = ();
    type Error = Fallback;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Result<(), Fallback> {
        self.field(key, value)
    }
    fn end(self) -> Result<(), Fallback> {
        if self.skipping == self.depth {
            self.skipping = 0;
        }
        self.depth -= 1;
        Ok(())
    }
}

impl ser::SerializeStructVariant for &mut SizeCounter<'_> {
    type Ok = ();
    type Error = Fallback;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Result<(), Fallback> {
        self.field(key, value)
    }
    fn end(self) -> Result<(), Fallback> {
        self.depth -= 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Serialize;
    use std::collections::BTreeMap;

    #[derive(Serialize)]
    enum Shape {
        Unit,
        New(u32),
        Pair(i8, String),
        Named { a: Option<u64>, b: Vec<f32> },
    }

    #[derive(Serialize)]
    struct Everything {
        flag: bool,
        small: i64,
        wide: i128,
        unsigned: u128,
        ch: char,
        text: String,
        #[serde(with = "serde_bytes_like")]
        blob: Vec<u8>,
        floats: Vec<f64>,
        shapes: Vec<Shape>,
        map: BTreeMap<String, (u16, f32)>,
        #[serde(skip_serializing_if = "Option::is_none")]
        maybe: Option<u8>,
        unit: (),
    }

    mod serde_bytes_like {
        pub fn serialize<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(v)
        }
    }

    /// A sequence of unknown length (ciborium writes it indefinite, with a break).
    struct Unsized(Vec<u8>);
    impl Serialize for Unsized {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(self.0.iter().filter(|_| true))
        }
    }

    #[test]
    fn floats_narrow_like_ciborium() {
        let specials = [
            0.0,
            -0.0,
            1.0,
            -2.5,
            65504.0,
            65505.0,
            65520.0,
            1e-8,
            5.960464477539063e-8, // smallest f16 subnormal
            6.103515625e-5,       // smallest f16 normal
            3.0517578125e-5,      // an f16 subnormal
            0.1,
            1.0 / 3.0,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            f64::MAX,
            f64::MIN_POSITIVE,
            f32::MAX as f64,
            f32::MIN_POSITIVE as f64,
        ];
        for v in specials {
            assert_eq!(cbor_len(&v), encoded_len(&v), "{v:e}");
        }
    }

    #[test]
    fn everything_sizes_like_ciborium() {
        let value = Everything {
            flag: true,
            small: -300,
            wide: -(1i128 << 100),
            unsigned: 1u128 << 70,
            ch: 'é',
            text: "x".repeat(300),
            blob: vec![7; 70_000],
            floats: vec![0.5, 0.1, 1e300, -0.0, 1024.0],
            shapes: vec![
                Shape::Unit,
                Shape::New(1 << 20),
                Shape::Pair(-1, "hi".into()),
                Shape::Named { a: None, b: vec![1.5, 0.3] },
            ],
            map: [("k".to_string(), (300, 0.25)), ("long key".to_string(), (7, 1e30))].into_iter().collect(),
            maybe: None,
            unit: (),
        };
        assert_eq!(cbor_len(&value), encoded_len(&value));
        let no_len = Unsized((0..40).collect());
        assert_eq!(cbor_len(&no_len), encoded_len(&no_len));
    }

    #[derive(Serialize)]
    struct Outer {
        a: u8,
        grid: Option<Vec<f32>>,
        inner: Inner,
    }

    #[derive(Serialize)]
    struct Inner {
        grid: Vec<f32>,
    }

    #[test]
    fn tracked_fields_at_their_depth_only() {
        let value = Outer { a: 1, grid: Some(vec![0.5, 0.1]), inner: Inner { grid: vec![0.3; 30] } };
        let (total, tracked) = cbor_len_with_fields(&value, 1, &["grid"]);
        assert_eq!(total, encoded_len(&value));
        assert_eq!(tracked, encoded_len(&vec![0.5f32, 0.1]));
        let (_, inner) = cbor_len_with_fields(&value, 2, &["grid"]);
        assert_eq!(inner, encoded_len(&vec![0.3f32; 30]));
    }

    #[test]
    fn presized_structs_are_counted_not_walked_in_order() {
        let value = Outer { a: 1, grid: Some(vec![0.5, 0.1]), inner: Inner { grid: vec![0.3; 30] } };
        let inner_len = encoded_len(&value.inner);
        let (total, tracked) = cbor_len_with_fields(&value, 1, &["grid"]);
        assert_eq!(cbor_len_presized(&value, 1, &["grid"], &[Presized::Struct("Inner", inner_len)]), (total, tracked));
        // Taken on trust: a wrong length shows in the total, so it was counted instead of walked.
        assert_eq!(
            cbor_len_presized(&value, 1, &["grid"], &[Presized::Struct("Inner", inner_len + 5)]),
            (total + 5, tracked)
        );
        // The struct is inside a tracked field: its counted length is tracked too.
        let (total, tracked) = cbor_len_with_fields(&value, 1, &["inner"]);
        assert_eq!(
            cbor_len_presized(&value, 1, &["inner"], &[Presized::Struct("Inner", inner_len + 2)]),
            (total + 2, tracked + 2)
        );
    }

    #[test]
    fn presized_entries_pair_with_structs_in_walk_order() {
        #[derive(Serialize)]
        struct Two {
            first: Inner,
            second: Inner,
            after: u32,
        }
        let value = Two { first: Inner { grid: vec![0.3; 3] }, second: Inner { grid: vec![0.1; 40] }, after: 7 };
        let (first, second) = (encoded_len(&value.first), encoded_len(&value.second));
        assert_eq!(
            cbor_len_presized(&value, 0, &[], &[Presized::Struct("Inner", first), Presized::Struct("Inner", second)]).0,
            encoded_len(&value)
        );
        // Only the first listed: the second is walked.
        assert_eq!(
            cbor_len_presized(&value, 0, &[], &[Presized::Struct("Inner", first + 1)]).0,
            encoded_len(&value) + 1
        );
    }

    /// Floats around every boundary of the f16/f32 choice: f16 normals and subnormals, values just outside them,
    /// zeros, infinities and f32 subnormals, besides any bit pattern.
    fn any_f32() -> impl Strategy<Value = f32> {
        let special = prop_oneof![
            Just(0.0f32),
            Just(-0.0),
            Just(f32::INFINITY),
            Just(f32::NEG_INFINITY),
            Just(65504.0),
            Just(65520.0),
            Just(2f32.powi(-14)),
            Just(2f32.powi(-24)),
            Just(3.0 * 2f32.powi(-24)),
            Just(2f32.powi(-25)),
            Just(1.5 * 2f32.powi(-20)),
            Just(f32::from_bits(1)),
            (-30i32..20, 0u32..16).prop_map(|(e, m)| (1.0 + m as f32 / 16.0) * 2f32.powi(e)),
        ];
        prop_oneof![special, any::<u32>().prop_map(f32::from_bits).prop_filter("not NaN", |v| !v.is_nan())]
    }

    proptest! {
        #[test]
        fn bulk_number_lengths_are_the_walks(
            counts in proptest::collection::vec(prop_oneof![0u32..30, 0u32..70_000, any::<u32>()], 0..300),
            floats in proptest::collection::vec(any_f32(), 0..300),
        ) {
            prop_assert_eq!(u32_seq_len(&counts), encoded_len(&counts));
            prop_assert_eq!(f32_seq_len(&floats), Some(encoded_len(&floats)));
        }
    }

    #[test]
    fn a_nan_leaves_a_sequence_to_the_encoder() {
        assert_eq!(f32_seq_len(&[1.0, f32::NAN]), None);
        assert_eq!(f32_seq_len(&[]), Some(1));
    }

    #[test]
    fn presized_sequences_are_counted_not_walked_in_order() {
        #[derive(Serialize)]
        struct Arrays {
            first: Vec<f32>,
            inner: Inner,
            second: Vec<u32>,
        }
        let value = Arrays { first: vec![0.1, 2.0], inner: Inner { grid: vec![0.3; 5] }, second: vec![1, 300, 70_000] };
        let (first, second) = (encoded_len(&value.first), encoded_len(&value.second));
        // The inner struct's sequence comes between the two: listed, it is counted too.
        let inner = encoded_len(&value.inner.grid);
        let listed = [Presized::Seq(first + 1), Presized::Seq(inner + 2), Presized::Seq(second + 3)];
        assert_eq!(cbor_len_presized(&value, 0, &[], &listed).0, encoded_len(&value) + 6);
        // Only the first listed: the others are walked.
        assert_eq!(cbor_len_presized(&value, 0, &[], &[Presized::Seq(first + 1)]).0, encoded_len(&value) + 1);
    }

    #[test]
    fn arc_lengths_remember_by_allocation() {
        let mut lengths = ArcLengths::new(4);
        let grid = Arc::new(vec![0.5f32; 10]);
        let walks = std::cell::Cell::new(0);
        let len = |g: &Arc<Vec<f32>>, lengths: &mut ArcLengths<Vec<f32>>| {
            lengths.get_or_size(g, |v| {
                walks.set(walks.get() + 1);
                cbor_len(v)
            })
        };
        assert_eq!(len(&grid, &mut lengths), encoded_len(&*grid));
        assert_eq!(len(&Arc::clone(&grid), &mut lengths), encoded_len(&*grid));
        // Equal contents in another allocation are sized again.
        let other = Arc::new(vec![0.5f32; 10]);
        assert_eq!(len(&other, &mut lengths), encoded_len(&*other));
        assert_eq!(walks.get(), 2);
        // A dropped value's allocation stays remembered (weakly), so a new value never inherits its length.
        drop(grid);
        for n in 0..100 {
            let fresh = Arc::new(vec![0.25f32; n]);
            assert_eq!(len(&fresh, &mut lengths), encoded_len(&*fresh));
        }
    }

    #[test]
    fn a_nan_falls_back_to_the_encoder() {
        let value = Outer { a: 1, grid: Some(vec![f32::NAN, 1.0]), inner: Inner { grid: vec![f32::NAN] } };
        assert_eq!(cbor_len(&value), encoded_len(&value));
    }

    proptest! {
        #[test]
        fn any_f32_bits_size_like_ciborium(bits in any::<u32>()) {
            let v = f32::from_bits(bits);
            prop_assert_eq!(cbor_len(&v), encoded_len(&v));
        }

        #[test]
        fn near_f16_f32_values_size_like_ciborium(mantissa in 0u32..4096, exponent in -40i32..12, negative in any::<bool>()) {
            let v = mantissa as f32 * 2f32.powi(exponent) * if negative { -1.0 } else { 1.0 };
            prop_assert_eq!(cbor_len(&v), encoded_len(&v));
        }

        #[test]
        fn any_f64_bits_size_like_ciborium(bits in any::<u64>()) {
            let v = f64::from_bits(bits);
            prop_assert_eq!(cbor_len(&v), encoded_len(&v));
        }

        #[test]
        fn any_f32_widened_sizes_like_ciborium(bits in any::<u32>()) {
            let v = f64::from(f32::from_bits(bits));
            prop_assert_eq!(cbor_len(&v), encoded_len(&v));
        }

        #[test]
        fn near_f16_values_size_like_ciborium(mantissa in 0u64..4096, exponent in -40i32..12, negative in any::<bool>()) {
            let v = mantissa as f64 * 2f64.powi(exponent) * if negative { -1.0 } else { 1.0 };
            prop_assert_eq!(cbor_len(&v), encoded_len(&v));
        }

        #[test]
        fn integers_size_like_ciborium(a in any::<i64>(), b in any::<u64>(), c in any::<i128>(), d in any::<u128>()) {
            prop_assert_eq!(cbor_len(&(a, b, c, d)), encoded_len(&(a, b, c, d)));
        }
    }
}
