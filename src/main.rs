//! The `routerscope` command line.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // SAFETY: first statement of main, no other thread exists yet.
    unsafe { routerscope::runtime::pin_thread_count() };
    // Ctrl-C: a stoppable run (`analyze`) winds down and writes what it did; otherwise, or on a
    // second Ctrl-C, exit at once, leaving no half-written output behind.
    let _ = ctrlc::set_handler(|| {
        if routerscope::runtime::request_stop() {
            eprintln!("\nrouterscope: stopping after the current batch (Ctrl-C again to quit now)");
            return;
        }
        routerscope::tensor_io::remove_pending_temporaries();
        eprintln!("\nrouterscope: interrupted");
        std::process::exit(130);
    });
    let args = cli::Cli::parse();
    if !args.opens_app() {
        quiet_on_closed_pipe();
    }
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line: the context chain joined with ": ".
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// A command whose reader goes away (`routerscope predict --json … | head`) ends as command-line
/// tools do, killed quietly by SIGPIPE (status 141 in the shell), instead of panicking at the next
/// print: Rust ignores SIGPIPE, so restore the default action. Not for the app, which writes to no
/// pipe and must not die of one.
fn quiet_on_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: restoring a signal's default disposition; no handler code is involved.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
