//! The `switchboard` command: parses arguments, loads and validates configuration, sets up
//! logging, and hands over to the library (`server`, `policy::origin`, `demo::run`,
//! `demo::voice_echo`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use switchboard::config::{Loaded, Settings};
use switchboard::demo::run::{self as simulate, RemoteOptions};
use switchboard::demo::voice_echo::{self, EchoOptions};
use switchboard::policy::origin::Day;

#[derive(Parser)]
#[command(
    name = "switchboard",
    version,
    about = "A real-time WebSocket hub for live call dashboards"
)]
struct Cli {
    /// Directory holding default.toml and the $SWITCHBOARD_ENV.toml profiles.
    #[arg(long, global = true, default_value = "config")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the hub (the default).
    Serve,
    /// Say whether the loaded configuration admits ORIGIN, and why.
    CheckOrigin { origin: String },
    /// Print the effective configuration (secrets redacted) and every warning.
    Config,
    /// Publish simulated call-status events to a running hub through its HTTP API.
    Simulate {
        /// Base URL of the hub.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// A publish key (api.publish_keys).
        #[arg(
            long,
            env = "SWITCHBOARD_PUBLISH_KEY",
            default_value = "dev-publish-key"
        )]
        key: String,
        #[arg(long, default_value = "demo")]
        org: String,
        #[arg(long, default_value_t = 12.0)]
        calls_per_minute: f64,
        #[arg(long, default_value_t = 30)]
        agents: usize,
        /// Stop after this many seconds (default: run until interrupted).
        #[arg(long)]
        duration_s: Option<u64>,
    },
    /// Answer the voice test page (/voice-test): send every audio frame streamed to
    /// voice:<id>:in back to voice:<id>:out. Clustered (redis.url): straight from Redis, every
    /// org. Embedded: through the hub at --url, for the sessions of --org announced on
    /// voice:lobby:in, logged in with auth.jwt_secret and publishing with api.publish_keys.
    VoiceEcho {
        /// Base URL of the hub (embedded); default http://<server.bind>:<server.port>.
        #[arg(long)]
        url: Option<String>,
        /// The org whose sessions an embedded echo answers.
        #[arg(long, default_value = "demo")]
        org: String,
        /// The Origin its WebSockets present (embedded); default: --url.
        #[arg(long)]
        origin: Option<String>,
    },
}

/// jemalloc rather than glibc malloc: thousands of idle sockets' small allocations cost ~1.1
/// KiB less resident memory each (BENCHMARKS.md, round 2), and its own decay hands freed pages
/// back to the OS, so a node's RSS falls after a reconnect storm without a trimming task.
/// The `system-allocator` feature leaves glibc's in place, for heap profilers that watch
/// `malloc` (heaptrack: BENCHMARKS.md's accounting of an idle socket's bytes).
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main` (the C string `malloc_conf` under the crate's
/// `_rjem_` prefix). Pages freed are handed back to the OS ~0.3 s later by jemalloc's
/// background thread, not after its default 10 s and only when some thread next allocates:
/// a connection ramp frees the HTTP phase's buffers (~14 KiB per handshake in flight, far
/// more of them at once when each waits on Redis) and an idle hub would otherwise keep those
/// pages resident, ~1 KiB per clustered socket (BENCHMARKS.md, idle memory, round 3).
/// `muzzy_decay_ms:0`: purged pages leave RSS at once rather than on memory pressure.
#[cfg(not(feature = "system-allocator"))]
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: &u8 = &b"background_thread:true,dirty_decay_ms:300,muzzy_decay_ms:0\0"[0];

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(&cli.config),
        Command::CheckOrigin { origin } => check_origin(&cli.config, &origin),
        Command::Config => print_config(&cli.config),
        Command::Simulate {
            url,
            key,
            org,
            calls_per_minute,
            agents,
            duration_s,
        } => simulate(RemoteOptions {
            url,
            key,
            org,
            calls_per_minute,
            agents,
            duration: duration_s.map(Duration::from_secs),
        }),
        Command::VoiceEcho { url, org, origin } => {
            voice_echo(&cli.config, EchoOptions { url, org, origin })
        }
    }
}

/// Load the configuration or print every problem, one per line.
fn load(dir: &std::path::Path) -> Result<Loaded, ExitCode> {
    Settings::load(dir).map_err(|errors| {
        eprintln!("{errors}");
        eprintln!(
            "switchboard: {} configuration problem(s); not starting",
            errors.0.len()
        );
        ExitCode::from(2)
    })
}

fn serve(dir: &std::path::Path) -> ExitCode {
    let loaded = match load(dir) {
        Ok(l) => l,
        Err(code) => return code,
    };
    for warning in &loaded.warnings {
        log::warn!("config warning: {warning}");
    }
    let system = actix_web::rt::System::new();
    let result = system.block_on(async move {
        let bound = switchboard::server::bind(loaded).await?;
        bound.run().await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchboard: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check_origin(dir: &std::path::Path, origin: &str) -> ExitCode {
    let loaded = match load(dir) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let policy = &loaded.compiled.origins;
    let today = Day::today();
    println!("{}", policy.explain(origin, today));
    if policy.check(Some(origin), today).is_allowed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn print_config(dir: &std::path::Path) -> ExitCode {
    let loaded = match load(dir) {
        Ok(l) => l,
        Err(code) => return code,
    };
    if let Some(profile) = &loaded.profile {
        println!("# profile: {profile} (SWITCHBOARD_ENV)");
    }
    println!(
        "# mode: {}",
        if loaded.settings.clustered() {
            "clustered"
        } else {
            "embedded"
        }
    );
    print!("{}", loaded.settings.redacted_toml());
    for warning in &loaded.warnings {
        eprintln!("config warning: {warning}");
    }
    ExitCode::SUCCESS
}

fn simulate(options: RemoteOptions) -> ExitCode {
    let system = actix_web::rt::System::new();
    match system.block_on(simulate::run_remote(options)) {
        Ok(accepted) => {
            eprintln!("simulate: {accepted} event(s) accepted");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("simulate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn voice_echo(dir: &std::path::Path, options: EchoOptions) -> ExitCode {
    let loaded = match load(dir) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let system = actix_web::rt::System::new();
    match system.block_on(voice_echo::run(&loaded.settings, options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("voice-echo: {e}");
            ExitCode::FAILURE
        }
    }
}
