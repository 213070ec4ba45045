//! The `routerscope` command line.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // SAFETY: first statement of main, no other thread exists yet.
    unsafe { routerscope::runtime::pin_thread_count() };
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line: the context chain joined with ": ".
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
