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
    line_starts: Vec<usize>,
}

impl SourceFile {
    pub fn new(path: &Path, text: String) -> Self {
        let mut line_starts = vec![0];
        for (i, b) in text.bytes().enumerate() {
            if b == b'\n' {
                line_starts.push(i + 1);
            }
        }
        SourceFile { path: path.to_path_buf(), text: text.into(), line_starts }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = match self.line_starts.binary_search(&offset) {
            Ok(i) => i,
            Err(i) => i.saturating_sub(1),
        };
        let start = self.line_starts[line];
        let col = self.text.get(start..offset).map(|s| s.chars().count()).unwrap_or(0);
        (line + 1, col + 1)
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
