fn main() -> std::process::ExitCode {
    slipway_agent::cli::main()
}
