//! Command-line front end: argument parsing and the subcommands.

mod convert;
mod init_model;
mod predict;
mod route;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "routerscope",
    version,
    about = "Look inside vision Mixture-of-Experts routing"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Apply one router to tensors in a safetensors file and write its dispatch and combine tensors.
    Route(route::RouteArgs),
    /// Classify images and summarise how every MoE layer routed their patches.
    Predict(predict::PredictArgs),
    /// Write a seeded random checkpoint of a named architecture.
    InitModel(init_model::InitModelArgs),
    /// Convert a vmoe checkpoint (index + msgpack shards) to a routerscope safetensors checkpoint.
    Convert(convert::ConvertArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Route(args) => route::run(&args),
        Command::Predict(args) => predict::run(&args),
        Command::InitModel(args) => init_model::run(&args),
        Command::Convert(args) => convert::run(&args),
    }
}
