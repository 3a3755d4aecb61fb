//! Logging: tracing to stderr, filtered by `RUST_LOG` (default `info`). Records of the `log`
//! facade, which is where aya-log delivers the kernel programs' messages, join the same stream.

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // `try_init` also installs the log -> tracing bridge (tracing-subscriber's tracing-log feature).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
