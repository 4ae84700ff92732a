//! The `salt-steward` binary: everything lives in the library.

fn main() -> std::process::ExitCode {
    salt_steward::cli::main()
}
