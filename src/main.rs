//! The `lifecycle-scorer` binary: parses the command line, loads configuration, starts logging,
//! and runs one command. Wiring only; the logic lives in the library.

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use lifecycle_scorer::codec::parse_time_argument;
use lifecycle_scorer::config::{Config, ConfigError};
use lifecycle_scorer::domain::Timestamp;
use lifecycle_scorer::fit_command::{fit_rows, read_summary, spend_rows_from_state, statistics_from_state};
use lifecycle_scorer::generate::{generate, GenerateOptions};
use lifecycle_scorer::http::wall_clock;
use lifecycle_scorer::process_stats::peak_resident_bytes;
use lifecycle_scorer::replay::{replay, write_state, ReplayOptions};
use lifecycle_scorer::scoring::gamma_gamma::fit_gamma_gamma;
use lifecycle_scorer::scoring::{ModelKind, TimeUnit};
use lifecycle_scorer::service::embedded::{run_embedded, EmbeddedOptions};
use lifecycle_scorer::service::RunOptions;

#[derive(Debug, Parser)]
#[command(
    name = "lifecycle-scorer",
    version,
    about = "Customer lifecycle stages and calibrated churn risk from behaviour streams"
)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `lifecycle_scorer=debug`.
    #[arg(long, global = true, env = "LIFECYCLE_SCORER_LOG", default_value = "info")]
    log: String,
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the Kafka service: consume the input topics, publish stage changes, conversions and
    /// dead letters, serve /metrics, /healthz, /readyz, /contacts/{id} and /stages. Stops
    /// gracefully on SIGTERM or SIGINT.
    Run {
        /// Configuration file (default: the built-in default). With --embedded, its broker
        /// address and input formats are replaced by the embedded ones.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Start librdkafka's mock cluster in process, feed it a generated stream and run
        /// against it: the whole service with no external broker.
        #[arg(long)]
        embedded: bool,
        /// With --embedded: contacts in the generated stream.
        #[arg(long, default_value_t = 20_000, requires = "embedded")]
        contacts: u64,
        /// With --embedded: days the generated stream spans.
        #[arg(long, default_value_t = 365, requires = "embedded")]
        days: u32,
        /// With --embedded: generator seed.
        #[arg(long, default_value_t = 1, requires = "embedded")]
        seed: u64,
        /// With --embedded: partitions of every topic.
        #[arg(long, default_value_t = 8, requires = "embedded")]
        partitions: i32,
        /// With --embedded: input records per second (0 = as fast as possible).
        #[arg(long, default_value_t = 0, requires = "embedded")]
        rate: u64,
        /// With --embedded: stop once every record is processed and print the throughput,
        /// latency and CPU report as JSON (the end-to-end benchmark).
        #[arg(long, requires = "embedded")]
        exit_when_done: bool,
        /// With --embedded: HTTP listen address (else `http.listen` of the configuration).
        #[arg(long, default_value = "127.0.0.1:8080", requires = "embedded")]
        listen: std::net::SocketAddr,
    },
    /// Run events from a JSON-lines file (or stdin) through the engine; stage changes go to
    /// stdout as JSON lines, a summary to stderr.
    Replay {
        /// Input file, or `-` for stdin.
        #[arg(long)]
        input: String,
        /// Configuration file (default: the built-in default).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Advance every timer to this time at the end (RFC 3339 or YYYY-MM-DD = midnight UTC).
        #[arg(long, value_parser = parse_time)]
        as_of: Option<Timestamp>,
        /// Write every contact's final state as JSON lines to this file.
        #[arg(long)]
        state_out: Option<PathBuf>,
        /// Write stage changes here instead of stdout.
        #[arg(long)]
        output: Option<PathBuf>,
        /// How many bad lines to describe individually (all are counted).
        #[arg(long, default_value_t = 20)]
        max_errors_shown: usize,
        /// Expected number of contacts, to size the state up front.
        #[arg(long, default_value_t = 0)]
        capacity: usize,
        /// Process as `run` does with this many input partitions (each with its own clock,
        /// timers and reorder buffer), to compare with the service's output.
        #[arg(long, default_value_t = 1)]
        partitions: u32,
    },
    /// Fit model parameters by maximum likelihood.
    Fit {
        /// Summary CSV with columns `ID,frequency,recency,T`.
        #[arg(long, conflicts_with = "events", required_unless_present = "events")]
        summary: Option<PathBuf>,
        /// Events file (JSON lines) to take every buyer's statistics from.
        #[arg(long)]
        events: Option<PathBuf>,
        /// `bg-nbd` or `mbg-nbd`.
        #[arg(long, default_value = "bg-nbd")]
        model: ModelKind,
        /// Unit of the summary's recency and T, and of the fitted alpha: `days` or `weeks`.
        #[arg(long, default_value = "weeks")]
        time_unit: TimeUnit,
        /// With `--events`: statistics as of this time (default: the latest event).
        #[arg(long, value_parser = parse_time)]
        as_of: Option<Timestamp>,
        /// With `--events`: configuration whose engine replays the events.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Generate a realistic synthetic event stream (JSON lines) with its ground truth.
    Generate {
        /// Number of contacts.
        #[arg(long, default_value_t = 10_000)]
        contacts: u64,
        /// Length of the period in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Random seed: the same seed gives byte-identical output.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// First day of the period (YYYY-MM-DD or RFC 3339).
        #[arg(long, value_parser = parse_time, default_value = "2025-01-01")]
        start: Timestamp,
        /// Events file, or `-` for stdout.
        #[arg(long, default_value = "-")]
        output: String,
        /// Ground-truth file (one JSON line per contact). Default: beside `--output` as
        /// `<output>.truth.jsonl`; none when writing to stdout.
        #[arg(long)]
        truth: Option<PathBuf>,
    },
    /// Validate a configuration file and report every problem with its location.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
}

fn parse_time(text: &str) -> Result<Timestamp, String> {
    parse_time_argument(text)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log, cli.log_json);
    match run(cli.command) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn init_logging(filter: &str, json: bool) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    let config = Config::load(path)?;
    for warning in &config.warnings {
        tracing::warn!(location = %warning.location, "{}", warning.message);
    }
    Ok(config)
}

fn open_input(path: &str) -> anyhow::Result<Box<dyn BufRead>> {
    if path == "-" {
        Ok(Box::new(BufReader::with_capacity(1 << 20, io::stdin().lock())))
    } else {
        let file = File::open(path).with_context(|| format!("cannot open {path}"))?;
        Ok(Box::new(BufReader::with_capacity(1 << 20, file)))
    }
}

fn create_output(path: &Path) -> anyhow::Result<BufWriter<File>> {
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    Ok(BufWriter::with_capacity(1 << 20, file))
}

/// Completes on the first SIGTERM or SIGINT.
async fn termination() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("termination signal received");
}

fn run_service(config_path: Option<PathBuf>, embedded: Option<EmbeddedOptions>) -> anyhow::Result<ExitCode> {
    let config = load_config(config_path.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("lifecycle-scorer")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        match embedded {
            Some(options) => {
                if let Some(report) = run_embedded(config, options, termination()).await? {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                }
            }
            None => {
                let listen = config.service.listen;
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("cannot listen on {listen} (http.listen)"))?;
                let config_dir = config_path
                    .as_deref()
                    .and_then(Path::parent)
                    .map(Path::to_path_buf)
                    .unwrap_or_default();
                let options = RunOptions {
                    config_dir,
                    now: wall_clock,
                };
                lifecycle_scorer::service::run(config, options, listener, termination()).await?;
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run {
            config,
            embedded,
            contacts,
            days,
            seed,
            partitions,
            rate,
            exit_when_done,
            listen,
        } => run_service(
            config,
            embedded.then_some(EmbeddedOptions {
                contacts,
                days,
                seed,
                partitions,
                rate,
                exit_when_done,
                listen,
            }),
        ),
        Command::Replay {
            input,
            config,
            as_of,
            state_out,
            output,
            max_errors_shown,
            capacity,
            partitions,
        } => {
            let config = load_config(config.as_deref())?;
            let engine = Arc::new(config.engine);
            let reader = open_input(&input)?;
            let mut changes: Box<dyn Write> = match &output {
                Some(path) => Box::new(create_output(path)?),
                None => Box::new(BufWriter::with_capacity(1 << 20, io::stdout().lock())),
            };
            let mut errors = io::stderr().lock();
            let started = Instant::now();
            let options = ReplayOptions {
                as_of,
                max_errors_shown,
                capacity,
                partitions,
            };
            let (summary, processor) = replay(engine, config.processing, reader, &mut changes, &mut errors, options)?;
            changes.flush()?;
            let elapsed = started.elapsed().as_secs_f64();
            if let Some(path) = state_out {
                let mut out = create_output(&path)?;
                write_state(&processor, as_of.unwrap_or(processor.watermark()), &mut out)?;
                out.flush()?;
            }
            let report = serde_json::json!({
                "summary": summary,
                "elapsed_seconds": elapsed,
                "events_per_second": summary.lines as f64 / elapsed.max(1e-9),
                "peak_rss_bytes": peak_resident_bytes(),
            });
            writeln!(errors, "{}", serde_json::to_string_pretty(&report)?)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Fit {
            summary,
            events,
            model,
            time_unit,
            as_of,
            config,
            json,
        } => {
            let mut spend = Vec::new();
            let rows = match (summary, events) {
                (Some(path), _) => {
                    let file = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
                    read_summary(BufReader::new(file)).with_context(|| format!("in {}", path.display()))?
                }
                (None, Some(path)) => {
                    let config = load_config(config.as_deref())?;
                    let reader = open_input(&path.display().to_string())?;
                    let options = ReplayOptions {
                        as_of,
                        max_errors_shown: 20,
                        ..ReplayOptions::default()
                    };
                    let (_, processor) = replay(
                        Arc::new(config.engine),
                        config.processing,
                        reader,
                        &mut io::sink(),
                        &mut io::stderr(),
                        options,
                    )?;
                    spend = spend_rows_from_state(&processor);
                    statistics_from_state(&processor, time_unit, as_of.unwrap_or(processor.watermark()))
                }
                (None, None) => bail!("give --summary or --events"),
            };
            let mut fitted = fit_rows(model, rows, time_unit)?;
            if !spend.is_empty() {
                fitted.gamma_gamma = Some(fit_gamma_gamma(&spend)?);
            }
            if json {
                println!("{}", serde_json::to_string(&fitted)?);
            } else {
                println!(
                    "{} fitted on {} customers ({} distinct rows), time unit {}:\n  r = {:.6}\n  alpha = {:.6}\n  a = {:.6}\n  b = {:.6}\n  log-likelihood = {:.4}\n  iterations = {}, converged = {}",
                    fitted.model, fitted.customers, fitted.distinct_rows, fitted.time_unit, fitted.r, fitted.alpha, fitted.a, fitted.b,
                    fitted.log_likelihood, fitted.iterations, fitted.converged
                );
                if let Some(spend) = &fitted.gamma_gamma {
                    println!(
                        "gamma-gamma spend model on {} repeat buyers:\n  p = {:.6}\n  q = {:.6}\n  v = {:.6}\n  log-likelihood = {:.4}",
                        spend.customers, spend.params.p, spend.params.q, spend.params.v, spend.log_likelihood
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate {
            contacts,
            days,
            seed,
            start,
            output,
            truth,
        } => {
            let options = GenerateOptions {
                contacts,
                days,
                seed,
                start,
            };
            let truth_path = truth.or_else(|| (output != "-").then(|| PathBuf::from(format!("{output}.truth.jsonl"))));
            let mut events: Box<dyn Write> = if output == "-" {
                Box::new(BufWriter::with_capacity(1 << 20, io::stdout().lock()))
            } else {
                Box::new(create_output(Path::new(&output))?)
            };
            let mut truth_writer = truth_path.as_deref().map(create_output).transpose()?;
            let summary = generate(
                &options,
                &mut events,
                truth_writer.as_mut().map(|writer| writer as &mut dyn Write),
            )?;
            events.flush()?;
            if let Some(writer) = truth_writer.as_mut() {
                writer.flush()?;
            }
            eprintln!("{}", serde_json::to_string_pretty(&summary)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { file } => match Config::load(Some(&file)) {
            Ok(config) => {
                for warning in &config.warnings {
                    println!("warning: {warning}");
                }
                let model = &config.engine.model;
                println!(
                    "{}: ok ({} stages, {} rules, {} warning(s))",
                    file.display(),
                    model.stages.len(),
                    model.main_rules.len() + model.lost_rules.len(),
                    config.warnings.len()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(error @ (ConfigError::Invalid { .. } | ConfigError::Syntax { .. } | ConfigError::Read { .. })) => {
                println!("{error}");
                Ok(ExitCode::from(1))
            }
        },
    }
}
