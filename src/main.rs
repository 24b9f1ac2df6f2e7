fn main() {
    std::process::exit(capgen::cli::main());
}
