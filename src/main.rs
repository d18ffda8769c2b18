//! The `ovlfuse` command: parses the command line and hands over to the daemon or the demo.

use std::process::ExitCode;

use ovlfuse::options::{self, Command};

/// Exit code for a command line that cannot be understood.
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let command = match options::parse_args(std::env::args_os().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ovlfuse: {e}");
            eprintln!("Try 'ovlfuse --help' for more information.");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let code = match command {
        Command::Help => {
            print!("{}", options::help_text());
            0
        }
        Command::Version => {
            println!("ovlfuse {}", env!("CARGO_PKG_VERSION"));
            0
        }
        Command::Demo => ovlfuse::demo::run(),
        Command::Status(target) => ovlfuse::status::command(&target),
        Command::Sync(path) => ovlfuse::health::sync_command(&path),
        Command::Mount(config) => ovlfuse::daemon::run(config),
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
