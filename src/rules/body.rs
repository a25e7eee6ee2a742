//! What a rule reads from request and response bodies, compiled once per rule.
//!
//! A rule that names no body path has no plan, and its requests skip every body stage. A plan
//! lists the dotted paths to look for, so the scanners ([`crate::scan`]) compare keys
//! against a fixed set and never build a document.

use super::{Actions, CostSource};
use crate::scan::JsonPaths;
use std::sync::Arc;

/// Where the request body is read from, and which of its paths mean what.
pub struct BodyPlan {
    /// The whole request body is read before the quota stage: a charge's cost comes from it,
    /// or `stream_options` may be added to it. Otherwise the body is scanned as it streams.
    pub pre_read: bool,
    /// Paths read in the request body.
    pub request: Option<JsonPaths>,
    /// Per charge (in the rule's order): the indexes in `request` of its `cost_from_body`
    /// paths (empty for a cost from elsewhere).
    pub cost_at: Vec<Vec<usize>>,
    /// Per charge: the indexes in `request` of its `cost_multiplier_from_body` paths.
    pub multiplier_at: Vec<Vec<usize>>,
    pub model_at: Option<usize>,
    /// `stream`, `stream_options` and `stream_options.include_usage`, for
    /// `inject_stream_usage`.
    pub stream_at: Option<(usize, usize, usize)>,
    /// Paths read in a JSON response body, and per charge the index of its `settle_from_body`.
    pub json: Option<JsonPaths>,
    pub json_at: Vec<Option<usize>>,
    /// Paths read in the events of a `text/event-stream` response, per charge the index of
    /// its `settle_from_sse`, and the index of `choices` (an event carrying usage and no
    /// choices is the extra usage event `inject_stream_usage` takes out).
    pub sse: Option<Arc<JsonPaths>>,
    pub sse_at: Vec<Option<usize>>,
    pub sse_choices_at: Option<usize>,
}

impl std::fmt::Debug for BodyPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyPlan")
            .field("pre_read", &self.pre_read)
            .field("request", &self.request.as_ref().map(JsonPaths::len))
            .field("json", &self.json.as_ref().map(JsonPaths::len))
            .field("sse", &self.sse.as_ref().map(|s| s.len()))
            .finish()
    }
}

/// Collects paths once each and answers their index.
#[derive(Default)]
struct PathList(Vec<Arc<str>>);

impl PathList {
    fn add(&mut self, p: &Arc<str>) -> usize {
        match self.0.iter().position(|q| q == p) {
            Some(i) => i,
            None => {
                self.0.push(p.clone());
                self.0.len() - 1
            }
        }
    }

    /// `Err` names the side when its paths do not compile together (more than the scanner
    /// takes; each path alone was checked when the rule was read).
    fn compile(&self, side: &str) -> Result<Option<JsonPaths>, String> {
        if self.0.is_empty() {
            return Ok(None);
        }
        JsonPaths::new(&self.0).map(Some).map_err(|e| format!("the rule reads too many paths in the {side}: {e}"))
    }
}

impl BodyPlan {
    /// The plan of a rule's (merged) actions; `None` when the rule reads no body, `Err` when
    /// it names more distinct paths on one side than the scanner takes.
    pub fn of(a: &Actions) -> Result<Option<BodyPlan>, String> {
        let mut request = PathList::default();
        let cost_at: Vec<Vec<usize>> = a
            .charges
            .iter()
            .map(|c| match &c.cost {
                CostSource::Body { paths, .. } => paths.iter().map(|p| request.add(p)).collect(),
                _ => Vec::new(),
            })
            .collect();
        let multiplier_at: Vec<Vec<usize>> = a
            .charges
            .iter()
            .map(|c| match &c.cost {
                CostSource::Body { multiplier, .. } => multiplier.iter().map(|m| request.add(m)).collect(),
                _ => Vec::new(),
            })
            .collect();
        let model_at = a.model_from_body.as_ref().map(|m| request.add(m));
        let stream_at = a.inject_stream_usage.then(|| {
            (
                request.add(&"stream".into()),
                request.add(&"stream_options".into()),
                request.add(&"stream_options.include_usage".into()),
            )
        });
        let mut json = PathList::default();
        let json_at: Vec<Option<usize>> =
            a.charges.iter().map(|c| c.settle_from_body.as_ref().map(|p| json.add(p))).collect();
        let mut sse = PathList::default();
        let sse_at: Vec<Option<usize>> =
            a.charges.iter().map(|c| c.settle_from_sse.as_ref().map(|p| sse.add(p))).collect();
        let sse_choices_at = (a.inject_stream_usage && !sse.0.is_empty()).then(|| sse.add(&"choices".into()));
        if request.0.is_empty() && json.0.is_empty() && sse.0.is_empty() {
            return Ok(None);
        }
        Ok(Some(BodyPlan {
            pre_read: cost_at.iter().any(|at| !at.is_empty()) || stream_at.is_some(),
            request: request.compile("request body")?,
            cost_at,
            multiplier_at,
            model_at,
            stream_at,
            json: json.compile("JSON answer")?,
            json_at,
            sse: sse.compile("event stream")?.map(Arc::new),
            sse_at,
            sse_choices_at,
        }))
    }
}
