fn main() -> std::process::ExitCode {
    sideyard::cli::main()
}
