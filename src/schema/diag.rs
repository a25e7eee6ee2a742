//! Config diagnostics: every problem found in a config, each with file, line and column.
//!
//! Loading never stops at the first problem. Each stage pushes into one [`Diagnostics`] and the
//! caller prints them all, so an operator fixes a file in one pass.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One loaded source file, kept to turn byte offsets into line and column.
#[derive(Debug, Clone)]
pub struct SourceFile {
    pub path: PathBuf,
    pub text: Arc<str>,
    /// Where each line starts: worked out on the first diagnostic, since a valid file of a
    /// million keys (seven million lines) never needs it.
    line_starts: std::sync::OnceLock<Vec<usize>>,
    /// For a part of a file read on its own (one `[[tenants]]` table of a large config): where
    /// the part starts in the file, in bytes and in lines. Zero for a whole file.
    offset: usize,
    first_line: usize,
}

impl SourceFile {
    pub fn new(path: &Path, text: String) -> Self {
        SourceFile::part(path, text, 0, 0)
    }

    /// A part of the file at `path` that starts `offset` bytes and `first_line` lines into it:
    /// spans are relative to the part, and diagnostics name the file's own lines.
    pub fn part(path: &Path, text: String, offset: usize, first_line: usize) -> Self {
        SourceFile { path: path.to_path_buf(), text: text.into(), line_starts: Default::default(), offset, first_line }
    }

    fn line_starts(&self) -> &[usize] {
        self.line_starts.get_or_init(|| {
            let mut starts = vec![0];
            starts.extend(self.text.bytes().enumerate().filter(|(_, b)| *b == b'\n').map(|(i, _)| i + 1));
            starts
        })
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line_starts = self.line_starts();
        let line = match line_starts.binary_search(&offset) {
            Ok(i) => i,
            Err(i) => i.saturating_sub(1),
        };
        let start = line_starts[line];
        let col = self.text.get(start..offset).map(|s| s.chars().count()).unwrap_or(0);
        (self.first_line + line + 1, col + 1)
    }
}

/// Severity of a diagnostic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// A problem in a config file.
#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub severity: Severity,
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        if self.line == 0 {
            write!(f, "{}: {sev}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}:{}:{}: {sev}: {}", self.file.display(), self.line, self.col, self.message)
        }
    }
}

/// The collected diagnostics of one load.
#[derive(Debug, Default, Clone)]
pub struct Diagnostics {
    pub items: Vec<Diagnostic>,
    /// Fields whose value had the wrong type. Each was reported at its value and then left out,
    /// so a check that the field is present must not report it a second time as missing.
    invalid: Vec<InvalidField>,
}

/// A field left out because its value had the wrong type: the table it was written in (known
/// by the table's span, or by the span of the key the table is written under) and its key.
#[derive(Debug, Clone)]
struct InvalidField {
    file: PathBuf,
    table: Range<usize>,
    key: String,
}

impl Diagnostics {
    pub fn error_at(&mut self, src: &SourceFile, span: Range<usize>, message: impl Into<String>) {
        self.push(Severity::Error, src, Some(span), message.into());
    }

    pub fn warn_at(&mut self, src: &SourceFile, span: Range<usize>, message: impl Into<String>) {
        self.push(Severity::Warning, src, Some(span), message.into());
    }

    /// An error about a whole file (it cannot be read, for example).
    pub fn error_file(&mut self, path: &Path, message: impl Into<String>) {
        self.items.push(Diagnostic {
            severity: Severity::Error,
            file: path.to_path_buf(),
            line: 0,
            col: 0,
            message: message.into(),
        });
    }

    fn push(&mut self, severity: Severity, src: &SourceFile, span: Option<Range<usize>>, message: String) {
        let (line, col) = span.map(|s| src.line_col(s.start)).unwrap_or((0, 0));
        self.items.push(Diagnostic { severity, file: src.path.clone(), line, col, message });
    }

    /// Records that `key` of the table at `table` was reported for its type and left out.
    pub fn mark_invalid(&mut self, src: &SourceFile, table: Range<usize>, key: &str) {
        let table = table.start + src.offset..table.end + src.offset;
        self.invalid.push(InvalidField { file: src.path.clone(), table, key: key.to_string() });
    }

    /// Whether `key` of the table at `table` (the table's span, or the span of the key it is
    /// written under) was already reported for its type.
    pub fn was_invalid(&self, src: &SourceFile, table: Range<usize>, key: &str) -> bool {
        let table = table.start + src.offset..table.end + src.offset;
        self.invalid.iter().any(|f| f.table == table && f.key == key && f.file == src.path)
    }

    /// Reports that a table lacks `key`, unless `key` was written with the wrong type (which
    /// was already reported where it stands).
    pub fn missing_at(
        &mut self,
        src: &SourceFile,
        table: Range<usize>,
        key: &str,
        at: Range<usize>,
        message: impl Into<String>,
    ) {
        if !self.was_invalid(src, table, key) {
            self.error_at(src, at, message);
        }
    }

    /// Orders the diagnostics as a reader fixes them: file by file (in the order the files were
    /// first reported on, so the main file comes first) and top to bottom within a file.
    /// Problems are found table by table and then check by check, which is not that order.
    pub fn sort(&mut self) {
        let mut files: Vec<PathBuf> = Vec::new();
        for d in &self.items {
            if !files.contains(&d.file) {
                files.push(d.file.clone());
            }
        }
        let rank = |d: &Diagnostic| files.iter().position(|f| *f == d.file).unwrap_or(usize::MAX);
        self.items.sort_by_key(|d| (rank(d), d.line, d.col));
    }

    pub fn has_errors(&self) -> bool {
        self.items.iter().any(|d| d.severity == Severity::Error)
    }

    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.items.iter().filter(|d| d.severity == Severity::Error)
    }

    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.items.iter().filter(|d| d.severity == Severity::Warning)
    }

    pub fn extend(&mut self, other: Diagnostics) {
        self.items.extend(other.items);
        self.invalid.extend(other.invalid);
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.items {
            writeln!(f, "{d}")?;
        }
        let n = self.errors().count();
        if n > 0 {
            write!(f, "{n} error(s); the config was not loaded")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}
