//! One table of the document and its spans: deserializing it key by key so that every bad
//! key is reported, and finding the line of any key. Knows nothing of loadgate's keys.

use std::ops::Range;
use std::time::Duration;

use serde::de::{DeserializeOwned, IntoDeserializer};
use toml_edit::{Item, TableLike, Value};

use super::ConfigError;

#[derive(Default)]
pub(super) struct Errors(pub(super) Vec<ConfigError>);

impl Errors {
    pub(super) fn push(&mut self, line: usize, message: impl Into<String>) {
        self.0.push(ConfigError {
            line,
            message: message.into(),
        });
    }
}

/// Byte offset → 1-based line number.
pub(super) struct LineIndex {
    starts: Vec<usize>,
    last: usize,
}

impl LineIndex {
    pub(super) fn new(text: &str) -> Self {
        let starts: Vec<usize> = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        // A file ending in a newline has no line after it worth pointing at.
        let last = (starts.len() - usize::from(text.ends_with('\n'))).max(1);
        LineIndex { starts, last }
    }

    pub(super) fn line(&self, offset: usize) -> usize {
        self.starts
            .partition_point(|&s| s <= offset)
            .clamp(1, self.last)
    }

    pub(super) fn line_of(&self, span: Option<Range<usize>>) -> usize {
        span.map_or(1, |s| self.line(s.start))
    }
}

/// A step in a path to a key: a table key or an array index.
pub(super) enum Seg {
    Key(String),
    Index(usize),
}

fn render(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) if out.is_empty() => out.push_str(k),
            Seg::Key(k) => {
                out.push('.');
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// One table of the document (`[server]`, one `[[route]]`, …), kept with its spans.
pub(super) struct Section<'l> {
    lines: &'l LineIndex,
    /// How messages name it: `[server]`, `upstream "app"`, `[[route]] #2`.
    label: String,
    original: Item,
    /// Line of the table header; where a missing key is reported.
    pub(super) header: usize,
    /// Dotted paths of keys dropped because they failed to deserialize (already reported).
    removed: Vec<String>,
}

impl<'l> Section<'l> {
    pub(super) fn new(lines: &'l LineIndex, label: String, original: Item, header: usize) -> Self {
        Section {
            lines,
            label,
            original,
            header,
            removed: Vec::new(),
        }
    }

    pub(super) fn say(&self, text: impl std::fmt::Display) -> String {
        format!("{}: {text}", self.label)
    }

    /// The string value of a top-level key, as written.
    pub(super) fn str_value(&self, key: &str) -> Option<&str> {
        self.original.get(key).and_then(Item::as_str)
    }

    pub(super) fn has(&self, key: &str) -> bool {
        self.original
            .as_table_like()
            .is_some_and(|t| t.contains_key(key))
    }

    pub(super) fn dropped(&self, path: &str) -> bool {
        self.removed.iter().any(|r| r == path)
    }

    /// Line of the key at `path`, or of the nearest enclosing key or header that exists.
    pub(super) fn line(&self, path: &[&str]) -> usize {
        let mut line = self.header;
        let mut table = self.original.as_table_like();
        for key in path {
            let Some((k, item)) = table.and_then(|t| t.get_key_value(key)) else {
                break;
            };
            if let Some(span) = k.span().or_else(|| item.span()) {
                line = self.lines.line(span.start);
            }
            table = item.as_table_like();
        }
        line
    }

    /// Line of element `index` of the array (or array of tables) at `key`.
    pub(super) fn elem_line(&self, key: &str, index: usize) -> usize {
        let span = match self.original.get(key) {
            Some(Item::Value(Value::Array(a))) => a.get(index).and_then(Value::span),
            Some(Item::ArrayOfTables(a)) => a.get(index).and_then(|t| t.span()),
            _ => None,
        };
        span.map_or_else(|| self.line(&[key]), |s| self.lines.line(s.start))
    }

    /// Line of element `index` of the array at the key `path`, which may lie in nested
    /// tables (`["table", "list"]`), or of the nearest key that exists.
    pub(super) fn path_elem_line(&self, path: &[&str], index: usize) -> usize {
        let mut item = Some(&self.original);
        for key in path {
            item = item
                .and_then(|i| i.as_table_like())
                .and_then(|t| t.get(key));
        }
        let span = match item {
            Some(Item::Value(Value::Array(a))) => a.get(index).and_then(Value::span),
            _ => None,
        };
        span.map_or_else(|| self.line(path), |s| self.lines.line(s.start))
    }

    /// Line of `inner` in the table that is element `index` of the array of tables at
    /// `key` (`[[sim.routes]]`), or of that element when it lacks `inner`.
    pub(super) fn elem_key_line(&self, key: &str, index: usize, inner: &str) -> usize {
        let table = match self.original.get(key) {
            Some(Item::ArrayOfTables(a)) => a.get(index).map(|t| t as &dyn TableLike),
            Some(Item::Value(Value::Array(a))) => a
                .get(index)
                .and_then(Value::as_inline_table)
                .map(|t| t as &dyn TableLike),
            _ => None,
        };
        let span = table
            .and_then(|t| t.get_key_value(inner))
            .and_then(|(k, item)| k.span().or_else(|| item.span()));
        span.map_or_else(|| self.elem_line(key, index), |s| self.lines.line(s.start))
    }

    /// A positive number of milliseconds, or the default.
    pub(super) fn millis(
        &self,
        errs: &mut Errors,
        path: &[&str],
        value: Option<u64>,
        default: u64,
    ) -> Duration {
        let ms = value.unwrap_or(default);
        if ms == 0 {
            errs.push(
                self.line(path),
                self.say(format!("{} must be greater than 0", path.join("."))),
            );
        }
        Duration::from_millis(ms)
    }

    /// Deserializes the section. A key that fails is reported at its line, dropped, and the
    /// section retried, so every bad key is reported. `None` when an error cannot be pinned to
    /// a key (it is reported at the header).
    pub(super) fn deserialize<T: DeserializeOwned>(&mut self, errs: &mut Errors) -> Option<T> {
        let mut work = self.original.clone();
        loop {
            let value = work.clone().into_value().ok()?;
            let err = match T::deserialize(value.into_deserializer()) {
                Ok(v) => return Some(v),
                Err(e) => e,
            };
            let span = err.span();
            let mut path = span.as_ref().and_then(|s| locate(&work, s));
            let mut line = span.map_or(self.header, |s| self.lines.line(s.start));
            if let (Some(p), Some(field)) = (path.as_mut(), missing_field(err.message())) {
                // Serde names the missing field but not the table lacking it: find that table.
                if let Some(found) = lacking(&work, p, field) {
                    line = found.map_or(line, |s| self.lines.line(s.start));
                }
            }
            errs.push(
                line,
                self.describe(path.as_deref().unwrap_or(&[]), err.message()),
            );

            let mut path = path?;
            while matches!(path.last(), Some(Seg::Index(_))) {
                path.pop();
            }
            if path.is_empty() || !remove(work.as_table_like_mut()?, &path) {
                return None;
            }
            self.removed.push(render(&path));
        }
    }

    pub(super) fn describe(&self, path: &[Seg], message: &str) -> String {
        let message = message.replacen("missing field", "missing key", 1);
        let (path, message) = match message.strip_prefix("unknown field") {
            // The path ends at the unknown key itself, which the message already names.
            Some(rest) => (
                &path[..path.len().saturating_sub(1)],
                format!("unknown key{rest}"),
            ),
            None => (
                path,
                message.replacen("unknown variant", "unknown value", 1),
            ),
        };
        let message = if message == "invalid socket address syntax" {
            format!("{message}; write \"ip:port\", e.g. \"127.0.0.1:8080\" (host names are not resolved)")
        } else {
            message
        };
        if path.is_empty() {
            self.say(message)
        } else {
            self.say(format!("{}: {message}", render(path)))
        }
    }
}

fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.strip_suffix('`')
}

/// For a "missing field" error located at `path` (trimmed to its last key): the element of
/// the array there that lacks `field`. Rewrites `path` to end at that element and returns its
/// header span.
fn lacking(work: &Item, path: &mut Vec<Seg>, field: &str) -> Option<Option<Range<usize>>> {
    while matches!(path.last(), Some(Seg::Index(_))) {
        path.pop();
    }
    let mut item = work;
    for seg in path.iter() {
        item = match seg {
            Seg::Key(k) => item.as_table_like()?.get(k)?,
            Seg::Index(_) => return None,
        };
    }
    let (index, span) = match item {
        Item::ArrayOfTables(a) => a
            .iter()
            .enumerate()
            .find(|(_, t)| !t.contains_key(field))
            .map(|(i, t)| (i, t.span()))?,
        Item::Value(Value::Array(a)) => a.iter().enumerate().find_map(|(i, v)| {
            let t = v.as_inline_table()?;
            (!t.contains_key(field)).then(|| (i, t.span()))
        })?,
        _ => return None,
    };
    path.push(Seg::Index(index));
    Some(span)
}

fn contains(outer: Option<Range<usize>>, inner: &Range<usize>) -> bool {
    outer.is_some_and(|o| o.start <= inner.start && inner.end <= o.end)
}

/// The path of the innermost key whose name or value spans `err`.
fn locate(item: &Item, err: &Range<usize>) -> Option<Vec<Seg>> {
    match item {
        Item::Value(v) => locate_value(v, err),
        Item::Table(t) => locate_table(t, err),
        Item::ArrayOfTables(a) => a.iter().enumerate().find_map(|(i, t)| {
            let inner = locate_table(t, err).or_else(|| contains(t.span(), err).then(Vec::new));
            inner.map(|p| prepend(Seg::Index(i), p))
        }),
        Item::None => None,
    }
}

fn locate_value(value: &Value, err: &Range<usize>) -> Option<Vec<Seg>> {
    match value {
        Value::InlineTable(t) => locate_table(t, err),
        Value::Array(a) => a.iter().enumerate().find_map(|(i, v)| {
            let inner = locate_value(v, err).or_else(|| contains(v.span(), err).then(Vec::new));
            inner.map(|p| prepend(Seg::Index(i), p))
        }),
        _ => None,
    }
}

fn locate_table(table: &dyn TableLike, err: &Range<usize>) -> Option<Vec<Seg>> {
    table.iter().find_map(|(key, item)| {
        let here =
            contains(table.key(key).and_then(|k| k.span()), err) || contains(item.span(), err);
        let inner = locate(item, err).or_else(|| here.then(Vec::new));
        inner.map(|p| prepend(Seg::Key(key.to_string()), p))
    })
}

fn prepend(seg: Seg, mut path: Vec<Seg>) -> Vec<Seg> {
    path.insert(0, seg);
    path
}

/// Removes the key at `path` (which ends with a key). True if something was removed.
fn remove(table: &mut dyn TableLike, path: &[Seg]) -> bool {
    let [Seg::Key(key), rest @ ..] = path else {
        return false;
    };
    if rest.is_empty() {
        return table.remove(key).is_some();
    }
    let Some(child) = table.get_mut(key) else {
        return false;
    };
    match (child, &rest[0]) {
        (Item::ArrayOfTables(a), Seg::Index(i)) => {
            a.get_mut(*i).is_some_and(|t| remove(t, &rest[1..]))
        }
        (Item::Value(Value::Array(a)), Seg::Index(i)) => match a.get_mut(*i) {
            Some(Value::InlineTable(t)) => remove(t, &rest[1..]),
            _ => false,
        },
        (child, Seg::Key(_)) => child.as_table_like_mut().is_some_and(|t| remove(t, rest)),
        _ => false,
    }
}
