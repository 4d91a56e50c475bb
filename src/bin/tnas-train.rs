//! `tnas-train`: offline meta-training and evaluation of T-NAS supernets and baselines.

use clap::{Parser, Subcommand};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tnas::meta::command::{card, eval, meta_train, CardArgs, EvalArgs, MetaTrainArgs};

#[derive(Parser)]
#[command(
    version,
    about = "Meta-train a DARTS supernet with T-NAS (or a baseline) and evaluate it on held-out classes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Meta-train and write models/<name>/ (the best checkpoint by validation accuracy, or the
    /// latest with --no-validation; resumable).
    MetaTrain(MetaTrainArgs),
    /// N-way K-shot accuracy ± 95% interval on held-out classes.
    Eval(EvalArgs),
    /// Write the model card (README.md) from model.json, optionally beside baselines.
    Card(CardArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::MetaTrain(args) => {
            let stop = Arc::new(AtomicBool::new(false));
            let handler_stop = stop.clone();
            ctrlc::set_handler(move || {
                eprintln!("\nstopping: saving a resumable checkpoint after this step");
                handler_stop.store(true, Ordering::SeqCst);
            })?;
            // Recorded in model.json; the program is named as users call it, not by its path.
            let command = std::iter::once("tnas-train".to_string())
                .chain(std::env::args().skip(1))
                .collect::<Vec<_>>()
                .join(" ");
            meta_train(&args, command, &stop).map_err(anyhow::Error::msg)
        }
        Command::Eval(args) => eval(&args).map(|_| ()).map_err(anyhow::Error::msg),
        Command::Card(args) => card(&args).map_err(anyhow::Error::msg),
    }
}
