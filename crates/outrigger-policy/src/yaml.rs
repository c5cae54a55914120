//! A located YAML tree and a serde `Deserializer` over it that records the field path and the
//! line/column of any error.
//!
//! serde-saphyr parses the text (multi-document, anchors, all YAML scalars) into [`Node`]s, each
//! carrying its [`Pos`]. The typed CRD structs are then deserialized from that tree, so every
//! error, including errors found later by validation, can be reported as
//! `file:line:column: spec.field.path: reason`.

use std::fmt;

use serde::de::{self, DeserializeSeed, Visitor};
use serde_saphyr::Spanned;

/// A 1-based line and column in the source text (0 = unknown).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pos {
    pub line: u32,
    pub column: u32,
}

impl Pos {
    fn of(loc: &serde_saphyr::Location) -> Pos {
        Pos {
            line: u32::try_from(loc.line()).unwrap_or(u32::MAX),
            column: u32::try_from(loc.column()).unwrap_or(u32::MAX),
        }
    }
}

/// One YAML node and where it starts.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node {
    pub pos: Pos,
    pub value: Value,
}

/// The value of a YAML node. Mapping keys are kept as strings (YAML `8080:` becomes `"8080"`,
/// as Kubernetes' JSON conversion does).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Key, Node)>),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Key {
    pub pos: Pos,
    pub name: String,
}

impl Node {
    /// The node at a field path, e.g. `["spec", "mtls", "mode"]`; `None` if absent.
    pub fn at<'a>(&'a self, path: &[PathSeg]) -> Option<&'a Node> {
        let mut n = self;
        for seg in path {
            n = match (&n.value, seg) {
                (Value::Map(entries), PathSeg::Key(k)) => {
                    &entries.iter().rev().find(|(key, _)| key.name == *k)?.1
                }
                (Value::Seq(items), PathSeg::Index(i)) => items.get(*i)?,
                _ => return None,
            };
        }
        Some(n)
    }

    /// The position of the deepest existing node along `path` (the closest we can point at).
    pub fn pos_of(&self, path: &[PathSeg]) -> Pos {
        for len in (0..=path.len()).rev() {
            if let Some(n) = self.at(&path[..len]) {
                // For a mapping key that exists, point at its value.
                return n.pos;
            }
        }
        self.pos
    }

    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Map(entries) => entries
                .iter()
                .rev()
                .find(|(k, _)| k.name == key)
                .map(|e| &e.1),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Building the tree with serde-saphyr.

struct RawNode(Value);
struct RawKey(String);

impl<'de> de::Deserialize<'de> for RawKey {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawKey;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a scalar mapping key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawKey, E> {
                Ok(RawKey(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<RawKey, E> {
                Ok(RawKey(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawKey, E> {
                Ok(RawKey(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawKey, E> {
                Ok(RawKey(v.to_string()))
            }
            fn visit_i128<E: de::Error>(self, v: i128) -> Result<RawKey, E> {
                Ok(RawKey(v.to_string()))
            }
            fn visit_u128<E: de::Error>(self, v: u128) -> Result<RawKey, E> {
                Ok(RawKey(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<RawKey, E> {
                Ok(RawKey(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<RawKey, E> {
                Ok(RawKey(v.to_string()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<RawKey, E> {
                Ok(RawKey("null".into()))
            }
            fn visit_none<E: de::Error>(self) -> Result<RawKey, E> {
                Ok(RawKey("null".into()))
            }
        }
        d.deserialize_any(V)
    }
}

fn to_node(s: Spanned<RawNode>) -> Node {
    Node {
        pos: Pos::of(&s.referenced),
        value: s.value.0,
    }
}

impl<'de> de::Deserialize<'de> for RawNode {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawNode;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<RawNode, E> {
                Ok(RawNode(Value::Bool(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawNode, E> {
                Ok(RawNode(Value::Int(v)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawNode, E> {
                Ok(RawNode(Value::UInt(v)))
            }
            fn visit_i128<E: de::Error>(self, v: i128) -> Result<RawNode, E> {
                Ok(RawNode(Value::Float(v as f64)))
            }
            fn visit_u128<E: de::Error>(self, v: u128) -> Result<RawNode, E> {
                Ok(RawNode(Value::Float(v as f64)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<RawNode, E> {
                Ok(RawNode(Value::Float(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawNode, E> {
                Ok(RawNode(Value::Str(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<RawNode, E> {
                Ok(RawNode(Value::Str(v)))
            }
            fn visit_unit<E: de::Error>(self) -> Result<RawNode, E> {
                Ok(RawNode(Value::Null))
            }
            fn visit_none<E: de::Error>(self) -> Result<RawNode, E> {
                Ok(RawNode(Value::Null))
            }
            fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<RawNode, D::Error> {
                <RawNode as de::Deserialize>::deserialize(d)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<RawNode, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<Spanned<RawNode>>()? {
                    items.push(to_node(item));
                }
                Ok(RawNode(Value::Seq(items)))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<RawNode, A::Error> {
                let mut entries = Vec::new();
                while let Some(k) = map.next_key::<Spanned<RawKey>>()? {
                    let v = map.next_value::<Spanned<RawNode>>()?;
                    entries.push((
                        Key {
                            pos: Pos::of(&k.referenced),
                            name: k.value.0,
                        },
                        to_node(v),
                    ));
                }
                Ok(RawNode(Value::Map(entries)))
            }
        }
        d.deserialize_any(V)
    }
}

/// A YAML syntax error.
#[derive(Debug, Clone)]
pub(crate) struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

/// Parses every document of a YAML stream into located trees (empty documents are skipped).
pub(crate) fn parse_stream(text: &str) -> Result<Vec<Node>, SyntaxError> {
    let options = serde_saphyr::options! {
        // Kubernetes rejects duplicate keys in a manifest; so do we.
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::Error,
        // serde-saphyr's defaults (1,024 documents, 250,000 nodes) are too small for a
        // mesh's worth of policies in one file; these still bound alias/anchor bombs.
        budget: serde_saphyr::budget! {
            max_documents: 100_000,
            max_nodes: 10_000_000,
            max_events: 40_000_000,
        },
    };
    match serde_saphyr::from_multiple_with_options::<Spanned<RawNode>>(text, options) {
        Ok(docs) => Ok(docs.into_iter().map(to_node).collect()),
        Err(e) => {
            let pos = e.location().map(|l| Pos::of(&l)).unwrap_or_default();
            let message = e
                .render_with_options(serde_saphyr::render_options! {
                    snippets: serde_saphyr::SnippetMode::Off,
                })
                .trim()
                .to_string();
            Err(SyntaxError { pos, message })
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Deserializing typed structs from the tree, with paths.

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PathSeg {
    Key(String),
    Index(usize),
}

/// Formats a field path as `spec.rules[0].from[1].source.principals[2]`; map keys that are not
/// identifiers (labels, ports) are written as `.key` too, e.g. `spec.portLevelMtls.8080.mode`.
pub(crate) fn format_path(path: &[PathSeg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            PathSeg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            PathSeg::Index(i) => {
                s.push('[');
                s.push_str(&i.to_string());
                s.push(']');
            }
        }
    }
    s
}

/// A deserialization error with the path (innermost segment first while propagating) and the
/// position of the offending node.
#[derive(Debug, Clone)]
pub(crate) struct DeError {
    pub message: String,
    /// Reversed: the innermost segment is pushed first.
    pub rev_path: Vec<PathSeg>,
    pub pos: Option<Pos>,
}

impl DeError {
    pub fn path(&self) -> Vec<PathSeg> {
        self.rev_path.iter().rev().cloned().collect()
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError {
            message: msg.to_string(),
            rev_path: Vec::new(),
            pos: None,
        }
    }
}

fn locate(mut e: DeError, pos: Pos) -> DeError {
    if e.pos.is_none() {
        e.pos = Some(pos);
    }
    e
}

fn within(mut e: DeError, seg: PathSeg, pos: Pos) -> DeError {
    e.rev_path.push(seg);
    locate(e, pos)
}

/// Deserializes a `T` from a located node.
pub(crate) fn from_node<'a, T: de::Deserialize<'a>>(node: &'a Node) -> Result<T, DeError> {
    T::deserialize(NodeDe(node))
}

struct NodeDe<'a>(&'a Node);

impl NodeDe<'_> {
    fn unexpected(&self) -> de::Unexpected<'_> {
        match &self.0.value {
            Value::Null => de::Unexpected::Unit,
            Value::Bool(b) => de::Unexpected::Bool(*b),
            Value::Int(i) => de::Unexpected::Signed(*i),
            Value::UInt(u) => de::Unexpected::Unsigned(*u),
            Value::Float(f) => de::Unexpected::Float(*f),
            Value::Str(s) => de::Unexpected::Str(s),
            Value::Seq(_) => de::Unexpected::Seq,
            Value::Map(_) => de::Unexpected::Map,
        }
    }
}

impl<'de> de::Deserializer<'de> for NodeDe<'de> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let pos = self.0.pos;
        let r = match &self.0.value {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Int(i) => visitor.visit_i64(*i),
            Value::UInt(u) => visitor.visit_u64(*u),
            Value::Float(f) => visitor.visit_f64(*f),
            Value::Str(s) => visitor.visit_borrowed_str(s),
            Value::Seq(items) => visitor.visit_seq(SeqAcc {
                items: items.iter().enumerate(),
            }),
            Value::Map(entries) => visitor.visit_map(MapAcc {
                entries: entries.iter(),
                current: None,
            }),
        };
        r.map_err(|e| locate(e, pos))
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.0.value {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        // Kubernetes' schema validation rejects a number or boolean where a string is declared
        // (`ports: [8080]` instead of `["8080"]`); so do we, naming the field.
        match &self.0.value {
            Value::Str(s) => visitor
                .visit_borrowed_str(s)
                .map_err(|e| locate(e, self.0.pos)),
            _ => Err(locate(
                de::Error::invalid_type(self.unexpected(), &visitor),
                self.0.pos,
            )),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        match &self.0.value {
            Value::Str(s) => {
                let d: de::value::BorrowedStrDeserializer<'de, DeError> =
                    de::value::BorrowedStrDeserializer::new(s);
                visitor.visit_enum(d).map_err(|e| locate(e, self.0.pos))
            }
            _ => Err(locate(
                de::Error::invalid_type(self.unexpected(), &visitor),
                self.0.pos,
            )),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char
        bytes byte_buf unit unit_struct seq tuple
        tuple_struct map struct identifier
    }
}

struct SeqAcc<'a> {
    items: std::iter::Enumerate<std::slice::Iter<'a, Node>>,
}

impl<'de> de::SeqAccess<'de> for SeqAcc<'de> {
    type Error = DeError;
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        match self.items.next() {
            None => Ok(None),
            Some((i, n)) => seed
                .deserialize(NodeDe(n))
                .map(Some)
                .map_err(|e| within(e, PathSeg::Index(i), n.pos)),
        }
    }
}

struct MapAcc<'a> {
    entries: std::slice::Iter<'a, (Key, Node)>,
    current: Option<&'a (Key, Node)>,
}

impl<'de> de::MapAccess<'de> for MapAcc<'de> {
    type Error = DeError;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        match self.entries.next() {
            None => Ok(None),
            Some(entry) => {
                self.current = Some(entry);
                let k: de::value::BorrowedStrDeserializer<'de, DeError> =
                    de::value::BorrowedStrDeserializer::new(entry.0.name.as_str());
                seed.deserialize(k)
                    .map(Some)
                    .map_err(|e| within(e, PathSeg::Key(entry.0.name.clone()), entry.0.pos))
            }
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let entry = self
            .current
            .take()
            .ok_or_else(|| <DeError as de::Error>::custom("value requested before key"))?;
        seed.deserialize(NodeDe(&entry.1))
            .map_err(|e| within(e, PathSeg::Key(entry.0.name.clone()), entry.1.pos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_has_positions() {
        let docs = parse_stream("a: 1\n---\nb:\n  c: [x, 'y']\n  8080: {mode: STRICT}\n").unwrap();
        assert_eq!(docs.len(), 2);
        let c = docs[1]
            .at(&[PathSeg::Key("b".into()), PathSeg::Key("c".into())])
            .unwrap();
        assert_eq!(c.pos, Pos { line: 4, column: 6 });
        let m = docs[1]
            .at(&[
                PathSeg::Key("b".into()),
                PathSeg::Key("8080".into()),
                PathSeg::Key("mode".into()),
            ])
            .unwrap();
        assert_eq!(m.as_str(), Some("STRICT"));
        assert_eq!(m.pos.line, 5);
    }

    #[test]
    fn syntax_error_has_position() {
        let e = parse_stream("a: 1\nb: [1, 2\n").unwrap_err();
        assert!(e.pos.line >= 2, "{e:?}");
    }

    #[test]
    fn duplicate_keys_are_errors() {
        assert!(parse_stream("a: 1\na: 2\n").is_err());
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct T {
        a: Vec<String>,
        b: Option<u16>,
    }

    #[test]
    fn typed_errors_carry_path_and_position() {
        let docs = parse_stream("a:\n  - x\n  - 3\n").unwrap();
        let e = from_node::<T>(&docs[0]).unwrap_err();
        assert_eq!(format_path(&e.path()), "a[1]");
        assert_eq!(e.pos, Some(Pos { line: 3, column: 5 }));
        let docs = parse_stream("a: []\nzz: 1\n").unwrap();
        let e = from_node::<T>(&docs[0]).unwrap_err();
        assert_eq!(format_path(&e.path()), "zz");
        assert_eq!(e.pos.unwrap().line, 2);
        assert!(e.message.contains("unknown field `zz`"), "{}", e.message);
        let docs = parse_stream("a: []\nb: 70000\n").unwrap();
        let e = from_node::<T>(&docs[0]).unwrap_err();
        assert_eq!(format_path(&e.path()), "b");
    }
}
