//! The `riffle` binary; everything lives in the library (`riffle::cli`).

/// mimalloc: streaming operators allocate per key and per epoch, which glibc's allocator
/// handled at a third of their time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    riffle::cli::main()
}
