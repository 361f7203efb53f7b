fn main() -> std::process::ExitCode {
    slipway_coordinator::cli::main()
}
