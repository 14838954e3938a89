fn main() {
    std::process::exit(vmexportfs::cli::main());
}
