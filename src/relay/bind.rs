//! Reading a Bind message's parameters, for cache keys and row-precise invalidation.

use crate::protocol::cstr_at;

/// The parts of a Bind body after the portal and statement names. Read in place: parsing
/// allocates nothing (it runs for every Bind, twice for one the cache could not answer).
pub struct BindParams<'a> {
    /// Everything from the parameter format codes on: formats, values, result formats. This is
    /// exactly what distinguishes two executions of one statement for the cache key.
    pub tail: &'a [u8],
    /// The parameter format codes, as sent (big-endian i16s).
    formats: &'a [u8],
    /// The parameter values, as sent (each a big-endian i32 length, -1 for NULL, then its
    /// bytes); checked whole by [`BindParams::parse`].
    values: &'a [u8],
    nvalues: usize,
    /// The parameter type OIDs the statement was parsed with (big-endian u32s; missing
    /// ones and 0: left to the server).
    types: &'a [u8],
}

/// The values of a checked Bind, in order (`None`: NULL).
struct Values<'a> {
    rest: &'a [u8],
    left: usize,
}

impl<'a> Iterator for Values<'a> {
    type Item = Option<&'a [u8]>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let len = i32::from_be_bytes(self.rest.get(..4)?.try_into().ok()?);
        self.rest = &self.rest[4..];
        if len < 0 {
            return Some(None);
        }
        let (v, rest) = self.rest.split_at_checked(len as usize)?;
        self.rest = rest;
        Some(Some(v))
    }
}

impl<'a> BindParams<'a> {
    pub fn parse(body: &'a [u8]) -> Option<BindParams<'a>> {
        let (_, p1) = cstr_at(body, 0)?;
        let (_, p2) = cstr_at(body, p1)?;
        let tail = body.get(p2..)?;
        let i16_at = |pos: usize| -> Option<i16> {
            Some(i16::from_be_bytes(tail.get(pos..pos + 2)?.try_into().ok()?))
        };
        let nformats = i16_at(0)?.max(0) as usize;
        let formats = tail.get(2..2 + 2 * nformats)?;
        let at = 2 + 2 * nformats;
        let nvalues = i16_at(at)?.max(0) as usize;
        let values = &tail[at + 2..];
        // Check every value's length once, so that reading them later cannot fail.
        let mut check = Values {
            rest: values,
            left: nvalues,
        };
        for _ in 0..nvalues {
            check.next()?;
        }
        Some(BindParams {
            tail,
            formats,
            values,
            nvalues,
            types: &[],
        })
    }

    /// With the parameter types of the statement's Parse (an i16 count, then the OIDs):
    /// a binary value is only read as an integer when its type says it is one.
    pub fn with_types(mut self, param_types: &'a [u8]) -> Self {
        let n = param_types
            .get(..2)
            .map_or(0, |b| i16::from_be_bytes([b[0], b[1]]).max(0) as usize);
        let present = param_types.len().saturating_sub(2) / 4;
        self.types = param_types.get(2..2 + 4 * n.min(present)).unwrap_or(&[]);
        self
    }

    fn values(&self) -> Values<'a> {
        Values {
            rest: self.values,
            left: self.nvalues,
        }
    }

    /// The format code of parameter `i` (0-based), as Postgres reads the format list: none
    /// means all text, one applies to all, else one each.
    fn format(&self, i: usize) -> Option<i16> {
        let at = |i: usize| i16::from_be_bytes([self.formats[2 * i], self.formats[2 * i + 1]]);
        match self.formats.len() / 2 {
            0 => Some(0),
            1 => Some(at(0)),
            n => (i < n).then(|| at(i)),
        }
    }

    /// The declared type OID of parameter `i` (0-based); 0 when unspecified.
    fn type_of(&self, i: usize) -> u32 {
        self.types
            .get(4 * i..4 * i + 4)
            .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Whether a parameter spells a moment relative to now ('now', 'today', ...): a result
    /// computed with it is not reusable later. Binary values too: a `text` parameter's binary
    /// form is its text.
    pub fn has_time_literal(&self) -> bool {
        self.values().enumerate().any(|(i, v)| {
            let Some(v) = v else { return false };
            let text = self.format(i) == Some(0);
            if text {
                std::str::from_utf8(v).is_ok_and(crate::analysis::is_time_literal)
            } else {
                crate::analysis::binary_holds_time_word(v)
            }
        })
    }

    /// Parameter `n` (1-based) as a canonical integer, if it is one: text digits, or a binary
    /// int2/int4/int8. Anything else is `None` and the caller falls back to table grain.
    pub fn int_param(&self, n: usize) -> Option<i64> {
        let value = self.values().nth(n.checked_sub(1)?)??;
        let format = self.format(n - 1)?;
        const INT2: u32 = 21;
        const INT4: u32 = 23;
        const INT8: u32 = 20;
        let declared = self.type_of(n - 1);
        if format == 0 {
            // Text read by integer input: unspecified (the server infers the column's
            // type), an integer type, or text cast to one in the query. A float4, float8,
            // numeric or oid parameter is read its own way ('16777217' as float4 is
            // 16777216) and then compared: no integer key.
            const TEXT: u32 = 25;
            const UNKNOWN: u32 = 705;
            const VARCHAR: u32 = 1043;
            if !matches!(declared, 0 | INT2 | INT4 | INT8 | TEXT | UNKNOWN | VARCHAR) {
                return None;
            }
            canonical_int(std::str::from_utf8(value).ok()?)
        } else {
            // Unspecified (0): the server infers the compared column's integer type, and a
            // binary value of another width is refused. Any other type (float8, numeric,
            // text...) has its own binary form, which is no integer.
            if !matches!(declared, 0 | INT2 | INT4 | INT8) {
                return None;
            }
            match value.len() {
                2 => Some(i16::from_be_bytes(value.try_into().ok()?) as i64),
                4 => Some(i32::from_be_bytes(value.try_into().ok()?) as i64),
                8 => Some(i64::from_be_bytes(value.try_into().ok()?)),
                _ => None,
            }
        }
    }
}

/// The integer a text spells, the way Postgres' integer input would read it.
pub fn canonical_int(s: &str) -> Option<i64> {
    let t = s.trim();
    let t = t.strip_prefix('+').unwrap_or(t);
    t.parse::<i64>().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind(formats: &[i16], values: &[Option<&[u8]>]) -> Vec<u8> {
        let mut b = b"\0P_1\0".to_vec();
        b.extend_from_slice(&(formats.len() as i16).to_be_bytes());
        for f in formats {
            b.extend_from_slice(&f.to_be_bytes());
        }
        b.extend_from_slice(&(values.len() as i16).to_be_bytes());
        for v in values {
            match v {
                Some(v) => {
                    b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v);
                }
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        b.extend_from_slice(&0i16.to_be_bytes());
        b
    }

    #[test]
    fn text_and_binary_integers_canonicalise_alike() {
        let body = bind(&[], &[Some(b" +0042"), None]);
        let p = BindParams::parse(&body).unwrap();
        assert_eq!(p.int_param(1), Some(42));
        assert_eq!(p.int_param(2), None);
        assert_eq!(p.int_param(3), None);
        let body = bind(&[1], &[Some(&42i32.to_be_bytes())]);
        assert_eq!(BindParams::parse(&body).unwrap().int_param(1), Some(42));
    }

    #[test]
    fn time_words_count_in_text_and_binary_parameters() {
        let has = |formats: &[i16], v: &[u8]| {
            BindParams::parse(&bind(formats, &[Some(b"1"), Some(v)]))
                .unwrap()
                .has_time_literal()
        };
        assert!(has(&[], b"now"));
        assert!(has(&[0, 1], b"today"));
        // A text parameter sent in binary is its text; a text[] carries it after lengths.
        assert!(has(&[1], b"now"));
        assert!(has(
            &[0, 1],
            b"\0\0\0\x01\0\0\0\0\0\0\0\x19\0\0\0\x01\0\0\0\x01\0\0\0\x03now"
        ));
        assert!(!has(&[1], &42i64.to_be_bytes()));
        assert!(!has(&[0], b"2024-01-01"));
    }

    #[test]
    fn truncated_bind_is_none_not_a_panic() {
        let body = bind(&[0, 1], &[Some(b"1"), Some(b"2")]);
        for cut in 0..body.len() {
            let _ = BindParams::parse(&body[..cut]);
        }
    }

    #[test]
    fn binary_values_of_other_types_are_not_integers() {
        let types = |oids: &[u32]| {
            let mut b = (oids.len() as i16).to_be_bytes().to_vec();
            for o in oids {
                b.extend_from_slice(&o.to_be_bytes());
            }
            b
        };
        let five = 5.0f64.to_be_bytes();
        let body = bind(&[1], &[Some(&five)]);
        let float8 = types(&[701]);
        assert_eq!(
            BindParams::parse(&body)
                .unwrap()
                .with_types(&float8)
                .int_param(1),
            None
        );
        let body = bind(&[1], &[Some(b"12")]);
        let text = types(&[25]);
        assert_eq!(
            BindParams::parse(&body)
                .unwrap()
                .with_types(&text)
                .int_param(1),
            None
        );
        // A text value declared float4, float8 or oid is read as that type first.
        for oid in [700, 701, 26, 1700] {
            let body = bind(&[0], &[Some(b"16777217")]);
            assert_eq!(
                BindParams::parse(&body)
                    .unwrap()
                    .with_types(&types(&[oid]))
                    .int_param(1),
                None,
                "{oid}"
            );
        }
        let body = bind(&[0], &[Some(b"16777217")]);
        assert_eq!(
            BindParams::parse(&body)
                .unwrap()
                .with_types(&types(&[23]))
                .int_param(1),
            Some(16777217)
        );
        let body = bind(&[1], &[Some(&7i64.to_be_bytes())]);
        let int8 = types(&[20]);
        assert_eq!(
            BindParams::parse(&body)
                .unwrap()
                .with_types(&int8)
                .int_param(1),
            Some(7)
        );
        assert_eq!(
            BindParams::parse(&body)
                .unwrap()
                .with_types(&types(&[0]))
                .int_param(1),
            Some(7)
        );
    }
}
