//! Body scanning: `JsonScan` over JSON response bodies and `SseScan` over event streams, as the
//! gateway runs them on a body that passes through.
//!
//! Bound: at most 1 µs per KiB of JSON and 1 µs per SSE event.
//!
//! Run with `cargo bench --bench scan`. Groups (each iteration scans one whole body, fed in
//! chunks; the time per KiB or per event is the iteration time divided by the body's KiB or
//! event count, printed to stderr with the body sizes):
//! - `json/chat_16k_4k_chunks`: a ~16 KiB chat completion whose `content` is one long string
//!   with escapes, the `usage` block at the end; paths `usage.total_tokens`,
//!   `usage.prompt_tokens`, `usage.completion_tokens`, `model`; fed in 4 KiB chunks.
//! - `json/small_keys_4k`: a ~4 KiB object of many short keys with numbers, strings and small
//!   nested objects, the worst shape (every byte is structure at a depth a path can reach);
//!   the same paths plus one the body lacks (so the scan reads to the end); one chunk.
//! - `json/request_strict_small_keys_4k`: the same 4 KiB body read as a request body is read
//!   before forwarding (a strict scanner, which reads to the end and compares every key along a
//!   path with the paths in another case too); the paths of the `openai-compatible` pack's
//!   completions route: `max_tokens`, `n`, `best_of`, `model`, `stream`, `stream_options`,
//!   `stream_options.include_usage`.
//! - `sse/chat_200_events_1k_chunks/{pass,drop}`: 200 chat-chunk events (~150 bytes each), a
//!   usage event and `data: [DONE]`, fed in 1 KiB chunks; paths `usage.total_tokens`,
//!   `choices`; without `drop_when`, and with `drop_when = (usage.total_tokens, choices)`
//!   (the usage event is removed from the output).

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;
use tollgate::scan::{Found, JsonPaths, JsonScan, SseScan};

fn chat_completion_16k() -> Vec<u8> {
    let mut content = String::new();
    let mut i = 0;
    while content.len() < 16 * 1024 - 400 {
        content.push_str(&format!("Paragraph {i}: the gateway meters tokens \\\"exactly\\\" as they pass.\\n"));
        i += 1;
    }
    format!(
        r#"{{"id":"chatcmpl-9x","object":"chat.completion","created":1733000000,"model":"gpt-4o-2024-08-06","choices":[{{"index":0,"message":{{"role":"assistant","content":"{content}","refusal":null}},"logprobs":null,"finish_reason":"stop"}}],"usage":{{"prompt_tokens":1024,"completion_tokens":3900,"total_tokens":4924,"prompt_tokens_details":{{"cached_tokens":0}}}},"system_fingerprint":"fp_9x"}}"#
    )
    .into_bytes()
}

fn small_keys_4k() -> Vec<u8> {
    let mut s = String::from("{");
    let mut i = 0;
    while s.len() < 4 * 1024 - 200 {
        match i % 4 {
            0 => s.push_str(&format!(r#""k{i}":{i},"#)),
            1 => s.push_str(&format!(r#""k{i}":"v{i}","#)),
            2 => s.push_str(&format!(r#""k{i}":{{"a":{i},"b":[1,2]}},"#)),
            _ => s.push_str(&format!(r#""k{i}":1.5e2,"#)),
        }
        i += 1;
    }
    s.push_str(r#""model":"m","usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#);
    s.into_bytes()
}

fn sse_stream() -> (Vec<u8>, u64) {
    let mut s = String::new();
    let mut events = 0;
    for i in 0..200 {
        s.push_str(&format!(
            "data: {{\"id\":\"chatcmpl-9x\",\"object\":\"chat.completion.chunk\",\"created\":1733000000,\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{i:03}\"}}}}],\"usage\":null}}\n\n"
        ));
        events += 1;
    }
    s.push_str("data: {\"id\":\"chatcmpl-9x\",\"object\":\"chat.completion.chunk\",\"created\":1733000000,\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":200,\"total_tokens\":209}}\n\n");
    s.push_str("data: [DONE]\n\n");
    events += 2;
    (s.into_bytes(), events)
}

fn bench(c: &mut Criterion) {
    let json_paths = JsonPaths::new(&[
        "usage.total_tokens",
        "usage.prompt_tokens",
        "usage.completion_tokens",
        "model",
        "absent.path",
    ])
    .expect("paths");
    let chat = chat_completion_16k();
    let small = small_keys_4k();
    eprintln!("scan bench: chat body {} bytes, small-keys body {} bytes", chat.len(), small.len());

    let mut g = c.benchmark_group("json");
    g.throughput(Throughput::Bytes(chat.len() as u64));
    let mut scan = JsonScan::new(&json_paths);
    g.bench_function("chat_16k_4k_chunks", |b| {
        b.iter(|| {
            scan.reset();
            for part in chat.chunks(4096) {
                scan.feed(&json_paths, black_box(part));
            }
            scan.finish(&json_paths);
            assert_eq!(scan.get(0), Some(&Found::Num(4924)));
        })
    });
    g.throughput(Throughput::Bytes(small.len() as u64));
    g.bench_function("small_keys_4k", |b| {
        b.iter(|| {
            scan.reset();
            scan.feed(&json_paths, black_box(&small));
            scan.finish(&json_paths);
            assert_eq!(scan.get(0), Some(&Found::Num(3)));
        })
    });
    let request_paths = JsonPaths::new(&[
        "max_tokens",
        "n",
        "best_of",
        "model",
        "stream",
        "stream_options",
        "stream_options.include_usage",
    ])
    .expect("paths");
    let mut strict = JsonScan::strict(&request_paths);
    g.bench_function("request_strict_small_keys_4k", |b| {
        b.iter(|| {
            strict.reset();
            strict.feed(&request_paths, black_box(&small));
            strict.finish(&request_paths);
            assert!(!strict.duplicated() && !strict.case_variant());
            assert!(matches!(strict.get(3), Some(Found::Str { .. })));
        })
    });
    g.finish();

    let (stream, events) = sse_stream();
    eprintln!("scan bench: SSE stream {} bytes, {events} events", stream.len());
    let chunks: Vec<Bytes> = stream.chunks(1024).map(Bytes::copy_from_slice).collect();
    let sse_paths = Arc::new(JsonPaths::new(&["usage.total_tokens", "choices"]).expect("paths"));
    let mut g = c.benchmark_group("sse");
    g.throughput(Throughput::Elements(events));
    for (name, drop_when) in [("pass", None), ("drop", Some((0, 1)))] {
        g.bench_function(format!("chat_200_events_1k_chunks/{name}"), |b| {
            b.iter(|| {
                let mut sse = SseScan::new(sse_paths.clone(), drop_when, 64 * 1024);
                let mut out = 0;
                let last = chunks.len() - 1;
                for (i, ch) in chunks.iter().enumerate() {
                    out += sse.feed(black_box(ch.clone()), i == last).len();
                }
                assert_eq!(sse.last(0), Some(&Found::Num(209)));
                out
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
