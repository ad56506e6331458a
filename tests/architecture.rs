//! Keeps the architecture invariants of ARCHITECTURE.md true: the decision core does no I/O, knows
//! nothing of gRPC and reads no clock; nothing outside tests unwraps or panics.
#![allow(clippy::panic)]

use std::fs;
use std::path::Path;

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display())) {
        let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code before a file's `#[cfg(test)]` module (tests may do what production code may not).
fn production_part(text: &str) -> &str {
    text.split("#[cfg(test)]").next().unwrap_or(text)
}

#[test]
fn the_core_does_no_io_and_knows_no_transport() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/core");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    assert!(
        files.len() >= 7,
        "expected the core's modules under {}",
        root.display()
    );
    let forbidden = [
        "tokio",
        "tonic",
        "prost",
        "reqwest",
        "axum",
        "hyper",
        "std::net",
        "std::fs",
        "SystemTime",
        "Instant::now",
        "crate::proto",
        "crate::grpc",
        "crate::jwks",
        "crate::directory",
        "crate::engine",
        "crate::server",
    ];
    for file in files {
        if file.ends_with("tests.rs") {
            continue;
        }
        let text = fs::read_to_string(&file).unwrap_or_else(|e| panic!("{e}"));
        for word in forbidden {
            assert!(
                !production_part(&text).contains(word),
                "{} mentions `{word}`: the core must stay pure (see ARCHITECTURE.md)",
                file.display()
            );
        }
    }
}

#[test]
fn production_code_has_no_unwrap_expect_or_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    for file in files {
        if file.ends_with("core/tests.rs") {
            continue;
        }
        let text = fs::read_to_string(&file).unwrap_or_else(|e| panic!("{e}"));
        for word in [
            ".unwrap()",
            ".expect(",
            "panic!(",
            "unreachable!(",
            "todo!(",
            "unimplemented!(",
        ] {
            assert!(
                !production_part(&text).contains(word),
                "{} uses `{word}` outside tests",
                file.display()
            );
        }
    }
}
