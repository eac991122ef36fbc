//! The `hbrfs` binary: parse arguments, set up logging, call the library.

fn main() {
    std::process::exit(hbrfs::cli::main());
}
