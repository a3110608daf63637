//! The `riffle` binary; everything lives in the library (`riffle::cli`).

fn main() -> std::process::ExitCode {
    riffle::cli::main()
}
